//! The safe ordering of `connection_limit` and replica changes, as a pure planner.
//!
//! Each reconcile observes the world (the ConfigMap's limit, the Deployment's replicas, the
//! pods and what they report on `/status`) and [`plan`] decides the next safe write. Nothing
//! is remembered between steps except what is observable, so an operator restart resumes
//! where the previous one stopped.
//!
//! With `R` the Deployment's replicas, `T` the target replicas, `B` the budget and
//! `L(n) = ⌊B ÷ (n + 1)⌋`:
//! 1. **Lower first.** If the ConfigMap's limit is above `L(max(R, T))`, write that limit.
//! 2. **Scale up only behind acknowledgements.** If `T > R`, set replicas to `T` only once no
//!    pod can still hold more than the ConfigMap's limit: every pod reports the new config
//!    hash on `/status`, or a limit no higher than it, or has not been scheduled yet (it will
//!    start with the new file), *and* holds no more server connections than that limit (a
//!    lowered limit closes busy connections only when they are released: a session-mode
//!    client's at its end, a long transaction's at its end). Pods that do not apply the
//!    config within a timeout are deleted by the reconciler; pods that applied it but still
//!    hold more keep the scale-up waiting (`Progressing`, `LoweringLimit`).
//! 3. **Scale down before raising.** If `T < R`, set replicas to `T`.
//! 4. **Raise last.** If the limit is below `L(T)`, raise it only once at most `T` pods exist
//!    and none is terminating (removed pods are gone, not just draining).
//!
//! # Guarantees
//! At every moment, every pod that exists holds at most the limit that was in force when
//! `L(n)` was computed for an `n` at least as large as the number of pods that could exist
//! (replicas plus one rollout pod), so the total stays within the budget (see the
//! `resize_sequences_stay_within_budget` property test).

use crate::budget::{Infeasible, per_replica_limit};

/// What one pod reports on `GET /status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReport {
    /// `config_hash`.
    pub config_hash: String,
    /// `connection_limit`.
    pub connection_limit: i64,
    /// `server_connections.open`: what the pod holds now (open, opening and closing).
    pub held: i64,
    /// `admitted`: the process may open server connections.
    pub admitted: bool,
    /// `admission_nonce`: what its admission token is made from.
    pub nonce: String,
}

/// One pooler pod as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// `spec.nodeName` is set (the kubelet may have mounted the config).
    pub scheduled: bool,
    /// What the pod reported, `None` when it was not asked or did not answer.
    pub report: Option<PodReport>,
    /// When asked and it did not answer: the most it could hold by its last answer (its
    /// limit or what it held then), if it ever answered this operator process.
    pub last_seen: Option<i64>,
}

impl PodView {
    /// The most this pod may hold as far as the operator knows: what it reported (its
    /// limit, or more while it still holds busy connections above it), else the higher
    /// of `unknown` and what it could hold when it last answered; and at least `unknown`
    /// (the ConfigMap's limit) while it runs, since it may reload that at any moment.
    fn may_hold(&self, unknown: i64) -> i64 {
        let reported = match &self.report {
            Some(r) => r.connection_limit.max(r.held),
            None => unknown.max(self.last_seen.unwrap_or(0)),
        };
        if self.terminating {
            reported
        } else {
            reported.max(unknown)
        }
    }
}

/// The observed world.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `connection_limit` in the live ConfigMap (`None`: no ConfigMap yet).
    pub config_limit: Option<i64>,
    /// `spec.replicas` of the live Deployment (`None`: no Deployment yet).
    pub deployment_replicas: Option<i32>,
    /// The pool's pods.
    pub pods: Vec<PodView>,
    /// A config hash every pod was already seen to run (`status.budget.appliedConfigHash`);
    /// when the planned config has this hash, pods need not be asked again.
    pub acknowledged_hash: Option<String>,
}

/// The step a resize is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Nothing in flight.
    Idle,
    /// A lower limit is written; waiting for pods to apply it.
    LoweringLimit,
    /// Replicas reduced; waiting for the removed pods to be gone.
    ScalingDown,
    /// Raising the limit now that the removed pods are gone.
    RaisingLimit,
}

impl Phase {
    /// The `Progressing` condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::LoweringLimit => "LoweringLimit",
            Phase::ScalingDown => "ScalingDown",
            Phase::RaisingLimit => "RaisingLimit",
        }
    }
}

