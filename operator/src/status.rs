//! Pure construction of a pool's status and its kstatus-style conditions.
//!
//! # Guarantees
//! A condition keeps its `lastTransitionTime` while its status does not change, so an
//! unchanged world produces a status equal to the previous one and no write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{BudgetStatus, ConnectionPoolStatus, ResizeStatus};

/// Condition types.
pub const READY: &str = "Ready";
/// Condition types.
pub const PROGRESSING: &str = "Progressing";
/// Condition types.
pub const DEGRADED: &str = "Degraded";
/// Condition types.
pub const BUDGET_EXCEEDED: &str = "BudgetExceeded";
/// kstatus: the operator is still working towards the spec (Flux, cli-utils and Argo CD
/// read it as in progress).
pub const RECONCILING: &str = "Reconciling";
/// kstatus: the operator cannot make progress until something changes (read as failed).
pub const STALLED: &str = "Stalled";

/// What the reconcile found, in status terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// `metadata.generation` of the pool.
    pub generation: Option<i64>,
    /// `status.selector`.
    pub selector: String,
    /// Target replicas.
    pub desired_replicas: i32,
    /// Pods that exist and are not terminating.
    pub replicas: i32,
    /// Ready pods.
    pub ready_replicas: i32,
    /// The budget block.
    pub budget: Option<BudgetStatus>,
    /// A resize in flight.
    pub resize: Option<ResizeStatus>,
    /// `(reason, message)` while a resize or rollout is in flight.
    pub progressing: Option<(String, String)>,
    /// `(reason, message)` when the pool cannot be served as specified.
    pub degraded: Option<(String, String)>,
    /// Message when the budget cannot fit the replicas.
    pub budget_exceeded: Option<String>,
}

