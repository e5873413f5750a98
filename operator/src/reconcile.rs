//! The reconciler: the only code that calls the Kubernetes API.
//!
//! One reconcile reads the pool's Secrets, the children and the pods from the watch caches
//! ([`crate::cache`]; no read request), the database limits (cached, refreshed every
//! discovery interval and on spec or credential changes) and the pods' `/status`; asks
//! [`crate::resize::plan`] for the next safe step; writes only the children whose rendering
//! changed (server-side apply, field manager `sluice-operator`); deletes pods that did not
//! acknowledge a lowered limit in time; and patches status only when it changed.
//!
//! # Guarantees
//! - A reconcile of an unchanged, settled pool issues no request to the API server.
//! - When the database cannot be reached, a Secret is missing or the pool does not fit the
//!   budget, no child is written: the last good config stays in force.
//! - The operator writes the status of ConnectionPools and the children it owns, never a
//!   pool's spec.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::api::{BudgetSource, BudgetStatus, ConnectionPool, ConnectionPoolStatus, ResizeStatus};
use crate::budget::{self, Budget, DatabaseLimits};
use crate::cache::{self, CacheWriters, Caches};
use crate::desired::{self, FIELD_MANAGER, LIMIT_ANNOTATION, RenderInputs};
use crate::discovery::{Discover, ProbePods, Target};
use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::resize::{self, Observed, Plan, PodView};
use crate::status::{self, Report};

mod group;
mod memory;
use group::GroupView;
use memory::{CachedLimits, Memory};

/// Settings of the reconciler.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pooler image for pools that name none.
    pub default_image: String,
    /// How often database limits are re-read.
    pub discovery_interval: Duration,
    /// How long pods get to acknowledge a lowered limit before they are deleted.
    pub ack_timeout: Duration,
    /// Requeue delay while a resize waits.
    pub poll_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_image: "ghcr.io/sluice-dev/sluice-pooler:0.1.0".into(),
            discovery_interval: Duration::from_secs(300),
            ack_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// Trailing-edge debounce of reconcile triggers (see [`run_controller`]).
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Shared state of all reconciles.
pub struct Context {
    client: Client,
    metrics: Arc<Metrics>,
    discovery: Arc<dyn Discover>,
    probe: Arc<dyn ProbePods>,
    recorder: Recorder,
    caches: Caches,
    settings: Settings,
    /// What this process remembers per pool (see [`memory`]).
    memory: Memory,
    /// All ConnectionPools (the controller's own cache), to find a pool's budget group.
    pools: std::sync::OnceLock<reflector::Store<ConnectionPool>>,
    /// Reconciles of one budget group run one at a time: each plans with what the others
    /// committed, and commits before the next plans.
    group_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Context {
    /// A context over `client`, reading objects from `caches`.
    pub fn new(
        client: Client,
        caches: Caches,
        metrics: Arc<Metrics>,
        discovery: Arc<dyn Discover>,
        probe: Arc<dyn ProbePods>,
        settings: Settings,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            caches,
            metrics,
            discovery,
            probe,
            settings,
            memory: Memory::default(),
            pools: std::sync::OnceLock::new(),
            group_locks: Mutex::default(),
        }
    }
}

fn uid(pool: &ConnectionPool) -> String {
    pool.uid().unwrap_or_else(|| key(pool))
}

fn key(pool: &ConnectionPool) -> String {
    format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )
}

/// Reconciles one pool; see the module docs.
///
/// # Errors
/// API failures; the controller retries them with backoff ([`error_policy`]).
pub async fn reconcile(pool: Arc<ConnectionPool>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    if pool.metadata.deletion_timestamp.is_some() {
        // Children go with the pool through their owner references.
        ctx.metrics
            .forget_pool(&pool.namespace().unwrap_or_default(), &pool.name_any());
        ctx.memory.forget(&uid(&pool));
        return Ok(Action::await_change());
    }
    ctx.caches.ready().await?;
    let action = Reconciler::new(&pool, &ctx).run().await?;
    ctx.memory.with(&uid(&pool), |m| m.failures = 0);
    Ok(action)
}

