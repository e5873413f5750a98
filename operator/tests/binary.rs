//! The `sluice-operator` binary: `crd` prints the committed CRD, and two `run` processes
//! with `--leader-election` against a real control plane: one holds the Lease and
//! reconciles, the other takes over when the first stops.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;
use sluice_operator::ConnectionPool;
mod common;
use common::eventually;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-operator");

#[test]
fn crd_command_prints_the_committed_crd() {
    let out = Command::new(BIN).arg("crd").output().unwrap();
    assert!(out.status.success());
    let committed = std::fs::read_to_string(
        std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../crds/connectionpool.yaml"),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        committed,
        "run `make crds`"
    );
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(kubeconfig: &std::path::Path, metrics_port: u16, name: &str) -> Operator {
    spawn_with(kubeconfig, metrics_port, name, &[])
}

fn spawn_with(
    kubeconfig: &std::path::Path,
    metrics_port: u16,
    name: &str,
    extra: &[&str],
) -> Operator {
    let child = Command::new(BIN)
        .args([
            "run",
            "--namespace",
            "default",
            "--leader-election",
            "--lease-namespace",
            "default",
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("SLUICE_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Operator(child)
}

/// `GET path` on the operator's metrics port: the body of a 200 answer.
async fn http_get(port: u16, path: &str) -> Option<String> {
    sluice_testkit::http::get_ok(&format!("127.0.0.1:{port}"), path)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over() {
    let Some((cp, client)) = common::control_plane_with_crd().await else {
        return;
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    for name in ["creds", "users"] {
        let s: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name}, "stringData": {"username": "u", "password": "p"}}))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }

    let (p1, p2) = (
        sluice_testkit::free_port().unwrap(),
        sluice_testkit::free_port().unwrap(),
    );
    let first = spawn(&cp.kubeconfig_path(), p1, "first");
    eventually("first /readyz", Duration::from_secs(30), || async {
        http_get(p1, "/readyz").await
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = || async {
        leases
            .get("sluice-operator")
            .await
            .ok()?
            .spec?
            .holder_identity
    };
    let h1 = eventually("a lease holder", Duration::from_secs(30), holder).await;
    assert!(h1.starts_with("first"), "{h1}");
    let second = spawn(&cp.kubeconfig_path(), p2, "second");
    eventually("second /healthz", Duration::from_secs(30), || async {
        http_get(p2, "/healthz").await
    })
    .await;

    // The leader reconciles a pool (spec maxConnections: no database needed).
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), "default");
    let pool: ConnectionPool = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "p"},
        "spec": {"database": {"host": "db", "credentialsSecret": "creds", "maxConnections": 40},
                 "clientAuth": {"usersSecret": "users"}}}))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    eventually(
        "ConfigMap from the leader",
        Duration::from_secs(30),
        || async { cms.get_opt("p-config").await.ok()? },
    )
    .await;
    let m1 = http_get(p1, "/metrics").await.unwrap();
    let m2 = http_get(p2, "/metrics").await.unwrap();
    assert!(m1.contains("sluice_operator_reconciles_total"), "{m1}");
    assert!(
        !m2.contains("sluice_operator_reconciles_total 1"),
        "standby reconciled: {m2}"
    );

    secure_metrics(&cp, &client).await;

    // The leader stops (SIGTERM): the standby takes over.
    let pid = first.0.id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let h2 = eventually(
        "the standby holds the lease",
        Duration::from_secs(60),
        || async { holder().await.filter(|h| h.starts_with("second")) },
    )
    .await;
    assert!(h2.starts_with("second"));
    drop(first);
    drop(second);
}

/// `--metrics-secure` (a third, standby replica): `/metrics` over HTTPS answers only a
/// bearer token the API server authenticates and authorises for `get /metrics`;
/// `/healthz` stays open.
async fn secure_metrics(cp: &sluice_testkit::ControlPlane, client: &kube::Client) {
    let ca = sluice_testkit::tls::TestCa::new("metrics-ca").unwrap();
    let issued = ca.issue(&["localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &issued.key_pem).unwrap();
    let port = sluice_testkit::free_port().unwrap();
    let cert_dir = dir.path().display().to_string();
    let _third = spawn_with(
        &cp.kubeconfig_path(),
        port,
        "third",
        &["--metrics-secure", "--metrics-cert-dir", &cert_dir],
    );
    let addr = format!("127.0.0.1:{port}");
    let get = |path: &'static str, token: Option<String>| {
        let (addr, ca) = (addr.clone(), ca.pem().to_string());
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            sluice_testkit::http::https_get(&addr, path, &headers, &ca, "localhost").await
        }
    };
    eventually("secure /healthz", Duration::from_secs(30), || async {
        get("/healthz", None).await.ok().filter(|(c, _)| *c == 200)
    })
    .await;

    let apply = |v: serde_json::Value| async move {
        let obj: kube::api::DynamicObject = serde_json::from_value(v.clone()).unwrap();
        let ar = kube::discovery::ApiResource::from_gvk(
            &kube::api::GroupVersionKind::try_from(obj.types.as_ref().unwrap()).unwrap(),
        );
        let api: Api<kube::api::DynamicObject> = match obj.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        api.create(&PostParams::default(), &obj).await.unwrap();
    };
    apply(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "metrics-reader"},
        "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}),
    )
    .await;
    for sa in ["prom", "nobody"] {
        apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": "default"}}))
        .await;
    }
    apply(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "prom-metrics"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "metrics-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "prom", "namespace": "default"}]}),
    )
    .await;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), "default");
    let token = |name: &'static str| {
        let sas = sas.clone();
        async move {
            sas.create_token_request(name, &PostParams::default(), &Default::default())
                .await
                .unwrap()
                .status
                .unwrap()
                .token
        }
    };
    let (prom, nobody) = (token("prom").await, token("nobody").await);

    let (code, _) = get("/metrics", None).await.unwrap();
    assert_eq!(code, 401, "no token");
    let (code, _) = get("/metrics", Some("not-a-token".into())).await.unwrap();
    assert_eq!(code, 401, "a token the API server does not know");
    let (code, _) = get("/metrics", Some(nobody)).await.unwrap();
    assert_eq!(code, 403, "authenticated, not allowed get /metrics");
    let body = eventually("prom reads /metrics", Duration::from_secs(30), || async {
        get("/metrics", Some(prom.clone()))
            .await
            .ok()
            .filter(|(c, _)| *c == 200)
            .map(|(_, b)| b)
    })
    .await;
    assert!(body.contains("sluice_operator_"), "{body}");
    // Plain HTTP is not served.
    assert!(
        !matches!(
            sluice_testkit::http::get(&addr, "/metrics").await,
            Ok((200, _))
        ),
        "/metrics over plain HTTP"
    );
}