fn condition(
    prev: Option<&ConnectionPoolStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last = prev
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// Builds the status from a report, carrying transition times over from `prev`.
pub fn build(prev: Option<&ConnectionPoolStatus>, r: &Report, now: Time) -> ConnectionPoolStatus {
    let g = r.generation;
    let ready = r.ready_replicas >= r.desired_replicas
        && r.degraded.is_none()
        && r.budget_exceeded.is_none();
    let ready_msg = format!(
        "{}/{} pooler pods ready",
        r.ready_replicas, r.desired_replicas
    );
    let ready_reason = if r.budget_exceeded.is_some() {
        "BudgetExceeded"
    } else if r.degraded.is_some() {
        "Degraded"
    } else if ready {
        "Ready"
    } else {
        "PodsNotReady"
    };
    let (p_on, p_reason, p_msg) = match &r.progressing {
        Some((reason, msg)) => (true, reason.as_str(), msg.clone()),
        None => (false, "Idle", String::new()),
    };
    let (d_on, d_reason, d_msg) = match &r.degraded {
        Some((reason, msg)) => (true, reason.as_str(), msg.clone()),
        None => (false, "AsExpected", String::new()),
    };
    let (b_on, b_reason, b_msg) = match &r.budget_exceeded {
        Some(msg) => (true, "BudgetExceeded", msg.clone()),
        None => (false, "WithinBudget", String::new()),
    };
    let (state, reason) = if b_on {
        ("BudgetExceeded", b_reason)
    } else if d_on {
        ("Degraded", d_reason)
    } else if p_on {
        ("Progressing", p_reason)
    } else if ready {
        ("Ready", ready_reason)
    } else {
        ("NotReady", ready_reason)
    };
    // kstatus: Stalled when the pool cannot be served as specified, else Reconciling
    // while a resize, a rollout or pods are under way.
    let stalled = b_on || d_on;
    let (s_reason, s_msg) = if b_on {
        (b_reason, b_msg.clone())
    } else if d_on {
        (d_reason, d_msg.clone())
    } else {
        ("AsExpected", String::new())
    };
    let reconciling = !stalled && (p_on || !ready);
    let (r_reason, r_msg) = if !reconciling {
        ("AsExpected", String::new())
    } else if p_on {
        (p_reason, p_msg.clone())
    } else {
        (ready_reason, ready_msg.clone())
    };
    ConnectionPoolStatus {
        state: Some(state.into()),
        reason: Some(reason.into()),
        observed_generation: g,
        conditions: vec![
            condition(prev, READY, ready, ready_reason, ready_msg, g, &now),
            condition(prev, PROGRESSING, p_on, p_reason, p_msg, g, &now),
            condition(prev, DEGRADED, d_on, d_reason, d_msg, g, &now),
            condition(prev, BUDGET_EXCEEDED, b_on, b_reason, b_msg, g, &now),
            condition(prev, RECONCILING, reconciling, r_reason, r_msg, g, &now),
            condition(prev, STALLED, stalled, s_reason, s_msg, g, &now),
        ],
        replicas: r.replicas,
        ready_replicas: r.ready_replicas,
        selector: Some(r.selector.clone()),
        budget: r.budget.clone(),
        resize: r.resize.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn unchanged_report_gives_equal_status() {
        let r = Report {
            desired_replicas: 2,
            replicas: 2,
            ready_replicas: 2,
            ..Default::default()
        };
        let a = build(None, &r, t(1));
        let b = build(Some(&a), &r, t(2));
        assert_eq!(a, b);
        assert_eq!(a.conditions[0].status, "True");
    }

    #[test]
    fn transitions_move_the_time_and_budget_exceeded_is_not_ready() {
        let r = Report {
            desired_replicas: 2,
            replicas: 2,
            ready_replicas: 2,
            ..Default::default()
        };
        let a = build(None, &r, t(1));
        let r2 = Report {
            budget_exceeded: Some("too many".into()),
            ..r
        };
        let b = build(Some(&a), &r2, t(2));
        let ready = &b.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.clone()),
            ("False", t(2))
        );
        let be = b
            .conditions
            .iter()
            .find(|c| c.type_ == BUDGET_EXCEEDED)
            .unwrap();
        assert_eq!(
            (be.status.as_str(), be.message.as_str()),
            ("True", "too many")
        );
        // Progressing did not change: its time stays.
        assert_eq!(b.conditions[1].last_transition_time, t(1));
    }

    #[test]
    fn state_names_the_condition_that_matters_most() {
        let ready = Report {
            desired_replicas: 2,
            replicas: 2,
            ready_replicas: 2,
            ..Default::default()
        };
        let state = |r: &Report| {
            let s = build(None, r, t(1));
            (s.state.unwrap(), s.reason.unwrap())
        };
        assert_eq!(state(&ready), ("Ready".into(), "Ready".into()));
        let starting = Report {
            ready_replicas: 1,
            ..ready.clone()
        };
        assert_eq!(state(&starting), ("NotReady".into(), "PodsNotReady".into()));
        let resizing = Report {
            progressing: Some(("LoweringLimit".into(), "Waiting".into())),
            ..ready.clone()
        };
        assert_eq!(
            state(&resizing),
            ("Progressing".into(), "LoweringLimit".into())
        );
        let degraded = Report {
            degraded: Some(("NotOwned".into(), "Service ns/app".into())),
            ..resizing.clone()
        };
        assert_eq!(state(&degraded), ("Degraded".into(), "NotOwned".into()));
        let over = Report {
            budget_exceeded: Some("too many".into()),
            ..degraded
        };
        assert_eq!(
            state(&over),
            ("BudgetExceeded".into(), "BudgetExceeded".into())
        );
    }

    #[test]
    fn kstatus_conditions_follow_the_domain_ones() {
        let ready = Report {
            generation: Some(3),
            desired_replicas: 2,
            replicas: 2,
            ready_replicas: 2,
            ..Default::default()
        };
        let kstatus = |r: &Report| {
            let s = build(None, r, t(1));
            let get = |ty: &str| {
                let c = s.conditions.iter().find(|c| c.type_ == ty).unwrap();
                assert_eq!(c.observed_generation, Some(3));
                (c.status.clone(), c.reason.clone())
            };
            (get(RECONCILING), get(STALLED))
        };
        let off = ("False".to_string(), "AsExpected".to_string());
        assert_eq!(kstatus(&ready), (off.clone(), off.clone()), "current");
        let resizing = Report {
            progressing: Some(("LoweringLimit".into(), "waiting".into())),
            ..ready.clone()
        };
        assert_eq!(
            kstatus(&resizing),
            (("True".into(), "LoweringLimit".into()), off.clone())
        );
        let starting = Report {
            ready_replicas: 1,
            ..ready.clone()
        };
        assert_eq!(
            kstatus(&starting),
            (("True".into(), "PodsNotReady".into()), off.clone())
        );
        let over = Report {
            budget_exceeded: Some("too many".into()),
            progressing: Some(("RollingOut".into(), String::new())),
            ..ready.clone()
        };
        assert_eq!(
            kstatus(&over),
            (off.clone(), ("True".into(), "BudgetExceeded".into())),
            "stalled, not in progress"
        );
        let degraded = Report {
            degraded: Some(("SecretNotFound".into(), "x".into())),
            ..ready
        };
        assert_eq!(
            kstatus(&degraded),
            (off, ("True".into(), "SecretNotFound".into()))
        );
    }
}

