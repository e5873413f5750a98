//! Reconcile scenarios against an in-memory API server behind `tower_test::mock::pair`.
//!
//! The fake keeps objects by URL path, answers GET/PATCH (apply)/DELETE/POST like the API
//! server would for this operator's requests, and logs every request so the tests can check
//! which writes happened and in what order. Before each reconcile the harness relists the
//! fake's objects into the watch caches the reconciler reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;

use super::watches::pools_referencing;
use super::*;
use crate::api::BudgetSource;
use crate::api::ConnectionPool;
use crate::budget::DatabaseLimits;
use crate::cache::{self, CacheWriters};
use crate::desired::tests::minimal;
use crate::discovery::BoxFuture;
use crate::discovery::Target;
use crate::resize::PodReport;

const NS: &str = "default";
const POOL_PATH: &str = "/apis/sluice.dev/v1alpha1/namespaces/default/connectionpools/app";
const CM_PATH: &str = "/api/v1/namespaces/default/configmaps/app-config";
const DEP_PATH: &str = "/apis/apps/v1/namespaces/default/deployments/app";
const PODS_PATH: &str = "/api/v1/namespaces/default/pods";

#[derive(Clone, Debug)]
struct Logged {
    method: Method,
    path: String,
    body: Value,
}

#[derive(Default)]
struct FakeApi {
    objects: Mutex<BTreeMap<String, Value>>,
    log: Mutex<Vec<Logged>>,
    rv: Mutex<u64>,
}

impl FakeApi {
    fn put(&self, path: &str, obj: Value) {
        self.objects.lock().unwrap().insert(path.to_string(), obj);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    fn remove(&self, path: &str) {
        self.objects.lock().unwrap().remove(path);
    }

    fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn next_rv(&self) -> String {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        rv.to_string()
    }

    fn handle(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        self.log.lock().unwrap().push(Logged {
            method: method.clone(),
            path: path.into(),
            body: body.clone(),
        });
        let not_found = || {
            (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
            )
        };
        match method {
            Method::GET => match self.get(path) {
                Some(v) => (StatusCode::OK, v),
                None => not_found(),
            },
            Method::PATCH if path.ends_with("/status") => {
                let obj_path = path.trim_end_matches("/status");
                let Some(mut obj) = self.get(obj_path) else {
                    return not_found();
                };
                obj["status"] = body["status"].clone();
                self.put(obj_path, obj.clone());
                (StatusCode::OK, obj)
            }
            Method::PATCH => {
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                if let Some(old) = self.get(path) {
                    obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                    if let Some(st) = old.get("status") {
                        obj["status"] = st.clone();
                    }
                }
                self.put(path, obj.clone());
                (StatusCode::OK, obj)
            }
            Method::DELETE => match self.get(path) {
                Some(v) => {
                    self.remove(path);
                    (StatusCode::OK, v)
                }
                None => not_found(),
            },
            Method::POST => (StatusCode::CREATED, body),
            _ => (StatusCode::METHOD_NOT_ALLOWED, json!({})),
        }
    }
}

async fn serve(
    api: Arc<FakeApi>,
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
) {
    while let Some((req, send)) = handle.next_request().await {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let (code, out) = api.handle(method, &path, body);
        let resp = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&out).unwrap()))
            .unwrap();
        send.send_response(resp);
    }
}

#[derive(Default)]
struct FakeProbe {
    reports: Mutex<HashMap<String, PodReport>>,
    /// (ip, token) of each admission sent.
    admitted: Mutex<Vec<(String, String)>>,
}

impl ProbePods for FakeProbe {
    fn status<'a>(&'a self, ip: &'a str) -> BoxFuture<'a, Option<PodReport>> {
        let r = self.reports.lock().unwrap().get(ip).cloned();
        Box::pin(async move { r })
    }

    fn admit<'a>(&'a self, ip: &'a str, token: &'a str) -> BoxFuture<'a, bool> {
        self.admitted
            .lock()
            .unwrap()
            .push((ip.to_string(), token.to_string()));
        if let Some(r) = self.reports.lock().unwrap().get_mut(ip) {
            r.admitted = true;
        }
        Box::pin(async move { true })
    }
}

struct FakeDiscovery {
    result: Mutex<std::result::Result<DatabaseLimits, String>>,
    /// The last target asked.
    last: Mutex<Option<Target>>,
}

impl Discover for FakeDiscovery {
    fn discover<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<DatabaseLimits>> {
        *self.last.lock().unwrap() = Some(target.clone());
        let r = self.result.lock().unwrap().clone();
        let target = format!("{}:{}", target.host, target.port);
        Box::pin(async move { r.map_err(|_| Error::DiscoveryTimeout { target }) })
    }
}

struct Harness {
    api: Arc<FakeApi>,
    writers: Mutex<CacheWriters>,
    probe: Arc<FakeProbe>,
    discovery: Arc<FakeDiscovery>,
    ctx: Arc<Context>,
}

