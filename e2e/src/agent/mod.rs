//! A process-backed Kubernetes node: no kubelet, no container runtime, no
//! kube-scheduler, no kube-proxy.
//!
//! [`run`] registers a Node (Ready, generous capacity) and renews its Lease and
//! heartbeat, binds every pending pod without a nodeName to itself (Binding
//! subresource), runs each bound pod's first container as a local process in the pod's
//! own network namespace ([`pod`]), and serves Services on their cluster IPs with
//! round-robin TCP forwarders over ready EndpointSlice endpoints ([`service`]).
//!
//! See `docs/test-platform.md` for the full picture and how to run it by hand.
//!
//! # Guarantees
//! - When `shutdown` resolves, every pod process gets SIGTERM (at most 10 s of grace,
//!   then SIGKILL), forwarders stop, and the bridge and every `sluice-p*` namespace
//!   are deleted before [`run`] returns. Pod objects are left in the API.
//! - Pod processes die with the agent process (`setpriv --pdeathsig KILL`), even when
//!   the agent is killed with SIGKILL; the next agent removes leftover namespaces.
//!
//! # Assumptions
//! - One agent per machine at a time: it owns `sluice0` and 198.18.0.0/24, and a
//!   second agent waits on the `flock` of [`net::LOCK_PATH`] until the first exits.
//! - It runs as root with `ip`, `setpriv`, `unshare`, `mount` and `kill` on the PATH.

pub mod fields;
pub mod mounts;
pub mod net;
pub mod pod;
pub mod service;
pub mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use net::{cleanup_host, cleanup_host_if_unused};
pub use sluice_testkit::cluster::{BRIDGE_IP, KUBERNETES_SERVICE_IP};

const HEARTBEAT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(200);

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Kubeconfig with rights to nodes, pods, bindings, leases, serviceaccounts/token,
    /// configmaps, secrets, services and endpointslices (the admin kubeconfig will do).
    pub kubeconfig: PathBuf,
    /// Name of the Node object (default `sluice-node`).
    pub node_name: String,
    /// Image name (last path segment, no registry or tag) → local binary.
    pub images: HashMap<String, PathBuf>,
    /// Where pod directories and logs (`logs/<ns>_<pod>.log`) go; a temporary directory
    /// removed on shutdown when `None` (kept with `SLUICE_KEEP_CLUSTER=1`).
    pub state_dir: Option<PathBuf>,
    /// Skip network namespaces and give each pod a loopback IP (127.0.1.x).
    pub loopback_only: bool,
    /// How long to wait for another agent on this machine to exit (default 5 min).
    pub lock_timeout: Duration,
}

impl AgentConfig {
    /// A config with the default node name, no images and a temporary state dir.
    pub fn new(kubeconfig: impl Into<PathBuf>) -> Self {
        Self {
            kubeconfig: kubeconfig.into(),
            node_name: "sluice-node".into(),
            images: HashMap::new(),
            state_dir: None,
            loopback_only: false,
            lock_timeout: Duration::from_secs(300),
        }
    }

    /// Maps an image name to a binary.
    pub fn image(mut self, name: impl Into<String>, bin: impl Into<PathBuf>) -> Self {
        self.images.insert(name.into(), bin.into());
        self
    }

    /// Maps images from `NAME=PATH` command-line specs (paths made absolute).
    ///
    /// # Errors
    /// A spec without `=`, or a path that does not exist.
    pub fn image_specs(mut self, specs: &[String]) -> Result<Self> {
        for spec in specs {
            let (name, path) = spec
                .split_once('=')
                .with_context(|| format!("--image {spec}: expected NAME=PATH"))?;
            let path = std::fs::canonicalize(path).with_context(|| format!("--image {spec}"))?;
            self = self.image(name, path);
        }
        Ok(self)
    }
}

/// State shared by the agent's tasks.
pub struct Shared {
    client: Client,
    net: net::Network,
    images: HashMap<String, PathBuf>,
    state_dir: PathBuf,
    pod_api_server: String,
    ca_pem: String,
    mounts: mounts::MountPoints,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("state_dir", &self.state_dir).finish()
    }
}

struct Worker {
    tx: watch::Sender<Option<Pod>>,
    version: Option<String>,
    task: JoinHandle<()>,
}

