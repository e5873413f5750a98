//! Deciding a reconcile, as a pure function: from the spec, the pool's budget and the
//! observed world to the intended children, the pod to restart, the pods to admit, the
//! events and the status. `Reconciler::run` is the I/O around it.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::act::Drift;
use super::budget_block;
use super::group::GroupView;
use super::observe::{pod_counts, rolling_out};
use crate::api::{ConnectionPool, ConnectionPoolStatus, ResizeStatus};
use crate::budget::{Budget, Share};
use crate::desired::{self, ConfigInputs, RenderInputs};
use crate::error::Result;
use crate::resize::{self, Observed, PodReport};
use crate::status::Report;

/// What a reconcile decides from.
pub(super) struct World<'a> {
    pub(super) pool: &'a ConnectionPool,
    /// The status last written.
    pub(super) prev: Option<&'a ConnectionPoolStatus>,
    /// The pool's budget: `available` is its share of the group's.
    pub(super) budget: Budget,
    pub(super) share: Share,
    pub(super) group: &'a GroupView,
    pub(super) observed: &'a Observed,
    /// The pods as the cache has them, and what each that answered reported.
    pub(super) pods: &'a [Pod],
    pub(super) reports: &'a HashMap<String, PodReport>,
    /// Every pod was Ready and the config applied: the pods were not asked.
    pub(super) steady: bool,
    /// The live Deployment.
    pub(super) deployment: Option<&'a Deployment>,
    pub(super) config_inputs: &'a ConfigInputs,
    pub(super) default_image: &'a str,
    pub(super) now: Timestamp,
    /// How long a pod may take to apply a lowered limit before it is restarted.
    pub(super) ack_timeout: Duration,
}

/// The children as they should be.
pub(super) struct Intended {
    pub(super) service_account: ServiceAccount,
    pub(super) config_map: ConfigMap,
    pub(super) deployment: Deployment,
    pub(super) service: Service,
    pub(super) pdb: PodDisruptionBudget,
}

