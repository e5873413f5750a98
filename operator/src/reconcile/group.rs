//! Budget groups: the ConnectionPools on one database divide its budget (see
//! `docs/architecture.md`). The operator remembers what each pool's pods may hold
//! (`committed`), and the reconciles of one group run one at a time.

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector;

use super::memory::Committed;
use super::{Context, Reconciler, budget_block, uid};
use crate::api::{BudgetStatus, ConnectionPool};
use crate::budget::{self, Budget};
use crate::desired;
use crate::error::Result;
use crate::status::{self, Report};

impl Context {
    /// Gives the reconciler the controller's ConnectionPool cache (budget groups).
    pub fn set_pool_store(&self, store: reflector::Store<ConnectionPool>) {
        let _ = self.pools.set(store);
    }

    pub(super) async fn lock_group(&self, group: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .group_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(group.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    pub(super) fn commit(&self, pool: &ConnectionPool, group: &str, committed: i64) {
        self.memory.with(&uid(pool), |m| {
            m.committed = Some(Committed {
                group: group.to_string(),
                namespace: pool.namespace().unwrap_or_default(),
                name: pool.name_any(),
                connections: committed,
            });
        });
    }

    /// Whether pods of pool `name` in `namespace` remain (draining, perhaps).
    fn has_pods(&self, namespace: &str, name: &str) -> bool {
        self.caches.pods.state().iter().any(|p| {
            p.namespace().as_deref() == Some(namespace)
                && p.labels().get(desired::POOL_LABEL).map(String::as_str) == Some(name)
        })
    }

    /// The other pools of `group`: their weights and what their pods may hold (as last
    /// decided by this process, else as their status says). A deleted pool counts while
    /// its pods remain.
    pub(super) fn group_members(&self, me: &ConnectionPool, group: &str) -> Vec<budget::Member> {
        let me = uid(me);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        if let Some(store) = self.pools.get() {
            for p in store.state() {
                if uid(&p) == me || budget::group_key(&p.spec.database) != group {
                    continue;
                }
                seen.insert(uid(&p));
                let c = self
                    .memory
                    .peek(&uid(&p), |m| m.committed.as_ref().map(|c| c.connections))
                    .flatten()
                    .or_else(|| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.budget.as_ref())
                            .map(|b| b.committed.max(b.worst_case_total))
                    });
                out.push(budget::Member {
                    weight: i64::from(p.spec.database.budget_weight.unwrap_or(1)),
                    committed: c.unwrap_or(0),
                });
            }
        }
        // Pools gone from the cache count while their pods drain with connections.
        self.memory.retain_committed(|u, c| {
            if c.group != group || u == me || seen.contains(u) {
                return true;
            }
            let draining = self.has_pods(&c.namespace, &c.name);
            if draining {
                out.push(budget::Member {
                    weight: 0,
                    committed: c.connections,
                });
            }
            draining
        });
        out
    }
}

/// A pool's budget group as shown in its status.
pub(super) struct GroupView {
    pub(super) key: String,
    pub(super) pools: i32,
    pub(super) database_budget: i64,
}

impl GroupView {
    pub(super) fn fill(&self, b: &mut BudgetStatus, committed: i64) {
        b.group = Some(self.key.clone());
        b.group_pools = self.pools;
        b.group_budget = self.database_budget;
        b.committed = committed;
    }
}

impl Reconciler<'_> {
    /// The pool's share fits its replicas, but other pools of its group still hold part
    /// of it: nothing is written (the pool keeps what it runs) until they release it.
    pub(super) async fn waiting_for_budget(
        &self,
        budget: &Budget,
        group: &GroupView,
        committed: i64,
        message: String,
    ) -> Result<Action> {
        let prev = self.prev();
        let applied = prev
            .and_then(|s| s.budget.as_ref())
            .and_then(|b| b.applied_config_hash.clone());
        let limit = prev
            .and_then(|s| s.budget.as_ref())
            .map_or(0, |b| b.per_replica_limit);
        let mut block = budget_block(budget, limit, self.pool.spec.replicas, applied);
        group.fill(&mut block, committed);
        let was = prev
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::PROGRESSING))
            .is_some_and(|c| c.reason == "WaitingForBudget");
        if !was {
            self.event(EventType::Normal, "WaitingForBudget", message.clone())
                .await;
        }
        let report = Report {
            generation: self.pool.metadata.generation,
            selector: desired::selector_string(self.pool),
            desired_replicas: self.pool.spec.replicas,
            replicas: prev.map_or(0, |s| s.replicas),
            ready_replicas: prev.map_or(0, |s| s.ready_replicas),
            budget: Some(block),
            resize: prev.and_then(|s| s.resize.clone()),
            progressing: Some(("WaitingForBudget".into(), message)),
            degraded: None,
            budget_exceeded: None,
        };
        self.patch_status(&report).await?;
        Ok(Action::requeue(self.ctx.settings.poll_interval))
    }
}