/// Runs the node until `shutdown` resolves; see the module docs.
///
/// # Errors
/// When the kubeconfig is unusable or the Node cannot be registered. Errors of single
/// pods are logged and retried, never returned.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let client = sluice_testkit::client_from_kubeconfig(&config.kubeconfig).await?;
    let (server, ca_pem) = api_server_and_ca(&config.kubeconfig)?;
    let _host_lock = net::acquire_host_lock(config.lock_timeout).await?;
    let net = if config.loopback_only {
        tracing::error!("LOOPBACK MODE requested: pods get 127.0.1.x and share the host network");
        cleanup_host();
        net::Network::fallback()
    } else {
        net::Network::setup(BRIDGE_IP)
    };
    // Pods reach the API server through the bridge (its port is open on 0.0.0.0).
    let pod_api_server = match net.mode() {
        net::Mode::Namespaces => {
            let port = server.rsplit(':').next().unwrap_or("443").trim_end_matches('/');
            format!("https://{BRIDGE_IP}:{port}")
        }
        net::Mode::Loopback => server.clone(),
    };
    let (state_dir, tmp) = match &config.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("sluice-node-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    tracing::info!(state_dir = %state_dir.display(), node = %config.node_name, "node agent starting");
    let shared = Arc::new(Shared {
        client: client.clone(),
        net,
        images: config.images.clone(),
        state_dir,
        pod_api_server,
        ca_pem,
        mounts: mounts::MountPoints::default(),
    });
    let stop = CancellationToken::new();
    let result = run_inner(&config, shared.clone(), stop.clone(), shutdown).await;
    stop.cancel();
    cleanup_host();
    if let Some(t) = tmp
        && sluice_testkit::cluster::keep_requested()
    {
        eprintln!("SLUICE_KEEP_CLUSTER=1: kept node state dir {}", t.keep().display());
    }
    tracing::info!("node agent stopped");
    result
}

async fn run_inner(
    config: &AgentConfig,
    shared: Arc<Shared>,
    stop: CancellationToken,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let client = shared.client.clone();
    register_node(&client, &config.node_name).await.context("registering the Node")?;
    let heartbeat = tokio::spawn(heartbeat(client.clone(), config.node_name.clone(), stop.clone()));

    let (pods, pods_w) = reflector::store::<Pod>();
    let (svcs, svcs_w) = reflector::store::<Service>();
    let (slices, slices_w) = reflector::store::<EndpointSlice>();
    let cfg = watcher::Config::default();
    let mut watchers = vec![
        tokio::spawn(
            reflector(pods_w, watcher(Api::<Pod>::all(client.clone()), cfg.clone()))
                .default_backoff()
                .for_each(|_| async {}),
        ),
        tokio::spawn(
            reflector(svcs_w, watcher(Api::<Service>::all(client.clone()), cfg.clone()))
                .default_backoff()
                .for_each(|_| async {}),
        ),
        tokio::spawn(
            reflector(slices_w, watcher(Api::<EndpointSlice>::all(client.clone()), cfg))
                .default_backoff()
                .for_each(|_| async {}),
        ),
    ];
    pods.wait_until_ready().await.ok();
    svcs.wait_until_ready().await.ok();
    slices.wait_until_ready().await.ok();
    tracing::info!(node = %config.node_name, "node agent ready");

    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut bind_attempts: HashMap<String, Instant> = HashMap::new();
    let mut services = service::Services::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(TICK) => {}
        }
        let state = pods.state();
        let mut seen = std::collections::HashSet::new();
        for p in &state {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            match node {
                None => {
                    if should_bind(p)
                        && bind_attempts
                            .get(&uid)
                            .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
                    {
                        bind_attempts.insert(uid.clone(), Instant::now());
                        bind(&client, p, &config.node_name).await;
                    }
                }
                Some(n) if n == config.node_name => {
                    seen.insert(uid.clone());
                    let version = p.metadata.resource_version.clone();
                    match workers.get_mut(&uid) {
                        Some(w) if w.version != version => {
                            w.version = version;
                            w.tx.send_replace(Some((**p).clone()));
                        }
                        Some(_) => {}
                        None if !is_terminal(p) || p.metadata.deletion_timestamp.is_some() => {
                            let (tx, rx) = watch::channel(Some((**p).clone()));
                            let task = tokio::spawn(pod::run(shared.clone(), rx, stop.clone()));
                            workers.insert(uid, Worker { tx, version, task });
                        }
                        None => {}
                    }
                }
                Some(_) => {}
            }
        }
        bind_attempts.retain(|uid, _| state.iter().any(|p| p.metadata.uid.as_deref() == Some(uid)));
        for (uid, w) in &workers {
            if !seen.contains(uid) && w.tx.borrow().is_some() {
                w.tx.send_replace(None);
            }
        }
        // A worker that finished while its pod still exists (e.g. a failed setup) is
        // restarted on the next tick, unless the pod object is gone.
        workers.retain(|_, w| !w.task.is_finished());
        services.reconcile(&shared.net, &svcs.state(), &slices.state(), &state).await;
    }

    tracing::info!("node agent shutting down: stopping pods");
    stop.cancel();
    for (_, w) in workers.drain() {
        let _ = tokio::time::timeout(Duration::from_secs(15), w.task).await;
    }
    services.shutdown(&shared.net);
    heartbeat.abort();
    for w in watchers.drain(..) {
        w.abort();
    }
    Ok(())
}