/// What a reconcile does.
pub(super) struct Decision {
    pub(super) children: Intended,
    /// What the pool's pods may hold once the children are written (committed to the
    /// budget group before anything is written).
    pub(super) committed: i64,
    /// A pod that did not apply a lowered limit in time.
    pub(super) restart: Option<String>,
    /// Pods waiting for admission that the budget has room for.
    pub(super) admit: Vec<String>,
    /// One event per step taken, in order.
    pub(super) events: Vec<(EventType, &'static str, String)>,
    pub(super) report: Report,
    /// Something is in flight: look again soon.
    pub(super) requeue_soon: bool,
}

/// Decides a reconcile.
///
/// # Errors
/// [`crate::Error::Infeasible`] when the plan cannot fit the budget (the caller tells a
/// pool waiting for its group from one that does not fit), or a rendering error.
pub(super) fn decide(w: &World, hash_for: impl Fn(i64) -> String) -> Result<Decision> {
    let pool = w.pool;
    let target_replicas = pool.spec.replicas;
    let plan = resize::plan(w.observed, w.share.usable, target_replicas, &hash_for)?;
    let config_hash = hash_for(plan.config_limit);
    let committed = resize::committed(w.observed, &plan);

    let inputs = RenderInputs {
        limit: plan.config_limit,
        replicas: plan.deployment_replicas,
        revision: w.config_inputs.revision.clone(),
        default_image: w.default_image.to_string(),
    };
    let children = Intended {
        service_account: desired::service_account(pool)?,
        config_map: desired::config_map(pool, plan.config_limit, w.config_inputs)?,
        deployment: desired::deployment(pool, &inputs)?,
        service: desired::service(pool)?,
        pdb: desired::pod_disruption_budget(pool)?,
    };
    let deployment_changes = w.deployment.is_none_or(|live| {
        desired::spec_hash_of(live) != desired::spec_hash_of(&children.deployment)
            || live.drifted_from(&children.deployment)
    });

    let mut events = Vec::new();
    let config_limit = w.observed.config_limit;
    if config_limit != Some(plan.config_limit) {
        let from = config_limit.map_or("none".to_string(), |l| l.to_string());
        events.push((
            EventType::Normal,
            "ConfigUpdated",
            format!("connection_limit {from} -> {}", plan.config_limit),
        ));
    }
    if let Some(from) = w.observed.deployment_replicas
        && from != plan.deployment_replicas
    {
        events.push((
            EventType::Normal,
            "Scaled",
            format!("Deployment replicas {from} -> {}", plan.deployment_replicas),
        ));
    }

    // Pods that do not acknowledge a lowered limit in time are restarted; every pod gets
    // the full timeout, counted from the write or its own creation.
    let prev_resize = w.prev.and_then(|s| s.resize.as_ref());
    let since = prev_resize
        .filter(|r| r.config_hash == config_hash && r.phase == plan.phase.reason())
        .map(|r| r.since.clone())
        .unwrap_or_else(|| w.now.to_string());
    let expired_since = |t: Timestamp| {
        let age = w.now.as_second() - t.as_second();
        age >= 0 && age as u64 >= w.ack_timeout.as_secs()
    };
    let resize_expired = since.parse::<Timestamp>().is_ok_and(expired_since);
    let expired = |name: &str| {
        resize_expired
            && w.pods.iter().any(|p| {
                p.name_any() == name
                    && p.metadata
                        .creation_timestamp
                        .as_ref()
                        .is_none_or(|t| expired_since(t.0))
            })
    };
    let restart = resize::pod_to_restart(w.observed, &plan, expired).map(str::to_string);
    let admit = resize::admissions(w.observed, &plan, w.share.usable)
        .into_iter()
        .map(str::to_string)
        .collect();

    // Status. Pods that start later mount the ConfigMap as it is now, so the hash counts
    // as applied once every existing pod reports it (or there is none).
    let all_report = !w.pods.is_empty()
        && w.pods.iter().all(|p| {
            w.reports
                .get(&p.name_any())
                .is_some_and(|r| r.config_hash == config_hash && r.held <= plan.config_limit)
        });
    let applied = if w.steady || all_report || w.pods.is_empty() {
        Some(config_hash.clone())
    } else {
        w.observed.acknowledged_hash.clone()
    };
    let steady_limit =
        crate::budget::per_replica_limit(w.budget.available, i64::from(target_replicas)).ok();
    let limit = steady_limit.unwrap_or(plan.target_limit);
    let mut budget_status = budget_block(&w.budget, limit, target_replicas, applied);
    w.group.fill(&mut budget_status, committed);
    let (replicas, ready) = pod_counts(w.pods);
    let progressing = if !plan.settled() {
        Some((plan.phase.reason().to_string(), plan.message()))
    } else if deployment_changes || rolling_out(w.deployment) {
        // A Deployment written now rolls out.
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
        since,
    });
    if !plan.settled() && prev_resize.map(|r| r.phase.as_str()) != Some(plan.phase.reason()) {
        events.push((EventType::Normal, plan.phase.reason(), plan.message()));
    }
    let requeue_soon = progressing.is_some() || ready < target_replicas;
    let report = Report {
        generation: pool.metadata.generation,
        selector: desired::selector_string(pool),
        desired_replicas: target_replicas,
        replicas,
        ready_replicas: ready,
        budget: Some(budget_status),
        resize,
        progressing,
        degraded: None,
        budget_exceeded: None,
    };
    Ok(Decision {
        children,
        committed,
        restart,
        admit,
        events,
        report,
        requeue_soon,
    })
}

