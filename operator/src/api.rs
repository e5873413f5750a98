//! The `ConnectionPool` custom resource (`sluice.dev/v1alpha1`): spec, status and CRD generation.
// Several `printcolumn(type_ = ...)` in one `#[kube]` attribute are not duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, LocalObjectReference, PodSecurityContext, ResourceRequirements,
    Toleration, TopologySpreadConstraint, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a pool of `sluice-pooler` replicas in front of one database.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "ConnectionPool",
    namespaced,
    shortname = "cpool",
    status = "ConnectionPoolStatus",
    derive = "PartialEq",
    validation = (
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63",
        "metadata.name must be a DNS label (at most 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit): it names the pool's Service"
    ),
    doc = "A pool of sluice-pooler replicas whose server connections together stay within the database's connection budget.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Limit/Replica",
        type_ = "integer",
        json_path = ".status.budget.perReplicaLimit",
        description = "connection_limit of each pooler replica"
    ),
    printcolumn(
        name = "Budget",
        type_ = "integer",
        json_path = ".status.budget.available",
        description = "server connections the pool may use in total (its share of the database budget)"
    ),
    printcolumn(
        name = "Group",
        type_ = "string",
        json_path = ".status.budget.group",
        description = "pools of one budget group divide the database budget",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    /// The PostgreSQL server the pool connects to.
    pub database: DatabaseSpec,
    /// Number of pooler replicas (default 2).
    #[serde(default = "default_replicas")]
    #[x_kube(validation = ("self >= 1", "replicas must be at least 1"))]
    pub replicas: i32,
    /// `transaction` (default) or `session`.
    #[serde(default)]
    #[x_kube(validation = ("self in ['transaction', 'session']", "poolMode must be transaction or session"))]
    pub pool_mode: PoolMode,
    /// Client connections one replica accepts (pooler default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self >= 1", "maxClientConnections must be at least 1"))]
    pub max_client_connections: Option<i32>,
    /// How long a client waits for a server connection, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self.matches('^([0-9]+(ms|s|m|h))+$')", "poolTimeout must be a duration like 500ms, 30s, 1m30s"))]
    pub pool_timeout: Option<String>,
    /// Idle server connections are closed after this, e.g. `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self.matches('^([0-9]+(ms|s|m|h))+$')", "idleTimeout must be a duration like 500ms, 30s, 1m30s"))]
    pub idle_timeout: Option<String>,
    /// Server connections are replaced after this age, e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self.matches('^([0-9]+(ms|s|m|h))+$')", "serverLifetime must be a duration like 500ms, 30s, 1m30s"))]
    pub server_lifetime: Option<String>,
    /// After SIGTERM the pooler drains for at most this long (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self.matches('^([0-9]+(ms|s|m|h))+$')", "drainTimeout must be a duration like 500ms, 30s, 1m30s"))]
    pub drain_timeout: Option<String>,
    /// Users the pooler accepts from clients.
    pub client_auth: ClientAuthSpec,
    /// Pooler image (default: the operator's `--pooler-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of the pooler container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Overrides merged into the pooler pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,
    /// The Service in front of the pooler pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceOverrides>,
    /// TLS between clients and the pooler (absent: plaintext only).
    #[serde(default, rename = "clientTLS", skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTlsSpec>,
    /// PostgreSQL over HTTP and WebSocket for serverless and edge functions (the
    /// protocol of `@neondatabase/serverless`), on the pod and Service port `http`;
    /// served with the `clientTLS` certificate when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
}

/// The HTTP and WebSocket front door.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSpec {
    /// Serve it (default true when `http` is given).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The Service's `http` port (default 8080; the pods listen on 8080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self >= 1 && self <= 65535", "http.port must be between 1 and 65535"))]
    pub port: Option<i32>,
}

fn default_true() -> bool {
    true
}

impl ConnectionPoolSpec {
    /// Whether the HTTP front door is on.
    pub fn http_enabled(&self) -> bool {
        self.http.as_ref().is_some_and(|h| h.enabled)
    }
}

