//! Pure rendering of every child object from a pool's spec, its budget decision and its Secrets.
//!
//! # Guarantees
//! - Passwords never appear in any rendered object: the pooler reads them from mounted Secrets.
//! - Every child carries a controller owner reference to the pool and the annotation
//!   [`SPEC_HASH_ANNOTATION`], a hash of everything the operator sets on it; the apply layer
//!   skips the write when the live object carries the same hash.
//! - The pod template changes only for restart-requiring changes (image, resources, pod
//!   overrides, pool mode, drain timeout); `connection_limit` and the Secrets' revision live in
//!   the ConfigMap only, which the pooler hot-reloads.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};
use sluice_contract::{
    AuthMethod, AuthSection, BudgetBasis, ConfigDuration, PoolerConfig, ServerSection,
};

use crate::api::ConnectionPool;
use crate::error::{Error, Result};

/// Port clients connect to.
pub const POSTGRES_PORT: i32 = sluice_contract::POSTGRES_PORT as i32;
/// Port of the pooler's admin HTTP API.
pub const ADMIN_PORT: i32 = sluice_contract::ADMIN_PORT as i32;
/// The pooler's HTTP and WebSocket port (`http`).
pub const HTTP_PORT: i32 = sluice_contract::HTTP_PORT as i32;
pub use sluice_contract::CONFIG_KEY;
/// Annotation with the hash of what the operator set on a child.
pub const SPEC_HASH_ANNOTATION: &str = "sluice.dev/spec-hash";
/// ConfigMap annotation with the rendered `connection_limit`.
pub const LIMIT_ANNOTATION: &str = "sluice.dev/connection-limit";
/// ConfigMap annotation with the hash of `pooler.toml`.
pub const CONFIG_HASH_ANNOTATION: &str = "sluice.dev/config-hash";
/// Pod template annotation that changes only for restart-requiring config changes.
pub const RESTART_HASH_ANNOTATION: &str = "sluice.dev/restart-hash";
/// Label naming the pool on every child and pod.
pub const POOL_LABEL: &str = "sluice.dev/pool";
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "sluice-operator";
/// Pooler defaults the operator renders when the spec leaves them out.
const DEFAULT_DRAIN: &str = "30s";
const DEFAULT_POOL_TIMEOUT: &str = "30s";
const DEFAULT_IDLE_TIMEOUT: &str = "10m";
const DEFAULT_SERVER_LIFETIME: &str = "1h";
/// Seconds the kubelet waits beyond the drain timeout before killing a pooler.
const GRACE_MARGIN_SECONDS: i64 = 5;
/// UID/GID the pooler runs as.
const POOLER_UID: i64 = 65532;

/// Everything besides the spec that a rendering depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderInputs {
    /// `connection_limit` to write into `pooler.toml`.
    pub limit: i64,
    /// `spec.replicas` of the Deployment (may lag the pool's during a resize).
    pub replicas: i32,
    /// Changes when a referenced Secret changes (see [`secrets_revision`]).
    pub revision: String,
    /// Image used when the spec names none.
    pub default_image: String,
}

/// What `pooler.toml` is rendered from besides the spec and the limit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigInputs {
    /// Changes when a referenced Secret changes (see [`secrets_revision`]).
    pub revision: String,
    /// The database size the limit is computed from (see [`BudgetBasis`]).
    pub basis: Option<BudgetBasis>,
}

#[cfg(test)]
impl ConfigInputs {
    /// Inputs with `revision` and no basis.
    pub fn new(revision: &str) -> Self {
        Self {
            revision: revision.to_string(),
            basis: None,
        }
    }
}

/// Name of the ConfigMap.
pub fn config_map_name(pool: &ConnectionPool) -> String {
    format!("{}-config", pool.name_any())
}

/// Name of the ServiceAccount of the pooler pods.
pub fn service_account_name(pool: &ConnectionPool) -> String {
    format!("{}-pooler", pool.name_any())
}

/// Labels selecting the pool's pods (stable for the pool's lifetime).
pub fn selector_labels(pool: &ConnectionPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "sluice-pooler".to_string(),
        ),
        (POOL_LABEL.to_string(), pool.name_any()),
    ])
}