/// Whether a decision made with stale limits (the database cannot be reached) may be
/// carried out: a scale-down that does not raise what the pods may hold. Anything else
/// waits for the database: it may have shrunk meanwhile.
pub(super) fn safe_without_discovery(
    observed: &Observed,
    target_replicas: i32,
    committed: i64,
) -> bool {
    let scaling_down = observed
        .deployment_replicas
        .is_some_and(|r| target_replicas < r);
    scaling_down && committed <= resize::committed_as_is(observed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BudgetSource;
    use crate::budget::{self, DatabaseLimits};
    use crate::desired::tests::minimal;
    use crate::resize::PodView;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const ACK: Duration = Duration::from_secs(120);

    fn budget() -> Budget {
        let limits = DatabaseLimits {
            max_connections: 60,
            superuser_reserved: 3,
            reserved_connections: 0,
            source: BudgetSource::Discovered,
        };
        budget::budget(limits, None).unwrap()
    }

    fn group() -> GroupView {
        GroupView {
            key: "db:5432/app".into(),
            pools: 1,
            database_budget: budget().available,
        }
    }

    fn hash(limit: i64) -> String {
        format!("h{limit}")
    }

    fn pod(name: &str, created: Timestamp) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.creation_timestamp = Some(Time(created));
        p
    }

    fn view(name: &str, limit: i64) -> PodView {
        PodView {
            name: name.into(),
            terminating: false,
            scheduled: true,
            report: Some(report(limit)),
            last_seen: None,
        }
    }

    fn report(limit: i64) -> PodReport {
        PodReport {
            config_hash: hash(limit),
            connection_limit: limit,
            held: limit,
            admitted: true,
            nonce: String::new(),
        }
    }

    struct Case {
        pool: ConnectionPool,
        prev: Option<ConnectionPoolStatus>,
        observed: Observed,
        pods: Vec<Pod>,
        reports: HashMap<String, PodReport>,
        now: Timestamp,
    }

    impl Case {
        fn new(replicas: i32) -> Self {
            let mut pool = minimal();
            pool.spec.replicas = replicas;
            Self {
                pool,
                prev: None,
                observed: Observed {
                    config_limit: None,
                    deployment_replicas: None,
                    pods: Vec::new(),
                    acknowledged_hash: None,
                },
                pods: Vec::new(),
                reports: HashMap::new(),
                now: Timestamp::now(),
            }
        }

        /// Pods running `limit`, created `age` ago, each reporting it.
        fn running(mut self, n: usize, limit: i64, age: i64) -> Self {
            let created = self.now - k8s_openapi::jiff::SignedDuration::from_secs(age);
            for i in 0..n {
                let name = format!("p{i}");
                self.pods.push(pod(&name, created));
                self.observed.pods.push(view(&name, limit));
                self.reports.insert(name, report(limit));
            }
            self.observed.config_limit = Some(limit);
            self.observed.deployment_replicas = Some(n as i32);
            self
        }

        fn decide(&self) -> Decision {
            let b = budget();
            let share = budget::share(b.available, 1, &[]);
            let world = World {
                pool: &self.pool,
                prev: self.prev.as_ref(),
                budget: b,
                share,
                group: &group(),
                observed: &self.observed,
                pods: &self.pods,
                reports: &self.reports,
                steady: false,
                deployment: None,
                config_inputs: &ConfigInputs::default(),
                default_image: "pooler:test",
                now: self.now,
                ack_timeout: ACK,
            };
            decide(&world, hash).unwrap()
        }
    }

    #[test]
    fn a_new_pool_gets_its_children_one_event_and_a_quick_look_again() {
        let d = Case::new(2).decide();
        // budget 51 for 2 replicas and one rollout pod: 17 each.
        assert_eq!(
            d.events,
            vec![(
                EventType::Normal,
                "ConfigUpdated",
                "connection_limit none -> 17".to_string()
            )]
        );
        assert_eq!(d.report.budget.as_ref().unwrap().per_replica_limit, 17);
        assert_eq!(
            d.report
                .budget
                .as_ref()
                .unwrap()
                .applied_config_hash
                .as_deref(),
            Some("h17"),
            "no pod runs an older config"
        );
        assert_eq!(d.report.progressing.as_ref().unwrap().0, "RollingOut");
        assert!(d.requeue_soon);
        assert!(d.restart.is_none());
        assert_eq!(
            d.children.deployment.spec.as_ref().unwrap().replicas,
            Some(2)
        );
    }

    #[test]
    fn scaling_up_lowers_the_limit_first_and_restarts_a_pod_only_after_the_timeout() {
        let case = Case::new(5).running(2, 17, 600);
        let d = case.decide();
        // 51 for 5 + 1 pods: 8 each; the Deployment stays at 2 until the pods apply it.
        assert_eq!(
            d.children.deployment.spec.as_ref().unwrap().replicas,
            Some(2)
        );
        let reasons: Vec<&str> = d.events.iter().map(|e| e.1).collect();
        assert_eq!(reasons, vec!["ConfigUpdated", "LoweringLimit"]);
        assert_eq!(d.events[0].2, "connection_limit 17 -> 8");
        assert!(d.restart.is_none(), "the resize just began");
        let resize = d.report.resize.clone().unwrap();
        assert_eq!(resize.target_limit, 8);
        assert_eq!(
            d.report.budget.as_ref().unwrap().applied_config_hash,
            None,
            "no pod runs the lowered config yet"
        );

        // The same resize, begun longer ago than the timeout: one pod is restarted, and
        // the phase's event is not repeated.
        let mut later = case;
        let began = later.now - k8s_openapi::jiff::SignedDuration::from_secs(121);
        later.prev = Some(ConnectionPoolStatus {
            resize: Some(ResizeStatus {
                since: began.to_string(),
                ..resize.clone()
            }),
            ..Default::default()
        });
        let d = later.decide();
        assert!(d.restart.is_some());
        assert_eq!(d.events.len(), 1, "{:?}", d.events);
        assert_eq!(d.report.resize.unwrap().since, began.to_string());

        // A pod younger than the timeout gets its full time.
        let mut young = later;
        let created = young.now - k8s_openapi::jiff::SignedDuration::from_secs(30);
        for p in &mut young.pods {
            p.metadata.creation_timestamp = Some(Time(created));
        }
        assert!(young.decide().restart.is_none());
    }

    #[test]
    fn a_settled_pool_asks_for_nothing_and_looks_again_late() {
        let mut case = Case::new(2).running(2, 17, 600);
        case.observed.acknowledged_hash = Some(hash(17));
        let mut d = case.decide();
        assert!(d.events.is_empty(), "{:?}", d.events);
        assert!(d.restart.is_none());
        assert!(d.admit.is_empty());
        assert!(d.report.resize.is_none());
        // No live Deployment was given: writing one rolls out.
        assert_eq!(d.report.progressing.take().unwrap().0, "RollingOut");
        let b = d.report.budget.unwrap();
        assert_eq!((b.per_replica_limit, b.worst_case_total), (17, 51));
        assert_eq!(b.applied_config_hash.as_deref(), Some("h17"));
    }

    #[test]
    fn without_discovery_only_a_scale_down_that_lowers_what_pods_hold_goes_ahead() {
        let down = Case::new(2).running(3, 12, 600);
        let d = down.decide();
        assert!(safe_without_discovery(&down.observed, 2, d.committed));
        assert!(
            !safe_without_discovery(&down.observed, 2, d.committed + 100),
            "never more than the pods hold now"
        );
        let up = Case::new(4).running(2, 17, 600);
        let d = up.decide();
        assert!(
            !safe_without_discovery(&up.observed, 4, d.committed),
            "a scale-up waits for the database, even its first, lowering step"
        );
        let same = Case::new(2).running(2, 17, 600);
        let d = same.decide();
        assert!(!safe_without_discovery(&same.observed, 2, d.committed));
    }
}
