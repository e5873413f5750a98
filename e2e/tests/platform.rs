//! Smoke tests of the local test platform: a real control plane
//! (`sluice_testkit::ControlPlane`) and the node agent (`sluice-node-agent`, run as a
//! child process) running the `sluice-e2e-echo` program as pods.
//!
//! The tests share the host's bridge `sluice0` and the pod subnet, so they take a
//! process-wide lock and run one at a time even without `--test-threads=1`. Each test
//! is bounded by [`TEST_TIMEOUT`] and cleans up (agent stopped with SIGTERM, bridge and
//! namespaces removed, control plane stopped) when it fails too.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use sluice_testkit::ControlPlane;

const TEST_TIMEOUT: Duration = Duration::from_secs(360);
const NS: &str = "default";

/// Serializes the tests of this binary: they all use the same bridge and subnet.
static PLATFORM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Control plane + node agent process; stops both on drop.
struct Platform {
    agent: Option<Child>,
    cp: ControlPlane,
    client: kube::Client,
}

impl Platform {
    async fn start() -> Result<Self> {
        let cp = ControlPlane::start().await?;
        let client = cp.client().await?;
        let log = std::fs::File::create(cp.dir().join("node-agent.log"))?;
        // --pdeathsig TERM: if this test process dies, the agent still cleans up.
        let agent = Command::new("setpriv")
            .args(["--pdeathsig", "TERM"])
            .arg(env!("CARGO_BIN_EXE_sluice-node-agent"))
            .arg("--kubeconfig")
            .arg(cp.kubeconfig_path())
            .arg("--image")
            .arg(format!("sluice-e2e-echo={}", env!("CARGO_BIN_EXE_sluice-e2e-echo")))
            .arg("--state-dir")
            .arg(cp.dir().join("node"))
            .env("RUST_LOG", "info,kube=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning sluice-node-agent")?;
        let mut p = Self { agent: Some(agent), cp, client };
        let nodes: Api<Node> = Api::all(p.client.clone());
        // Up to 4 min: another test process's agent may hold the host lock.
        p.wait("node sluice-node Ready", Duration::from_secs(240), || {
            let nodes = nodes.clone();
            async move {
                let ready = nodes
                    .get_opt("sluice-node")
                    .await?
                    .and_then(|n| n.status?.conditions?.into_iter().find(|c| c.type_ == "Ready"));
                Ok(ready.filter(|c| c.status == "True").map(|_| ()))
            }
        })
        .await?;
        Ok(p)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn agent_log(&self) -> String {
        sluice_testkit::cluster::tail(&self.cp.dir().join("node-agent.log"), 40)
    }

    /// Polls `f` every 200 ms until it yields `Some`, failing after `timeout` with the
    /// agent's log tail.
    async fn wait<T, F, Fut>(&mut self, what: &str, timeout: Duration, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            match f().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if let Some(agent) = self.agent.as_mut()
                && let Ok(Some(status)) = agent.try_wait()
            {
                bail!(
                    "node agent exited ({status}) while waiting for {what}:\n{}",
                    self.agent_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what} (last error: {last})\nagent log:\n{}",
                    self.agent_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the pods with `app=<app>` are exactly `n`, all Ready, none terminating.
    async fn wait_ready_pods(&mut self, app: &str, n: usize) -> Result<Vec<Pod>> {
        let api = self.pods();
        let lp = ListParams::default().labels(&format!("app={app}"));
        self.wait(&format!("{n} ready pods of {app}"), Duration::from_secs(60), || {
            let (api, lp) = (api.clone(), lp.clone());
            async move {
                let pods = api.list(&lp).await?.items;
                let ok = pods.len() == n && pods.iter().all(is_ready);
                Ok(ok.then_some(pods))
            }
        })
        .await
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = Command::new("kill").arg("-TERM").arg(agent.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = agent.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        // The agent removes these itself; this covers an agent that was killed.
        sluice_e2e::agent::cleanup_host_if_unused();
    }
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(p: &Pod) -> Result<Ipv4Addr> {
    let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).context("pod without podIP")?;
    Ok(ip.parse()?)
}

fn echo_deployment(name: &str, replicas: i32, version: &str) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"version": version}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "echo",
                        "image": "registry.invalid/sluice/sluice-e2e-echo:test",
                        "env": [
                            {"name": "PORT", "value": "8080"},
                            {"name": "VERSION", "value": version},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                    }],
                },
            },
        },
    }))?)
}