/// [`selector_labels`] as a label selector string (for `status.selector` and pod lists).
pub fn selector_string(pool: &ConnectionPool) -> String {
    selector_labels(pool)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(pool: &ConnectionPool) -> BTreeMap<String, String> {
    let mut l = selector_labels(pool);
    l.insert("app.kubernetes.io/instance".into(), pool.name_any());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sluice_contract::config_hash(bytes)
}

/// The hash the pooler reports for this `pooler.toml` (see docs/interfaces.md).
pub fn config_hash(toml: &str) -> String {
    sluice_contract::config_hash(toml.as_bytes())
}

/// The config `revision`: changes whenever a referenced Secret changes, so the pooler
/// re-reads its credential files and reports a new hash.
/// `tls` carries the resourceVersions of the TLS Secrets the pooler reads once per
/// config (empty without TLS, which keeps the revision as it was before TLS).
pub fn secrets_revision(credentials_rv: &str, users_rv: &str, tls: &str) -> String {
    let mut text = format!("credentials={credentials_rv};users={users_rv}");
    if !tls.is_empty() {
        text.push_str(";tls=");
        text.push_str(tls);
    }
    sha256_hex(text.as_bytes())[..16].to_string()
}

/// Parses a duration of the spec as the pooler will (one parser for both).
///
/// # Errors
/// [`Error::InvalidSpec`] when the string is not `([0-9]+(ms|s|m|h))+` or longer than a
/// year.
pub fn parse_duration(s: &str) -> Result<ConfigDuration> {
    s.parse()
        .map_err(|e: sluice_contract::DurationError| Error::InvalidSpec(e.to_string()))
}

/// Checks what CEL cannot: every duration parses and fits, the rendered config is valid.
///
/// # Errors
/// [`Error::InvalidSpec`] naming the first problem.
pub fn validate(pool: &ConnectionPool) -> Result<()> {
    grace_seconds(pool)?;
    pooler_toml(pool, 0, &ConfigInputs::default()).map(drop)
}

/// Seconds the kubelet gives a pooler pod to drain, and the Deployment's `minReadySeconds`.
///
/// # Errors
/// When `drainTimeout` is malformed.
pub fn grace_seconds(pool: &ConnectionPool) -> Result<i64> {
    let drain = pool.spec.drain_timeout.as_deref().unwrap_or(DEFAULT_DRAIN);
    let ms = parse_duration(drain)?.get().as_millis();
    Ok(ms.div_ceil(1000) as i64 + GRACE_MARGIN_SECONDS)
}

/// Renders `pooler.toml` (docs/interfaces.md §1, [`PoolerConfig`]).
///
/// # Errors
/// When a duration in the spec is malformed.
pub fn pooler_toml(pool: &ConnectionPool, limit: i64, inputs: &ConfigInputs) -> Result<String> {
    let s = &pool.spec;
    let dur = |v: &Option<String>, default: &str| parse_duration(v.as_deref().unwrap_or(default));
    let config = PoolerConfig {
        listen_addr: format!("0.0.0.0:{POSTGRES_PORT}"),
        admin_addr: format!("0.0.0.0:{ADMIN_PORT}"),
        pool_mode: s.pool_mode,
        connection_limit: usize::try_from(limit)
            .map_err(|_| Error::InvalidSpec(format!("connection limit {limit} below 0")))?,
        max_client_connections: Some(s.max_client_connections.unwrap_or(10_000).max(0) as usize),
        pool_timeout: Some(dur(&s.pool_timeout, DEFAULT_POOL_TIMEOUT)?),
        idle_timeout: Some(dur(&s.idle_timeout, DEFAULT_IDLE_TIMEOUT)?),
        server_lifetime: Some(dur(&s.server_lifetime, DEFAULT_SERVER_LIFETIME)?),
        server_check_delay: None,
        drain_timeout: Some(dur(&s.drain_timeout, DEFAULT_DRAIN)?),
        max_prepared_statements: None,
        max_client_memory: None,
        require_admission: Some(true),
        ignore_startup_parameters: None,
        budget_basis: inputs.basis,
        revision: Some(inputs.revision.clone()),
        client_tls: s.client_tls.as_ref().map(|t| sluice_contract::ClientTls {
            mode: t.mode,
            cert_file: t
                .secret_name
                .as_ref()
                .map(|_| sluice_contract::CLIENT_CERT_FILE.into()),
            key_file: t
                .secret_name
                .as_ref()
                .map(|_| sluice_contract::CLIENT_KEY_FILE.into()),
        }),
        http: s.http_enabled().then(|| sluice_contract::HttpSection {
            listen_addr: Some(format!("0.0.0.0:{HTTP_PORT}")),
            ..Default::default()
        }),
        server: ServerSection {
            host: s.database.host.clone(),
            port: u16::try_from(s.database.port).map_err(|_| {
                Error::InvalidSpec(format!("port {} out of range", s.database.port))
            })?,
            database: s.database.name.clone(),
            user_file: Some(sluice_contract::SERVER_USER_FILE.into()),
            password_file: Some(sluice_contract::SERVER_PASSWORD_FILE.into()),
            user: None,
            password: None,
            tls: s.database.tls.as_ref().map(|t| sluice_contract::ServerTls {
                sslmode: t.ssl_mode,
                ca_file: (t.ca_secret.is_some() || t.ca_config_map.is_some())
                    .then(|| sluice_contract::SERVER_CA_FILE.into()),
                cert_file: t
                    .client_cert_secret
                    .as_ref()
                    .map(|_| sluice_contract::SERVER_CERT_FILE.into()),
                key_file: t
                    .client_cert_secret
                    .as_ref()
                    .map(|_| sluice_contract::SERVER_KEY_FILE.into()),
                server_name: t.server_name.clone(),
            }),
        },
        auth: AuthSection {
            method: AuthMethod::ScramSha256,
            users_dir: Some(sluice_contract::USERS_DIR.into()),
            users: None,
        },
    };
    Ok(config.render(&format!(
        "Rendered by sluice-operator for ConnectionPool {}/{}; do not edit.",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )))
}

fn owner_refs(pool: &ConnectionPool) -> Value {
    let oref = pool
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
    json!([oref.unwrap_or(Value::Null)])
}

fn meta(pool: &ConnectionPool, name: &str, annotations: BTreeMap<String, String>) -> Value {
    let mut m = json!({
        "name": name,
        "namespace": pool.namespace(),
        "labels": labels(pool),
        "ownerReferences": owner_refs(pool),
    });
    if !annotations.is_empty() {
        m["annotations"] = json!(annotations);
    }
    m
}

/// Sets [`SPEC_HASH_ANNOTATION`] to the hash of the object as rendered.
fn with_spec_hash<K: Serialize + Resource>(mut obj: K) -> Result<K> {
    let hash = sha256_hex(&serde_json::to_vec(&obj)?)[..16].to_string();
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(SPEC_HASH_ANNOTATION.into(), hash);
    Ok(obj)
}

/// The `<pool>-config` ConfigMap holding `pooler.toml`.
///
/// # Errors
/// When a duration in the spec is malformed.
pub fn config_map(pool: &ConnectionPool, limit: i64, inputs: &ConfigInputs) -> Result<ConfigMap> {
    let toml = pooler_toml(pool, limit, inputs)?;
    let annotations = BTreeMap::from([
        (LIMIT_ANNOTATION.to_string(), limit.to_string()),
        (CONFIG_HASH_ANNOTATION.to_string(), config_hash(&toml)),
    ]);
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(pool, &config_map_name(pool), annotations),
        "data": { CONFIG_KEY: toml },
    }))?;
    with_spec_hash(cm)
}