fn limits(max: i64) -> DatabaseLimits {
    DatabaseLimits {
        max_connections: max,
        superuser_reserved: 3,
        reserved_connections: 0,
        source: BudgetSource::Discovered,
    }
}

/// A Secret with a fresh resourceVersion, as an API server gives each write.
fn secret(name: &str, data: Value) -> Value {
    static RV: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
    let rv = RV
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": NS, "resourceVersion": rv}, "data": data})
}

impl Harness {
    /// max_connections 60, superuser reserved 3 → reserved 6 → budget 51.
    fn new(settings: Settings) -> Self {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, NS);
        let api = Arc::new(FakeApi::default());
        tokio::spawn(serve(api.clone(), handle));
        let probe = Arc::new(FakeProbe::default());
        let discovery = Arc::new(FakeDiscovery {
            result: Mutex::new(Ok(limits(60))),
            last: Mutex::new(None),
        });
        let (caches, writers) = cache::caches();
        let ctx = Arc::new(Context::new(
            client,
            caches,
            Arc::new(Metrics::default()),
            discovery.clone(),
            probe.clone(),
            settings,
        ));
        // "dXNlcg==" = "user", "cGFzcw==" = "pass"
        api.put(
            "/api/v1/namespaces/default/secrets/app-db-credentials",
            secret(
                "app-db-credentials",
                json!({"username": "dXNlcg==", "password": "cGFzcw=="}),
            ),
        );
        api.put(
            "/api/v1/namespaces/default/secrets/app-users",
            secret("app-users", json!({"app": "cGFzcw=="})),
        );
        let mut pool = serde_json::to_value(minimal()).unwrap();
        pool["metadata"]["generation"] = json!(1);
        api.put(POOL_PATH, pool);
        Self {
            api,
            writers: Mutex::new(writers),
            probe,
            discovery,
            ctx,
        }
    }

    fn pool(&self) -> Arc<ConnectionPool> {
        Arc::new(serde_json::from_value(self.api.get(POOL_PATH).unwrap()).unwrap())
    }

    fn set_replicas(&self, n: i32) {
        let mut p = self.api.get(POOL_PATH).unwrap();
        p["spec"]["replicas"] = json!(n);
        let g = p["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        p["metadata"]["generation"] = json!(g);
        self.api.put(POOL_PATH, p);
    }

    /// Reconciles once, with caches that have caught up with the fake API server.
    async fn reconcile(&self) -> Action {
        self.sync_caches();
        reconcile(self.pool(), self.ctx.clone()).await.unwrap()
    }

    /// Replaces every cache's contents with the fake API server's objects, as a relist would.
    fn sync_caches(&self) {
        fn relist<K>(api: &FakeApi, writer: &mut reflector::store::Writer<K>, prefix: &str)
        where
            K: Resource<DynamicType = ()> + Clone + DeserializeOwned + 'static,
        {
            writer.apply_watcher_event(&watcher::Event::Init);
            for (path, obj) in api.objects.lock().unwrap().iter() {
                if path.starts_with(prefix) {
                    let obj: K = serde_json::from_value(obj.clone()).unwrap();
                    writer.apply_watcher_event(&watcher::Event::InitApply(obj));
                }
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        let api = &self.api;
        let mut w = self.writers.lock().unwrap();
        relist::<kube::core::PartialObjectMeta<Secret>>(
            api,
            &mut w.secrets,
            "/api/v1/namespaces/default/secrets/",
        );
        relist(
            api,
            &mut w.config_maps,
            "/api/v1/namespaces/default/configmaps/",
        );
        relist(
            api,
            &mut w.deployments,
            "/apis/apps/v1/namespaces/default/deployments/",
        );
        relist(api, &mut w.services, "/api/v1/namespaces/default/services/");
        relist(
            api,
            &mut w.pdbs,
            "/apis/policy/v1/namespaces/default/poddisruptionbudgets/",
        );
        relist(
            api,
            &mut w.service_accounts,
            "/api/v1/namespaces/default/serviceaccounts/",
        );
        relist(api, &mut w.pods, &format!("{PODS_PATH}/"));
    }

    fn config_limit(&self) -> i64 {
        let cm = self.api.get(CM_PATH).unwrap();
        cm["metadata"]["annotations"][LIMIT_ANNOTATION]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn config_hash(&self) -> String {
        let cm = self.api.get(CM_PATH).unwrap();
        desired::config_hash(cm["data"]["pooler.toml"].as_str().unwrap())
    }

    fn deployment_replicas(&self) -> i64 {
        self.api.get(DEP_PATH).unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap()
    }

    /// Pods `0..n` as the Deployment controller would create them, ready, each reporting
    /// the ConfigMap's current hash and limit.
    fn run_pods(&self, n: usize) {
        let (hash, limit) = (self.config_hash(), self.config_limit());
        // The Deployment controller's view: rolled out.
        let mut dep = self.api.get(DEP_PATH).unwrap();
        dep["status"] = json!({"replicas": n, "updatedReplicas": n, "readyReplicas": n});
        self.api.put(DEP_PATH, dep);
        for i in 0..n {
            let name = format!("app-{i}");
            let ip = format!("10.0.0.{i}");
            self.api.put(
                &format!("{PODS_PATH}/{name}"),
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": NS,
                                    "labels": {"app.kubernetes.io/name": "sluice-pooler", "sluice.dev/pool": "app"}},
                       "spec": {"nodeName": "node-1", "containers": [{"name": "pooler"}]},
                       "status": {"podIP": ip, "phase": "Running",
                                  "conditions": [{"type": "Ready", "status": "True"}]}}),
            );
            self.report(i, &hash, limit);
        }
    }

    fn report(&self, i: usize, hash: &str, limit: i64) {
        self.probe.reports.lock().unwrap().insert(
            format!("10.0.0.{i}"),
            PodReport {
                config_hash: hash.into(),
                connection_limit: limit,
                held: 0,
                admitted: true,
                nonce: String::new(),
            },
        );
    }

    fn terminate_pod(&self, i: usize) {
        let path = format!("{PODS_PATH}/app-{i}");
        let mut p = self.api.get(&path).unwrap();
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.api.put(&path, p);
    }

    fn status(&self) -> Value {
        self.api.get(POOL_PATH).unwrap()["status"].clone()
    }

    fn condition(&self, type_: &str) -> Value {
        self.status()["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap()
    }

    /// Creates the pool and brings it to a settled state with `n` running pods.
    async fn settled(&self, n: i32) {
        self.set_replicas(n);
        self.reconcile().await;
        self.run_pods(n as usize);
        self.reconcile().await;
        self.reconcile().await;
        self.api.take_log();
    }
}

fn writes(log: &[Logged]) -> Vec<String> {
    log.iter()
        .filter(|l| l.method != Method::GET)
        .map(|l| format!("{} {}", l.method, l.path))
        .collect()
}

fn position(log: &[Logged], method: Method, path: &str) -> Option<usize> {
    log.iter()
        .position(|l| l.method == method && l.path == path)
}

#[tokio::test]
async fn create_applies_every_child_with_the_budgeted_limit() {
    let h = Harness::new(Settings::default());
    h.reconcile().await;
    let log = h.api.take_log();
    let w = writes(&log);
    for path in [
        "/api/v1/namespaces/default/serviceaccounts/app-pooler",
        CM_PATH,
        "/api/v1/namespaces/default/services/app",
        "/apis/policy/v1/namespaces/default/poddisruptionbudgets/app",
        DEP_PATH,
        "/apis/sluice.dev/v1alpha1/namespaces/default/connectionpools/app/status",
    ] {
        assert!(
            w.contains(&format!("PATCH {path}")),
            "no apply of {path}: {w:?}"
        );
    }
    assert!(position(&log, Method::PATCH, CM_PATH) < position(&log, Method::PATCH, DEP_PATH));
    // budget 60 - 3 - 6 = 51; 2 replicas + 1 rollout pod → 17.
    assert_eq!(h.config_limit(), 17);
    assert_eq!(h.deployment_replicas(), 2);
    let budget = &h.status()["budget"];
    assert_eq!(
        (
            budget["available"].as_i64(),
            budget["perReplicaLimit"].as_i64()
        ),
        (Some(51), Some(17))
    );
    assert_eq!(budget["worstCaseTotal"].as_i64(), Some(51));
    assert_eq!(
        h.status()["selector"],
        "app.kubernetes.io/name=sluice-pooler,sluice.dev/pool=app"
    );
    // Field manager and apply semantics on every write.
    let patch = log
        .iter()
        .find(|l| l.path == CM_PATH && l.method == Method::PATCH)
        .unwrap();
    assert_eq!(patch.body["kind"], "ConfigMap");
}

#[tokio::test]
async fn steady_state_makes_no_writes() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    for _ in 0..3 {
        h.reconcile().await;
        let log = h.api.take_log();
        assert_eq!(writes(&log), Vec::<String>::new(), "steady state wrote");
        assert!(
            log.is_empty(),
            "steady state read from the API server instead of the caches: {log:?}"
        );
    }
    assert_eq!(h.condition("Ready")["status"], "True");
    assert_eq!(h.condition("Progressing")["status"], "False");
    assert_eq!(h.ctx.metrics.api_requests_with_verb("delete"), 0);
}