/// The decision of one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `connection_limit` to render into the ConfigMap now.
    pub config_limit: i64,
    /// `spec.replicas` to give the Deployment now.
    pub deployment_replicas: i32,
    /// Where the resize stands.
    pub phase: Phase,
    /// Pods that still hold (or may hold) more than `config_limit`.
    pub unacknowledged: Vec<String>,
    /// Of `unacknowledged`, pods that applied the config but still hold more server
    /// connections than it allows (busy ones close when released).
    pub over_limit: Vec<String>,
    /// Pods that must be gone before the limit can rise.
    pub awaiting_removal: Vec<String>,
    /// The limit the resize ends at.
    pub target_limit: i64,
}

impl Plan {
    /// True when nothing more is to be done.
    pub fn settled(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// A one-line description for conditions and events.
    pub fn message(&self) -> String {
        match self.phase {
            Phase::Idle => String::new(),
            Phase::LoweringLimit if self.over_limit.is_empty() => format!(
                "Waiting for {} pods to apply connection_limit {}",
                self.unacknowledged.len(),
                self.config_limit
            ),
            Phase::LoweringLimit => format!(
                "Waiting for {} pods to apply connection_limit {}; {} of them still hold more \
                 server connections (busy sessions and transactions close them when they end)",
                self.unacknowledged.len(),
                self.config_limit,
                self.over_limit.len()
            ),
            Phase::ScalingDown => format!(
                "Waiting for {} removed pods to be gone before raising connection_limit to {}",
                self.awaiting_removal.len(),
                self.target_limit
            ),
            Phase::RaisingLimit => {
                format!("Raising connection_limit to {}", self.target_limit)
            }
        }
    }
}

/// Decides the next safe step towards `target_replicas` within `available` connections.
///
/// `hash_for(limit)` is the hash of the `pooler.toml` rendered with that limit.
///
/// # Errors
/// [`Infeasible`] when the target replicas do not fit the budget; nothing may be written.
pub fn plan(
    observed: &Observed,
    available: i64,
    target_replicas: i32,
    hash_for: impl Fn(i64) -> String,
) -> Result<Plan, Infeasible> {
    let target = i64::from(target_replicas);
    let target_limit = per_replica_limit(available, target)?;
    let current_replicas = observed.deployment_replicas.unwrap_or(0);
    let widest = i64::from(current_replicas.max(target_replicas));
    // The limit safe for every pod count this resize passes through. When even that does
    // not fit (the Deployment is already larger than the budget allows), shrink first.
    let safe_limit = per_replica_limit(available, widest).ok();

    // 1. Lower first.
    let mut limit = match (observed.config_limit, safe_limit) {
        (None, Some(safe)) => safe,
        (None, None) => target_limit,
        (Some(cur), Some(safe)) if cur > safe => safe,
        (Some(cur), _) => cur,
    };
    let hash = hash_for(limit);
    let all_acknowledged = observed.acknowledged_hash.as_deref() == Some(hash.as_str());
    let suspect: Vec<&PodView> = observed
        .pods
        .iter()
        // Once every pod was seen on this hash, pods created since started with it.
        .filter(|_| !all_acknowledged)
        .filter(|p| p.scheduled || p.terminating)
        .collect();
    let unacknowledged: Vec<String> = suspect
        .iter()
        .filter(|p| match &p.report {
            Some(r) => (r.config_hash != hash && r.connection_limit > limit) || r.held > limit,
            None => true,
        })
        .map(|p| p.name.clone())
        .collect();
    let over_limit: Vec<String> = suspect
        .iter()
        .filter(|p| {
            p.report.as_ref().is_some_and(|r| {
                (r.config_hash == hash || r.connection_limit <= limit) && r.held > limit
            })
        })
        .map(|p| p.name.clone())
        .collect();

    let mut out = Plan {
        config_limit: limit,
        deployment_replicas: current_replicas,
        phase: Phase::Idle,
        unacknowledged: Vec::new(),
        over_limit: Vec::new(),
        awaiting_removal: Vec::new(),
        target_limit,
    };

    // 2. Scale up only once no pod can hold more than the new limit, and no pod is
    //    draining: the `+ 1` of the budget is for one rollout pod, not for pods left over
    //    from an earlier scale-down or restart.
    if target_replicas > current_replicas {
        let draining: Vec<String> = observed
            .pods
            .iter()
            .filter(|p| p.terminating)
            .map(|p| p.name.clone())
            .collect();
        if !unacknowledged.is_empty() {
            out.phase = Phase::LoweringLimit;
            out.unacknowledged = unacknowledged;
            out.over_limit = over_limit;
            return Ok(out);
        }
        if !draining.is_empty() || observed.pods.len() > current_replicas as usize {
            out.phase = Phase::ScalingDown;
            out.awaiting_removal = draining;
            return Ok(out);
        }
        out.deployment_replicas = target_replicas;
    } else if target_replicas < current_replicas {
        // 3. Scale down.
        out.deployment_replicas = target_replicas;
    }

    // 4. Raise last, once the removed pods are gone.
    if limit < target_limit {
        let pods = observed.pods.len();
        let draining: Vec<String> = observed
            .pods
            .iter()
            .filter(|p| p.terminating)
            .map(|p| p.name.clone())
            .collect();
        let shrinking = out.deployment_replicas < current_replicas;
        let want = out.deployment_replicas as usize;
        if shrinking || pods > want || !draining.is_empty() {
            out.phase = Phase::ScalingDown;
            // The draining pods, plus the pods beyond the new replica count that the
            // Deployment has yet to remove.
            let live: Vec<&PodView> = observed.pods.iter().filter(|p| !p.terminating).collect();
            let excess = live.iter().skip(want).map(|p| p.name.clone());
            out.awaiting_removal = draining.into_iter().chain(excess).collect();
            return Ok(out);
        }
        limit = target_limit;
        out.config_limit = limit;
        out.phase = Phase::RaisingLimit;
        return Ok(out);
    }

    if !unacknowledged.is_empty() {
        out.phase = Phase::LoweringLimit;
        out.unacknowledged = unacknowledged;
        out.over_limit = over_limit;
    }
    Ok(out)
}

/// The one pod to restart now because it has not applied a lowered limit, if any (a pod
/// that applied it and still holds busy connections above it is waited for: restarting
/// it would end its clients' sessions and add a replacement while it drains).
///
/// At most one pod is restarted at a time and never while another pod drains: the
/// Deployment replaces a deleted pod at once, so a restart briefly adds one pod, which the
/// budget's `+ 1` covers only once. `expired(name)` says whether the pod has had its full
/// acknowledgement timeout.
pub fn pod_to_restart<'a>(
    observed: &'a Observed,
    plan: &Plan,
    expired: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    if plan.phase != Phase::LoweringLimit || observed.pods.iter().any(|p| p.terminating) {
        return None;
    }
    observed
        .pods
        .iter()
        .find(|p| {
            p.scheduled
                && plan.unacknowledged.contains(&p.name)
                && !plan.over_limit.contains(&p.name)
                && expired(&p.name)
        })
        .map(|p| p.name.as_str())
}