/// A node agent on its own thread and tokio runtime, so that stopping it can wait for
/// its cleanup from synchronous code: dropping the handle (e.g. in a test fixture's
/// `Drop`, even while a test unwinds) cancels the agent and blocks until it has stopped
/// the pod processes and removed the bridge and namespaces.
#[derive(Debug)]
pub struct AgentHandle {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl AgentHandle {
    /// Starts [`run`] with `config` on a new thread.
    ///
    /// # Errors
    /// When the thread or its runtime cannot be created.
    pub fn start(config: AgentConfig) -> Result<Self> {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new()
            .name("sluice-node-agent".into())
            .spawn(move || runtime.block_on(run(config, token.cancelled_owned())))?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Whether the agent still runs (it stops on its own only after an error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the agent, waits for its cleanup and returns how it ended.
    ///
    /// # Errors
    /// The agent's own error, or a panic of its thread.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        self.stop.cancel();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("node agent thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!("node agent: {e:#}");
        }
    }
}

fn should_bind(p: &Pod) -> bool {
    let scheduler = p.spec.as_ref().and_then(|s| s.scheduler_name.as_deref());
    p.metadata.deletion_timestamp.is_none()
        && !is_terminal(p)
        && matches!(scheduler, None | Some("default-scheduler"))
}

fn is_terminal(p: &Pod) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

async fn bind(client: &Client, p: &Pod, node: &str) {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let binding = Binding {
        metadata: ObjectMeta { name: Some(name.clone()), uid: None, ..Default::default() },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    match api
        .create_subresource::<_, serde_json::Value>(
            "binding",
            &name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), node, "bound"),
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), "binding failed: {e}"),
    }
}

fn node_status(node: &str) -> serde_json::Value {
    let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default();
    let cond = |ty: &str, status: &str, reason: &str| {
        json!({"type": ty, "status": status, "reason": reason, "message": reason,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let capacity =
        json!({"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "500Gi"});
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("Ready", "True", "SluiceNodeAgentReady"),
            cond("MemoryPressure", "False", "SluiceNodeAgent"),
            cond("DiskPressure", "False", "SluiceNodeAgent"),
            cond("PIDPressure", "False", "SluiceNodeAgent"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": BRIDGE_IP.to_string()},
            {"type": "Hostname", "address": node},
        ],
        "nodeInfo": {
            "machineID": "sluice", "systemUUID": "sluice", "bootID": "sluice",
            "kernelVersion": "", "osImage": "sluice process node",
            "containerRuntimeVersion": "sluice-node-agent://0.1", "kubeletVersion": "v1.34.4",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    })
}

async fn register_node(client: &Client, node: &str) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let body: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "labels": {
            "kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "node.sluice.dev/process-node": "true",
        }},
        "spec": {},
    }))?;
    if api.get_opt(node).await?.is_none() {
        api.create(&PostParams::default(), &body).await?;
    }
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": node_status(node)})),
    )
    .await?;
    renew_lease(client, node).await?;
    Ok(())
}

async fn renew_lease(client: &Client, node: &str) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = serde_json::to_value(MicroTime(k8s_openapi::jiff::Timestamp::now()))?;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": renew},
    });
    let pp = PatchParams::apply("sluice-node-agent").force();
    api.patch(node, &pp, &Patch::Apply(lease)).await?;
    Ok(())
}

async fn heartbeat(client: Client, node: String, stop: CancellationToken) {
    let api: Api<Node> = Api::all(client.clone());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        if let Err(e) = renew_lease(&client, &node).await {
            tracing::warn!("lease renewal failed: {e}");
        }
        let patch = json!({"status": node_status(&node)});
        if let Err(e) = api.patch_status(&node, &PatchParams::default(), &Patch::Merge(patch)).await
        {
            tracing::warn!("node heartbeat failed: {e}");
        }
    }
}

/// The server URL and CA (PEM) of the kubeconfig's current context.
fn api_server_and_ca(path: &std::path::Path) -> Result<(String, String)> {
    let kc = kube::config::Kubeconfig::read_from(path)?;
    let ctx_name = kc.current_context.clone().context("kubeconfig has no current-context")?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.clone())
        .context("current context not found")?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.clone())
        .context("cluster of the current context not found")?;
    let server = cluster.server.clone().context("cluster without server")?;
    let ca = if let Some(data) = &cluster.certificate_authority_data {
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data.trim())?)?
    } else if let Some(file) = &cluster.certificate_authority {
        std::fs::read_to_string(file).with_context(|| format!("reading CA {file}"))?
    } else {
        anyhow::bail!("kubeconfig cluster has no CA");
    };
    Ok((server, ca))
}
