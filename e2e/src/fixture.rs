//! The end-to-end fixture shared by the e2e tests and `make demo`: a real
//! PostgreSQL, the real control plane, the process-backed node agent running
//! pooler (and operator) pods, the operator as a local process, and one
//! ConnectionPool made from `config/samples/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{AgentConfig, AgentHandle, BRIDGE_IP};
use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, core::DynamicObject, discovery::ApiResource};
use serde_json::{Value, json};
use sluice_testkit::{
    APP_DB, APP_USER, ControlPlane, ControlPlaneOptions, SUPERUSER, TempPostgres, free_port,
};

/// The password clients use with the pooler (distinct from the server's).
pub const CLIENT_PASSWORD: &str = "client-secret";
/// How often the operator re-reads max_connections in these tests.
pub const DISCOVERY_INTERVAL: &str = "5s";

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// `max_connections` of the PostgreSQL (default 60).
    pub max_connections: u32,
    /// Run `sluice-operator` as a local process (default true). Off when a test
    /// installs the operator into the cluster (helm, kustomize).
    pub local_operator: bool,
    /// Create the CRD from `crds/` (default true).
    pub install_crds: bool,
    /// Namespace of the pool (default `sluice-e2e`).
    pub namespace: String,
    /// How to start the control plane (default: upstream defaults).
    pub control_plane: ControlPlaneOptions,
    /// PEM certificate and key: PostgreSQL serves TLS and refuses plaintext over TCP.
    pub pg_tls: Option<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_connections: 60,
            local_operator: true,
            install_crds: true,
            namespace: "sluice-e2e".into(),
            control_plane: ControlPlaneOptions::default(),
            pg_tls: None,
        }
    }
}

/// Everything running; see the module docs. Dropping it stops the operator and the
/// node agent; [`Fixture::shutdown`] also waits for the pods to stop.
pub struct Fixture {
    pub pg: TempPostgres,
    pub cp: ControlPlane,
    pub client: Client,
    pub ns: String,
    pub pool: String,
    agent: Option<AgentHandle>,
    operator: Option<Child>,
    operator_log: PathBuf,
    metrics_port: u16,
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    // At run time, not compile time: with a shared target directory, a library built in
    // another clone (since removed) may be the one linked in.
    let found = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(|d| PathBuf::from(d).join(".."))
        .into_iter()
        .chain(std::env::current_dir().ok())
        .flat_map(|d| d.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .find(|d| d.join("crds/connectionpool.yaml").is_file());
    found.unwrap_or_else(|| PathBuf::from("."))
}

/// A workspace binary from the same target directory as the running program
/// (a test in `target/debug/deps`, or a binary such as `sluice-demo` in
/// `target/debug`); `make e2e` and `make demo` build them first.
///
/// # Errors
/// When the binary has not been built.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("program has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first (`make e2e` does)",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn pool_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "sluice.dev".into(),
        version: "v1alpha1".into(),
        api_version: "sluice.dev/v1alpha1".into(),
        kind: "ConnectionPool".into(),
        plural: "connectionpools".into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

impl Fixture {
    /// Starts everything with PostgreSQL at `max_connections`; no pool yet.
    ///
    /// # Errors
    /// When any part fails to start; the error names it.
    pub async fn start(max_connections: u32) -> Result<Self> {
        Self::start_with(Options { max_connections, ..Options::default() }).await
    }

    /// Starts what `options` asks for.
    ///
    /// # Errors
    /// When any part fails to start.
    pub async fn start_with(options: Options) -> Result<Self> {
        let mut pg =
            TempPostgres::builder().max_connections(options.max_connections).listen_addresses("*");
        if let Some((cert, key)) = &options.pg_tls {
            pg = pg.tls_only(cert.clone(), key.clone());
        }
        let pg = pg.start()?;
        let cp = ControlPlane::start_with(options.control_plane.clone()).await?;
        let client = cp.client().await?;
        let config = AgentConfig::new(cp.kubeconfig_path())
            .image("sluice-pooler", workspace_bin("sluice-pooler")?)
            .image("sluice-operator", workspace_bin("sluice-operator")?);
        // On its own thread: dropping the handle (a failed test) still stops every
        // pod and removes the pod network before the control plane goes away.
        let agent = AgentHandle::start(config)?;
        if options.install_crds {
            let crd = std::fs::read_to_string(repo_root().join("crds/connectionpool.yaml"))?;
            let crd: CustomResourceDefinition = serde_yaml::from_str(&crd)?;
            Api::<CustomResourceDefinition>::all(client.clone())
                .create(&PostParams::default(), &crd)
                .await?;
        }
        let ns = options.namespace.clone();
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await?;
        let operator_log = cp.dir().join("operator.log");
        let mut fx = Self {
            pg,
            cp,
            client,
            ns,
            pool: String::new(),
            agent: Some(agent),
            operator: None,
            operator_log,
            metrics_port: free_port()?,
        };
        if options.install_crds {
            fx.wait_crd_established().await?;
        }
        if options.local_operator {
            fx.start_operator()?;
        }
        Ok(fx)
    }