/// Requeues a failed reconcile with exponential backoff per pool.
pub fn error_policy(pool: Arc<ConnectionPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    let n = ctx.memory.with(&uid(&pool), |m| {
        m.failures += 1;
        m.failures
    });
    tracing::warn!(pool = %key(&pool), %error, failures = n, "reconcile failed");
    Action::requeue(metrics::backoff(n))
}

/// Children of one pool as observed.
struct Children {
    config_map: Option<ConfigMap>,
    deployment: Option<Deployment>,
    service: Option<Service>,
    pdb: Option<PodDisruptionBudget>,
    service_account: Option<ServiceAccount>,
    pods: Vec<Pod>,
}

struct Reconciler<'a> {
    pool: &'a ConnectionPool,
    ctx: &'a Context,
    ns: String,
    name: String,
    /// The status this process last wrote for the pool, else the one the cache holds.
    prev: Option<ConnectionPoolStatus>,
}

/// Why the pool cannot be reconciled as specified.
enum Blocked {
    Degraded(&'static str, String),
    BudgetExceeded(String, Option<Budget>),
}

impl<'a> Reconciler<'a> {
    fn new(pool: &'a ConnectionPool, ctx: &'a Context) -> Self {
        Self {
            pool,
            ctx,
            ns: pool.namespace().unwrap_or_default(),
            name: pool.name_any(),
            prev: ctx
                .memory
                .peek(&uid(pool), |m| m.written.clone())
                .flatten()
                .or_else(|| pool.status.clone()),
        }
    }

    fn prev(&self) -> Option<&ConnectionPoolStatus> {
        self.prev.as_ref()
    }

