//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager as local processes, with generated certificates and an
//! admin kubeconfig.
//!
//! The binaries come from `$SLUICE_BIN_DIR`, else `~/.cache/sluice/bin`, where
//! `e2e/platform/build-tools.sh` builds and caches them.
//!
//! Addresses (see `docs/test-platform.md`): the API server binds `0.0.0.0` on a free
//! port and advertises `198.18.0.1` (the node agent's bridge, [`BRIDGE_IP`]), Service
//! cluster IPs come from [`SERVICE_CIDR`], and etcd listens on loopback only. There is
//! no kube-scheduler and no kubelet: the node agent in `sluice-e2e` binds and runs pods.
//!
//! # Guarantees
//! - [`ControlPlane::start`] returns only once `/readyz` answers `ok` with the admin
//!   credentials; its errors carry the tail of the failing process's log.
//! - Dropping a [`ControlPlane`] stops the three processes (SIGTERM, then SIGKILL after
//!   5 s) and deletes its directory, unless `SLUICE_KEEP_CLUSTER=1` is set, in which
//!   case the directory (certs, logs, etcd data, kubeconfig) is kept and its path logged.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::free_port;

/// Address of the node agent's bridge `sluice0`; the API server advertises it, so pods
/// reach the API server (and other host services) there.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The pod subnet (RFC 2544 benchmarking range; never routed off the machine).
pub const POD_CIDR: &str = "198.18.0.0/24";
/// The Service cluster IP range.
pub const SERVICE_CIDR: &str = "198.19.0.0/24";
/// Cluster IP of the `kubernetes` Service in `default` (first address of the range).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

const PROCESS_NAMES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// The directory holding the control plane binaries: `$SLUICE_BIN_DIR`, else
/// `~/.cache/sluice/bin`.
///
/// # Errors
/// When a binary is missing; the message says to run `e2e/platform/build-tools.sh`.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("SLUICE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            PathBuf::from(home).join(".cache/sluice/bin")
        }
    };
    check_bin_dir(&dir)?;
    Ok(dir)
}

fn check_bin_dir(dir: &Path) -> Result<()> {
    for name in PROCESS_NAMES {
        if !dir.join(name).exists() {
            bail!(
                "{} not found in {} (set SLUICE_BIN_DIR or run `bash e2e/platform/build-tools.sh` \
                 to build and cache the control plane binaries)",
                name,
                dir.display()
            );
        }
    }
    Ok(())
}

/// How to start a [`ControlPlane`]; the default is what every test uses.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// The controller-manager's client-side rate limit (`--kube-api-qps`, burst twice
    /// that). `None` keeps the upstream default of 20 requests per second (burst 30).
    /// Large clusters raise it; the operator benchmark can (`CONTROLLER_MANAGER_QPS`), to
    /// see how much of its time-to-Ready is the controller-manager's throttle.
    pub controller_manager_qps: Option<u32>,
}

/// A running etcd + kube-apiserver + kube-controller-manager; see the module docs.
#[derive(Debug)]
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    port: u16,
    etcd_port: u16,
    /// Running processes, in start order (stopped in reverse).
    procs: Vec<(String, Child)>,
}

impl ControlPlane {
    /// Generates certificates, starts etcd, kube-apiserver and kube-controller-manager,
    /// writes the admin kubeconfig and waits until `/readyz` is ok (up to 90 s).
    ///
    /// # Errors
    /// When a binary is missing, a process exits early or the API server does not
    /// become ready; the error carries the tail of the relevant logs.
    pub async fn start() -> Result<Self> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// [`ControlPlane::start`] with non-default [`ControlPlaneOptions`].
    ///
    /// # Errors
    /// As [`ControlPlane::start`].
    pub async fn start_with(options: ControlPlaneOptions) -> Result<Self> {
        let bin = k8s_bin_dir()?;
        reap_orphans();
        let dir = tempfile::Builder::new().prefix("sluice-k8s-").tempdir()?;
        fs::write(dir.path().join("owner.pid"), std::process::id().to_string())?;
        let path = dir.path().to_path_buf();
        let port = free_port()?;
        let mut cp = Self { dir: Some(dir), path, port, etcd_port: 0, procs: Vec::new() };
        cp.write_certs()?;
        cp.start_etcd(&bin)?;
        cp.start_apiserver(&bin)?;
        cp.wait_ready().await?;
        cp.start_controller_manager(&bin, &options)?;
        cp.wait_controller_manager().await?;
        tracing::info!(dir = %cp.path.display(), url = %cp.server_url(), "control plane ready");
        Ok(cp)
    }

