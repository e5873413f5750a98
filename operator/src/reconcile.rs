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
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::{Client, Resource, ResourceExt};

use crate::api::{BudgetStatus, ConnectionPool, ConnectionPoolStatus};
use crate::budget::{self, Budget};
use crate::cache::Caches;
use crate::desired::{self, FIELD_MANAGER, LIMIT_ANNOTATION};
use crate::discovery::{Discover, ProbePods};
use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::resize::{self, Observed, PodView};

mod act;
mod decide;
mod group;
mod memory;
mod observe;
mod watches;
use group::GroupView;
use memory::Memory;
use observe::{pod_ready, secret_field};
pub use watches::run_controller;

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

impl Context {
    /// Waits until every watch cache has its first full list.
    ///
    /// # Errors
    /// [`Error::CacheClosed`] when a watch ended for good.
    pub async fn caches_ready(&self) -> Result<()> {
        self.caches.ready().await
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
    let r = Reconciler::new(&pool, &ctx);
    let res = match ctx.caches.ready_within(CACHE_SYNC_WAIT).await {
        Ok(()) => r.run().await,
        Err(e) => Err(e),
    };
    match res {
        Ok(action) => {
            ctx.memory.with(&uid(&pool), |m| m.failures = 0);
            Ok(action)
        }
        Err(e) => {
            r.report_retried(&e).await;
            Err(e)
        }
    }
}

/// How long a reconcile waits for the watch caches before it reports them (and retries).
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(30);

/// Consecutive failures after which a failure retried with backoff also makes the pool
/// `Degraded` (before that, its Warning event only: a blip of the API server does not
/// flap the pool's health).
const DEGRADED_AFTER: u32 = 2;

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

struct Reconciler<'a> {
    pool: &'a ConnectionPool,
    ctx: &'a Context,
    ns: String,
    name: String,
    /// The status this process last wrote for the pool, else the one the cache holds.
    prev: Option<ConnectionPoolStatus>,
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

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn run(&self) -> Result<Action> {
        let spec = &self.pool.spec;
        // 0. The whole spec is checked once, up front: what CEL cannot check.
        if let Err(e) = desired::validate(self.pool) {
            return self.fail(e).await;
        }
        // 1. Secrets (their resourceVersions make the config revision).
        let creds = match self.secret(&spec.database.credentials_secret).await {
            Ok(s) => s,
            Err(e) => return self.fail(e).await,
        };
        let users = match self.secret(&spec.client_auth.users_secret).await {
            Ok(s) => s,
            Err(e) => return self.fail(e).await,
        };
        let tls = match self.tls().await {
            Ok(t) => t,
            Err(e) => return self.fail(e).await,
        };
        let revision = desired::secrets_revision(
            creds.resource_version().as_deref().unwrap_or(""),
            users.resource_version().as_deref().unwrap_or(""),
            &tls.revision,
        );

        // 2. The budget.
        // A database that cannot be reached still lets safe steps happen (a scale-down
        // that lowers what the pods may hold), with the limits last discovered.
        let discovery_creds = match &spec.database.discovery_credentials_secret {
            Some(name) => match self.secret(name).await {
                Ok(s) => s,
                Err(e) => return self.fail(e).await,
            },
            None => creds.clone(),
        };
        let (limits, unreachable) = match self.limits(&discovery_creds, &tls).await {
            Ok(l) => (l, None),
            Err(e) if e.degraded_reason() == Some("DatabaseUnreachable") => {
                match self.last_limits() {
                    Some(l) => (l, Some(e)),
                    None => return self.fail(e).await,
                }
            }
            Err(e) => return self.fail(e).await,
        };
        let reserved = spec.database.reserved_connections.map(i64::from);
        let budget = match budget::budget(limits, reserved) {
            Ok(b) => b,
            Err(e) => return self.fail(e.into()).await,
        };
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
        // Each limit's `pooler.toml` is rendered once per reconcile (the planner asks for
        // the same hashes several times).
        let hashes = Mutex::new(HashMap::<i64, String>::new());
        let hash_for = |limit: i64| {
            hashes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(limit)
                .or_insert_with(|| {
                    desired::pooler_toml(self.pool, limit, &config_inputs)
                        .map(|t| desired::config_hash(&t))
                        .unwrap_or_default()
                })
                .clone()
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
        let world = decide::World {
            pool: self.pool,
            prev: self.prev(),
            budget,
            share,
            group: &group_view,
            observed: &observed,
            pods: &children.pods,
            reports: &reports,
            steady,
            deployment: children.deployment.as_ref(),
            config_inputs: &config_inputs,
            default_image: &self.ctx.settings.default_image,
            now: Timestamp::now(),
            ack_timeout: self.ctx.settings.ack_timeout,
        };
        let mut d = match decide::decide(&world, hash_for) {
            Ok(d) => d,
            Err(Error::Infeasible(e))
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
            Err(e @ Error::Infeasible(_)) => return self.blocked(&e, Some(budget)).await,
            Err(e) => return self.fail(e).await,
        };
        if let Some(e) = unreachable {
            if !decide::safe_without_discovery(&observed, target_replicas, d.committed) {
                return self.fail(e).await;
            }
            d.report.degraded = Some((
                "DatabaseUnreachable".into(),
                format!("{e}; scaling down with the limits last discovered"),
            ));
        }
        // Committed before anything is written: the group's next reconcile counts it.
        self.ctx.commit(self.pool, &group, d.committed);

        // 5. Act: the children (see `write_children` for the order); a name taken by an
        // object the pool does not own makes it Degraded. Then one event per step, the
        // restart of a pod that did not apply a lowered limit in time, admissions of
        // pods the budget has room for, and the status.
        if let Err(e) = self.write_children(&children, d.children).await {
            return self.fail(e).await;
        }
        for (kind, reason, message) in d.events {
            self.event(kind, reason, message).await;
        }
        if let Some(name) = &d.restart {
            self.delete_pod(name).await?;
        }
        if !d.admit.is_empty() {
            let password = secret_field(&creds, "password").unwrap_or_default();
            for name in &d.admit {
                let (Some(ip), Some(report)) = (
                    children
                        .pods
                        .iter()
                        .find(|p| p.name_any() == *name)
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
        let limit = d.report.budget.as_ref().map_or(0, |b| b.per_replica_limit);
        self.ctx
            .metrics
            .set_budget(&self.ns, &self.name, budget.available, limit);
        self.patch_status(&d.report).await?;
        Ok(if d.requeue_soon {
            Action::requeue(self.ctx.settings.poll_interval)
        } else {
            Action::requeue(self.ctx.settings.discovery_interval)
        })
    }
}

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

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