/// Each step is its own event with its own note: the recorder once merged the
/// second `ConfigUpdated` into the first and kept the first's note.
#[tokio::test]
async fn each_step_is_its_own_accurate_event() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    h.api.take_log();
    h.set_replicas(4);
    h.reconcile().await;
    let log = h.api.take_log();
    let created: Vec<(String, String)> = log
        .iter()
        .filter(|l| l.method == Method::POST && l.path.contains("events"))
        .map(|l| {
            (
                l.body["reason"].as_str().unwrap_or("").to_string(),
                l.body["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        created.contains(&("ConfigUpdated".into(), "connection_limit 17 -> 10".into())),
        "{created:?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.method == Method::PATCH && l.path.contains("events")),
        "no event was merged into an earlier one"
    );
}

#[tokio::test]
async fn scale_up_lowers_the_limit_before_the_deployment_grows() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    assert_eq!(h.config_limit(), 17);
    h.set_replicas(4);
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        position(&log, Method::PATCH, CM_PATH).is_some(),
        "ConfigMap not lowered: {:?}",
        writes(&log)
    );
    assert!(
        position(&log, Method::PATCH, DEP_PATH).is_none(),
        "Deployment grew before acks"
    );
    assert_eq!((h.config_limit(), h.deployment_replicas()), (10, 2));
    assert_eq!(h.condition("Progressing")["reason"], "LoweringLimit");
    assert_eq!(h.status()["resize"]["phase"], "LoweringLimit");

    // One pod applied the new config: still waiting.
    let new_hash = h.config_hash();
    h.report(0, &new_hash, 10);
    h.reconcile().await;
    assert!(position(&h.api.take_log(), Method::PATCH, DEP_PATH).is_none());
    // Both did: the Deployment grows.
    h.report(1, &new_hash, 10);
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        position(&log, Method::PATCH, DEP_PATH).is_some(),
        "{:?}",
        writes(&log)
    );
    assert!(position(&log, Method::PATCH, CM_PATH).is_none());
    assert_eq!(h.deployment_replicas(), 4);
    // New pods start with the lowered config; the pool settles.
    h.run_pods(4);
    h.reconcile().await;
    h.reconcile().await;
    h.api.take_log();
    h.reconcile().await;
    assert_eq!(writes(&h.api.take_log()), Vec::<String>::new());
    assert_eq!(h.status()["budget"]["perReplicaLimit"], 10);
    assert!(h.status().get("resize").is_none());
}

