//! Observing a pool's world: its Secrets, children and pods from the watch caches (no
//! request to the API server), the database's limits (discovered, cached per pool) and
//! the pods' `/status`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;

use super::memory::CachedLimits;
use super::{Reconciler, uid};
use crate::budget::DatabaseLimits;
use crate::cache;
use crate::desired;
use crate::discovery::{Target, TargetTls};
use crate::error::{Error, Result};
use crate::resize;

/// What the pool's TLS Secrets hold.
pub(super) struct TlsMaterial {
    /// resourceVersions of the Secrets the pooler reads once per config (empty without).
    pub(super) revision: String,
    /// For the operator's own connection to the database.
    pub(super) target: TargetTls,
}

/// Children of one pool as observed.
pub(super) struct Children {
    pub(super) config_map: Option<ConfigMap>,
    pub(super) deployment: Option<Deployment>,
    pub(super) service: Option<Service>,
    pub(super) pdb: Option<PodDisruptionBudget>,
    pub(super) service_account: Option<ServiceAccount>,
    pub(super) pods: Vec<Pod>,
}

impl Reconciler<'_> {
    /// Records what each pod that answered could hold (by pod UID; pods gone are
    /// forgotten) and returns what is known of those that did not, when `asked`.
    pub(super) fn remember_reports(
        &self,
        pods: &[Pod],
        reports: &HashMap<String, resize::PodReport>,
        asked: bool,
    ) -> HashMap<String, i64> {
        self.ctx.memory.with(&uid(self.pool), |m| {
            let live: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
            m.last_seen.retain(|u, _| live.contains(u));
            for p in pods {
                if let (Some(u), Some(r)) = (p.uid(), reports.get(&p.name_any())) {
                    m.last_seen.insert(u, r.connection_limit.max(r.held));
                }
            }
            if asked {
                m.last_seen.clone()
            } else {
                HashMap::new()
            }
        })
    }

    /// The Secret `name`: its metadata from the cache, its data read by GET when its
    /// resourceVersion changed since the last read (only referenced Secrets are kept).
    ///
    /// # Errors
    /// [`Error::MissingSecret`] when it does not exist; API errors of the read.
    pub(super) async fn secret(&self, name: &str) -> Result<Arc<Secret>> {
        let missing = || Error::MissingSecret {
            namespace: self.ns.clone(),
            name: name.into(),
        };
        let meta = cache::get(&self.ctx.caches.secrets, &self.ns, name).ok_or_else(missing)?;
        let data = &self.ctx.caches.secret_data;
        if let Some(s) = data.get(&self.ns, name, meta.metadata.resource_version.as_deref()) {
            return Ok(s);
        }
        self.ctx.metrics.api_request("get", "secrets");
        let s = self
            .api::<Secret>()
            .get_opt(name)
            .await?
            .ok_or_else(missing)?;
        data.retain_listed(&self.ctx.caches.secrets);
        Ok(data.put(s))
    }

    /// A key of `secret` (`what` names its role in errors).
    fn secret_bytes(&self, secret: &Secret, key: &str) -> Result<Vec<u8>> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.0.clone())
            .ok_or_else(|| Error::MissingSecretKey {
                namespace: self.ns.clone(),
                name: secret.name_any(),
                key: key.into(),
            })
    }

    /// The pool's TLS Secrets, checked: each exists with the keys the pods mount.
    ///
    /// # Errors
    /// [`Error::MissingSecret`] or [`Error::MissingSecretKey`] naming the first missing.
    pub(super) async fn tls(&self) -> Result<TlsMaterial> {
        let spec = &self.pool.spec;
        let mut revision = String::new();
        let mut target = TargetTls::default();
        if let Some(t) = &spec.database.tls {
            target.mode = t.ssl_mode;
            target.server_name = t.server_name.clone();
            if let Some(name) = &t.ca_secret {
                let s = self.secret(name).await?;
                target.ca_pem = Some(self.secret_bytes(&s, t.ca_key())?);
                revision.push_str(&format!("ca={};", s.resource_version().unwrap_or_default()));
            } else if let Some(name) = &t.ca_config_map {
                // Read when needed (the caches hold only the pools' own ConfigMaps).
                self.ctx.metrics.api_request("get", "configmaps");
                let missing = |key| Error::MissingConfigMap {
                    namespace: self.ns.clone(),
                    name: name.clone(),
                    key,
                };
                let cm = self
                    .api::<ConfigMap>()
                    .get_opt(name)
                    .await?
                    .ok_or_else(|| missing(None))?;
                let key = t.ca_key();
                let pem = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|v| v.as_bytes().to_vec())
                    .or_else(|| {
                        cm.binary_data
                            .as_ref()
                            .and_then(|d| d.get(key))
                            .map(|v| v.0.clone())
                    })
                    .ok_or_else(|| missing(Some(key.to_string())))?;
                target.ca_pem = Some(pem);
                revision.push_str(&format!(
                    "cacm={};",
                    cm.resource_version().unwrap_or_default()
                ));
            }
            if let Some(name) = &t.client_cert_secret {
                let s = self.secret(name).await?;
                target.client_cert = Some((
                    self.secret_bytes(&s, "tls.crt")?,
                    self.secret_bytes(&s, "tls.key")?,
                ));
                revision.push_str(&format!(
                    "cert={};",
                    s.resource_version().unwrap_or_default()
                ));
            }
        }
        // The certificate served to clients reloads itself: only checked here.
        if let Some(name) = spec
            .client_tls
            .as_ref()
            .and_then(|t| t.secret_name.as_ref())
        {
            let s = self.secret(name).await?;
            self.secret_bytes(&s, "tls.crt")?;
            self.secret_bytes(&s, "tls.key")?;
        }
        Ok(TlsMaterial { revision, target })
    }

    pub(super) async fn limits(&self, creds: &Secret, tls: &TlsMaterial) -> Result<DatabaseLimits> {
        let db = &self.pool.spec.database;
        if let Some(max) = db.max_connections {
            return Ok(DatabaseLimits::from_spec(i64::from(max)));
        }
        let cache_key = (
            self.pool.metadata.generation,
            format!(
                "{}/{}",
                creds.resource_version().unwrap_or_default(),
                tls.revision
            ),
        );
        if let Some(c) = self
            .ctx
            .memory
            .peek(&uid(self.pool), |m| m.limits.clone())
            .flatten()
            && c.key == cache_key
            // A little short of the interval, so the periodic requeue always refreshes.
            && c.at.elapsed() < self.ctx.settings.discovery_interval.mul_f64(0.9)
        {
            return Ok(c.limits);
        }
        let field = |k: &str| -> Result<String> {
            secret_field(creds, k).ok_or_else(|| Error::MissingSecretKey {
                namespace: self.ns.clone(),
                name: creds.name_any(),
                key: k.into(),
            })
        };
        let target = Target {
            host: db.host.clone(),
            port: u16::try_from(db.port).map_err(|_| Error::InvalidSpec("database.port".into()))?,
            database: db.name.clone().unwrap_or_else(|| "postgres".into()),
            user: field("username")?,
            password: field("password")?,
            tls: tls.target.clone(),
        };
        let limits = self.ctx.discovery.discover(&target).await?;
        self.ctx.memory.with(&uid(self.pool), |m| {
            m.limits = Some(CachedLimits {
                key: cache_key,
                target: self.database_target(),
                at: Instant::now(),
                limits,
            });
        });
        Ok(limits)
    }

    fn database_target(&self) -> String {
        let db = &self.pool.spec.database;
        format!(
            "{}:{}/{}",
            db.host,
            db.port,
            db.name.as_deref().unwrap_or("postgres")
        )
    }

    /// The limits last discovered for the database the spec names now, however old.
    pub(super) fn last_limits(&self) -> Option<DatabaseLimits> {
        let target = self.database_target();
        self.ctx
            .memory
            .peek(&uid(self.pool), |m| m.limits.clone())
            .flatten()
            .filter(|c| c.target == target)
            .map(|c| c.limits)
    }

    pub(super) fn observe(&self) -> Children {
        let c = &self.ctx.caches;
        let ns = &self.ns;
        Children {
            config_map: cache::get(&c.config_maps, ns, &desired::config_map_name(self.pool)),
            deployment: cache::get(&c.deployments, ns, &self.name),
            service: cache::get(&c.services, ns, &self.name),
            pdb: cache::get(&c.pdbs, ns, &self.name),
            service_account: cache::get(
                &c.service_accounts,
                ns,
                &desired::service_account_name(self.pool),
            ),
            pods: cache::pods_matching(&c.pods, ns, &desired::selector_labels(self.pool)),
        }
    }

    pub(super) async fn probe(&self, pods: &[Pod]) -> HashMap<String, resize::PodReport> {
        let probes = pods.iter().filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            let name = p.name_any();
            Some(async move { (name, self.ctx.probe.status(&ip).await) })
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(|(n, r)| r.map(|r| (n, r)))
            .collect()
    }
}

pub(super) fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A key of a Secret's data, as text, trailing line ends dropped (as the pooler reads the
/// mounted file, so both compute the same admission token).
pub(super) fn secret_field(secret: &Secret, k: &str) -> Option<String> {
    secret.data.as_ref().and_then(|d| d.get(k)).map(|v| {
        String::from_utf8_lossy(&v.0)
            .trim_end_matches(['\n', '\r'])
            .to_string()
    })
}

pub(super) fn pod_counts(pods: &[Pod]) -> (i32, i32) {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let ready = live.iter().filter(|p| pod_ready(p)).count();
    (live.len() as i32, ready as i32)
}

pub(super) fn rolling_out(dep: Option<&Deployment>) -> bool {
    let Some(d) = dep else { return false };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let Some(s) = &d.status else { return want > 0 };
    s.observed_generation < d.metadata.generation
        || s.updated_replicas.unwrap_or(0) < want
        || s.replicas.unwrap_or(0) > want
}