/// Most server connections the pool's pods may hold once `plan` is written: each existing
/// pod what it reported (its applied limit, or more while busy connections above a lowered
/// limit are still held; the higher of the old and new limit when it did not answer), and
/// each pod that may still be created (the replicas plus the rollout pod) the planned
/// limit.
///
/// # Guarantees
/// At least [`crate::budget::worst_case_total`] of the planned limit and replicas; equal
/// to it once the pool is settled.
pub fn committed(observed: &Observed, plan: &Plan) -> i64 {
    committed_with(observed, plan.config_limit, plan.deployment_replicas)
}

/// [`committed`] when nothing is written: the pods as they are, the ConfigMap's limit and
/// the Deployment's replicas.
pub fn committed_as_is(observed: &Observed) -> i64 {
    committed_with(
        observed,
        observed.config_limit.unwrap_or(0),
        observed.deployment_replicas.unwrap_or(0),
    )
}

fn committed_with(observed: &Observed, config_limit: i64, deployment_replicas: i32) -> i64 {
    let unknown = observed.config_limit.unwrap_or(0).max(config_limit);
    let existing: i64 = observed.pods.iter().map(|p| p.may_hold(unknown)).sum();
    // Pods that may exist at once: the replicas and the rollout pod, a terminating pod
    // taking the rollout pod's place (so a rollout is not counted twice).
    let pods = observed.pods.len() as i64;
    let replicas = i64::from(deployment_replicas.max(observed.deployment_replicas.unwrap_or(0)));
    let slots = replicas + crate::budget::ROLLOUT_EXTRA_PODS;
    let room = (slots - pods).max(0) * config_limit;
    (existing + room).max(slots * config_limit)
}