/// Hash of the settings that need a pooler restart (docs/interfaces.md: `pool_mode`,
/// listen, admin and HTTP addresses).
fn restart_hash(pool: &ConnectionPool) -> String {
    let mut key = format!(
        "pool_mode={};listen={POSTGRES_PORT};admin={ADMIN_PORT}",
        pool.spec.pool_mode.as_str()
    );
    // Added only when on, so pools without it keep the hash (and their pods) they had.
    if pool.spec.http_enabled() {
        key.push_str(&format!(";http={HTTP_PORT}"));
    }
    sha256_hex(key.as_bytes())[..16].to_string()
}

/// CPU request of a pooler container whose pool sets no `resources`.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// Memory request of a pooler container whose pool sets no `resources`.
pub const DEFAULT_MEMORY_REQUEST: &str = "64Mi";

/// The pooler Deployment.
///
/// # Errors
/// When a duration in the spec is malformed.
pub fn deployment(pool: &ConnectionPool, inputs: &RenderInputs) -> Result<Deployment> {
    let s = &pool.spec;
    let o = s.pod_template.clone().unwrap_or_default();
    let grace = grace_seconds(pool)?;
    let selector = selector_labels(pool);

    let mut pod_labels = o.labels.clone();
    pod_labels.extend(labels(pool));
    let mut pod_annotations = o.annotations.clone();
    pod_annotations.insert(RESTART_HASH_ANNOTATION.into(), restart_hash(pool));

    let topology = if o.topology_spread_constraints.is_empty() {
        json!([{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": { "matchLabels": selector },
        }])
    } else {
        serde_json::to_value(&o.topology_spread_constraints)?
    };
    let probe = |path: &str, period: i32, failures: i32| {
        json!({
            "httpGet": { "path": path, "port": "admin" },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        })
    };
    let mut ports = vec![
        json!({ "name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP" }),
        json!({ "name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP" }),
    ];
    if s.http_enabled() {
        ports.push(json!({ "name": "http", "containerPort": HTTP_PORT, "protocol": "TCP" }));
    }
    let mut container = json!({
        "name": "pooler",
        "image": s.image.clone().unwrap_or_else(|| inputs.default_image.clone()),
        "args": ["--config", sluice_contract::CONFIG_PATH],
        "ports": ports,
        // Ready after one good answer, unready after three bad ones in a row: a
        // moment's hiccup does not take a pod out of the Service.
        "readinessProbe": probe("/readyz", 3, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [
            { "name": "config", "mountPath": sluice_contract::CONFIG_DIR, "readOnly": true },
            { "name": "users", "mountPath": sluice_contract::USERS_DIR, "readOnly": true },
        ],
    });
    container["resources"] = match &s.resources {
        Some(r) => serde_json::to_value(r)?,
        // Scheduled where a pooler fits; no limit, so a burst is not throttled.
        None => {
            json!({ "requests": { "cpu": DEFAULT_CPU_REQUEST, "memory": DEFAULT_MEMORY_REQUEST } })
        }
    };
    if !o.env.is_empty() {
        container["env"] = serde_json::to_value(&o.env)?;
    }
    let (tls_mounts, tls_volumes) = tls_volumes(pool);
    if let Some(m) = container["volumeMounts"].as_array_mut() {
        m.extend(tls_mounts);
    }
    let mut pod_spec = json!({
        "serviceAccountName": service_account_name(pool),
        "automountServiceAccountToken": false,
        "terminationGracePeriodSeconds": grace,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": POOLER_UID,
            "runAsGroup": POOLER_UID,
            "fsGroup": POOLER_UID,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "topologySpreadConstraints": topology,
        "containers": [container],
        "volumes": [
            {
                "name": "config",
                "projected": {
                    "defaultMode": 0o440,
                    "sources": [
                        { "configMap": { "name": config_map_name(pool),
                            "items": [{ "key": CONFIG_KEY, "path": CONFIG_KEY }] } },
                        { "secret": { "name": s.database.credentials_secret,
                            "items": [
                                { "key": "username", "path": sluice_contract::SERVER_USER_ITEM },
                                { "key": "password", "path": sluice_contract::SERVER_PASSWORD_ITEM },
                            ] } },
                    ],
                },
            },
            {
                "name": "users",
                "secret": { "secretName": s.client_auth.users_secret, "defaultMode": 0o440 },
            },
        ],
    });
    if let Some(v) = pod_spec["volumes"].as_array_mut() {
        v.extend(tls_volumes);
        for extra in &o.volumes {
            v.push(serde_json::to_value(extra)?);
        }
    }
    if let Some(c) = pod_spec["containers"].as_array_mut() {
        for sidecar in &o.sidecars {
            c.push(serde_json::to_value(sidecar)?);
        }
    }
    if !o.image_pull_secrets.is_empty() {
        pod_spec["imagePullSecrets"] = serde_json::to_value(&o.image_pull_secrets)?;
    }
    if let Some(sc) = &o.security_context {
        pod_spec["securityContext"] = serde_json::to_value(sc)?;
    }
    if let Some(a) = &o.affinity {
        pod_spec["affinity"] = serde_json::to_value(a)?;
    }
    if !o.tolerations.is_empty() {
        pod_spec["tolerations"] = serde_json::to_value(&o.tolerations)?;
    }
    if !o.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(o.node_selector);
    }
    if let Some(p) = &o.priority_class_name {
        pod_spec["priorityClassName"] = json!(p);
    }
    let dep: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(pool, &pool.name_any(), BTreeMap::new()),
        "spec": {
            "replicas": inputs.replicas,
            "revisionHistoryLimit": 3,
            "minReadySeconds": grace,
            "selector": { "matchLabels": selector },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": { "maxSurge": 0, "maxUnavailable": 1 },
            },
            "template": {
                "metadata": { "labels": pod_labels, "annotations": pod_annotations },
                "spec": pod_spec,
            },
        },
    }))?;
    with_spec_hash(dep)
}