/// TLS between clients and the pooler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = (
    "self.mode == 'disable' || has(self.secretName)",
    "clientTLS.secretName is required unless clientTLS.mode is disable"
))]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSpec {
    /// `allow` (default: TLS for clients that ask), `require` (plaintext logins are
    /// refused) or `disable`.
    #[serde(default = "default_client_tls_mode")]
    #[x_kube(validation = ("self in ['disable', 'allow', 'require']", "clientTLS.mode must be disable, allow or require"))]
    pub mode: ClientTlsMode,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) with the certificate served
    /// to clients, for example the one a cert-manager Certificate writes. A renewed
    /// certificate is served to the next client without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0", "clientTLS.secretName must not be empty"))]
    pub secret_name: Option<String>,
}

fn default_client_tls_mode() -> ClientTlsMode {
    ClientTlsMode::Allow
}

/// TLS between the pooler (and the operator's discovery) and the database.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = (
        "!(self.sslMode in ['verify-ca', 'verify-full']) || has(self.caSecret) || has(self.caConfigMap) || (has(self.useSystemRoots) && self.useSystemRoots)",
        "database.tls.sslMode verify-ca and verify-full need caSecret or caConfigMap, or useSystemRoots: true for a certificate from a public CA"
    ),
    validation = (
        "!(has(self.caSecret) && has(self.caConfigMap))",
        "database.tls: set caSecret or caConfigMap, not both"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseTlsSpec {
    /// As libpq's `sslmode`: `disable`, `prefer` (default: TLS when the server offers
    /// it, unverified), `require` (TLS, unverified), `verify-ca` (the chain) or
    /// `verify-full` (the chain and the host name; recommended).
    #[serde(default)]
    #[x_kube(validation = (
        "self in ['disable', 'prefer', 'require', 'verify-ca', 'verify-full']",
        "database.tls.sslMode must be disable, prefer, require, verify-ca or verify-full"
    ))]
    pub ssl_mode: SslMode,
    /// Secret holding the CA bundle to verify the server with (key `caKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0", "database.tls.caSecret must not be empty"))]
    pub ca_secret: Option<String>,
    /// ConfigMap holding the CA bundle instead (key `caKey`), for example one that
    /// trust-manager distributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0", "database.tls.caConfigMap must not be empty"))]
    pub ca_config_map: Option<String>,
    /// Key of `caSecret` or `caConfigMap` holding the PEM bundle (default `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0", "database.tls.caKey must not be empty"))]
    pub ca_key: Option<String>,
    /// Trust the public CAs of the pooler image instead of `caSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_system_roots: Option<bool>,
    /// A `kubernetes.io/tls` Secret with a client certificate and key, for servers that
    /// authenticate clients by certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0", "database.tls.clientCertSecret must not be empty"))]
    pub client_cert_secret: Option<String>,
    /// The name the certificate must be valid for (`verify-full`) and sent as SNI
    /// (default: `database.host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0 && size(self) <= 253", "database.tls.serverName must be 1 to 253 characters"))]
    pub server_name: Option<String>,
}

impl DatabaseTlsSpec {
    /// Key of the CA Secret holding the bundle.
    pub fn ca_key(&self) -> &str {
        self.ca_key.as_deref().unwrap_or("ca.crt")
    }
}

impl ConnectionPoolSpec {
    /// Names of every Secret the pool references.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        let tls = self.database.tls.as_ref();
        [
            Some(self.database.credentials_secret.as_str()),
            Some(self.client_auth.users_secret.as_str()),
            self.database.discovery_credentials_secret.as_deref(),
            tls.and_then(|t| t.ca_secret.as_deref()),
            tls.and_then(|t| t.client_cert_secret.as_deref()),
            self.client_tls
                .as_ref()
                .and_then(|t| t.secret_name.as_deref()),
        ]
        .into_iter()
        .flatten()
    }
}

fn default_replicas() -> i32 {
    2
}