    /// Records what each pod that answered could hold (by pod UID; pods gone are
    /// forgotten) and returns what is known of those that did not, when `asked`.
    fn remember_reports(
        &self,
        pods: &[Pod],
        reports: &HashMap<String, resize::PodReport>,
        asked: bool,
    ) -> HashMap<String, i64> {
        self.ctx.memory.with(&uid(self.pool), |m| {
            let live: std::collections::HashSet<String> =
                pods.iter().filter_map(|p| p.uid()).collect();
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

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn run(&self) -> Result<Action> {
        let spec = &self.pool.spec;
        // 1. Secrets (their resourceVersions make the config revision).
        let creds = match self.secret(&spec.database.credentials_secret) {
            Ok(s) => s,
            Err(b) => return self.blocked(b).await,
        };
        let users = match self.secret(&spec.client_auth.users_secret) {
            Ok(s) => s,
            Err(b) => return self.blocked(b).await,
        };
        let revision = desired::secrets_revision(
            creds.resource_version().as_deref().unwrap_or(""),
            users.resource_version().as_deref().unwrap_or(""),
        );

        // 2. The budget.
        let limits = match self.limits(&creds).await {
            Ok(l) => l,
            Err(e) => return self.fail(e).await,
        };
        let reserved = spec.database.reserved_connections.map(i64::from);
        let budget = match budget::budget(limits, reserved) {
            Ok(b) => b,
            Err(e) => {
                return self
                    .blocked(Blocked::BudgetExceeded(e.to_string(), None))
                    .await;
            }
        };
        if let Err(e) = desired::grace_seconds(self.pool) {
            return self
                .blocked(Blocked::Degraded("InvalidSpec", e.to_string()))
                .await;
        }
        // This pool's share of its group's budget (pools on one database divide it);
        // the group's reconciles run one at a time from here to the commit.
        let group = budget::group_key(&spec.database);
        let _group_turn = self.ctx.lock_group(&group).await;
        let others = self.ctx.group_members(self.pool, &group);
        let weight = i64::from(spec.database.budget_weight.unwrap_or(1));
        let share = budget::share(budget.available, weight, &others);
        let group_view = GroupView {
            key: group.clone(),
            pools: others.iter().filter(|m| m.weight > 0).count() as i32 + 1,
            database_budget: budget.available,
        };
        // The pods' limits are computed from this: a pooler finding the database smaller
        // lowers its own limit in proportion before the next refresh sees it.
        let config_inputs = desired::ConfigInputs {
            revision: revision.clone(),
            basis: Some(sluice_contract::BudgetBasis {
                max_connections: u32::try_from(limits.max_connections).unwrap_or(0),
                budget: u32::try_from(budget.available).unwrap_or(0),
            }),
        };
        let budget = Budget {
            available: share.share,
            ..budget
        };

        // 3. Observe.
        let children = self.observe();
        let config_limit = children
            .config_map
            .as_ref()
            .and_then(|cm| cm.annotations().get(LIMIT_ANNOTATION))
            .and_then(|v| v.parse().ok());
        let deployment_replicas = children
            .deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas);
        let acknowledged_hash = self
            .prev()
            .and_then(|s| s.budget.as_ref())
            .and_then(|b| b.applied_config_hash.clone());
        let hash_for = |limit: i64| {
            desired::pooler_toml(self.pool, limit, &config_inputs)
                .map(|t| desired::config_hash(&t))
                .unwrap_or_default()
        };
        let target_replicas = spec.replicas;
        let steady_limit =
            budget::per_replica_limit(budget.available, i64::from(target_replicas)).ok();
        let live_hash = children.config_map.as_ref().and_then(|cm| {
            cm.annotations()
                .get(desired::CONFIG_HASH_ANNOTATION)
                .cloned()
        });
        // A pod that is not Ready may be waiting for admission: ask every pod then.
        let all_ready = children.pods.iter().all(pod_ready);
        let steady = all_ready
            && steady_limit.is_some_and(|l| {
                let h = hash_for(l);
                live_hash.as_deref() == Some(h.as_str())
                    && acknowledged_hash.as_deref() == Some(h.as_str())
                    && deployment_replicas == Some(target_replicas)
            });
        let reports = if steady {
            HashMap::new()
        } else {
            self.probe(&children.pods).await
        };
        // A pod that does not answer counts with what it could hold when it last did.
        let last_seen = self.remember_reports(&children.pods, &reports, !steady);
        let pods: Vec<PodView> = children
            .pods
            .iter()
            .map(|p| {
                let report = reports.get(&p.name_any()).cloned();
                PodView {
                    name: p.name_any(),
                    terminating: p.metadata.deletion_timestamp.is_some(),
                    scheduled: p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
                    last_seen: report
                        .is_none()
                        .then(|| last_seen.get(&p.uid().unwrap_or_default()).copied())
                        .flatten(),
                    report,
                }
            })
            .collect();
        let observed = Observed {
            config_limit,
            deployment_replicas,
            pods,
            acknowledged_hash: acknowledged_hash.clone(),
        };

        // 4. Decide.
        let plan = match resize::plan(&observed, share.usable, target_replicas, hash_for) {
            Ok(p) => p,
            Err(e)
                if budget::per_replica_limit(share.share, i64::from(target_replicas)).is_ok() =>
            {
                // The share fits, but other pools of the group still hold part of it.
                let held = resize::committed_as_is(&observed);
                self.ctx.commit(self.pool, &group, held);
                let message = format!(
                    "Waiting for other pools of budget group {group} to release connections: \
                     {} of this pool's share of {} are free ({e})",
                    share.usable.max(0),
                    share.share
                );
                return self
                    .waiting_for_budget(&budget, &group_view, held, message)
                    .await;
            }
            Err(e) => {
                return self
                    .blocked(Blocked::BudgetExceeded(e.to_string(), Some(budget)))
                    .await;
            }
        };
        let config_hash = hash_for(plan.config_limit);
        // Committed before anything is written: the group's next reconcile counts it.
        let committed = resize::committed(&observed, &plan);
        self.ctx.commit(self.pool, &group, committed);

        // 5. Act: the children (see `write_children` for the order); a name taken by an
        // object the pool does not own makes it Degraded.
        let inputs = RenderInputs {
            limit: plan.config_limit,
            replicas: plan.deployment_replicas,
            revision: revision.clone(),
            default_image: self.ctx.settings.default_image.clone(),
        };
        let (cm_written, deployment_written) = match self
            .write_children(&children, &inputs, &config_inputs, plan.config_limit)
            .await
        {
            Ok(w) => w,
            Err(e) => return self.fail(e).await,
        };

        if cm_written && config_limit != Some(plan.config_limit) {
            let from = config_limit.map_or("none".to_string(), |l| l.to_string());
            self.event(
                EventType::Normal,
                "ConfigUpdated",
                format!("connection_limit {from} -> {}", plan.config_limit),
            )
            .await;
        }
        if deployment_replicas.is_some() && deployment_replicas != Some(plan.deployment_replicas) {
            self.event(
                EventType::Normal,
                "Scaled",
                format!(
                    "Deployment replicas {} -> {}",
                    deployment_replicas.unwrap_or(0),
                    plan.deployment_replicas
                ),
            )
            .await;
        }

        // 6. Pods that do not acknowledge a lowered limit in time are restarted.
        let since = self.resize_since(&plan, &config_hash);
        // Every pod gets the full timeout, counted from the write or its own creation.
        let expired = |name: &str| {
            self.expired(&since)
                && children.pods.iter().any(|p| {
                    p.name_any() == name
                        && p.metadata
                            .creation_timestamp
                            .as_ref()
                            .is_none_or(|t| self.expired(&t.0.to_string()))
                })
        };
        if let Some(name) = resize::pod_to_restart(&observed, &plan, expired) {
            self.delete_pod(name).await?;
        }

        // 6b. Pods waiting for admission get it while the budget has room for them.
        let to_admit = resize::admissions(&observed, &plan, share.usable);
        if !to_admit.is_empty() {
            let password = secret_field(&creds, "password").unwrap_or_default();
            for name in to_admit {
                let (Some(ip), Some(report)) = (
                    children
                        .pods
                        .iter()
                        .find(|p| p.name_any() == name)
                        .and_then(|p| p.status.as_ref()?.pod_ip.clone()),
                    reports.get(name),
                ) else {
                    continue;
                };
                let token = sluice_contract::admission_token(&password, &report.nonce);
                let ok = self.ctx.probe.admit(&ip, &token).await;
                tracing::info!(pool = %key(self.pool), pod = name, ok, "admitting pooler pod");
            }
        }

        // 7. Status.
        let all_report = !children.pods.is_empty()
            && children.pods.iter().all(|p| {
                reports
                    .get(&p.name_any())
                    .is_some_and(|r| r.config_hash == config_hash && r.held <= plan.config_limit)
            });
        // Pods that start later mount the ConfigMap as it is now, so the hash counts as
        // applied once every existing pod reports it (or there is none).
        let applied = if steady || all_report || children.pods.is_empty() {
            Some(config_hash.clone())
        } else {
            acknowledged_hash
        };
        let limit = steady_limit.unwrap_or(plan.target_limit);
        let mut budget_status = budget_block(&budget, limit, target_replicas, applied);
        group_view.fill(&mut budget_status, committed);
        self.ctx
            .metrics
            .set_budget(&self.ns, &self.name, budget.available, limit);
        let (replicas, ready) = pod_counts(&children.pods);
        let progressing = if !plan.settled() {
            Some((plan.phase.reason().to_string(), plan.message()))
        } else if deployment_written || rolling_out(children.deployment.as_ref()) {
            // A Deployment written just now rolls out (the cache shows the old one, or none).
            Some((
                "RollingOut".to_string(),
                "The pooler Deployment is rolling out".to_string(),
            ))
        } else {
            None
        };
        let resize = (!plan.settled()).then(|| ResizeStatus {
            phase: plan.phase.reason().into(),
            target_replicas,
            target_limit: plan.target_limit,
            config_hash: config_hash.clone(),
            since: since.clone(),
        });
        if self
            .prev()
            .and_then(|s| s.resize.as_ref())
            .map(|r| r.phase.as_str())
            != resize.as_ref().map(|r| r.phase.as_str())
            && !plan.settled()
        {
            self.event(EventType::Normal, plan.phase.reason(), plan.message())
                .await;
        }
        let report = Report {
            generation: self.pool.metadata.generation,
            selector: desired::selector_string(self.pool),
            desired_replicas: target_replicas,
            replicas,
            ready_replicas: ready,
            budget: Some(budget_status),
            resize,
            progressing: progressing.clone(),
            degraded: None,
            budget_exceeded: None,
        };
        self.patch_status(&report).await?;

        let waiting = progressing.is_some() || ready < target_replicas;
        Ok(if waiting {
            Action::requeue(self.ctx.settings.poll_interval)
        } else {
            Action::requeue(self.ctx.settings.discovery_interval)
        })
    }

    /// Writes the children in a safe order: the ServiceAccount (pods cannot be admitted
    /// without it) and the ConfigMap (their config) before the Deployment, which goes
    /// before the Service and PDB so the controller-manager can start on it sooner; the
    /// two pairs are written concurrently. Returns whether the ConfigMap and the
    /// Deployment were written.
    ///
    /// # Errors
    /// [`Error::NotOwned`] when a child's name is taken by an object the pool does not
    /// own (nothing is written over it), or the API call's error.
    async fn write_children(
        &self,
        children: &Children,
        inputs: &RenderInputs,
        config_inputs: &desired::ConfigInputs,
        limit: i64,
    ) -> Result<(bool, bool)> {
        let (_, cm_written) = futures::try_join!(
            self.apply(
                children.service_account.as_ref(),
                desired::service_account(self.pool)?,
                "serviceaccounts",
            ),
            self.apply(
                children.config_map.as_ref(),
                desired::config_map(self.pool, limit, config_inputs)?,
                "configmaps",
            ),
        )?;
        let deployment_written = self
            .apply(
                children.deployment.as_ref(),
                desired::deployment(self.pool, inputs)?,
                "deployments",
            )
            .await?;
        futures::try_join!(
            self.apply(
                children.service.as_ref(),
                desired::service(self.pool)?,
                "services",
            ),
            self.apply(
                children.pdb.as_ref(),
                desired::pod_disruption_budget(self.pool)?,
                "poddisruptionbudgets",
            ),
        )?;
        Ok((cm_written, deployment_written))
    }

    /// Reports `e` as the pool's `Degraded` condition when it is the pool's to fix (see
    /// [`Error::degraded_reason`]), else returns it for a retry with backoff.
    async fn fail(&self, e: Error) -> Result<Action> {
        match e.degraded_reason() {
            Some(reason) => self.blocked(Blocked::Degraded(reason, e.to_string())).await,
            None => Err(e),
        }
    }

    /// The Secret, or why the pool is degraded without it.
    fn secret(&self, name: &str) -> Result<Secret, Blocked> {
        match cache::get(&self.ctx.caches.secrets, &self.ns, name) {
            Some(s) => Ok(s),
            None => Err(Blocked::Degraded(
                "SecretNotFound",
                Error::MissingSecret {
                    namespace: self.ns.clone(),
                    name: name.into(),
                }
                .to_string(),
            )),
        }
    }

    async fn limits(&self, creds: &Secret) -> Result<DatabaseLimits> {
        let db = &self.pool.spec.database;
        if let Some(max) = db.max_connections {
            // Without discovery, assume PostgreSQL's defaults for the server's own reservations.
            return Ok(DatabaseLimits {
                max_connections: i64::from(max),
                superuser_reserved: 3,
                reserved_connections: 0,
                source: BudgetSource::Spec,
            });
        }
        let cache_key = (
            self.pool.metadata.generation,
            creds.resource_version().unwrap_or_default(),
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
        };
        let limits = self.ctx.discovery.discover(&target).await?;
        self.ctx.memory.with(&uid(self.pool), |m| {
            m.limits = Some(CachedLimits {
                key: cache_key,
                at: Instant::now(),
                limits,
            });
        });
        Ok(limits)
    }

    fn observe(&self) -> Children {
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

    async fn probe(&self, pods: &[Pod]) -> HashMap<String, resize::PodReport> {
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

    /// Server-side applies `desired` unless the live object carries the same spec hash.
    /// Returns whether it wrote.
    async fn apply<K>(&self, live: Option<&K>, desired: K, resource: &str) -> Result<bool>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug
            + Drift,
    {
        let name = desired.name_any();
        let not_owned = || Error::NotOwned {
            kind: K::kind(&()).to_string(),
            namespace: self.ns.clone(),
            name: name.clone(),
        };
        match live {
            Some(l) if !owned_by(l, self.pool) => return Err(not_owned()),
            Some(l) => {
                let want = desired::spec_hash_of(&desired);
                if desired::spec_hash_of(l) == want && !l.drifted_from(&desired) {
                    return Ok(false);
                }
            }
            // The caches hold only objects labelled as the operator's: an object of this
            // name may still exist. It is never adopted.
            None => {
                self.ctx.metrics.api_request("get", resource);
                if let Some(existing) = self.api::<K>().get_opt(&name).await?
                    && !owned_by(&existing, self.pool)
                {
                    return Err(not_owned());
                }
            }
        }
        self.ctx.metrics.api_request("patch", resource);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<K>()
            .patch(&name, &pp, &Patch::Apply(&desired))
            .await?;
        tracing::info!(pool = %key(self.pool), resource, %name, "applied");
        Ok(true)
    }

    async fn delete_pod(&self, name: &str) -> Result<()> {
        self.ctx.metrics.api_request("delete", "pods");
        match self
            .api::<Pod>()
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        self.event(
            EventType::Warning,
            "RestartedPod",
            format!(
                "Pod {name} did not apply the lowered connection_limit within {:?}",
                self.ctx.settings.ack_timeout
            ),
        )
        .await;
        Ok(())
    }

    fn resize_since(&self, plan: &Plan, hash: &str) -> String {
        self.prev()
            .and_then(|s| s.resize.as_ref())
            .filter(|r| r.config_hash == hash && r.phase == plan.phase.reason())
            .map(|r| r.since.clone())
            .unwrap_or_else(|| Timestamp::now().to_string())
    }

    fn expired(&self, since: &str) -> bool {
        let Ok(t) = since.parse::<Timestamp>() else {
            return false;
        };
        let age = Timestamp::now().as_second() - t.as_second();
        age >= 0 && age as u64 >= self.ctx.settings.ack_timeout.as_secs()
    }

    /// Records the pool as degraded or over budget without touching any child.
    async fn blocked(&self, why: Blocked) -> Result<Action> {
        let prev_budget = self.prev().and_then(|s| s.budget.clone());
        let mut report = Report {
            generation: self.pool.metadata.generation,
            selector: desired::selector_string(self.pool),
            desired_replicas: self.pool.spec.replicas,
            replicas: self.prev().map_or(0, |s| s.replicas),
            ready_replicas: self.prev().map_or(0, |s| s.ready_replicas),
            budget: prev_budget.clone(),
            resize: self.prev().and_then(|s| s.resize.clone()),
            ..Default::default()
        };
        let (cond, reason, message) = match why {
            Blocked::Degraded(reason, message) => {
                report.degraded = Some((reason.to_string(), message.clone()));
                (status::DEGRADED, reason, message)
            }
            Blocked::BudgetExceeded(message, budget) => {
                if let Some(b) = budget {
                    let applied = prev_budget
                        .as_ref()
                        .and_then(|p| p.applied_config_hash.clone());
                    let mut block = budget_block(&b, 0, self.pool.spec.replicas, applied);
                    block.worst_case_total = 0;
                    // The pods keep the last good config: what they may hold still counts
                    // for the other pools of the group (after an operator restart too).
                    if let Some(p) = &prev_budget {
                        block.group = p.group.clone();
                        block.group_pools = p.group_pools;
                        block.group_budget = p.group_budget;
                        block.committed = p.committed.max(p.worst_case_total);
                    }
                    report.budget = Some(block);
                }
                report.budget_exceeded = Some(message.clone());
                (status::BUDGET_EXCEEDED, "BudgetExceeded", message)
            }
        };
        let was_true = self
            .prev()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == cond))
            .is_some_and(|c| c.status == "True" && c.message == message);
        if !was_true {
            tracing::warn!(pool = %key(self.pool), reason, %message, "pool blocked; last good config kept");
            self.event(EventType::Warning, reason, message).await;
        }
        self.patch_status(&report).await?;
        Ok(Action::requeue(
            Duration::from_secs(30).min(self.ctx.settings.discovery_interval),
        ))
    }

    async fn patch_status(&self, report: &Report) -> Result<()> {
        let now = Time(Timestamp::now());
        let new = status::build(self.prev(), report, now);
        if self.prev() == Some(&new) {
            return Ok(());
        }
        self.ctx.metrics.api_request("patch", "connectionpools");
        let body = json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "ConnectionPool",
            "status": new,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<ConnectionPool>()
            .patch_status(&self.name, &pp, &Patch::Apply(&body))
            .await?;
        self.ctx
            .memory
            .with(&uid(self.pool), |m| m.written = Some(new));
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx.metrics.api_request("create", "events");
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&ev, &self.pool.object_ref(&()))
            .await
        {
            tracing::warn!(pool = %key(self.pool), error = %e, "could not record event");
        }
    }
}

/// Fields that others might change on a child behind the spec-hash annotation's back and
/// that matter for the budget; a difference forces a re-apply.
trait Drift {
    fn drifted_from(&self, _desired: &Self) -> bool {
        false
    }
}

impl Drift for ConfigMap {
    fn drifted_from(&self, desired: &Self) -> bool {
        self.data != desired.data
    }
}

impl Drift for Deployment {
    fn drifted_from(&self, desired: &Self) -> bool {
        let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
        replicas(self) != replicas(desired)
    }
}

impl Drift for Service {}
impl Drift for PodDisruptionBudget {}
impl Drift for ServiceAccount {}

fn budget_block(b: &Budget, limit: i64, replicas: i32, applied: Option<String>) -> BudgetStatus {
    BudgetStatus {
        database_max_connections: b.limits.max_connections,
        superuser_reserved: b.limits.superuser_reserved,
        database_reserved: b.limits.reserved_connections,
        reserved: b.reserved,
        available: b.available,
        per_replica_limit: limit,
        worst_case_total: budget::worst_case_total(limit, i64::from(replicas)),
        source: b.limits.source,
        applied_config_hash: applied,
        group: None,
        group_pools: 1,
        group_budget: b.available,
        committed: 0,
    }
}

/// The pod's `Ready` condition is True.
/// Whether `obj` carries `pool`'s controller owner reference.
fn owned_by<K: Resource>(obj: &K, pool: &ConnectionPool) -> bool {
    let Some(uid) = pool.uid() else {
        return false;
    };
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A key of a Secret's data, as text, trailing line ends dropped (as the pooler reads the
/// mounted file, so both compute the same admission token).
fn secret_field(secret: &Secret, k: &str) -> Option<String> {
    secret.data.as_ref().and_then(|d| d.get(k)).map(|v| {
        String::from_utf8_lossy(&v.0)
            .trim_end_matches(['\n', '\r'])
            .to_string()
    })
}

fn pod_counts(pods: &[Pod]) -> (i32, i32) {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let ready = live.iter().filter(|p| pod_ready(p)).count();
    (live.len() as i32, ready as i32)
}

fn rolling_out(dep: Option<&Deployment>) -> bool {
    let Some(d) = dep else { return false };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let Some(s) = &d.status else { return want > 0 };
    s.observed_generation < d.metadata.generation
        || s.updated_replicas.unwrap_or(0) < want
        || s.replicas.unwrap_or(0) > want
}

/// Pools that reference `secret` by name (credentials or users).
pub fn pools_referencing(
    pools: &[Arc<ConnectionPool>],
    secret: &Secret,
) -> Vec<ObjectRef<ConnectionPool>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    pools
        .iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| {
            p.spec.database.credentials_secret == name || p.spec.client_auth.users_secret == name
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The pool a pooler pod belongs to, from its `sluice.dev/pool` label.
pub fn pool_of_pod(pod: &Pod) -> Option<ObjectRef<ConnectionPool>> {
    let pool = pod.labels().get(desired::POOL_LABEL)?;
    Some(ObjectRef::new(pool).within(&pod.namespace()?))
}

/// Runs the controller until `shutdown` resolves, feeding `writers` (the caches in `ctx`)
/// from one watch per kind; each watch also triggers reconciles of the pools it concerns.
///
/// `namespace`: watch one namespace, or all when `None`.
pub async fn run_controller(
    ctx: Arc<Context>,
    writers: CacheWriters,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    /// A watch of `K` that keeps `writer`'s cache and yields each changed object.
    fn cached<K>(
        api: Api<K>,
        config: watcher::Config,
        writer: reflector::store::Writer<K>,
    ) -> impl futures::Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        watcher(api, config)
            .default_backoff()
            // Managed fields are most of an object's size and never read here.
            .modify(|o| o.managed_fields_mut().clear())
            .reflect(writer)
            .touched_objects()
    }
    let pools: Api<ConnectionPool> = scoped(&client, &namespace);
    let all = watcher::Config::default();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    let pods = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/name=sluice-pooler,{}",
        desired::POOL_LABEL
    ));
    let controller = Controller::new(pools, all.clone());
    let store = controller.store();
    ctx.set_pool_store(store.clone());
    let w = writers;
    controller
        .owns_stream(cached(
            scoped::<Deployment>(&client, &namespace),
            owned.clone(),
            w.deployments,
        ))
        .owns_stream(cached(
            scoped::<ConfigMap>(&client, &namespace),
            owned.clone(),
            w.config_maps,
        ))
        .owns_stream(cached(
            scoped::<Service>(&client, &namespace),
            owned.clone(),
            w.services,
        ))
        .owns_stream(cached(
            scoped::<PodDisruptionBudget>(&client, &namespace),
            owned.clone(),
            w.pdbs,
        ))
        .owns_stream(cached(
            scoped::<ServiceAccount>(&client, &namespace),
            owned,
            w.service_accounts,
        ))
        .watches_stream(
            cached(scoped::<Pod>(&client, &namespace), pods, w.pods),
            |p| pool_of_pod(&p),
        )
        .watches_stream(
            cached(scoped::<Secret>(&client, &namespace), all, w.secrets),
            move |secret| pools_referencing(&store.state(), &secret),
        )
        // Child and pod events come in bursts while a pool starts or rolls; one reconcile
        // per burst writes one status instead of several.
        .with_config(controller::Config::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(pool = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