/// The Argo CD health check's test data (`docs/argocd/.../testdata`) carries statuses
/// rendered here, from the operator's own messages, so the check is tested against what
/// the operator really writes. `UPDATE_GOLDEN=1` rewrites them.
#[cfg(test)]
mod argocd_testdata {
    use super::*;
    use crate::budget::Infeasible;
    use crate::error::Error;
    use crate::resize::{Phase, Plan};

    fn dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/argocd/sluice.dev/ConnectionPool/testdata")
    }

    fn report(ready: i32) -> Report {
        Report {
            generation: Some(4),
            selector: "sluice.dev/pool=app".into(),
            desired_replicas: 2,
            replicas: 2,
            ready_replicas: ready,
            ..Default::default()
        }
    }

    /// Each testdata file and the report whose status it carries.
    fn cases() -> Vec<(&'static str, Report)> {
        let lowering = Plan {
            config_limit: 12,
            deployment_replicas: 2,
            phase: Phase::LoweringLimit,
            unacknowledged: vec!["app-a".into(), "app-b".into()],
            over_limit: vec![],
            awaiting_removal: vec![],
            target_limit: 12,
        };
        let too_many = Infeasible::TooManyReplicas {
            replicas: 2,
            extra: 1,
            needed: 3,
            available: 2,
        };
        let missing = Error::MissingSecret {
            namespace: "default".into(),
            name: "app-db-credentials".into(),
        };
        let (_, reason) = missing.condition().expect("a pool condition");
        vec![
            ("healthy.yaml", report(2)),
            ("not_ready.yaml", report(1)),
            (
                "progressing.yaml",
                Report {
                    progressing: Some((lowering.phase.reason().into(), lowering.message())),
                    ..report(2)
                },
            ),
            (
                "degraded.yaml",
                Report {
                    degraded: Some((reason.into(), missing.to_string())),
                    ..report(0)
                },
            ),
            (
                "budget_exceeded.yaml",
                Report {
                    budget_exceeded: Some(too_many.to_string()),
                    ..report(0)
                },
            ),
            // Healthy at generation 2 while the spec is at 3.
            (
                "generation_lag.yaml",
                Report {
                    generation: Some(2),
                    ..report(2)
                },
            ),
        ]
    }

    #[test]
    fn argocd_testdata_carries_the_statuses_the_operator_writes() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_767_225_600).unwrap());
        let mut stale = Vec::new();
        for (file, r) in cases() {
            let path = dir().join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let mut obj: serde_json::Value = serde_yaml::from_str(&text).unwrap();
            let status = serde_json::to_value(build(None, &r, now.clone())).unwrap();
            // The spec's generation: the status's, but one ahead where the case is a lag.
            let generation = r.generation.unwrap() + i64::from(file == "generation_lag.yaml");
            if obj["status"] == status && obj["metadata"]["generation"] == generation {
                continue;
            }
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                obj["status"] = status;
                obj["metadata"]["generation"] = generation.into();
                std::fs::write(&path, serde_yaml::to_string(&obj).unwrap()).unwrap();
            } else {
                stale.push(file);
            }
        }
        assert!(
            stale.is_empty(),
            "{stale:?} differ from the operator's statuses; rerun with UPDATE_GOLDEN=1"
        );
    }
}