/// The database server and how to reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = (
    "!has(self.maxConnections) || !has(self.reservedConnections) || self.reservedConnections < self.maxConnections",
    "reservedConnections must be less than maxConnections"
))]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Host name or address of the PostgreSQL server.
    #[x_kube(validation = ("size(self) > 0", "database.host must not be empty"))]
    pub host: String,
    /// Port of the PostgreSQL server (default 5432).
    #[serde(default = "default_db_port")]
    #[x_kube(validation = ("self >= 1 && self <= 65535", "database.port must be between 1 and 65535"))]
    pub port: i32,
    /// Database name; the operator connects to it for discovery. When absent, the
    /// pooler uses the database the client asks for and the operator uses `postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Secret with keys `username` and `password`, used by the pooler and the operator.
    #[x_kube(validation = ("size(self) > 0", "database.credentialsSecret must not be empty"))]
    pub credentials_secret: String,
    /// Secret (`username`, `password`) of the role the operator reads the database's
    /// limits with, instead of `credentialsSecret`: a role of its own (for example one
    /// granted `pg_monitor`; `SHOW max_connections` needs no privilege beyond LOGIN)
    /// keeps discovery working while the pool's role is at its connection limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0", "database.discoveryCredentialsSecret must not be empty"))]
    pub discovery_credentials_secret: Option<String>,
    /// Overrides the discovered `max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self >= 1", "database.maxConnections must be at least 1"))]
    pub max_connections: Option<i32>,
    /// Connections kept free for migrations, admins and direct clients
    /// (default: 10% of max_connections rounded up, at least 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self >= 0", "database.reservedConnections must not be negative"))]
    pub reserved_connections: Option<i32>,
    /// Pools that share one database budget (default: every pool naming the same host
    /// and port). The budget is divided among the group's pools by `budgetWeight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("size(self) > 0 && size(self) <= 253", "database.budgetGroup must be 1 to 253 characters"))]
    pub budget_group: Option<String>,
    /// This pool's weight in its budget group (default 1): its share of the database
    /// budget is `budget × weight ÷ (sum of the group's weights)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self >= 1 && self <= 1000", "database.budgetWeight must be between 1 and 1000"))]
    pub budget_weight: Option<i32>,
    /// TLS to the database, for the pooler and the operator's discovery (absent:
    /// `sslMode: prefer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DatabaseTlsSpec>,
}

fn default_db_port() -> i32 {
    5432
}

pub use sluice_contract::{ClientTlsMode, PoolMode, SslMode};

/// Client authentication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientAuthSpec {
    /// Secret with one key per user: key = user name, value = password or SCRAM verifier.
    #[x_kube(validation = ("size(self) > 0", "clientAuth.usersSecret must not be empty"))]
    pub users_secret: String,
}

/// Overrides for the pooler pod template.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Extra pod labels (the operator's selector labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Pod affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Pod tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Replaces the default spread across nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Priority class of the pooler pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets to pull the pooler (and sidecar) images with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Extra environment variables of the pooler container (for example `RUST_LOG`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Replaces the pod security context (default: non-root, UID 65532, seccomp
    /// RuntimeDefault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Containers run beside the pooler (log shippers, proxies, exporters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<Container>,
    /// Volumes for the sidecars (names must not clash with the pooler's: `config`,
    /// `users`, `server-tls`, `client-tls`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
}

/// The Service in front of the pooler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceOverrides {
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = (
        "self in ['ClusterIP', 'NodePort', 'LoadBalancer']",
        "service.type must be ClusterIP, NodePort or LoadBalancer"
    ))]
    pub type_: Option<String>,
    /// Service port (default 6432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = ("self >= 1 && self <= 65535", "service.port must be between 1 and 65535"))]
    pub port: Option<i32>,
    /// Service annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state, written only by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `BudgetExceeded`, and kstatus's
    /// `Reconciling` and `Stalled`; one per type.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pooler pods that exist (for the scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Pooler pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pooler pods (for the scale subresource and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The connection budget and how it is split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetStatus>,
    /// The resize in flight, if any; lets a restarted operator resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<ResizeStatus>,
    /// One word for `kubectl get`: `BudgetExceeded`, `Degraded`, `Progressing`, `Ready` or
    /// `NotReady`, the first whose condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The reason of the condition that gives `state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where `max_connections` came from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BudgetSource {
    /// Read from the server with `SHOW`.
    Discovered,
    /// `spec.database.maxConnections`.
    Spec,
}