/// The TLS volumes of the pooler pod and their mounts: what PostgreSQL's certificate is
/// verified with and the pooler's client certificate (read once per config; a change
/// rolls the config revision), and the certificate served to clients (a whole Secret
/// volume, so the kubelet swaps renewed files in place and the pooler serves them to the
/// next client).
fn tls_volumes(pool: &ConnectionPool) -> (Vec<Value>, Vec<Value>) {
    let (mut mounts, mut volumes) = (Vec::new(), Vec::new());
    let server = pool.spec.database.tls.as_ref();
    let mut sources = Vec::new();
    if let Some(t) = server {
        let items = json!([{ "key": t.ca_key(), "path": "ca.crt" }]);
        if let Some(ca) = &t.ca_secret {
            sources.push(json!({ "secret": { "name": ca, "items": items } }));
        } else if let Some(ca) = &t.ca_config_map {
            sources.push(json!({ "configMap": { "name": ca, "items": items } }));
        }
    }
    if let Some(cert) = server.and_then(|t| t.client_cert_secret.as_ref()) {
        sources.push(json!({ "secret": { "name": cert,
            "items": [{ "key": "tls.crt", "path": "tls.crt" }, { "key": "tls.key", "path": "tls.key" }] } }));
    }
    if !sources.is_empty() {
        volumes.push(json!({ "name": "server-tls",
            "projected": { "defaultMode": 0o440, "sources": sources } }));
        mounts.push(json!({ "name": "server-tls", "mountPath": sluice_contract::SERVER_TLS_DIR, "readOnly": true }));
    }
    if let Some(secret) = pool
        .spec
        .client_tls
        .as_ref()
        .and_then(|t| t.secret_name.as_ref())
    {
        volumes.push(json!({ "name": "client-tls",
            "secret": { "secretName": secret, "defaultMode": 0o440 } }));
        mounts.push(json!({ "name": "client-tls", "mountPath": sluice_contract::CLIENT_TLS_DIR, "readOnly": true }));
    }
    (mounts, volumes)
}