/// The pods to admit now (see `require_admission` in `sluice_contract::PoolerConfig`):
/// pods whose process waits for admission, in name order, as long as what every pod
/// that may hold server connections can hold — admitted pods, pods that did not answer,
/// and terminating pods, which drain with their connections — plus theirs stays within
/// `available`. A pod that appears outside the operator's ordering (the replacement of a
/// deleted or evicted pod) so waits until the pod it replaces is gone.
///
/// # Guarantees
/// What the admitted and the still-holding pods may hold never exceeds `available`
/// through an admission, whatever the number of pods the Deployment created.
pub fn admissions<'a>(observed: &'a Observed, plan: &Plan, available: i64) -> Vec<&'a str> {
    let unknown = observed.config_limit.unwrap_or(0).max(plan.config_limit);
    let waiting = |p: &PodView| !p.terminating && p.report.as_ref().is_some_and(|r| !r.admitted);
    let mut holding: i64 = observed
        .pods
        .iter()
        .filter(|p| !waiting(p))
        .map(|p| match &p.report {
            Some(r) if !r.admitted => r.held,
            _ => p.may_hold(unknown),
        })
        .sum();
    let mut candidates: Vec<&PodView> = observed.pods.iter().filter(|p| waiting(p)).collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for p in candidates {
        let r = p.report.as_ref().expect("waiting pods reported");
        let need = r.connection_limit.max(plan.config_limit).max(r.held);
        if holding + need <= available {
            holding += need;
            out.push(p.name.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(limit: i64) -> String {
        format!("h{limit}")
    }

    fn pod(name: &str, limit: i64) -> PodView {
        PodView {
            name: name.into(),
            terminating: false,
            scheduled: true,
            report: Some(PodReport {
                config_hash: hash(limit),
                connection_limit: limit,
                held: limit,
                admitted: true,
                nonce: String::new(),
            }),
            last_seen: None,
        }
    }

    fn world(limit: i64, replicas: i32) -> Observed {
        Observed {
            config_limit: Some(limit),
            deployment_replicas: Some(replicas),
            pods: (0..replicas)
                .map(|i| pod(&format!("p{i}"), limit))
                .collect(),
            acknowledged_hash: Some(hash(limit)),
        }
    }

    #[test]
    fn create_writes_target_limit_and_replicas_at_once() {
        let p = plan(&Observed::default(), 51, 2, hash).unwrap();
        assert_eq!(
            (p.config_limit, p.deployment_replicas, p.phase),
            (17, 2, Phase::Idle)
        );
    }

    #[test]
    fn scale_up_lowers_then_waits_then_grows() {
        let mut w = world(17, 2);
        let p = plan(&w, 51, 4, hash).unwrap();
        assert_eq!(
            (p.config_limit, p.deployment_replicas, p.phase),
            (10, 2, Phase::LoweringLimit)
        );
        assert_eq!(p.unacknowledged.len(), 2);
        // The ConfigMap is written; one pod applied it.
        w.config_limit = Some(10);
        w.pods[0] = pod("p0", 10);
        let p = plan(&w, 51, 4, hash).unwrap();
        assert_eq!(
            (p.deployment_replicas, p.unacknowledged.clone()),
            (2, vec!["p1".to_string()])
        );
        w.pods[1] = pod("p1", 10);
        let p = plan(&w, 51, 4, hash).unwrap();
        assert_eq!(
            (p.config_limit, p.deployment_replicas, p.phase),
            (10, 4, Phase::Idle)
        );
    }

    #[test]
    fn scale_down_shrinks_then_waits_then_raises() {
        let mut w = world(10, 4);
        let p = plan(&w, 51, 2, hash).unwrap();
        assert_eq!(
            (p.config_limit, p.deployment_replicas, p.phase),
            (10, 2, Phase::ScalingDown)
        );
        w.deployment_replicas = Some(2);
        w.pods[2].terminating = true;
        w.pods[3].terminating = true;
        let p = plan(&w, 51, 2, hash).unwrap();
        assert_eq!((p.config_limit, p.phase), (10, Phase::ScalingDown));
        w.pods.truncate(2);
        let p = plan(&w, 51, 2, hash).unwrap();
        assert_eq!(
            (p.config_limit, p.deployment_replicas, p.phase),
            (17, 2, Phase::RaisingLimit)
        );
    }

    #[test]
    fn budget_shrink_lowers_without_scaling() {
        let w = world(17, 2);
        let p = plan(&w, 30, 2, hash).unwrap();
        assert_eq!(
            (p.config_limit, p.deployment_replicas, p.phase),
            (10, 2, Phase::LoweringLimit)
        );
    }

    #[test]
    fn infeasible_target_is_an_error() {
        assert!(plan(&world(17, 2), 51, 60, hash).is_err());
    }

    #[test]
    fn stale_pod_blocks_scale_up_but_lower_limit_pod_does_not() {
        let mut w = world(10, 2);
        w.acknowledged_hash = None;
        w.pods[0].report = Some(PodReport {
            config_hash: "old".into(),
            connection_limit: 17,
            held: 3,
            admitted: true,
            nonce: String::new(),
        });
        w.pods[1].report = Some(PodReport {
            config_hash: "old".into(),
            connection_limit: 5,
            held: 5,
            admitted: true,
            nonce: String::new(),
        });
        let p = plan(&w, 51, 4, hash).unwrap();
        assert_eq!(p.deployment_replicas, 2);
        assert_eq!(p.unacknowledged, vec!["p0".to_string()]);
    }

    #[test]
    fn busy_connections_above_a_lowered_limit_hold_the_scale_up() {
        let mut w = world(17, 2);
        w.config_limit = Some(10);
        w.acknowledged_hash = None;
        // Both applied limit 10; p1's session-mode clients still hold 17.
        w.pods[0] = pod("p0", 10);
        w.pods[1] = pod("p1", 10);
        w.pods[1].report.as_mut().unwrap().held = 17;
        let p = plan(&w, 51, 4, hash).unwrap();
        assert_eq!((p.deployment_replicas, p.phase), (2, Phase::LoweringLimit));
        assert_eq!(p.unacknowledged, vec!["p1".to_string()]);
        assert_eq!(p.over_limit, vec!["p1".to_string()]);
        assert!(p.message().contains("still hold more"), "{}", p.message());
        assert_eq!(
            pod_to_restart(&w, &p, |_| true),
            None,
            "its sessions are waited for"
        );
        w.pods[1].report.as_mut().unwrap().held = 10;
        let p = plan(&w, 51, 4, hash).unwrap();
        assert_eq!((p.deployment_replicas, p.phase), (4, Phase::Idle));
    }

    #[test]
    fn committed_counts_what_pods_may_still_hold() {
        let w = world(17, 2);
        let settled = plan(&w, 51, 2, hash).unwrap();
        assert_eq!(committed(&w, &settled), 51, "settled: the worst case");
        // Another pool joined: lowering to 8, pods still report 17 (one holds 20).
        let mut w = world(17, 2);
        w.pods[1].report.as_mut().unwrap().held = 20;
        let p = plan(&w, 25, 2, hash).unwrap();
        assert_eq!(p.config_limit, 8);
        assert_eq!(committed(&w, &p), 17 + 20 + 8);
        w.config_limit = Some(8);
        w.pods = vec![pod("p0", 8), pod("p1", 8)];
        let p = plan(&w, 25, 2, hash).unwrap();
        assert_eq!(committed(&w, &p), 24);
        // A rollout: one pod drains, its replacement waits for admission.
        w.pods[1].terminating = true;
        let mut new = pod("p2", 8);
        new.report.as_mut().unwrap().admitted = false;
        new.report.as_mut().unwrap().held = 0;
        w.pods.push(new);
        assert_eq!(committed(&w, &p), 24, "the rollout pod is the + 1");
    }

    /// Found by the simulation: a pod that stops answering counts with what it could
    /// hold when it last answered, and a live pod with what the ConfigMap lets it reload.
    #[test]
    fn admission_counts_silent_pods_and_pending_reloads() {
        // The old pod at 22 drains and stopped answering; the ConfigMap says 11.
        let mut w = world(11, 2);
        let mut old = pod("p0", 22);
        old.terminating = true;
        old.report = None;
        old.last_seen = Some(22);
        let mut new = pod("p2", 11);
        new.report.as_mut().unwrap().admitted = false;
        new.report.as_mut().unwrap().held = 0;
        w.pods = vec![old, pod("p1", 11), new];
        let p = plan(&w, 33, 2, hash).unwrap();
        assert_eq!(p.config_limit, 11);
        assert!(admissions(&w, &p, 40).is_empty(), "22 + 11 + 11 > 40");
        assert_eq!(admissions(&w, &p, 44), vec!["p2"]);
        w.pods[0].last_seen = None;
        assert_eq!(
            admissions(&w, &p, 40),
            vec!["p2"],
            "unknown: the ConfigMap's limit"
        );
        // A live pod still at 8 while the ConfigMap says 10 counts 10.
        let mut w = world(10, 2);
        w.pods = vec![pod("p0", 8), pod("p1", 10)];
        let mut new = pod("p2", 10);
        new.report.as_mut().unwrap().admitted = false;
        new.report.as_mut().unwrap().held = 0;
        w.pods.push(new);
        let p = plan(&w, 30, 2, hash).unwrap();
        assert_eq!(admissions(&w, &p, 30), vec!["p2"]);
        assert!(
            admissions(&w, &p, 29).is_empty(),
            "8 + 10 + 10 would fit 29; 10 + 10 + 10 does not"
        );
    }
}

#[cfg(test)]
#[path = "resize_sim.rs"]
mod sim;
