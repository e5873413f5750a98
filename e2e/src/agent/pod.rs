//! One pod's life on this node: network identity, volumes, ServiceAccount kubeconfig,
//! the container process, readiness, status reports, restarts and termination.
//!
//! Only the pod's first container runs (others are reported as not started and logged).
//!
//! # How a container runs
//! ```text
//! setpriv --pdeathsig KILL  ip netns exec sluice-p<n>  sh -c '<bind mounts>; exec "$@"' pod <binary> <args>
//! ```
//! `ip netns exec` enters the pod's network namespace and a private mount namespace
//! (mounts are slave to the host's, never propagated back), where each volumeMount's
//! per-pod directory is bind-mounted onto its `mountPath` (a missing mount point is
//! created on the host file system, empty). The process is the leader of its own
//! process group; signals go to the group. `--pdeathsig` kills it if the agent dies.
//!
//! # Termination
//! When the pod gets a deletionTimestamp: Ready turns false, SIGTERM, wait the grace
//! period (deletionGracePeriodSeconds, else terminationGracePeriodSeconds, else 30 s),
//! SIGKILL, release network and directory, then delete the pod object with grace 0.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::fields::{expand, field_value, image_name, key, shell_quote};
use super::net::PodNet;
use super::volumes::{self, Content, Files};

mod probe;
mod status;

const TOKEN_REFRESH: Duration = Duration::from_secs(20 * 60);
const VOLUME_REFRESH: Duration = Duration::from_secs(1);

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

/// State of the one container, as reported in `containerStatuses`.
#[derive(Debug, Default)]
struct ContainerState {
    child: Option<Child>,
    pid: Option<u32>,
    started_at: Option<Value>,
    restart_count: i32,
    last_terminated: Option<Value>,
    waiting_reason: Option<(String, String)>,
    ready: bool,
    probe_ok: i32,
    probe_fail: i32,
    next_probe: Option<Instant>,
    next_start: Option<Instant>,
    backoff: Duration,
    /// Set for restartPolicy Never/OnFailure once the pod is done (phase).
    finished: Option<&'static str>,
}

struct PodRun {
    shared: Arc<Shared>,
    pod: Pod,
    dir: PathBuf,
    net: Option<PodNet>,
    volumes: HashMap<String, Files>,
    token: Option<(String, Instant)>,
    c: ContainerState,
    start_time: Value,
    transitions: BTreeMap<&'static str, (bool, Value)>,
    last_status: Value,
}