/// `GET path`: the body of a 200 answer (see [`sluice_testkit::http`]).
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    sluice_testkit::http::get_ok(&addr.to_string(), path).await
}

async fn bounded(test: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let _guard = PLATFORM_LOCK.lock().await;
    tokio::time::timeout(TEST_TIMEOUT, test).await.context("test timed out")?
}

/// (a) 3 replicas become 3 Ready pods with distinct IPs that answer HTTP from the host;
/// a crashed container is restarted (restartCount 1) and becomes Ready again.
#[tokio::test]
async fn deployment_pods_become_ready_with_distinct_ips() -> Result<()> {
    bounded(async {
        let mut p = Platform::start().await?;
        let started = Instant::now();
        p.deployments().create(&PostParams::default(), &echo_deployment("echo", 3, "v1")?).await?;
        let pods = p.wait_ready_pods("echo", 3).await?;
        println!("3 pods Ready {:.1?} after create", started.elapsed());

        let ips: BTreeSet<Ipv4Addr> = pods.iter().map(pod_ip).collect::<Result<_>>()?;
        assert_eq!(ips.len(), 3, "distinct pod IPs: {ips:?}");
        for pod in &pods {
            let ip = pod_ip(pod)?;
            assert_eq!(ip.octets()[..3], [198, 18, 0], "pod IP in 198.18.0.0/24: {ip}");
            let body = http_get(SocketAddr::from((ip, 8080)), "/").await?;
            assert_eq!(body.trim(), pod.metadata.name.as_deref().unwrap_or(""), "answer from {ip}");
            println!(
                "{} at {ip} answers {:?}",
                pod.metadata.name.as_deref().unwrap_or(""),
                body.trim()
            );
        }

        // Crash one container: the agent restarts it in the same pod.
        let victim = &pods[0];
        let name = victim.metadata.name.clone().unwrap_or_default();
        let ip = pod_ip(victim)?;
        let pid = http_get(SocketAddr::from((ip, 8080)), "/pid").await?;
        let status = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
        assert!(status.success());
        let api = p.pods();
        p.wait("restarted container Ready", Duration::from_secs(30), || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let pod = api.get(&name).await?;
                let restarts = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .map(|c| c.restart_count)
                    .unwrap_or(0);
                Ok((restarts == 1 && is_ready(&pod)).then_some(()))
            }
        })
        .await?;
        let new_pid = http_get(SocketAddr::from((ip, 8080)), "/pid").await?;
        assert_ne!(new_pid.trim(), pid.trim(), "a new process answers");
        Ok(())
    })
    .await
}

#[derive(Debug, Default)]
struct RolloutStats {
    /// Largest number of non-terminating pods seen at once.
    max_live: usize,
    /// Largest number of pod objects (terminating included) seen at once.
    max_objects: usize,
    /// Smallest number of Ready, non-terminating pods seen once the rollout started.
    min_ready: usize,
    events: usize,
}