#[tokio::test]
async fn scale_down_shrinks_before_the_limit_rises() {
    let h = Harness::new(Settings::default());
    h.settled(4).await;
    assert_eq!(h.config_limit(), 10);
    h.set_replicas(2);
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        position(&log, Method::PATCH, DEP_PATH).is_some(),
        "{:?}",
        writes(&log)
    );
    assert!(
        position(&log, Method::PATCH, CM_PATH).is_none(),
        "limit raised before pods were gone"
    );
    assert_eq!((h.deployment_replicas(), h.config_limit()), (2, 10));
    assert_eq!(h.condition("Progressing")["reason"], "ScalingDown");
    // Removed pods are terminating (draining): the limit stays.
    h.terminate_pod(2);
    h.terminate_pod(3);
    h.reconcile().await;
    assert!(position(&h.api.take_log(), Method::PATCH, CM_PATH).is_none());
    // Gone: the limit rises.
    h.api.remove(&format!("{PODS_PATH}/app-2"));
    h.api.remove(&format!("{PODS_PATH}/app-3"));
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        position(&log, Method::PATCH, CM_PATH).is_some(),
        "{:?}",
        writes(&log)
    );
    assert_eq!(h.config_limit(), 17);
}

#[tokio::test]
async fn budget_exceeded_keeps_the_last_good_config() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    let cm_before = h.api.get(CM_PATH).unwrap();
    h.set_replicas(60);
    h.reconcile().await;
    let log = h.api.take_log();
    let w = writes(&log);
    assert!(
        !w.iter()
            .any(|p| p.contains("configmaps") || p.contains("deployments")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|p| p.starts_with("POST") && p.contains("events")),
        "no event: {w:?}"
    );
    assert_eq!(h.api.get(CM_PATH).unwrap(), cm_before);
    assert_eq!(h.condition("BudgetExceeded")["status"], "True");
    assert_eq!(h.condition("Ready")["status"], "False");
    // Its pods keep 17 each: other pools of its database still count that, and status
    // shows the limit they run (issue 18: it showed 0) and the pods as they are.
    assert_eq!(h.status()["budget"]["committed"], 51);
    assert_eq!(h.status()["budget"]["perReplicaLimit"], 17);
    assert_eq!(h.status()["state"], "BudgetExceeded");
    // A second reconcile of the same infeasible pool writes nothing.
    h.reconcile().await;
    assert_eq!(writes(&h.api.take_log()), Vec::<String>::new());
}

#[tokio::test]
async fn missing_secret_is_degraded_and_names_it() {
    let h = Harness::new(Settings::default());
    h.api
        .remove("/api/v1/namespaces/default/secrets/app-db-credentials");
    h.reconcile().await;
    let w = writes(&h.api.take_log());
    assert!(
        !w.iter()
            .any(|p| p.contains("configmaps") || p.contains("deployments")),
        "{w:?}"
    );
    let c = h.condition("Degraded");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("SecretNotFound"))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("default/app-db-credentials"),
        "{c}"
    );
}

