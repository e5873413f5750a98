//! Acting on a pool's world: server-side applies of the children (never over an object the
//! pool does not own), pod deletions, status patches and events.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::time::Duration;

use super::decide::Intended;
use super::observe::{Children, pod_counts};
use super::{Reconciler, budget_block, key, uid};
use crate::api::ConnectionPool;
use crate::budget::Budget;
use crate::desired::{self, FIELD_MANAGER, LIMIT_ANNOTATION};
use crate::error::{Error, Result};
use crate::status::{self, Report};

impl Reconciler<'_> {
    /// Writes the children in a safe order: the ServiceAccount (pods cannot be admitted
    /// without it) and the ConfigMap (their config) before the Deployment, which goes
    /// before the Service and PDB so the controller-manager can start on it sooner; the
    /// two pairs are written concurrently.
    ///
    /// # Errors
    /// [`Error::NotOwned`] when a child's name is taken by an object the pool does not
    /// own (nothing is written over it), or the API call's error.
    pub(super) async fn write_children(
        &self,
        children: &Children,
        intended: Intended,
    ) -> Result<()> {
        futures::try_join!(
            self.apply(
                children.service_account.as_ref(),
                intended.service_account,
                "serviceaccounts",
            ),
            self.apply(
                children.config_map.as_ref(),
                intended.config_map,
                "configmaps",
            ),
        )?;
        self.apply(
            children.deployment.as_ref(),
            intended.deployment,
            "deployments",
        )
        .await?;
        futures::try_join!(
            self.apply(children.service.as_ref(), intended.service, "services"),
            self.apply(children.pdb.as_ref(), intended.pdb, "poddisruptionbudgets",),
        )?;
        Ok(())
    }

    /// Reports `e` as the pool's `Degraded` condition when it is the pool's to fix (see
    /// [`Error::degraded_reason`]), else returns it for a retry with backoff.
    pub(super) async fn fail(&self, e: Error) -> Result<Action> {
        if e.condition().is_some() {
            self.blocked(&e, None).await
        } else {
            Err(e)
        }
    }

    /// Reports a failure retried with backoff (an API call that failed, watches not
    /// synced): a Warning event each time (repeats of the same one count up in its
    /// series), and once it persists the `Degraded` condition, best effort (the status
    /// write may be what fails).
    pub(super) async fn report_retried(&self, e: &Error) {
        let Some(reason) = e.retry_reason() else {
            return;
        };
        let message = format!("{}; retrying", e.message());
        self.event(EventType::Warning, reason, message.clone())
            .await;
        let failures = self.ctx.memory.with(&uid(self.pool), |m| m.failures);
        if failures >= super::DEGRADED_AFTER {
            let mut report = self.report_as_is();
            report.degraded = Some((reason.to_string(), message));
            if let Err(e) = self.patch_status(&report).await {
                tracing::debug!(pool = %key(self.pool), error = %e, "could not report a retried failure in status");
            }
        }
    }

    /// Server-side applies `desired` unless the live object carries the same spec hash.
    /// Returns whether it wrote.
    pub(super) async fn apply<K>(
        &self,
        live: Option<&K>,
        desired: K,
        resource: &str,
    ) -> Result<bool>
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

    pub(super) async fn delete_pod(&self, name: &str) -> Result<()> {
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

    /// Records the pool as degraded or over budget (the condition [`Error::condition`]
    /// gives `why`) without touching any child; `budget` is the one computed, when it
    /// got that far.
    /// The status of the pods as they are (they keep running the last good config), with
    /// the last budget and resize reported.
    fn report_as_is(&self) -> Report {
        let children = self.observe();
        let (replicas, ready_replicas) = pod_counts(&children.pods);
        Report {
            generation: self.pool.metadata.generation,
            selector: desired::selector_string(self.pool),
            desired_replicas: self.pool.spec.replicas,
            replicas,
            ready_replicas,
            budget: self.prev().and_then(|s| s.budget.clone()),
            resize: self.prev().and_then(|s| s.resize.clone()),
            ..Default::default()
        }
    }

    pub(super) async fn blocked(&self, why: &Error, budget: Option<Budget>) -> Result<Action> {
        let prev_budget = self.prev().and_then(|s| s.budget.clone());
        let running_limit = self
            .observe()
            .config_map
            .as_ref()
            .and_then(|cm| cm.annotations().get(LIMIT_ANNOTATION))
            .and_then(|v| v.parse::<i64>().ok());
        let mut report = self.report_as_is();
        let message = why.message();
        let Some((cond, reason)) = why.condition() else {
            unreachable!("only errors with a condition block a pool: {why}")
        };
        match cond {
            status::DEGRADED => {
                report.degraded = Some((reason.to_string(), message.clone()));
            }
            _ => {
                if let Some(b) = budget {
                    let applied = prev_budget
                        .as_ref()
                        .and_then(|p| p.applied_config_hash.clone());
                    // The limit the pods run, not 0.
                    let limit = running_limit
                        .or(prev_budget.as_ref().map(|p| p.per_replica_limit))
                        .unwrap_or(0);
                    let mut block = budget_block(&b, limit, self.pool.spec.replicas, applied);
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
            }
        }
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

    pub(super) async fn patch_status(&self, report: &Report) -> Result<()> {
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

    pub(super) async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx.metrics.api_request("create", "events");
        // The recorder merges events with the same reason and action into one series
        // that keeps the first note: the action carries the step, so each distinct step
        // is its own event and only a repeat of the same step counts up.
        let action = event_action(&note);
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action,
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

/// An event's `action` (at most 128 bytes): its note, cut on a character boundary.
fn event_action(note: &str) -> String {
    let mut end = note.len().min(128);
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note[..end].to_string()
}

/// Fields that others might change on a child behind the spec-hash annotation's back and
/// that matter for the budget; a difference forces a re-apply.
pub(super) trait Drift {
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
    /// Replicas, and what bounds how many pods hold connections at once during a
    /// rollout: the strategy (`maxSurge: 0`), `minReadySeconds`, the pods' grace period
    /// and the selector.
    fn drifted_from(&self, desired: &Self) -> bool {
        let budget_fields = |d: &Deployment| {
            let s = d.spec.as_ref();
            (
                s.and_then(|s| s.replicas),
                s.and_then(|s| s.strategy.clone()),
                s.and_then(|s| s.min_ready_seconds),
                s.map(|s| s.selector.clone()),
                s.and_then(|s| s.template.spec.as_ref())
                    .and_then(|p| p.termination_grace_period_seconds),
            )
        };
        budget_fields(self) != budget_fields(desired)
    }
}

impl Drift for Service {
    /// The selector: clients must reach this pool's pods and no others.
    fn drifted_from(&self, desired: &Self) -> bool {
        let selector = |s: &Service| s.spec.as_ref().and_then(|s| s.selector.clone());
        selector(self) != selector(desired)
    }
}
impl Drift for PodDisruptionBudget {}
impl Drift for ServiceAccount {}

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