/// (b) A template change rolls the pods with maxSurge 0 / maxUnavailable 1: a watch on
/// the pods shows never more than 3 live (non-terminating) pods and never fewer than 2
/// Ready ones, so the new pods replace the old ones one at a time.
#[tokio::test]
async fn rolling_update_keeps_max_surge_0_max_unavailable_1() -> Result<()> {
    bounded(async {
        let mut p = Platform::start().await?;
        p.deployments().create(&PostParams::default(), &echo_deployment("roll", 3, "v1")?).await?;
        let before = p.wait_ready_pods("roll", 3).await?;
        let old: BTreeSet<String> = before.iter().filter_map(|p| p.metadata.name.clone()).collect();

        let stats =
            Arc::new(Mutex::new(RolloutStats { min_ready: usize::MAX, ..Default::default() }));
        let watch_stats = stats.clone();
        let api = p.pods();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let watch = tokio::spawn(async move {
            let cfg = watcher::Config::default().labels("app=roll");
            // The state is only checked between complete lists (after InitDone).
            let mut pods: HashMap<String, Pod> = HashMap::new();
            let mut listing: HashMap<String, Pod> = HashMap::new();
            let mut stream = watcher(api, cfg).boxed();
            let mut started_tx = Some(started_tx);
            while let Some(ev) = stream.try_next().await? {
                match ev {
                    watcher::Event::Apply(pod) => {
                        pods.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                    }
                    watcher::Event::Delete(pod) => {
                        pods.remove(pod.metadata.name.as_deref().unwrap_or(""));
                    }
                    watcher::Event::Init => {
                        listing.clear();
                        continue;
                    }
                    watcher::Event::InitApply(pod) => {
                        listing.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                        continue;
                    }
                    watcher::Event::InitDone => {
                        pods = std::mem::take(&mut listing);
                        if let Some(tx) = started_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                let live =
                    pods.values().filter(|p| p.metadata.deletion_timestamp.is_none()).count();
                let ready = pods.values().filter(|p| is_ready(p)).count();
                let mut s = watch_stats.lock().unwrap();
                s.events += 1;
                s.max_live = s.max_live.max(live);
                s.max_objects = s.max_objects.max(pods.len());
                s.min_ready = s.min_ready.min(ready);
            }
            anyhow::Ok(())
        });
        started_rx.await.context("pod watch did not start")?;

        let started = Instant::now();
        // Strategic merge: the env list merges by name, so only VERSION changes.
        let patch = json!({"spec": {"template": {
            "metadata": {"annotations": {"version": "v2"}},
            "spec": {"containers": [{"name": "echo", "env": [{"name": "VERSION", "value": "v2"}]}]},
        }}});
        p.deployments().patch("roll", &PatchParams::default(), &Patch::Strategic(&patch)).await?;
        let api = p.pods();
        let old_names = old.clone();
        let after = p
            .wait("rollout to v2", Duration::from_secs(120), || {
                let (api, old) = (api.clone(), old_names.clone());
                async move {
                    let pods = api.list(&ListParams::default().labels("app=roll")).await?.items;
                    let done = pods.len() == 3
                        && pods.iter().all(is_ready)
                        && pods
                            .iter()
                            .all(|p| !old.contains(p.metadata.name.as_deref().unwrap_or("")));
                    Ok(done.then_some(pods))
                }
            })
            .await?;
        let elapsed = started.elapsed();
        // Let the watch catch up with the last events.
        tokio::time::sleep(Duration::from_millis(500)).await;
        watch.abort();
        let s = std::mem::take(&mut *stats.lock().unwrap());
        let mut created: Vec<_> = after
            .iter()
            .filter_map(|p| p.metadata.creation_timestamp.clone())
            .map(|t| t.0)
            .collect();
        created.sort();
        println!(
            "rollout took {elapsed:.1?}: {} pod events, max live pods {}, max pod objects {} \
             (terminating included), min ready {}; new pods created at {created:?}",
            s.events, s.max_live, s.max_objects, s.min_ready
        );
        assert!(s.events > 5, "the watch saw the rollout ({} events)", s.events);
        assert!(s.max_live <= 3, "maxSurge 0: never more than 3 live pods, saw {}", s.max_live);
        // A pod being terminated (deletionTimestamp set, process still stopping) is not
        // counted by the ReplicaSet controller, as in any cluster: at most one of them.
        assert!(s.max_objects <= 4, "at most 3 live + 1 terminating pods, saw {}", s.max_objects);
        assert!(s.min_ready >= 2, "maxUnavailable 1: at least 2 Ready pods, saw {}", s.min_ready);
        // Creation timestamps have 1 s resolution, so they are printed, not compared;
        // "one at a time" follows from max_live <= 3 and min_ready >= 2 above.
        assert_eq!(created.len(), 3);
        for pod in &after {
            let ip = pod_ip(pod)?;
            assert_eq!(http_get(SocketAddr::from((ip, 8080)), "/env/VERSION").await?, "v2");
        }
        Ok(())
    })
    .await
}

/// (c) Deleting the Deployment garbage-collects its ReplicaSet and pods (the real
/// controller-manager's owner-reference GC), the processes exit and the pod network
/// namespaces are removed.
#[tokio::test]
async fn deleting_deployment_collects_pods_and_stops_processes() -> Result<()> {
    bounded(async {
        let mut p = Platform::start().await?;
        p.deployments().create(&PostParams::default(), &echo_deployment("gc", 3, "v1")?).await?;
        let pods = p.wait_ready_pods("gc", 3).await?;
        let mut pids = Vec::new();
        for pod in &pods {
            let pid = http_get(SocketAddr::from((pod_ip(pod)?, 8080)), "/pid").await?;
            pids.push(pid.trim().to_string());
        }
        for pid in &pids {
            assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} runs");
        }
        let started = Instant::now();
        p.deployments().delete("gc", &DeleteParams::background()).await?;
        let api = p.pods();
        p.wait("pods garbage-collected", Duration::from_secs(60), || {
            let api = api.clone();
            async move {
                let left = api.list(&ListParams::default().labels("app=gc")).await?.items;
                Ok(left.is_empty().then_some(()))
            }
        })
        .await?;
        println!("pods gone {:.1?} after deleting the Deployment", started.elapsed());
        for pid in &pids {
            // A zombie would still have a /proc entry; the agent reaps its children.
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "process {pid} exited"
            );
        }
        let netns = Command::new("ip").args(["netns", "list"]).output()?;
        let netns = String::from_utf8_lossy(&netns.stdout);
        assert!(!netns.contains("sluice-p"), "pod namespaces removed: {netns}");
        Ok(())
    })
    .await
}