#[tokio::test]
async fn tls_secrets_are_checked_mounted_and_used_for_discovery() {
    let h = Harness::new(Settings::default());
    let mut p = h.api.get(POOL_PATH).unwrap();
    p["spec"]["database"]["tls"] = json!({"sslMode": "verify-full", "caSecret": "db-ca"});
    p["spec"]["clientTLS"] = json!({"mode": "require", "secretName": "pooler-tls"});
    h.api.put(POOL_PATH, p);

    // Neither Secret exists: Degraded, naming the first, and nothing written.
    h.reconcile().await;
    let w = writes(&h.api.take_log());
    assert!(!w.iter().any(|p| p.contains("configmaps")), "{w:?}");
    let c = h.condition("Degraded");
    assert_eq!(c["reason"], "SecretNotFound", "{c}");
    assert!(
        c["message"].as_str().unwrap().contains("default/db-ca"),
        "{c}"
    );

    // "LS0t" is base64 of "---".
    h.api.put(
        "/api/v1/namespaces/default/secrets/db-ca",
        secret("db-ca", json!({"ca.crt": "LS0t"})),
    );
    // The client certificate Secret lacks its key.
    h.api.put(
        "/api/v1/namespaces/default/secrets/pooler-tls",
        secret("pooler-tls", json!({"tls.crt": "LS0t"})),
    );
    h.reconcile().await;
    let c = h.condition("Degraded");
    assert_eq!(c["reason"], "SecretInvalid", "{c}");
    assert!(c["message"].as_str().unwrap().contains("tls.key"), "{c}");

    h.api.put(
        "/api/v1/namespaces/default/secrets/pooler-tls",
        secret("pooler-tls", json!({"tls.crt": "LS0t", "tls.key": "LS0t"})),
    );
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    let toml = h.api.get(CM_PATH).unwrap()["data"]["pooler.toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        toml.contains(
            "[server.tls]\nsslmode = \"verify-full\"\nca_file = \"/etc/sluice/server-tls/ca.crt\""
        ) && toml.contains("[client_tls]\nmode = \"require\""),
        "{toml}"
    );
    let target = h.discovery.last.lock().unwrap().clone().unwrap();
    assert_eq!(target.tls.mode, sluice_contract::SslMode::VerifyFull);
    assert_eq!(target.tls.ca_pem.as_deref(), Some(&b"---"[..]));

    // The CA from a ConfigMap (as trust-manager distributes it) instead.
    let mut p = h.api.get(POOL_PATH).unwrap();
    p["spec"]["database"]["tls"] = json!({"sslMode": "verify-full", "caConfigMap": "trust"});
    p["metadata"]["generation"] = json!(2);
    h.api.put(POOL_PATH, p);
    h.reconcile().await;
    let c = h.condition("Degraded");
    assert_eq!(c["reason"], "ConfigMapNotFound", "{c}");
    h.api.put(
        "/api/v1/namespaces/default/configmaps/trust",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "trust", "namespace": NS, "resourceVersion": "9"},
               "data": {"ca.crt": "bundle"}}),
    );
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    let target = h.discovery.last.lock().unwrap().clone().unwrap();
    assert_eq!(target.tls.ca_pem.as_deref(), Some(&b"bundle"[..]));
}

/// Discovery may log in as a role of its own, so it is not refused while the pool's
/// role is at its connection limit.
#[tokio::test]
async fn discovery_uses_its_own_credentials_when_given() {
    let h = Harness::new(Settings::default());
    let mut p = h.api.get(POOL_PATH).unwrap();
    p["spec"]["database"]["discoveryCredentialsSecret"] = json!("monitor");
    h.api.put(POOL_PATH, p);
    h.reconcile().await;
    let c = h.condition("Degraded");
    assert_eq!(c["reason"], "SecretNotFound", "{c}");
    assert!(
        c["message"].as_str().unwrap().contains("default/monitor"),
        "{c}"
    );
    // "bW9uaXRvcg==" = "monitor"
    h.api.put(
        "/api/v1/namespaces/default/secrets/monitor",
        secret(
            "monitor",
            json!({"username": "bW9uaXRvcg==", "password": "cGFzcw=="}),
        ),
    );
    h.reconcile().await;
    assert_eq!(h.condition("Degraded")["status"], "False");
    let target = h.discovery.last.lock().unwrap().clone().unwrap();
    assert_eq!(target.user, "monitor");
    // The pooler still logs in with credentialsSecret.
    let toml = h.api.get(CM_PATH).unwrap()["data"]["pooler.toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        toml.contains("user_file = \"/etc/sluice/server/username\""),
        "{toml}"
    );
}

#[tokio::test]
async fn unreachable_database_is_degraded_and_keeps_config() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    let cm_before = h.api.get(CM_PATH).unwrap();
    *h.discovery.result.lock().unwrap() = Err("down".into());
    // A spec change forces a fresh discovery.
    h.set_replicas(3);
    h.reconcile().await;
    let w = writes(&h.api.take_log());
    assert!(
        !w.iter()
            .any(|p| p.contains("configmaps") || p.contains("deployments")),
        "{w:?}"
    );
    assert_eq!(h.api.get(CM_PATH).unwrap(), cm_before);
    let c = h.condition("Degraded");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("DatabaseUnreachable"))
    );
}

