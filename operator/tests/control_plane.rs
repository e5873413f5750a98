//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager)
//! and a real PostgreSQL: CRD acceptance and CEL rules, the create path, a scale-up through
//! the scale subresource, a budget change on the database, an infeasible pool, printer
//! columns and garbage collection. No node agent runs, so pods stay unscheduled.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_operator::{
    ConnectionPool, Context, HttpProbe, Metrics, PostgresDiscovery, Settings, run_controller,
};
mod common;
use common::eventually;
use sluice_testkit::{SUPERUSER, TempPostgres};

fn limit_of(cm: &ConfigMap) -> Option<i64> {
    cm.metadata
        .annotations
        .as_ref()?
        .get("sluice.dev/connection-limit")?
        .parse()
        .ok()
}

fn condition(pool: &ConnectionPool, type_: &str) -> Option<(String, String)> {
    let c = pool
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_against_a_real_control_plane() {
    let Some((cp, client)) = common::control_plane_with_crd().await else {
        return;
    };
    let mut pg = TempPostgres::builder().max_connections(60).start().unwrap();

    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), "default");
    // CEL rejects what it can check statically, with the rule's message.
    let bad = |spec: serde_json::Value| -> ConnectionPool {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "ConnectionPool",
            "metadata": {"name": "bad"}, "spec": spec,
        }))
        .unwrap()
    };
    let base = json!({"database": {"host": "db", "credentialsSecret": "c", "maxConnections": 40,
                                   "reservedConnections": 50},
                      "clientAuth": {"usersSecret": "u"}});
    let err = pools
        .create(&PostParams::default(), &bad(base.clone()))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("reservedConnections must be less than maxConnections"),
        "{err}"
    );
    // TLS: verify-full needs a CA (or the system roots), one CA source at most, and a
    // clientTLS that is on needs its certificate.
    let mut tls = base.clone();
    tls["database"]["reservedConnections"] = json!(5);
    for (database_tls, client_tls, message) in [
        (
            json!({"sslMode": "verify-full"}),
            json!(null),
            "need caSecret or caConfigMap",
        ),
        (
            json!({"sslMode": "verify-ca", "caSecret": "a", "caConfigMap": "b"}),
            json!(null),
            "set caSecret or caConfigMap, not both",
        ),
        (
            json!({"sslMode": "require"}),
            json!({"mode": "require"}),
            "clientTLS.secretName is required",
        ),
    ] {
        tls["database"]["tls"] = database_tls;
        tls["clientTLS"] = client_tls;
        let err = pools
            .create(&PostParams::default(), &bad(tls.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
    let mut spec = base.clone();
    spec["database"]["reservedConnections"] = json!(5);
    spec["drainTimeout"] = json!("30 seconds");
    let err = pools
        .create(&PostParams::default(), &bad(spec.clone()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("drainTimeout must be a duration"),
        "{err}"
    );
    spec["drainTimeout"] = json!("30s");
    spec["replicas"] = json!(0);
    let err = pools
        .create(&PostParams::default(), &bad(spec))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("replicas must be at least 1"),
        "{err}"
    );

    // Secrets and a pool pointing at the real PostgreSQL.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    for (name, data) in [
        (
            "app-db-credentials",
            json!({"username": SUPERUSER.0, "password": SUPERUSER.1}),
        ),
        ("app-users", json!({"app": "secret"})),
    ] {
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data,
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let pool: ConnectionPool = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "app"},
        "spec": {"replicas": 2,
                 "database": {"host": "127.0.0.1", "port": pg.port(), "name": "postgres",
                              "credentialsSecret": "app-db-credentials"},
                 "clientAuth": {"usersSecret": "app-users"}},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    // The operator, in process, with exactly the rights of config/rbac/role.yaml.
    let role_yaml = std::fs::read_to_string(
        std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../config/rbac/role.yaml"),
    )
    .unwrap();
    let role: ClusterRole = serde_yaml::from_str(&role_yaml).unwrap();
    let ssa = PatchParams::apply("test").force();
    Api::<ClusterRole>::all(client.clone())
        .patch("operator", &ssa, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "sluice-operator", "namespace": "default"}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch("operator", &ssa, &Patch::Apply(&binding))
        .await
        .unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some("system:serviceaccount:default:sluice-operator".into());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:authenticated".into(),
    ]);
    let operator_client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::default());
    let settings = Settings {
        discovery_interval: Duration::from_secs(2),
        poll_interval: Duration::from_millis(500),
        ..Settings::default()
    };
    let (caches, writers) = sluice_operator::caches();
    let ctx = Arc::new(Context::new(
        operator_client.clone(),
        caches,
        metrics.clone(),
        Arc::new(PostgresDiscovery::default()),
        Arc::new(HttpProbe::default()),
        settings,
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run_controller(
        ctx,
        writers,
        Some("default".into()),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Create path: 60 - 3 - 6 = 51 → ⌊51 / 3⌋ = 17.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    eventually(
        "ConfigMap with limit 17",
        Duration::from_secs(30),
        || async { (limit_of(&cms.get("app-config").await.ok()?)? == 17).then_some(()) },
    )
    .await;
    // The operator's identity really is limited (it may not delete its children).
    let err = Api::<ConfigMap>::namespaced(operator_client.clone(), "default")
        .delete("app-config", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    let replicas = eventually("Deployment", Duration::from_secs(30), || async {
        deps.get("app").await.ok()?.spec?.replicas
    })
    .await;
    assert_eq!(replicas, 2);

    // The admission policy shipped in config/ (and the chart) refuses hand edits of what
    // the budget depends on, from anyone but the operator (whose later writes go on).
    let policy = std::fs::read_to_string(
        std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../config/policy/admission_policy.yaml"),
    )
    .unwrap()
    .replace("name: budget-guard", "name: sluice-budget-guard")
    .replace(
        "system:serviceaccount:sluice-system:sluice-operator",
        "system:serviceaccount:default:sluice-operator",
    );
    let kubectl = sluice_testkit::k8s_bin_dir().unwrap().join("kubectl");
    let mut apply = std::process::Command::new(&kubectl)
        .args(["--kubeconfig", cp.kubeconfig_path().to_str().unwrap()])
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut apply.stdin.take().unwrap(), policy.as_bytes()).unwrap();
    assert!(apply.wait().unwrap().success(), "the policy applies");
    let surge = json!({"spec": {"strategy": {"rollingUpdate": {"maxSurge": 1}}}});
    let refused = eventually("hand edit refused", Duration::from_secs(30), || async {
        match deps
            .patch("app", &PatchParams::default(), &Patch::Merge(&surge))
            .await
        {
            Err(e) => Some(e.to_string()),
            Ok(_) => {
                // Not loaded yet: put it back and try again.
                let back = json!({"spec": {"strategy": {"rollingUpdate": {"maxSurge": 0}}}});
                let _ = deps
                    .patch("app", &PatchParams::default(), &Patch::Merge(&back))
                    .await;
                None
            }
        }
    })
    .await;
    assert!(refused.contains("belongs to a ConnectionPool"), "{refused}");
    let p = eventually("status budget", Duration::from_secs(30), || async {
        let p = pools.get("app").await.ok()?;
        (p.status.as_ref()?.budget.as_ref()?.per_replica_limit == 17).then_some(p)
    })
    .await;
    let b = p.status.unwrap().budget.unwrap();
    assert_eq!(
        (
            b.database_max_connections,
            b.superuser_reserved,
            b.available
        ),
        (60, 3, 51)
    );

    // Scale 2 → 4 through the scale subresource: the limit drops before the Deployment grows.
    pools
        .patch_scale(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    eventually(
        "Deployment at 4 replicas",
        Duration::from_secs(30),
        || async {
            let cm_limit = limit_of(&cms.get("app-config").await.ok()?)?;
            let replicas = deps.get("app").await.ok()?.spec?.replicas?;
            assert!(
                replicas <= 2 || cm_limit <= 10,
                "Deployment grew to {replicas} at limit {cm_limit}"
            );
            (replicas == 4 && cm_limit == 10).then_some(())
        },
    )
    .await;

    // Steady state: no more writes while the operator keeps requeueing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = metrics.api_requests_with_verb("patch") + metrics.api_requests_with_verb("delete");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = metrics.api_requests_with_verb("patch") + metrics.api_requests_with_verb("delete");
    assert_eq!(before, after, "steady state wrote");

    // The database grows: 100 - 3 - 10 = 87 → ⌊87 / 5⌋ = 17 within a refresh.
    pg.restart_with_max_connections(100).unwrap();
    eventually(
        "limit follows max_connections",
        Duration::from_secs(30),
        || async { (limit_of(&cms.get("app-config").await.ok()?)? == 17).then_some(()) },
    )
    .await;

    // Infeasible: BudgetExceeded, config untouched.
    pools
        .patch_scale(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 200}})),
        )
        .await
        .unwrap();
    let (_, msg) = eventually("BudgetExceeded", Duration::from_secs(30), || async {
        let p = pools.get("app").await.ok()?;
        condition(&p, "BudgetExceeded").filter(|(s, _)| s == "True")
    })
    .await;
    assert!(msg.contains("200 replicas"), "{msg}");
    assert_eq!(limit_of(&cms.get("app-config").await.unwrap()), Some(17));
    assert_eq!(
        deps.get("app").await.unwrap().spec.unwrap().replicas,
        Some(4)
    );

    // A failed API call is reported, not only logged: an admission policy refuses the
    // ConfigMap of pool `blocked` as Forbidden (403, retried with backoff); the pool gets
    // a Warning event at once and, as it persists, Degraded with the same reason.
    let vap: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "deny-blocked-config"},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                     "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]}]},
                 "validations": [{"expression": "object.metadata.name != 'blocked-config'",
                                  "message": "no ConfigMap for this pool", "reason": "Forbidden"}]},
    }))
    .unwrap();
    let vap_binding: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "deny-blocked-config"},
        "spec": {"policyName": "deny-blocked-config", "validationActions": ["Deny"]},
    }))
    .unwrap();
    for (obj, kind) in [
        (&vap, "ValidatingAdmissionPolicy"),
        (&vap_binding, "ValidatingAdmissionPolicyBinding"),
    ] {
        let ar = kube::discovery::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            kind,
        ));
        Api::<kube::api::DynamicObject>::all_with(client.clone(), &ar)
            .patch(
                &obj.metadata.name.clone().unwrap(),
                &ssa,
                &Patch::Apply(obj),
            )
            .await
            .unwrap();
    }
    let probe: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "blocked-config"}}))
    .unwrap();
    eventually("the policy denies", Duration::from_secs(30), || async {
        match cms.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(e)) if e.code == 403 => Some(()),
            Ok(_) => {
                let _ = cms.delete("blocked-config", &DeleteParams::default()).await;
                None
            }
            Err(_) => None,
        }
    })
    .await;
    let blocked: ConnectionPool = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "blocked"},
        "spec": {"database": {"host": "db", "credentialsSecret": "app-db-credentials",
                              "maxConnections": 40},
                 "clientAuth": {"usersSecret": "app-users"}},
    }))
    .unwrap();
    pools
        .create(&PostParams::default(), &blocked)
        .await
        .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let note = eventually("a Forbidden event", Duration::from_secs(30), || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("blocked")
                    && e.reason.as_deref() == Some("Forbidden")
            })?
            .note
    })
    .await;
    assert!(note.contains("no ConfigMap for this pool"), "{note}");
    let (status, message) = eventually("Degraded Forbidden", Duration::from_secs(60), || async {
        let p = pools.get("blocked").await.ok()?;
        let c = p
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded")?;
        (c.reason == "Forbidden").then_some((c.status, c.message))
    })
    .await;
    assert_eq!(status, "True");
    assert!(message.contains("retrying"), "{message}");
    pools
        .delete("blocked", &DeleteParams::background())
        .await
        .unwrap();

    // Printer columns.
    let kubectl = sluice_testkit::k8s_bin_dir().unwrap().join("kubectl");
    let out = std::process::Command::new(kubectl)
        .args([
            "--kubeconfig",
            cp.kubeconfig_path().to_str().unwrap(),
            "get",
            "cpool",
            "app",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for col in ["REPLICAS", "READY", "LIMIT/REPLICA", "BUDGET", "AGE"] {
        assert!(text.contains(col), "missing column {col}: {text}");
    }

    // Deleting the pool (background, as kubectl does) garbage-collects its children and
    // removes its metric series.
    assert!(metrics.render().contains("pool=\"app\""));
    pools
        .delete("app", &DeleteParams::background())
        .await
        .unwrap();
    eventually("children collected", Duration::from_secs(60), || async {
        (cms.get_opt("app-config").await.ok()?.is_none()
            && deps.get_opt("app").await.ok()?.is_none())
        .then_some(())
    })
    .await;
    eventually("metric series removed", Duration::from_secs(30), || async {
        (!metrics.render().contains("pool=\"app\"")).then_some(())
    })
    .await;

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
}