/// A Service over the Deployment is reachable at clusterIP:port through the agent's
/// forwarder, round-robin over all ready pods; pods get configMap volumes (updated in
/// place), downward-API env and their ServiceAccount's identity via KUBECONFIG, which
/// RBAC checks for real.
#[tokio::test]
async fn service_forwarder_volumes_and_service_account_identity() -> Result<()> {
    bounded(async {
        let mut p = Platform::start().await?;
        let client = p.client.clone();
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), NS);
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web-conf"}, "data": {"greeting": "hello v1"}}))?,
        )
        .await?;
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), NS);
        sas.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "web"}}))?)
            .await?;
        let mut dep = serde_json::to_value(echo_deployment("web", 3, "v1")?)?;
        let spec = &mut dep["spec"]["template"]["spec"];
        spec["serviceAccountName"] = json!("web");
        spec["volumes"] = json!([{"name": "conf", "configMap": {"name": "web-conf"}}]);
        spec["containers"][0]["volumeMounts"] = json!([{"name": "conf", "mountPath": "/etc/sluice-e2e-web"}]);
        p.deployments().create(&PostParams::default(), &serde_json::from_value(dep)?).await?;
        let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))?;
        let svc = svcs.create(&PostParams::default(), &svc).await?;
        let cluster_ip: Ipv4Addr =
            svc.spec.and_then(|s| s.cluster_ip).context("no clusterIP")?.parse()?;
        assert_eq!(cluster_ip.octets()[..3], [198, 19, 0], "cluster IP in 198.19.0.0/24");
        let pods = p.wait_ready_pods("web", 3).await?;
        let names: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();

        // The forwarder follows the EndpointSlice: wait until all 3 pods answer.
        let addr = SocketAddr::from((cluster_ip, 80));
        let seen = p
            .wait("all pods behind the Service", Duration::from_secs(30), || async move {
                let mut seen = BTreeMap::new();
                for _ in 0..9 {
                    let body = http_get(addr, "/").await?;
                    *seen.entry(body.trim().to_string()).or_insert(0) += 1;
                }
                Ok((seen.len() == 3).then_some(seen))
            })
            .await?;
        println!("{addr} answered by {seen:?}");
        assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), names);

        // configMap volume: mounted at its mountPath inside the pod, updated in place.
        let ip = pod_ip(&pods[0])?;
        let pod_addr = SocketAddr::from((ip, 8080));
        assert_eq!(http_get(pod_addr, "/file/etc/sluice-e2e-web/greeting").await?, "hello v1");
        let patch = json!({"data": {"greeting": "hello v2"}});
        cms.patch("web-conf", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        p.wait("configMap update visible in the pod", Duration::from_secs(20), || async move {
            Ok((http_get(pod_addr, "/file/etc/sluice-e2e-web/greeting").await? == "hello v2").then_some(()))
        })
        .await?;

        // ServiceAccount identity: the pod's KUBECONFIG, used from inside its network
        // namespace (API server through the bridge), authenticates as the SA.
        let kubeconfig = http_get(pod_addr, "/env/KUBECONFIG").await?;
        let netns = format!("sluice-p{}", ip.octets()[3]);
        let kubectl = |args: &[&str]| -> Result<(bool, String)> {
            let out = Command::new("ip")
                .args(["netns", "exec", &netns, "kubectl", "--kubeconfig", &kubeconfig])
                .args(args)
                .output()?;
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            Ok((out.status.success(), text))
        };
        let (ok, who) = kubectl(&["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"])?;
        assert!(ok, "whoami: {who}");
        assert_eq!(who.trim(), "system:serviceaccount:default:web");
        let (ok, denied) = kubectl(&["get", "pods"])?;
        assert!(!ok && denied.contains("forbidden"), "RBAC denies by default: {denied}");
        let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), NS);
        roles
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "pod-reader"},
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
                }))?,
            )
            .await?;
        let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(client.clone(), NS);
        bindings
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "web-reads-pods"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                    "subjects": [{"kind": "ServiceAccount", "name": "web", "namespace": NS}],
                }))?,
            )
            .await?;
        p.wait("RBAC grant takes effect", Duration::from_secs(20), || {
            let kubectl = &kubectl;
            async move {
                let (ok, out) = kubectl(&["get", "pods", "-o", "name"])?;
                Ok((ok && out.contains("pod/web-")).then_some(()))
            }
        })
        .await?;
        Ok(())
    })
    .await
}