/// A database that cannot be reached does not freeze the pool: a scale-down (always
/// safe) proceeds with the limits last discovered, while anything that could raise what
/// the pods hold waits for the database.
#[tokio::test]
async fn a_scale_down_proceeds_while_the_database_is_unreachable() {
    let h = Harness::new(Settings {
        // Every reconcile asks the database.
        discovery_interval: Duration::ZERO,
        ..Settings::default()
    });
    h.settled(3).await;
    assert_eq!((h.config_limit(), h.deployment_replicas()), (12, 3));
    *h.discovery.result.lock().unwrap() = Err("down".into());
    h.set_replicas(2);
    h.reconcile().await;
    assert_eq!(
        (h.config_limit(), h.deployment_replicas()),
        (12, 2),
        "the Deployment shrinks, the limit stays"
    );
    let c = h.condition("Degraded");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("DatabaseUnreachable"))
    );
    // The removed pod is gone; raising the limit waits for the database.
    h.api.remove(&format!("{PODS_PATH}/app-2"));
    h.run_pods(2);
    h.reconcile().await;
    assert_eq!(h.config_limit(), 12);
    // A scale-up waits too.
    h.set_replicas(4);
    h.reconcile().await;
    assert_eq!((h.config_limit(), h.deployment_replicas()), (12, 2));
    // The database is back: the pool converges.
    *h.discovery.result.lock().unwrap() = Ok(limits(60));
    h.settled(2).await;
    h.reconcile().await;
    assert_eq!((h.config_limit(), h.deployment_replicas()), (17, 2));
    assert_eq!(h.condition("Degraded")["status"], "False");
}

#[tokio::test]
async fn pods_that_do_not_acknowledge_are_deleted_after_the_timeout() {
    let h = Harness::new(Settings {
        ack_timeout: Duration::ZERO,
        ..Settings::default()
    });
    h.settled(2).await;
    h.set_replicas(4);
    h.reconcile().await;
    let log = h.api.take_log();
    // One pod at a time.
    let deleted = |log: &[Logged], i: usize| {
        position(log, Method::DELETE, &format!("{PODS_PATH}/app-{i}")).is_some()
    };
    assert!(deleted(&log, 0), "{:?}", writes(&log));
    assert!(!deleted(&log, 1), "{:?}", writes(&log));
    assert!(position(&log, Method::PATCH, DEP_PATH).is_none());
    // Never while another pod drains.
    h.run_pods(2);
    h.report(0, "old", 17);
    h.report(1, "old", 17);
    h.terminate_pod(0);
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        !writes(&log).iter().any(|w| w.starts_with("DELETE")),
        "{:?}",
        writes(&log)
    );
    assert!(position(&log, Method::PATCH, DEP_PATH).is_none());
}

#[tokio::test]
async fn secret_rotation_rerolls_config_without_restarting_pods() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    let dep_before = h.api.get(DEP_PATH).unwrap();
    let hash_before = h.config_hash();
    let mut s = h
        .api
        .get("/api/v1/namespaces/default/secrets/app-users")
        .unwrap();
    s["metadata"]["resourceVersion"] = json!("8");
    h.api.put("/api/v1/namespaces/default/secrets/app-users", s);
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(position(&log, Method::PATCH, CM_PATH).is_some());
    assert!(position(&log, Method::PATCH, DEP_PATH).is_none());
    assert_ne!(h.config_hash(), hash_before);
    assert_eq!(h.api.get(DEP_PATH).unwrap(), dep_before);
}

#[test]
fn secrets_map_to_the_pools_that_reference_them() {
    let pool = Arc::new(minimal());
    let mut s = Secret::default();
    s.metadata.name = Some("app-users".into());
    s.metadata.namespace = Some("default".into());
    let meta = |s: &Secret| {
        use kube::core::PartialObjectMetaExt;
        s.metadata.clone().into_response_partial::<Secret>()
    };
    assert_eq!(
        pools_referencing(std::slice::from_ref(&pool), &meta(&s)).len(),
        1
    );
    s.metadata.namespace = Some("other".into());
    assert!(pools_referencing(&[pool], &meta(&s)).is_empty());
}