/// The Service clients connect to.
///
/// # Errors
/// Only on serialization failure.
pub fn service(pool: &ConnectionPool) -> Result<Service> {
    let o = pool.spec.service.clone().unwrap_or_default();
    let mut ports = vec![json!({
        "name": "postgres",
        "port": o.port.unwrap_or(POSTGRES_PORT),
        "targetPort": "postgres",
        "protocol": "TCP",
    })];
    if let Some(h) = pool.spec.http.as_ref().filter(|h| h.enabled) {
        ports.push(json!({
            "name": "http",
            "port": h.port.unwrap_or(HTTP_PORT),
            "targetPort": "http",
            "protocol": "TCP",
        }));
    }
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(pool, &pool.name_any(), o.annotations.clone()),
        "spec": {
            "type": o.type_.as_deref().unwrap_or("ClusterIP"),
            "selector": selector_labels(pool),
            "ports": ports,
        },
    }))?;
    with_spec_hash(svc)
}

/// The PodDisruptionBudget (`maxUnavailable: 1`).
///
/// # Errors
/// Only on serialization failure.
pub fn pod_disruption_budget(pool: &ConnectionPool) -> Result<PodDisruptionBudget> {
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(pool, &pool.name_any(), BTreeMap::new()),
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": selector_labels(pool) },
        },
    }))?;
    with_spec_hash(pdb)
}

/// The pooler pods' ServiceAccount (no API token is mounted).
///
/// # Errors
/// Only on serialization failure.
pub fn service_account(pool: &ConnectionPool) -> Result<ServiceAccount> {
    let sa: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(pool, &service_account_name(pool), BTreeMap::new()),
        "automountServiceAccountToken": false,
    }))?;
    with_spec_hash(sa)
}