/// The agent also runs in-process (`agent::run(config, shutdown)`): a bare pod whose
/// `command` is a host program (`sh`) with `restartPolicy: Never` ends `Succeeded`, and
/// shutting the agent down removes the bridge. Then the same with `agent::AgentHandle`
/// (own thread), whose drop stops the agent and cleans up synchronously.
#[tokio::test]
async fn in_process_agent_runs_a_pod_to_completion() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start().await?;
        let client = cp.client().await?;
        let mut config = sluice_e2e::agent::AgentConfig::new(cp.kubeconfig_path());
        config.state_dir = Some(cp.dir().join("node"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(sluice_e2e::agent::run(config, async move {
            let _ = stop_rx.await;
        }));
        let pods: Api<Pod> = Api::namespaced(client, NS);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "once"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "once",
                    "image": "not-mapped",
                    "command": ["sh", "-c", "test \"$POD_NS\" = default && test -n \"$KUBECONFIG\""],
                    "env": [{"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                }],
            },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let phase = loop {
            let phase = pods.get("once").await?.status.and_then(|s| s.phase).unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" || Instant::now() > deadline {
                break phase;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = stop_tx.send(());
        agent.await??;
        assert_eq!(phase, "Succeeded", "log: {}", sluice_testkit::cluster::tail(&cp.dir().join("node/logs/default_once.log"), 20));
        let bridge = Command::new("ip").args(["link", "show", "sluice0"]).output()?;
        assert!(!bridge.status.success(), "bridge removed on shutdown");

        let config = sluice_e2e::agent::AgentConfig::new(cp.kubeconfig_path())
            .image("sluice-e2e-echo", env!("CARGO_BIN_EXE_sluice-e2e-echo"));
        let handle = sluice_e2e::agent::AgentHandle::start(config)?;
        let echo: Pod = serde_json::from_value(json!({
            "metadata": {"name": "echo"},
            "spec": {"containers": [{"name": "echo", "image": "sluice-e2e-echo"}]},
        }))?;
        pods.create(&PostParams::default(), &echo).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let ip = loop {
            let pod = pods.get("echo").await?;
            if is_ready(&pod) {
                break pod_ip(&pod)?;
            }
            assert!(handle.is_running() && Instant::now() < deadline, "echo pod not ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let pid = http_get(SocketAddr::from((ip, 8080)), "/pid").await?;
        drop(handle);
        assert!(!std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(), "pod process stopped");
        let bridge = Command::new("ip").args(["link", "show", "sluice0"]).output()?;
        assert!(!bridge.status.success(), "bridge removed when the handle is dropped");
        Ok(())
    })
    .await
}