#[tokio::test]
async fn only_the_secrets_pools_reference_are_read_whole_and_only_when_changed() {
    let h = Harness::new(Settings::default());
    for i in 0..50 {
        h.api.put(
            &format!("/api/v1/namespaces/default/secrets/unrelated-{i}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": format!("unrelated-{i}"), "namespace": "default",
                                "resourceVersion": "7"},
                   "data": {"big": "AAAA"}}),
        );
    }
    for path in [
        "/api/v1/namespaces/default/secrets/app-db-credentials",
        "/api/v1/namespaces/default/secrets/app-users",
    ] {
        let mut s = h.api.get(path).unwrap();
        s["metadata"]["resourceVersion"] = json!("5");
        h.api.put(path, s);
    }
    h.reconcile().await;
    let secret_gets = |log: &[Logged]| {
        log.iter()
            .filter(|l| l.method == Method::GET && l.path.contains("/secrets/"))
            .map(|l| l.path.clone())
            .collect::<Vec<_>>()
    };
    let gets = secret_gets(&h.api.take_log());
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets.iter().all(|p| !p.contains("unrelated")));
    assert_eq!(h.ctx.caches.secret_data.len(), 2);
    // Unchanged: served from what was read.
    h.reconcile().await;
    assert!(secret_gets(&h.api.take_log()).is_empty());
    // Changed (a new resourceVersion): read again.
    let path = "/api/v1/namespaces/default/secrets/app-users";
    let mut s = h.api.get(path).unwrap();
    s["metadata"]["resourceVersion"] = json!("6");
    h.api.put(path, s);
    h.reconcile().await;
    assert_eq!(secret_gets(&h.api.take_log()), vec![path.to_string()]);
}

#[tokio::test]
async fn manual_changes_that_break_the_budget_are_reverted() {
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    // Someone scales the Deployment directly and edits the limit.
    let mut dep = h.api.get(DEP_PATH).unwrap();
    dep["spec"]["replicas"] = json!(10);
    h.api.put(DEP_PATH, dep);
    let mut cm = h.api.get(CM_PATH).unwrap();
    cm["data"]["pooler.toml"] = json!("connection_limit = 1000\n");
    h.api.put(CM_PATH, cm);
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        position(&log, Method::PATCH, DEP_PATH).is_some(),
        "{:?}",
        writes(&log)
    );
    assert!(
        position(&log, Method::PATCH, CM_PATH).is_some(),
        "{:?}",
        writes(&log)
    );
    // The limit is first made safe for the 10 pods that may still exist: ⌊51 / 11⌋ = 4.
    assert_eq!(h.deployment_replicas(), 2);
    assert_eq!(h.config_limit(), 4);
    let toml = h.api.get(CM_PATH).unwrap()["data"]["pooler.toml"].clone();
    assert!(
        toml.as_str().unwrap().contains("connection_limit = 4\n"),
        "{toml}"
    );
}

/// Hand edits of what bounds the pods during a rollout (the strategy, minReadySeconds,
/// the grace period, the selectors) are put back: with `maxSurge: 1` a rollout would run
/// one pod more than the budget counts.
#[tokio::test]
async fn hand_edits_of_rollout_bounds_and_selectors_are_reverted() {
    let svc_path = "/api/v1/namespaces/default/services/app";
    let h = Harness::new(Settings::default());
    h.settled(2).await;
    let want_dep = h.api.get(DEP_PATH).unwrap();
    let want_svc = h.api.get(svc_path).unwrap();
    let edits: [(&str, &str, Value); 5] = [
        (DEP_PATH, "/spec/strategy/rollingUpdate/maxSurge", json!(1)),
        (DEP_PATH, "/spec/minReadySeconds", json!(0)),
        (
            DEP_PATH,
            "/spec/template/spec/terminationGracePeriodSeconds",
            json!(1),
        ),
        (DEP_PATH, "/spec/selector/matchLabels/extra", json!("x")),
        (
            svc_path,
            "/spec/selector/app.kubernetes.io~1name",
            json!("other"),
        ),
    ];
    for (path, pointer, value) in edits {
        let mut obj = h.api.get(path).unwrap();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        obj.pointer_mut(parent).unwrap()[key.replace("~1", "/")] = value.clone();
        h.api.put(path, obj);
        h.api.take_log();
        h.reconcile().await;
        let log = h.api.take_log();
        assert!(
            position(&log, Method::PATCH, path).is_some(),
            "{pointer} not restored: {:?}",
            writes(&log)
        );
        assert_eq!(
            h.api.get(path).unwrap().pointer(pointer),
            if path == DEP_PATH {
                &want_dep
            } else {
                &want_svc
            }
            .pointer(pointer),
            "{pointer}"
        );
    }
}

#[tokio::test]
async fn a_restarted_operator_resumes_a_resize_from_what_it_observes() {
    let mut h = Harness::new(Settings::default());
    h.settled(2).await;
    h.set_replicas(4);
    h.reconcile().await;
    assert_eq!((h.config_limit(), h.deployment_replicas()), (10, 2));
    h.api.take_log();

    // A new operator process: fresh caches, same API server, same pods.
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(serve(h.api.clone(), handle));
    let (caches, writers) = cache::caches();
    h.writers = Mutex::new(writers);
    h.ctx = Arc::new(Context::new(
        Client::new(svc, NS),
        caches,
        Arc::new(Metrics::default()),
        h.discovery.clone(),
        h.probe.clone(),
        Settings::default(),
    ));
    // Pods have not acknowledged yet: it keeps waiting, without writing the ConfigMap again.
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        position(&log, Method::PATCH, CM_PATH).is_none(),
        "{:?}",
        writes(&log)
    );
    assert!(
        position(&log, Method::PATCH, DEP_PATH).is_none(),
        "{:?}",
        writes(&log)
    );
    assert_eq!(h.condition("Progressing")["reason"], "LoweringLimit");
    // They acknowledge: it finishes.
    let hash = h.config_hash();
    h.report(0, &hash, 10);
    h.report(1, &hash, 10);
    h.reconcile().await;
    assert_eq!(h.deployment_replicas(), 4);
}