/// The connection budget.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// `max_connections` of the server (or the spec override).
    pub database_max_connections: i64,
    /// `superuser_reserved_connections` of the server.
    pub superuser_reserved: i64,
    /// `reserved_connections` of the server (PostgreSQL 16+, else 0).
    #[serde(default)]
    pub database_reserved: i64,
    /// `spec.database.reservedConnections` or its default.
    pub reserved: i64,
    /// Server connections the pool may hold in total: its share of the database budget.
    pub available: i64,
    /// The budget group (`spec.database.budgetGroup`, else `host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// ConnectionPools in the group, this one included.
    #[serde(default)]
    pub group_pools: i32,
    /// The database budget the group divides (`available` is this pool's share).
    #[serde(default)]
    pub group_budget: i64,
    /// Most server connections this pool's pods may hold now, counting pods that have not
    /// yet applied a lowered limit and busy connections above it. The other pools of the
    /// group count it against the budget until it falls.
    #[serde(default)]
    pub committed: i64,
    /// `connection_limit` of each replica at the target replica count.
    pub per_replica_limit: i64,
    /// Most server connections the pods can hold at once, rollouts included.
    pub worst_case_total: i64,
    /// `discovered` or `spec`.
    pub source: BudgetSource,
    /// Hash of the `pooler.toml` that every pod has acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config_hash: Option<String>,
}

/// A resize in flight.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResizeStatus {
    /// `LoweringLimit`, `ScalingDown` or `RaisingLimit`.
    pub phase: String,
    /// Replicas the resize ends at.
    pub target_replicas: i32,
    /// connection_limit the resize ends at.
    pub target_limit: i64,
    /// Hash of the ConfigMap content the pods must acknowledge.
    pub config_hash: String,
    /// When that ConfigMap content was first written (RFC 3339); pods that have not
    /// acknowledged it after the acknowledgement timeout are deleted.
    pub since: String,
}

/// The CRD as YAML, exactly as `crds/connectionpool.yaml` holds it.
///
/// # Errors
/// Never in practice; serialization of the generated CRD is infallible for valid types.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&ConnectionPool::crd())?;
    Ok(format!(
        "# Generated by `sluice-operator crd`; do not edit. Regenerate with `make crds`.\n{body}"
    ))
}

/// Where the generated CRD lives, relative to the repository root.
pub const CRD_PATHS: [&str; 3] = [
    "crds/connectionpool.yaml",
    "config/crd/bases/sluice.dev_connectionpools.yaml",
    "charts/sluice/crds/connectionpool.yaml",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        let want = crd_yaml().unwrap();
        let root = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("..");
        for rel in CRD_PATHS {
            let got = std::fs::read_to_string(root.join(rel)).unwrap_or_default();
            assert!(
                got == want,
                "{rel} differs from the generated CRD: run `make crds`"
            );
        }
    }

    #[test]
    fn crd_has_scale_status_and_columns() {
        let crd = ConnectionPool::crd();
        let v = &crd.spec.versions[0];
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            cols,
            [
                "Status",
                "Reason",
                "Replicas",
                "Ready",
                "Limit/Replica",
                "Budget",
                "Group",
                "Age"
            ]
        );
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["cpool".to_string()][..])
        );
    }

    #[test]
    fn crd_carries_cel_rules() {
        let yaml = crd_yaml().unwrap();
        for needle in [
            "reservedConnections must be less than maxConnections",
            "replicas must be at least 1",
            "database.port must be between 1 and 65535",
            "service.port must be between 1 and 65535",
            "drainTimeout must be a duration",
            "poolMode must be transaction or session",
            "self.matches('^([0-9]+(ms|s|m|h))+$')",
            "metadata.name must be a DNS label",
        ] {
            assert!(yaml.contains(needle), "missing rule: {needle}");
        }
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let pool: ConnectionPoolSpec = serde_json::from_value(serde_json::json!({
            "database": {"host": "db", "credentialsSecret": "c"},
            "clientAuth": {"usersSecret": "u"}
        }))
        .unwrap();
        assert_eq!(pool.replicas, 2);
        assert_eq!(pool.database.port, 5432);
        assert_eq!(pool.pool_mode, PoolMode::Transaction);
    }
}