    /// `https://127.0.0.1:<port>`: the API server URL for processes on this host.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `https://198.18.0.1:<port>`: the API server URL for pods (through the bridge).
    pub fn pod_server_url(&self) -> String {
        format!("https://{BRIDGE_IP}:{}", self.port)
    }

    /// The API server's secure port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin kubeconfig (user `kubernetes-admin`, group `system:masters`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.path.join("admin.kubeconfig")
    }

    /// The cluster CA certificate (PEM file) that signed the serving and client certs.
    pub fn ca_path(&self) -> PathBuf {
        self.path.join("ca.crt")
    }

    /// Directory with certificates, process logs (`<name>.log`) and etcd data.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A client with admin rights.
    ///
    /// # Errors
    /// When the kubeconfig cannot be read or the client cannot be built.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig_path()).await
    }

    /// The last `lines` lines of a process log (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        tail(&self.path.join(format!("{name}.log")), lines)
    }

    fn write_certs(&self) -> Result<()> {
        let d = &self.path;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = dn("sluice-test-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write(d.join("ca.crt"), ca_cert.pem())?;
        write(d.join("ca.key"), ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let sans: Vec<String> = [
            "127.0.0.1",
            &BRIDGE_IP.to_string(),
            &KUBERNETES_SERVICE_IP.to_string(),
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let leaf = |name: &str, cn: &str, org: Option<&str>, sans: Vec<String>, server: bool| {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(sans)?;
            p.distinguished_name = dn(cn, org);
            p.key_usages =
                vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            p.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = p.signed_by(&key, &issuer)?;
            write(d.join(format!("{name}.crt")), cert.pem())?;
            write(d.join(format!("{name}.key")), key.serialize_pem())?;
            anyhow::Ok(())
        };
        leaf("apiserver", "kube-apiserver", None, sans, true)?;
        leaf("admin", "kubernetes-admin", Some("system:masters"), vec![], false)?;
        leaf("controller-manager", "system:kube-controller-manager", None, vec![], false)?;
        // ES256 service account signing key (PKCS#8) and its public key.
        let sa = KeyPair::generate()?;
        write(d.join("sa.key"), sa.serialize_pem())?;
        write(d.join("sa.pub"), sa.public_key_pem())?;

        self.write_kubeconfig("admin.kubeconfig", "admin")?;
        self.write_kubeconfig("controller-manager.kubeconfig", "controller-manager")?;
        Ok(())
    }

    fn write_kubeconfig(&self, file: &str, cred: &str) -> Result<()> {
        let d = &self.path;
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: sluice
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {cred}
  user:
    client-certificate: {crt}
    client-key: {key}
contexts:
- name: sluice
  context:
    cluster: sluice
    user: {cred}
    namespace: default
current-context: sluice
",
            server = self.server_url(),
            ca = d.join("ca.crt").display(),
            crt = d.join(format!("{cred}.crt")).display(),
            key = d.join(format!("{cred}.key")).display(),
        );
        write(d.join(file), text)
    }

    fn spawn(&mut self, bin: &Path, name: &str, args: Vec<String>) -> Result<()> {
        let log_path = self.path.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)?;
        let child = Command::new(bin.join(name))
            .args(&args)
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let mut pids =
            fs::OpenOptions::new().create(true).append(true).open(self.path.join("pids"))?;
        writeln!(pids, "{}", child.id())?;
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    fn start_etcd(&mut self, bin: &Path) -> Result<()> {
        let client = free_port()?;
        let peer = free_port()?;
        let d = self.path.display().to_string();
        let args = vec![
            "--name=default".into(),
            format!("--data-dir={d}/etcd"),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        self.spawn(bin, "etcd", args)?;
        // The API server retries etcd, but fail fast with etcd's log when it cannot start.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("etcd did not listen within 20 s:\n{}", self.log_tail("etcd", 30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.etcd_port = client;
        Ok(())
    }

    fn start_apiserver(&mut self, bin: &Path) -> Result<()> {
        let d = self.path.display().to_string();
        let args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={}", self.port),
            format!("--advertise-address={BRIDGE_IP}"),
            format!("--cert-dir={d}/apiserver-certs"),
            format!("--tls-cert-file={d}/apiserver.crt"),
            format!("--tls-private-key-file={d}/apiserver.key"),
            format!("--client-ca-file={d}/ca.crt"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={d}/sa.pub"),
            format!("--service-account-signing-key-file={d}/sa.key"),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        self.spawn(bin, "kube-apiserver", args)
    }

    fn start_controller_manager(
        &mut self,
        bin: &Path,
        options: &ControlPlaneOptions,
    ) -> Result<()> {
        let d = self.path.display().to_string();
        let mut args = vec![
            format!("--kubeconfig={d}/controller-manager.kubeconfig"),
            format!("--authentication-kubeconfig={d}/controller-manager.kubeconfig"),
            format!("--authorization-kubeconfig={d}/controller-manager.kubeconfig"),
            format!("--service-account-private-key-file={d}/sa.key"),
            format!("--root-ca-file={d}/ca.crt"),
            "--use-service-account-credentials=true".into(),
            "--controllers=*".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={d}/controller-manager-certs"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--profiling=false".into(),
        ];
        if let Some(qps) = options.controller_manager_qps {
            args.push(format!("--kube-api-qps={qps}"));
            args.push(format!("--kube-api-burst={}", qps.saturating_mul(2)));
        }
        self.spawn(bin, "kube-controller-manager", args)
    }

    /// Fails with the log tail of the first process that has exited.
    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.procs {
            if let Some(status) = child.try_wait()? {
                let log = tail(&self.path.join(format!("{name}.log")), 40);
                bail!("{name} exited early ({status}):\n{log}");
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            self.check_alive()?;
            let last_err = match self.readyz().await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within 90 s (last: {last_err}):\n{}",
                    self.log_tail("kube-apiserver", 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `GET /readyz` with the admin credentials.
    ///
    /// # Errors
    /// When the request fails or the API server answers non-2xx.
    pub async fn readyz(&self) -> Result<String> {
        let client = self.client().await?;
        let req = http::Request::get("/readyz").body(Vec::new())?;
        Ok(client.request_text(req).await?)
    }

    /// Waits until the controller manager has created the `default` ServiceAccount in
    /// `default` (proof its controllers run and can write), up to 60 s.
    async fn wait_controller_manager(&mut self) -> Result<()> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let client = self.client().await?;
        let api: kube::Api<ServiceAccount> = kube::Api::namespaced(client, "default");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_alive()?;
            if let Ok(Some(_)) = api.get_opt("default").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default ServiceAccount within 60 s:\n{}",
                    self.log_tail("kube-controller-manager", 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the processes (reverse start order): SIGTERM, then SIGKILL after 5 s.
    /// Idempotent.
    pub fn stop(&mut self) {
        while let Some((_, mut child)) = self.procs.pop() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        if keep_requested()
            && let Some(dir) = self.dir.take()
        {
            let _ = fs::remove_file(dir.path().join("owner.pid"));
            let kept = dir.keep();
            eprintln!("SLUICE_KEEP_CLUSTER=1: kept control plane dir {}", kept.display());
        }
    }
}

/// Whether `SLUICE_KEEP_CLUSTER=1` asks to keep directories for debugging.
pub fn keep_requested() -> bool {
    std::env::var("SLUICE_KEEP_CLUSTER").is_ok_and(|v| v == "1")
}

/// A kube client from a kubeconfig file (its current context).
///
/// # Errors
/// When the file cannot be read or parsed, or the client cannot be built.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Kills the processes and removes the directories of control planes whose owning
/// process died without dropping them (e.g. a test run killed with SIGKILL). A
/// process is killed only if its command line still names that directory.
fn reap_orphans() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with("sluice-k8s-");
        let Some(owner) = fs::read_to_string(dir.join("owner.pid")).ok().filter(|_| is_ours) else {
            continue;
        };
        if Path::new(&format!("/proc/{}", owner.trim())).exists() {
            continue;
        }
        let dir_str = dir.display().to_string();
        for pid in fs::read_to_string(dir.join("pids")).unwrap_or_default().lines() {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir_str) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        tracing::warn!(dir = %dir_str, "removed the control plane of a dead process");
        let _ = fs::remove_dir_all(&dir);
    }
}

/// SIGTERM, wait up to `grace`, SIGKILL, reap.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn write(path: PathBuf, contents: impl AsRef<[u8]>) -> Result<()> {
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The last `lines` lines of a file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};

    #[tokio::test]
    async fn starts_ready_and_serves_kubectl() -> Result<()> {
        let cp = ControlPlane::start().await?;
        assert_eq!(cp.readyz().await?.trim(), "ok");

        let client = cp.client().await?;
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "smoke"}
        }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        let got = Api::<Namespace>::all(client).get("smoke").await?;
        assert_eq!(got.metadata.name.as_deref(), Some("smoke"));

        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cp.kubeconfig_path())
            .args(["get", "nodes,pods,namespaces", "-A"])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("smoke"), "kubectl output: {stdout}");

        let dir = cp.dir().to_path_buf();
        let port = cp.port();
        drop(cp);
        if std::env::var("SLUICE_KEEP_CLUSTER").is_err() {
            assert!(!dir.exists(), "control plane dir removed on drop");
        }
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "apiserver stopped");
        Ok(())
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_bin_dir(dir.path()).unwrap_err();
        assert!(format!("{err}").contains("build-tools.sh"), "{err}");
    }
}
