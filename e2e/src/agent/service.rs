//! Services without kube-proxy: for each TCP port of each Service with a cluster IP,
//! the cluster IP is added as a /32 on the bridge and a forwarder listens on
//! `clusterIP:port`, passing each accepted connection to the next ready endpoint
//! (round-robin) from the Service's EndpointSlices, which the real
//! controller-manager maintains.
//!
//! # Guarantees
//! - Only endpoints whose `ready` condition is not `false` receive new connections;
//!   when a connect fails the next endpoint is tried (each at most once).
//! - A connection with no ready endpoint is closed at once.
//! - Established connections are not cut when endpoints change.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::net::{Mode, Network};

type Key = (String, String, i32);

struct Forwarder {
    ip: Ipv4Addr,
    targets: Arc<RwLock<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

/// The forwarders of all Services; see the module docs.
#[derive(Default)]
pub struct Services {
    fwd: HashMap<Key, Forwarder>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("forwarders", &self.fwd.len()).finish()
    }
}

/// Ready endpoints of one Service port, from its EndpointSlices.
pub fn ready_endpoints(
    svc_ns: &str,
    svc_name: &str,
    port_name: Option<&str>,
    slices: &[Arc<EndpointSlice>],
) -> Vec<SocketAddr> {
    let port_name = port_name.unwrap_or("");
    let mut out = Vec::new();
    for s in slices {
        let labels = s.metadata.labels.as_ref();
        let owner = labels.and_then(|l| l.get("kubernetes.io/service-name"));
        if s.metadata.namespace.as_deref() != Some(svc_ns)
            || owner.map(String::as_str) != Some(svc_name)
        {
            continue;
        }
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in &s.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<Ipv4Addr>() {
                    out.push(SocketAddr::from((ip, port)));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Ready endpoints of one Service port from the pods its selector matches: the
/// loopback fallback, where the API server refuses 127.0.1.x in EndpointSlices.
pub fn ready_pod_endpoints(
    svc: &Service,
    port: &ServicePort,
    pods: &[Arc<Pod>],
) -> Vec<SocketAddr> {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pod in pods {
        let labels = pod.metadata.labels.as_ref();
        let matches = pod.metadata.namespace == svc.metadata.namespace
            && selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        let ready = pod.metadata.deletion_timestamp.is_none()
            && pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()?.parse::<Ipv4Addr>().ok());
        let (true, true, Some(ip)) = (matches, ready, ip) else { continue };
        let target = match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(p)) => Some(*p),
            Some(IntOrString::String(name)) => pod
                .spec
                .as_ref()
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        };
        if let Some(p) = target.and_then(|p| u16::try_from(p).ok()) {
            out.push(SocketAddr::from((ip, p)));
        }
    }
    out.sort();
    out
}

impl Services {
    /// Makes the forwarders match `services` and their endpoints in `slices` (in
    /// loopback mode: in the ready `pods` their selectors match).
    pub async fn reconcile(
        &mut self,
        net: &Network,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        pods: &[Arc<Pod>],
    ) {
        let mut want: HashMap<Key, (Ipv4Addr, Vec<SocketAddr>)> = HashMap::new();
        for svc in services {
            let (Some(ns), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
                continue;
            };
            let Some(spec) = &svc.spec else { continue };
            let Some(ip) = spec.cluster_ip.as_deref().and_then(|i| i.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            for p in spec.ports.iter().flatten() {
                if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let eps = match net.mode() {
                    Mode::Namespaces => ready_endpoints(ns, name, p.name.as_deref(), slices),
                    Mode::Loopback => ready_pod_endpoints(svc, p, pods),
                };
                want.insert((ns.clone(), name.clone(), p.port), (ip, eps));
            }
        }
        let gone: Vec<Key> = self.fwd.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        for k in gone {
            if let Some(f) = self.fwd.remove(&k) {
                f.task.abort();
                if !self.fwd.values().any(|o| o.ip == f.ip) {
                    net.del_service_ip(f.ip);
                }
                tracing::info!(service = %format!("{}/{}", k.0, k.1), port = k.2, "forwarder removed");
            }
        }
        for (k, (ip, eps)) in want {
            if let Some(f) = self.fwd.get(&k) {
                if f.ip == ip {
                    let mut t = f.targets.write().unwrap_or_else(|p| p.into_inner());
                    if *t != eps {
                        tracing::debug!(service = %format!("{}/{}", k.0, k.1), ?eps, "endpoints changed");
                        *t = eps;
                    }
                    continue;
                }
                if let Some(old) = self.fwd.remove(&k) {
                    old.task.abort();
                }
            }
            match start(net, ip, k.2, eps).await {
                Ok(f) => {
                    tracing::info!(service = %format!("{}/{}", k.0, k.1), %ip, port = k.2, "forwarder listening");
                    self.fwd.insert(k, f);
                }
                Err(e) => tracing::warn!(service = %format!("{}/{}", k.0, k.1), "forwarder: {e:#}"),
            }
        }
    }

    /// Stops every forwarder and removes the cluster IPs.
    pub fn shutdown(&mut self, net: &Network) {
        for (_, f) in self.fwd.drain() {
            f.task.abort();
            net.del_service_ip(f.ip);
        }
    }
}

async fn start(
    net: &Network,
    ip: Ipv4Addr,
    port: i32,
    eps: Vec<SocketAddr>,
) -> anyhow::Result<Forwarder> {
    net.add_service_ip(ip)?;
    let port = u16::try_from(port)?;
    let listener = TcpListener::bind((ip, port)).await?;
    let targets = Arc::new(RwLock::new(eps));
    let t = targets.clone();
    let task = tokio::spawn(async move {
        let next = Arc::new(AtomicUsize::new(0));
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let list = t.read().unwrap_or_else(|p| p.into_inner()).clone();
            let n = next.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(forward(conn, list, n));
        }
    });
    Ok(Forwarder { ip, targets, task })
}

async fn forward(mut conn: TcpStream, targets: Vec<SocketAddr>, start: usize) {
    let _ = conn.set_nodelay(true);
    for i in 0..targets.len() {
        let target = targets[(start + i) % targets.len()];
        let connect =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await;
        if let Ok(Ok(mut upstream)) = connect {
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
            return;
        }
    }
}