    /// Waits until ConnectionPools are served (the CRD is installed and established).
    ///
    /// # Errors
    /// After 30 s without.
    pub async fn wait_crd_established(&self) -> Result<()> {
        let api = pool_api(&self.client, &self.ns);
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.list(&ListParams::default()).await.is_err() {
            if Instant::now() > deadline {
                bail!("ConnectionPool CRD never became served");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Starts (or restarts) the operator process.
    pub fn start_operator(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.operator_log)?;
        let child = Command::new(workspace_bin("sluice-operator")?)
            .args([
                "run",
                "--pooler-image",
                "sluice-pooler:e2e",
                "--discovery-interval",
                DISCOVERY_INTERVAL,
            ])
            .arg(format!("--metrics-addr=127.0.0.1:{}", self.metrics_port))
            .env("KUBECONFIG", self.cp.kubeconfig_path())
            .env("SLUICE_LOG_FORMAT", "text")
            .env("RUST_LOG", "info,sluice_operator=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.operator = Some(child);
        Ok(())
    }

    /// PID of the local operator process, when one runs.
    pub fn operator_pid(&self) -> Option<u32> {
        self.operator.as_ref().map(Child::id)
    }

    /// `host:port` of the local operator's metrics endpoint.
    pub fn operator_metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    /// SIGKILLs the operator (no chance to clean up), as a node failure would.
    pub fn kill_operator(&mut self) {
        if let Some(mut child) = self.operator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn operator_log_tail(&self, lines: usize) -> String {
        sluice_testkit::cluster::tail(&self.operator_log, lines)
    }

    /// The minimal sample with `replicas`, pointed at our PostgreSQL through the
    /// bridge address.
    fn sample(&self, replicas: i32) -> Result<Value> {
        let sample = std::fs::read_to_string(
            repo_root().join("config/samples/sluice_v1alpha1_connectionpool_minimal.yaml"),
        )?;
        let mut pool: Value = serde_yaml::from_str(&sample)?;
        pool["spec"]["replicas"] = json!(replicas);
        pool["spec"]["database"]["host"] = json!(BRIDGE_IP.to_string());
        pool["spec"]["database"]["port"] = json!(self.pg.port());
        pool["spec"]["database"]["name"] = json!(APP_DB);
        pool["spec"]["drainTimeout"] = json!("5s");
        Ok(pool)
    }

    /// Creates the sample's Secrets: server credentials and client users.
    ///
    /// # Errors
    /// When the API server rejects them.
    pub async fn create_secrets(&self) -> Result<()> {
        let pool = self.sample(1)?;
        let creds = pool["spec"]["database"]["credentialsSecret"]
            .as_str()
            .context("sample has credentialsSecret")?;
        let users =
            pool["spec"]["clientAuth"]["usersSecret"].as_str().context("sample has usersSecret")?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        for (name, data) in [
            (creds, json!({"username": APP_USER.0, "password": APP_USER.1})),
            (users, json!({APP_USER.0: CLIENT_PASSWORD})),
        ] {
            let secret =
                serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
            secrets.create(&PostParams::default(), &secret).await?;
        }
        Ok(())
    }

    /// Creates a pool named `name` from the sample, merging `database` into
    /// `spec.database`.
    ///
    /// # Errors
    /// When the API server rejects it.
    pub async fn create_pool(&self, name: &str, replicas: i32, database: Value) -> Result<()> {
        let mut pool = self.sample(replicas)?;
        pool["metadata"]["name"] = json!(name);
        if let Some(extra) = database.as_object() {
            for (k, v) in extra {
                pool["spec"]["database"][k] = v.clone();
            }
        }
        let obj: DynamicObject = serde_json::from_value(pool)?;
        pool_api(&self.client, &self.ns).create(&PostParams::default(), &obj).await?;
        Ok(())
    }

    /// Creates pool `name` from the sample with `spec` keys set (for example
    /// `{"poolMode": "session"}`).
    ///
    /// # Errors
    /// When the API server rejects it.
    pub async fn create_pool_with(&self, name: &str, replicas: i32, spec: Value) -> Result<()> {
        let mut pool = self.sample(replicas)?;
        pool["metadata"]["name"] = json!(name);
        if let Some(extra) = spec.as_object() {
            for (k, v) in extra {
                pool["spec"][k] = v.clone();
            }
        }
        let obj: DynamicObject = serde_json::from_value(pool)?;
        pool_api(&self.client, &self.ns).create(&PostParams::default(), &obj).await?;
        Ok(())
    }

    /// Creates the Secrets and the pool from the minimal sample, pointed at our
    /// PostgreSQL through the bridge address, with `replicas`.
    ///
    /// # Errors
    /// When the CRD is not served within 30 s or an object is rejected.
    pub async fn apply_sample(&mut self, replicas: i32) -> Result<()> {
        self.wait_crd_established().await?;
        self.create_secrets().await?;
        let pool = self.sample(replicas)?;
        self.pool = pool["metadata"]["name"].as_str().context("sample has a name")?.to_string();
        self.create_pool(&self.pool, replicas, json!({})).await
    }

    /// Waits until pool `name` has condition `type_` with status True; returns the condition.
    ///
    /// # Errors
    /// After `timeout` without it (the error shows the last status).
    pub async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let api = pool_api(&self.client, &self.ns);
        let deadline = Instant::now() + timeout;
        loop {
            let pool = serde_json::to_value(api.get(name).await?)?;
            let cond = pool["status"]["conditions"].as_array().and_then(|cs| {
                cs.iter().find(|c| c["type"] == type_ && c["status"] == "True").cloned()
            });
            if let Some(c) = cond {
                return Ok(c);
            }
            ensure!(
                Instant::now() < deadline,
                "{name}: no {type_}=True within {timeout:?}: {}",
                pool["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ConnectionPool as JSON.
    pub async fn pool_json(&self) -> Result<Value> {
        let obj = pool_api(&self.client, &self.ns).get(&self.pool).await?;
        Ok(serde_json::to_value(obj)?)
    }

    /// `kubectl -n <pool namespace>` against the test cluster (the version-matched
    /// one from the tool cache).
    ///
    /// # Errors
    /// When kubectl exits non-zero; the error carries its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_ns(&self.ns, args)
    }

    /// `kubectl -n <ns>` against the test cluster.
    ///
    /// # Errors
    /// When kubectl exits non-zero; the error carries its stderr.
    pub fn kubectl_ns(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut with_ns = vec!["-n", ns];
        with_ns.extend_from_slice(args);
        self.kubectl_cluster(&with_ns)
    }

    /// `kubectl` against the test cluster with no namespace flag (objects keep
    /// their own namespaces, as with `apply -k`).
    ///
    /// # Errors
    /// When kubectl exits non-zero; the error carries its stderr.
    pub fn kubectl_cluster(&self, args: &[&str]) -> Result<String> {
        let kubectl = sluice_testkit::k8s_bin_dir()?.join("kubectl");
        let out = Command::new(kubectl)
            .arg(format!("--kubeconfig={}", self.cp.kubeconfig_path().display()))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl scale cpool/<pool> --replicas=n`.
    pub fn scale(&self, replicas: i32) -> Result<()> {
        self.kubectl(&[
            "scale",
            &format!("cpool/{}", self.pool),
            &format!("--replicas={replicas}"),
        ])?;
        Ok(())
    }

    /// The cluster IP of the pool's Service (served by the agent's forwarder).
    ///
    /// # Errors
    /// When the Service does not exist (yet).
    pub async fn service_host(&self) -> Result<String> {
        let svc = Api::<Service>::namespaced(self.client.clone(), &self.ns).get(&self.pool).await?;
        svc.spec.and_then(|s| s.cluster_ip).context("service has a cluster IP")
    }

    /// A client connection string through the pool's Service (the agent's forwarder).
    ///
    /// # Errors
    /// When the Service does not exist (yet).
    pub async fn service_conn_str(&self) -> Result<String> {
        let ip = self.service_host().await?;
        Ok(format!(
            "host={ip} port=6432 user={} password={CLIENT_PASSWORD} dbname={APP_DB} connect_timeout=5",
            APP_USER.0
        ))
    }

    /// Superuser connection string for the sampler.
    pub fn superuser_conn_str(&self) -> String {
        self.pg.conn_str(SUPERUSER.0, SUPERUSER.1, "postgres")
    }

    /// The pool's pod label selector, from `status.selector` (the scale subresource's).
    pub async fn selector(&self) -> Result<String> {
        let pool = self.pool_json().await?;
        Ok(pool["status"]["selector"]
            .as_str()
            .context("pool has no status.selector yet")?
            .to_string())
    }

    /// The running pooler pods (not terminating) with their IPs.
    pub async fn pooler_pods(&self) -> Result<Vec<(String, String)>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let list = pods.list(&ListParams::default().labels(&self.selector().await?)).await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let ip = p.status.as_ref()?.pod_ip.clone()?;
                Some((p.metadata.name.clone()?, ip))
            })
            .collect())
    }

    /// Number of pod objects of the pool, terminating ones included.
    pub async fn all_pods(&self) -> Result<usize> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let list = pods.list(&ListParams::default().labels(&self.selector().await?)).await?;
        Ok(list.items.len())
    }

    /// Waits until the pool is Ready with `replicas` ready pods, no resize in
    /// progress, and every pod reports the status' limit and config hash on
    /// `/status`. Returns (perReplicaLimit, available budget, seconds taken).
    pub async fn wait_converged(&self, replicas: i64, timeout: Duration) -> Result<Converged> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.converged(replicas).await {
                Ok(Some(c)) => return Ok(Converged { secs: start.elapsed().as_secs_f64(), ..c }),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let status = self.pool_json().await.map(|p| p["status"].clone()).unwrap_or_default();
        bail!(
            "pool did not converge to {replicas} replicas in {timeout:?} ({last}); status: {status:#}\noperator log:\n{}",
            self.operator_log_tail(30)
        )
    }

    async fn converged(&self, replicas: i64) -> Result<Option<Converged>> {
        let pool = self.pool_json().await?;
        let st = &pool["status"];
        let cond = |t: &str| {
            st["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == t))
                .map(|c| c["status"].as_str().unwrap_or("").to_string())
        };
        let generation_seen = st["observedGeneration"] == pool["metadata"]["generation"];
        if !generation_seen
            || cond("Ready").as_deref() != Some("True")
            || cond("Progressing").as_deref() == Some("True")
            || st["readyReplicas"].as_i64() != Some(replicas)
        {
            return Ok(None);
        }
        let limit = st["budget"]["perReplicaLimit"].as_i64().context("no perReplicaLimit")?;
        let available = st["budget"]["available"].as_i64().context("no available budget")?;
        let hash = st["budget"]["appliedConfigHash"].as_str().unwrap_or_default().to_string();
        let pods = self.pooler_pods().await?;
        if pods.len() as i64 != replicas || self.all_pods().await? as i64 != replicas {
            return Ok(None);
        }
        for (_, ip) in &pods {
            let s = pooler_status(ip).await?;
            if s["connection_limit"].as_i64() != Some(limit)
                || (!hash.is_empty() && s["config_hash"] != hash.as_str())
            {
                return Ok(None);
            }
        }
        Ok(Some(Converged { limit, available, secs: 0.0 }))
    }

    /// Deletes the pool and waits until its children are garbage-collected.
    pub async fn delete_pool(&self) -> Result<()> {
        pool_api(&self.client, &self.ns).delete(&self.pool, &DeleteParams::foreground()).await?;
        Ok(())
    }

    /// Stops the operator and the agent (which stops every pod), then the control
    /// plane and PostgreSQL.
    pub async fn shutdown(mut self) -> Result<()> {
        self.kill_operator();
        match self.agent.take() {
            Some(agent) => tokio::task::spawn_blocking(move || agent.stop()).await?,
            None => Ok(()),
        }
    }

    pub async fn patch_pool(&self, patch: Value) -> Result<()> {
        pool_api(&self.client, &self.ns)
            .patch(&self.pool, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.kill_operator();
        // Dropping the AgentHandle stops the agent and waits for its cleanup.
        self.agent.take();
    }
}

/// Where a pool settled.
#[derive(Debug, Clone, Copy)]
pub struct Converged {
    pub limit: i64,
    pub available: i64,
    pub secs: f64,
}

/// `GET http://<ip>:9930/status` of a pooler pod.
pub async fn pooler_status(ip: &str) -> Result<Value> {
    let body = http_get(&format!("{ip}:9930"), "/status").await?;
    Ok(serde_json::from_str(&body)?)
}

/// `GET path` at `addr`: the body of a 200 answer (see [`sluice_testkit::http`]).
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    sluice_testkit::http::get_ok(addr, path).await
}