/// The value of [`SPEC_HASH_ANNOTATION`] on an object, if any.
pub fn spec_hash_of<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .annotations
        .as_ref()?
        .get(SPEC_HASH_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pool as the API server would return it (uid set, so owner references render).
    pub(crate) fn pool_from_yaml(yaml: &str) -> ConnectionPool {
        let mut pool: ConnectionPool = serde_yaml::from_str(yaml).unwrap();
        pool.metadata.uid = Some("0d4a3f62-7a51-4b7c-9a8e-1f2d3c4b5a69".into());
        pool.metadata
            .namespace
            .get_or_insert_with(|| "default".into());
        pool
    }

    pub(crate) fn minimal() -> ConnectionPool {
        pool_from_yaml(include_str!(
            "../../config/samples/sluice_v1alpha1_connectionpool_minimal.yaml"
        ))
    }

    pub(crate) fn complete() -> ConnectionPool {
        pool_from_yaml(include_str!(
            "../../config/samples/sluice_v1alpha1_connectionpool_complete.yaml"
        ))
    }

    fn inputs() -> RenderInputs {
        RenderInputs {
            limit: 17,
            replicas: 2,
            revision: secrets_revision("100", "101", ""),
            default_image: "ghcr.io/sluice-dev/sluice-pooler:0.1.0".into(),
        }
    }

    fn render_all(pool: &ConnectionPool) -> String {
        let i = inputs();
        let docs = [
            serde_yaml::to_string(&service_account(pool).unwrap()).unwrap(),
            serde_yaml::to_string(
                &config_map(pool, i.limit, &ConfigInputs::new(&i.revision)).unwrap(),
            )
            .unwrap(),
            serde_yaml::to_string(&service(pool).unwrap()).unwrap(),
            serde_yaml::to_string(&pod_disruption_budget(pool).unwrap()).unwrap(),
            serde_yaml::to_string(&deployment(pool, &i).unwrap()).unwrap(),
        ];
        docs.join("---\n")
    }

    fn golden(name: &str, got: &str) {
        let path = // At run time: a shared target directory may hold a build from another checkout.
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, got).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            want == got,
            "{} differs from the rendering; rerun with UPDATE_GOLDEN=1 and review the diff\n--- got ---\n{got}",
            path.display()
        );
    }

    #[test]
    fn golden_minimal() {
        golden("minimal.yaml", &render_all(&minimal()));
    }

    #[test]
    fn golden_complete() {
        golden("complete.yaml", &render_all(&complete()));
    }

    #[test]
    fn no_password_in_config_map() {
        let cm = config_map(&complete(), 5, &ConfigInputs::new("r")).unwrap();
        let text = serde_json::to_string(&cm).unwrap();
        assert!(!text.to_lowercase().contains("password ="));
        assert!(text.contains("password_file"));
    }

    #[test]
    fn limit_changes_config_but_not_pod_template() {
        let pool = minimal();
        let mut a = inputs();
        let d1 = deployment(&pool, &a).unwrap();
        a.limit = 3;
        a.revision = "other".into();
        let d2 = deployment(&pool, &a).unwrap();
        assert_eq!(d1, d2);
        assert_ne!(
            config_map(&pool, 17, &ConfigInputs::new("x")).unwrap(),
            config_map(&pool, 3, &ConfigInputs::new("x")).unwrap()
        );
    }

    #[test]
    fn pool_mode_rolls_pods() {
        let mut pool = minimal();
        let d1 = deployment(&pool, &inputs()).unwrap();
        pool.spec.pool_mode = crate::api::PoolMode::Session;
        let d2 = deployment(&pool, &inputs()).unwrap();
        assert_ne!(d1.spec.unwrap().template, d2.spec.unwrap().template);
    }

    #[test]
    fn hash_matches_the_pooler_definition() {
        let toml = pooler_toml(&minimal(), 9, &ConfigInputs::new("r")).unwrap();
        let cm = config_map(&minimal(), 9, &ConfigInputs::new("r")).unwrap();
        assert_eq!(cm.data.unwrap()[CONFIG_KEY], toml);
        assert_eq!(
            config_hash("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn durations_are_the_poolers() {
        // Counts beyond u32 passed CEL and rendering, then the pooler refused them.
        let mut pool = minimal();
        pool.spec.pool_timeout = Some("4294967296ms".into());
        let toml = pooler_toml(&pool, 9, &ConfigInputs::new("r")).unwrap();
        let back = PoolerConfig::parse(&toml).expect("the pooler reads what is rendered");
        assert_eq!(back.pool_timeout().as_millis(), 4_294_967_296);
        pool.spec.pool_timeout = Some("8761h".into());
        let e = pooler_toml(&pool, 9, &ConfigInputs::new("r")).unwrap_err();
        assert!(e.to_string().contains("longer than the maximum"), "{e}");
        for bad in ["", "5", "s", "1x", "1.5s", "-1s", "1s "] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("1m30s").unwrap().get().as_millis(), 90_000);
    }

    #[test]
    fn toml_strings_are_escaped() {
        let mut pool = minimal();
        pool.spec.database.host = "a\"b\\c\n".into();
        let toml = pooler_toml(&pool, 1, &ConfigInputs::new("r")).unwrap();
        let back = PoolerConfig::parse(&toml).expect("valid TOML");
        assert_eq!(back.server.host, "a\"b\\c\n");
    }
}