/// Runs the pod received on `rx` until it is deleted (`None` on the channel, or a
/// deletionTimestamp) or `shutdown` fires; always releases its network and directory.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Option<Pod>>,
    shutdown: CancellationToken,
) {
    let Some(pod) = rx.borrow_and_update().clone() else { return };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = shared.state_dir.join("pods").join(&uid);
    let mut run = PodRun {
        shared,
        pod,
        dir,
        net: None,
        volumes: HashMap::new(),
        token: None,
        c: ContainerState { backoff: Duration::from_secs(1), ..Default::default() },
        start_time: now(),
        transitions: BTreeMap::new(),
        last_status: Value::Null,
    };
    let k = key(&run.pod);
    tracing::info!(pod = %k, "starting pod");
    let outcome = run.main(&mut rx, &shutdown).await;
    match outcome {
        Ok(delete) => {
            run.cleanup();
            if delete {
                run.delete_object().await;
            }
        }
        Err(e) => {
            tracing::error!(pod = %k, "pod worker failed: {e:#}");
            run.kill_now().await;
            run.cleanup();
            // The agent starts a new worker for the pod on its next tick; pace retries.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
    tracing::info!(pod = %k, "pod gone from node");
}

impl PodRun {
    fn client(&self) -> Client {
        self.shared.client.clone()
    }

    fn ns(&self) -> String {
        self.pod.metadata.namespace.clone().unwrap_or_else(|| "default".into())
    }

    fn name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    fn container(&self) -> Option<&Container> {
        self.pod.spec.as_ref().and_then(|s| s.containers.first())
    }

    /// Returns `Ok(true)` when the pod object should be deleted (graceful deletion done).
    async fn main(
        &mut self,
        rx: &mut watch::Receiver<Option<Pod>>,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        self.setup().await?;
        let mut refresh = tokio::time::interval(VOLUME_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Deletion or shutdown first.
            if shutdown.is_cancelled() {
                self.terminate(Some(10)).await;
                return Ok(false);
            }
            let latest = rx.borrow_and_update().clone();
            let Some(latest) = latest else {
                // Force-deleted from the API: stop at once.
                self.kill_now().await;
                return Ok(false);
            };
            self.pod = latest;
            if self.pod.metadata.deletion_timestamp.is_some() {
                let grace = self
                    .pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or_else(|| self.pod.spec.as_ref()?.termination_grace_period_seconds);
                self.c.ready = false;
                self.report().await;
                self.terminate(grace).await;
                return Ok(true);
            }

            if self.c.child.is_none() && self.c.finished.is_none() {
                let due = self.c.next_start.is_none_or(|t| Instant::now() >= t);
                if due && let Err(e) = self.spawn().await {
                    tracing::warn!(pod = %key(&self.pod), "cannot start container: {e:#}");
                    self.c.waiting_reason = Some(("CreateContainerError".into(), format!("{e:#}")));
                    self.c.next_start = Some(Instant::now() + Duration::from_secs(3));
                }
            }
            self.report().await;

            let probe_at = self.c.next_probe;
            let start_at = self.c.next_start.filter(|_| self.c.child.is_none());
            let child = self.c.child.as_mut();
            tokio::select! {
                status = async move {
                    match child { Some(c) => c.wait().await, None => std::future::pending().await }
                } => self.on_exit(status),
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The agent dropped this pod's channel: it is going away.
                        self.terminate(Some(10)).await;
                        return Ok(false);
                    }
                }
                _ = shutdown.cancelled() => {}
                _ = sleep_until(probe_at) => self.probe().await,
                _ = sleep_until(start_at) => {}
                _ = refresh.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(pod = %key(&self.pod), "refreshing volumes: {e:#}");
                    }
                }
            }
        }
    }

    async fn setup(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("volumes"))?;
        std::fs::create_dir_all(self.shared.state_dir.join("logs"))?;
        let net = self.shared.net.allocate(super::BRIDGE_IP)?;
        tracing::info!(pod = %key(&self.pod), ip = %net.ip, netns = ?net.netns, "pod network ready");
        self.net = Some(net);
        Ok(())
    }

    fn ip(&self) -> Option<Ipv4Addr> {
        self.net.as_ref().map(|n| n.ip)
    }

    /// Requests (or refreshes) the ServiceAccount token and writes `kubeconfig`.
    async fn ensure_token(&mut self) -> Result<Option<String>> {
        let spec = self.pod.spec.as_ref().context("pod without spec")?;
        if spec.automount_service_account_token == Some(false) {
            return Ok(None);
        }
        let sa = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
        if let Some((t, at)) = &self.token
            && at.elapsed() < TOKEN_REFRESH
        {
            return Ok(Some(t.clone()));
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), &self.ns());
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: self.pod.metadata.name.clone(),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let resp: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .with_context(|| format!("TokenRequest for serviceaccount {}/{sa}", self.ns()))?;
        let token = resp.status.map(|s| s.token).context("TokenRequest without status")?;
        let ca = self.dir.join("ca.crt");
        std::fs::write(&ca, &self.shared.ca_pem)?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sluice\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {sa}\n  user:\n    token: {token}\ncontexts:\n- name: sluice\n  context:\n    cluster: sluice\n    user: {sa}\n    namespace: {}\ncurrent-context: sluice\n",
            self.shared.pod_api_server,
            ca.display(),
            self.ns(),
        );
        let tmp = self.dir.join(".kubeconfig.tmp");
        std::fs::write(&tmp, kubeconfig)?;
        std::fs::rename(&tmp, self.dir.join("kubeconfig"))?;
        self.token = Some((token.clone(), Instant::now()));
        Ok(Some(token))
    }

    /// Re-resolves file volumes and rewrites those whose content changed.
    async fn refresh(&mut self) -> Result<()> {
        let token = self.ensure_token().await?;
        let vols = self.pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
        for vol in vols {
            let dir = self.dir.join("volumes").join(&vol.name);
            match volumes::resolve(&self.client(), &self.pod, &vol, token.as_deref()).await? {
                Content::Files(files) => {
                    if self.volumes.get(&vol.name) != Some(&files) {
                        volumes::write_atomic(&dir, &files)?;
                        if self.volumes.contains_key(&vol.name) {
                            tracing::info!(pod = %key(&self.pod), volume = %vol.name, "volume updated");
                        }
                        self.volumes.insert(vol.name.clone(), files);
                    }
                }
                Content::Empty => std::fs::create_dir_all(&dir)?,
            }
        }
        Ok(())
    }

    async fn env(&self, c: &Container, token: bool) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("HOSTNAME".into(), self.name()),
            ("HOME".into(), "/root".into()),
            ("KUBERNETES_SERVICE_HOST".into(), super::KUBERNETES_SERVICE_IP.to_string()),
            ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        ];
        for var in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(var) {
                env.push((var.into(), v));
            }
        }
        if token {
            env.push(("KUBECONFIG".into(), self.dir.join("kubeconfig").display().to_string()));
        }
        let ns = self.ns();
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                let api: Api<ConfigMap> = Api::namespaced(self.client(), &ns);
                match api.get_opt(&r.name).await? {
                    Some(cm) => env.extend(
                        cm.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (format!("{prefix}{k}"), v)),
                    ),
                    None if r.optional == Some(true) => {}
                    None => bail!("configmap {ns}/{} not found (envFrom)", r.name),
                }
            }
            if let Some(r) = &from.secret_ref {
                let api: Api<Secret> = Api::namespaced(self.client(), &ns);
                match api.get_opt(&r.name).await? {
                    Some(s) => env.extend(s.data.unwrap_or_default().into_iter().map(|(k, v)| {
                        (format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).to_string())
                    })),
                    None if r.optional == Some(true) => {}
                    None => bail!("secret {ns}/{} not found (envFrom)", r.name),
                }
            }
        }
        for var in c.env.iter().flatten() {
            let value = if let Some(v) = &var.value {
                expand(v, &env)
            } else if let Some(src) = &var.value_from {
                if let Some(f) = &src.field_ref {
                    field_value(&self.pod, &f.field_path, self.ip())
                } else if let Some(r) = &src.config_map_key_ref {
                    let api: Api<ConfigMap> = Api::namespaced(self.client(), &ns);
                    let v =
                        api.get_opt(&r.name).await?.and_then(|cm| cm.data?.get(&r.key).cloned());
                    match v {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => bail!("configmap {ns}/{} key {} not found", r.name, r.key),
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let api: Api<Secret> = Api::namespaced(self.client(), &ns);
                    let v = api.get_opt(&r.name).await?.and_then(|s| s.data?.get(&r.key).cloned());
                    match v {
                        Some(v) => String::from_utf8_lossy(&v.0).to_string(),
                        None if r.optional == Some(true) => continue,
                        None => bail!("secret {ns}/{} key {} not found", r.name, r.key),
                    }
                } else {
                    tracing::warn!(var = %var.name, "unsupported valueFrom");
                    String::new()
                }
            } else {
                String::new()
            };
            env.retain(|(k, _)| k != &var.name);
            env.push((var.name.clone(), value));
        }
        Ok(env)
    }

    /// argv of the container: the mapped binary for the image, then command/args.
    fn argv(&self, c: &Container, env: &[(String, String)]) -> Result<Vec<String>> {
        let image = c.image.clone().unwrap_or_default();
        let name = image_name(&image);
        let mapped = self.shared.images.get(name);
        let command: Vec<String> = c.command.clone().unwrap_or_default();
        let args: Vec<String> =
            c.args.clone().unwrap_or_default().iter().map(|a| expand(a, env)).collect();
        let mut argv = Vec::new();
        match (command.first(), mapped) {
            (None, Some(bin)) => argv.push(bin.display().to_string()),
            (None, None) => {
                bail!("image {image:?} is not mapped to a binary (--image {name}=PATH)")
            }
            (Some(first), Some(bin)) if Path::new(first).file_name().is_some_and(|f| f == name) => {
                argv.push(bin.display().to_string());
                argv.extend(command[1..].iter().map(|a| expand(a, env)));
            }
            (Some(_), _) => argv.extend(command.iter().map(|a| expand(a, env))),
        }
        argv.extend(args);
        Ok(argv)
    }

    /// `(source, mountPath)` bind mounts for the container's volumeMounts.
    fn mounts(&self, c: &Container) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let mut src = self.dir.join("volumes").join(&m.name);
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                src = src.join(sub);
            }
            out.push((src, m.mount_path.clone()));
        }
        out
    }

    async fn spawn(&mut self) -> Result<()> {
        let c = self.container().cloned().context("pod has no containers")?;
        if self.pod.spec.as_ref().is_some_and(|s| s.containers.len() > 1) {
            tracing::warn!(pod = %key(&self.pod), "only the first container runs on this node");
        }
        // Volumes and token must exist before the process starts.
        self.refresh().await?;
        let token = self.token.is_some();
        let env = self.env(&c, token).await?;
        let argv = self.argv(&c, &env)?;
        let mut script = String::new();
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        for (src, target) in self.mounts(&c) {
            self.shared.mounts.ensure(&uid, Path::new(&target), !src.is_dir())?;
            let (src, target) = (shell_quote(&src.display().to_string()), shell_quote(&target));
            // A file source (subPath) needs a file mount point; a directory a directory.
            script.push_str(&format!(
                "if [ -d {src} ]; then mkdir -p {target}; else mkdir -p \"$(dirname {target})\"; [ -e {target} ] || : > {target}; fi; mount --bind {src} {target} || exit 111; "
            ));
        }
        script.push_str("exec \"$@\"");

        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL"]);
        match self.net.as_ref().and_then(|n| n.netns.clone()) {
            Some(ns) => {
                cmd.args(["ip", "netns", "exec"]).arg(ns);
            }
            None => {
                cmd.args(["unshare", "--mount", "--propagation", "slave"]);
            }
        }
        cmd.args(["sh", "-c", &script, "pod"]).args(&argv);
        let log_path =
            self.shared.state_dir.join("logs").join(format!("{}_{}.log", self.ns(), self.name()));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let workdir = c.working_dir.clone().map(PathBuf::from).unwrap_or_else(|| self.dir.clone());
        cmd.env_clear()
            .envs(env)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawning {argv:?}"))?;
        let pid = child.id();
        tracing::info!(pod = %key(&self.pod), ?pid, ?argv, log = %log_path.display(), "container started");
        self.c.child = Some(child);
        self.c.pid = pid;
        self.c.started_at = Some(now());
        self.c.waiting_reason = None;
        self.c.ready = false;
        self.c.probe_ok = 0;
        self.c.probe_fail = 0;
        self.c.next_start = None;
        let delay = self.probe_spec().and_then(|p| p.initial_delay_seconds).unwrap_or(0);
        self.c.next_probe = Some(Instant::now() + Duration::from_secs(delay.max(0) as u64));
        Ok(())
    }

    fn on_exit(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        let code = status
            .as_ref()
            .ok()
            .map(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            })
            .unwrap_or(-1);
        tracing::warn!(pod = %key(&self.pod), code, "container exited");
        self.c.child = None;
        self.c.pid = None;
        self.c.ready = false;
        self.c.next_probe = None;
        self.c.last_terminated = Some(json!({"terminated": {
            "exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": self.c.started_at.clone(),
            "finishedAt": now(),
        }}));
        let policy = self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
        let restart = match policy.as_deref() {
            Some("Never") => false,
            Some("OnFailure") => code != 0,
            _ => true,
        };
        if !restart {
            self.c.finished = Some(if code == 0 { "Succeeded" } else { "Failed" });
            return;
        }
        // Back off like the kubelet, but shorter: 1 s doubling to 10 s; reset after a
        // run of over 10 s.
        self.c.restart_count += 1;
        self.c.next_start = Some(Instant::now() + self.c.backoff);
        self.c.backoff = (self.c.backoff * 2).min(Duration::from_secs(10));
        self.c.waiting_reason = Some(("CrashLoopBackOff".into(), format!("exit code {code}")));
    }

    async fn signal(&self, sig: &str) {
        if let Some(pid) = self.c.pid {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
    }

    /// SIGTERM, wait up to `grace` seconds (default 30), SIGKILL.
    async fn terminate(&mut self, grace: Option<i64>) {
        let grace = Duration::from_secs(grace.unwrap_or(30).max(0) as u64);
        let Some(mut child) = self.c.child.take() else { return };
        tracing::info!(pod = %key(&self.pod), ?grace, "stopping container (SIGTERM)");
        self.signal("TERM").await;
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::info!(pod = %key(&self.pod), "grace period over (SIGKILL)");
        }
        self.signal("KILL").await;
        let _ = child.wait().await;
        self.c.pid = None;
    }

    async fn kill_now(&mut self) {
        self.terminate(Some(0)).await;
    }

    fn cleanup(&mut self) {
        if let Some(net) = self.net.take() {
            self.shared.net.release(&net);
        }
        self.shared.mounts.release(self.pod.metadata.uid.as_deref().unwrap_or(""));
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    async fn delete_object(&self) {
        let api: Api<Pod> = Api::namespaced(self.client(), &self.ns());
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = api.delete(&self.name(), &dp).await {
            tracing::debug!(pod = %key(&self.pod), "final delete: {e}");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