/// Issue 16: pools on one database divide its budget; a pool joining takes only what the
/// others no longer hold, and gets its full share once they have lowered.
#[tokio::test]
async fn pools_on_one_database_divide_its_budget() {
    let h = Harness::new(Settings::default());
    let (store, mut writer) = reflector::store::<ConnectionPool>();
    h.ctx.set_pool_store(store);
    writer.apply_watcher_event(&watcher::Event::Apply((*h.pool()).clone()));
    h.settled(2).await;
    assert_eq!(h.config_limit(), 17, "alone: the whole budget of 51");

    // A second pool on the same server, not reconciled yet.
    let mut other: ConnectionPool = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "other", "namespace": NS, "uid": "other-uid"},
        "spec": serde_json::to_value(&h.pool().spec).unwrap(),
    }))
    .unwrap();
    other.spec.replicas = 2;
    writer.apply_watcher_event(&watcher::Event::Apply(other.clone()));
    h.reconcile().await;
    let group = budget::group_key(&h.pool().spec.database);
    assert_eq!(h.config_limit(), 8, "lowered to its share of 25");
    let b = &h.status()["budget"];
    assert_eq!(
        (b["available"].as_i64(), b["groupPools"].as_i64()),
        (Some(25), Some(2))
    );
    assert_eq!(b["groupBudget"], 51);
    // Its pods still run 17 each (one more may come): the other pool must leave that.
    assert_eq!(b["committed"], 17 + 17 + 8);
    let others = h.ctx.group_members(&other, &group);
    let s = budget::share(51, 1, &others);
    assert_eq!((s.share, s.usable), (25, 51 - 42));

    // Both pods applied 8: the other pool may use its whole share.
    let hash = h.config_hash();
    h.report(0, &hash, 8);
    h.report(1, &hash, 8);
    h.reconcile().await;
    assert_eq!(h.status()["budget"]["committed"], 24);
    let s = budget::share(51, 1, &h.ctx.group_members(&other, &group));
    assert_eq!((s.share, s.usable), (25, 25));

    // A pool in another group (explicit budgetGroup) does not count.
    let mut elsewhere = other.clone();
    elsewhere.metadata.name = Some("elsewhere".into());
    elsewhere.metadata.uid = Some("elsewhere-uid".into());
    elsewhere.spec.database.budget_group = Some("analytics".into());
    writer.apply_watcher_event(&watcher::Event::Apply(elsewhere.clone()));
    assert_eq!(h.ctx.group_members(&elsewhere, "group:analytics"), vec![]);
    assert_eq!(h.ctx.group_members(&other, &group).len(), 1);
}

/// Issue 18: a Service named like the pool that the pool does not own (a user's) is
/// neither changed nor adopted (so deleting the pool cannot delete it); the pool is
/// Degraded, naming it.
#[tokio::test]
async fn an_object_it_does_not_own_is_never_taken_over() {
    let h = Harness::new(Settings::default());
    let svc_path = "/api/v1/namespaces/default/services/app";
    let users = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "app", "namespace": NS, "uid": "users-svc"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
    h.api.put(svc_path, users.clone());
    h.reconcile().await;
    let log = h.api.take_log();
    assert!(
        !log.iter()
            .any(|l| l.path == svc_path && l.method != Method::GET),
        "the user's Service was written: {:?}",
        writes(&log)
    );
    assert_eq!(h.api.get(svc_path).unwrap(), users);
    let c = h.condition("Degraded");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("NotOwned"))
    );
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("Service default/app"), "{message}");
    assert!(
        log.iter()
            .any(|l| l.method == Method::POST && l.path.contains("events")),
        "an event says so"
    );
    // Not in the operator's caches (they hold only objects labelled as its own): found by
    // name before writing, and still left alone.
    let h = Harness::new(Settings::default());
    h.api.put(svc_path, users.clone());
    h.sync_caches();
    h.writers
        .lock()
        .unwrap()
        .services
        .apply_watcher_event(&watcher::Event::Init);
    h.writers
        .lock()
        .unwrap()
        .services
        .apply_watcher_event(&watcher::Event::InitDone);
    reconcile(h.pool(), h.ctx.clone()).await.unwrap();
    assert_eq!(h.api.get(svc_path).unwrap(), users);
    assert_eq!(h.condition("Degraded")["reason"].as_str(), Some("NotOwned"));
}
