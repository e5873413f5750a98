//! The simulation behind the budget guarantee: the operator's planner and admissions
//! against a model of the cluster (Deployment controller, pods reloading, busy
//! connections released only when their clients let go, pods deleted, evicted and
//! restarted, reports missing, several pools on one database), under any interleaving.

use super::*;
use crate::budget::{Member, per_replica_limit, share};
use proptest::prelude::*;

fn hash(limit: i64) -> String {
    format!("h{limit}")
}

#[derive(Clone, Debug)]
struct SimPod {
    id: usize,
    applied: i64,
    /// Server connections it holds: up to `applied` as clients come; above it after
    /// a lowered limit, until busy ones are released.
    held: i64,
    terminating: bool,
    /// Its process may open server connections.
    admitted: bool,
    /// Its `/status` does not answer (network trouble, overloaded): no report.
    silent: bool,
    /// What it could hold when it last answered the operator.
    last_answer: Option<i64>,
}

#[derive(Debug)]
struct Sim {
    budget: i64,
    cm_limit: Option<i64>,
    replicas: Option<i32>,
    pods: Vec<SimPod>,
    next_id: usize,
}

impl Sim {
    /// What the operator observes (asking every pod; those that answer are remembered).
    fn observed(&mut self) -> Observed {
        for p in &mut self.pods {
            if !p.silent {
                p.last_answer = Some(p.applied.max(p.held));
            }
        }
        Observed {
            config_limit: self.cm_limit,
            deployment_replicas: self.replicas,
            pods: self
                .pods
                .iter()
                .map(|p| PodView {
                    name: format!("p{}", p.id),
                    terminating: p.terminating,
                    scheduled: true,
                    last_seen: p.last_answer.filter(|_| p.silent),
                    report: (!p.silent).then(|| PodReport {
                        config_hash: hash(p.applied),
                        connection_limit: p.applied,
                        held: p.held,
                        admitted: p.admitted,
                        nonce: String::new(),
                    }),
                })
                .collect(),
            acknowledged_hash: None,
        }
    }

    /// What the pods hold or may take: each at most its applied limit, or what it
    /// already holds above it.
    fn holding(&self) -> i64 {
        self.pods
            .iter()
            .map(|p| {
                if p.admitted {
                    p.applied.max(p.held)
                } else {
                    p.held
                }
            })
            .sum()
    }

    /// One event chosen by `choice`; the invariant is checked by the caller.
    fn step(&mut self, choice: u8, target: i32) {
        match choice % 14 {
            // The operator reconciles.
            0 => {
                if let Ok(p) = plan(&self.observed(), self.budget, target, hash) {
                    self.cm_limit = Some(p.config_limit);
                    self.replicas = Some(p.deployment_replicas);
                }
            }
            // The Deployment controller converges by one pod.
            1 => {
                let want = self.replicas.unwrap_or(0) as usize;
                let live: Vec<usize> = (0..self.pods.len())
                    .filter(|&i| !self.pods[i].terminating)
                    .collect();
                if live.len() < want {
                    if let Some(limit) = self.cm_limit {
                        self.pods.push(SimPod {
                            id: self.next_id,
                            applied: limit,
                            held: 0,
                            terminating: false,
                            admitted: false,
                            silent: false,
                            last_answer: None,
                        });
                        self.next_id += 1;
                    }
                } else if live.len() > want {
                    let i = *live.last().unwrap();
                    self.pods[i].terminating = true;
                }
            }
            // One live pod reloads the current config.
            2 => {
                if let (Some(limit), Some(p)) = (
                    self.cm_limit,
                    self.pods
                        .iter_mut()
                        .find(|p| !p.terminating && p.applied != self.cm_limit.unwrap()),
                ) {
                    p.applied = limit;
                }
            }
            // A draining pod exits.
            3 => {
                if let Some(i) = self.pods.iter().position(|p| p.terminating) {
                    self.pods.remove(i);
                }
            }
            // A rolling update replaces one pod (maxSurge 0, maxUnavailable 1,
            // minReadySeconds ≥ grace: only when no other pod is draining).
            4 => {
                let want = self.replicas.unwrap_or(0) as usize;
                let live = self.pods.iter().filter(|p| !p.terminating).count();
                if live == want && want > 0 && !self.pods.iter().any(|p| p.terminating) {
                    self.pods[0].terminating = true;
                }
            }
            // The operator restarts a pod that has not acknowledged in time (the
            // Deployment controller then replaces it).
            5 => {
                let obs = self.observed();
                if let Ok(p) = plan(&obs, self.budget, target, hash)
                    && let Some(name) = pod_to_restart(&obs, &p, |_| true)
                {
                    let name = name.to_string();
                    if let Some(pod) = self.pods.iter_mut().find(|p| format!("p{}", p.id) == name) {
                        pod.terminating = true;
                    }
                }
            }
            // A pod's process is killed and restarted in place (same pod, same
            // address): its backends go with the old process (PostgreSQL sees their
            // sockets closed), the new one waits for admission.
            6 => {
                let n = self.pods.len().max(1);
                let limit = self.cm_limit;
                if let Some(p) = self.pods.get_mut(usize::from(choice / 14) % n)
                    && !p.terminating
                    && let Some(limit) = limit
                {
                    p.held = 0;
                    p.applied = limit;
                    p.admitted = false;
                }
            }
            // Saturation: one pod's clients take every connection it may open.
            7 => {
                let n = self.pods.len().max(1);
                if let Some(p) = self.pods.get_mut(usize::from(choice / 14) % n)
                    && !p.terminating
                    && p.admitted
                {
                    p.held = p.held.max(p.applied);
                }
            }
            // A busy connection is released: closed if above the limit (in session
            // mode, when its client leaves).
            8 => {
                let n = self.pods.len().max(1);
                if let Some(p) = self.pods.get_mut(usize::from(choice / 14) % n)
                    && p.held > 0
                {
                    p.held -= 1;
                }
            }
            // The operator admits the pods waiting for it.
            9 => {
                let obs = self.observed();
                if let Ok(p) = plan(&obs, self.budget, target, hash) {
                    let names: Vec<String> = admissions(&obs, &p, self.budget)
                        .into_iter()
                        .map(str::to_string)
                        .collect();
                    for pod in &mut self.pods {
                        if names.contains(&format!("p{}", pod.id)) {
                            pod.admitted = true;
                        }
                    }
                }
            }
            // Every pod deleted at once (`kubectl delete pods --all`): they drain
            // with their connections while the ReplicaSet replaces them.
            10 => {
                for p in &mut self.pods {
                    p.terminating = true;
                }
            }
            // An eviction (`kubectl drain`): the PodDisruptionBudget allows one
            // while every pod is available (Ready, so admitted).
            11 => {
                let want = self.replicas.unwrap_or(0) as usize;
                let live: Vec<usize> = (0..self.pods.len())
                    .filter(|&i| !self.pods[i].terminating)
                    .collect();
                if live.len() >= want && want > 0 && live.iter().all(|&i| self.pods[i].admitted) {
                    let i = live[usize::from(choice / 14) % live.len()];
                    self.pods[i].terminating = true;
                }
            }
            // One pod's `/status` stops or starts answering.
            12 => {
                let n = self.pods.len().max(1);
                if let Some(p) = self.pods.get_mut(usize::from(choice / 14) % n) {
                    p.silent = !p.silent;
                }
            }
            // Nothing happens (time passes).
            _ => {}
        }
    }
}

/// Two pools on one database (a budget group): each reconcile plans within the pool's
/// share less what the other pool committed, and commits what its pods may hold before
/// anything is written, as the operator does.
#[derive(Debug)]
struct Group {
    database: i64,
    weights: [i64; 2],
    pools: [Sim; 2],
    committed: [i64; 2],
}

impl Group {
    fn new(database: i64, weights: [i64; 2]) -> Self {
        let sim = || Sim {
            budget: 0,
            cm_limit: None,
            replicas: None,
            pods: vec![],
            next_id: 0,
        };
        Self {
            database,
            weights,
            pools: [sim(), sim()],
            committed: [0, 0],
        }
    }

    fn share(&self, which: usize) -> crate::budget::Share {
        let other = 1 - which;
        share(
            self.database,
            self.weights[which],
            &[Member {
                weight: self.weights[other],
                committed: self.committed[other],
            }],
        )
    }

    fn step(&mut self, which: usize, choice: u8, target: i32) {
        let usable = self.share(which).usable;
        let sim = &mut self.pools[which];
        sim.budget = usable;
        let reconcile = matches!(choice % 14, 0 | 5 | 9);
        if reconcile {
            // Committed before anything is written.
            let obs = sim.observed();
            self.committed[which] = match plan(&obs, usable, target, hash) {
                Ok(p) => committed(&obs, &p),
                Err(_) => committed_as_is(&obs),
            };
        }
        sim.step(choice, target);
    }

    fn holding(&self) -> i64 {
        self.pools.iter().map(Sim::holding).sum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    /// For any budget, any sequence of replica targets and any interleaving of pod
    /// reloads, pod exits, rollouts and reconciles, the pods together never hold more
    /// than the budget.
    #[test]
    fn resize_sequences_stay_within_budget(
        budget in 3i64..200,
        start in 1i32..8,
        targets in proptest::collection::vec(1i32..12, 1..5),
        events in proptest::collection::vec(any::<u8>(), 50..400),
    ) {
        let mut sim = Sim { budget, cm_limit: None, replicas: None, pods: vec![], next_id: 0 };
        if per_replica_limit(budget, i64::from(start)).is_err() {
            return Ok(());
        }
        // Converge on the start size.
        for _ in 0..200 {
            for c in [0u8, 1, 2, 3, 9] { sim.step(c, start); }
        }
        prop_assert!(sim.holding() <= budget);
        let chunk = events.len() / targets.len() + 1;
        for (i, c) in events.iter().enumerate() {
            let target = targets[(i / chunk).min(targets.len() - 1)];
            sim.step(*c, target);
            prop_assert!(
                sim.holding() <= budget,
                "over budget: {} > {} with {:?}", sim.holding(), budget, sim
            );
        }
        // Converges once events stop being adversarial.
        let last = *targets.last().unwrap();
        if per_replica_limit(budget, i64::from(last)).is_ok() {
            for _ in 0..400 {
                // Busy connections are released in the end.
                for p in &mut sim.pods { p.held = p.held.min(p.applied); p.silent = false; }
                for c in [0u8, 1, 2, 3, 9] { sim.step(c, last); }
            }
            let p = plan(&sim.observed(), budget, last, hash).unwrap();
            prop_assert!(p.settled(), "not settled: {:?} {:?}", p, sim);
            prop_assert_eq!(sim.pods.len(), last as usize);
            prop_assert_eq!(sim.cm_limit, Some(per_replica_limit(budget, i64::from(last)).unwrap()));
        }
    }

    /// A growing budget raises the limit without scaling; a pod never exceeds it.
    #[test]
    fn budget_growth_stays_within_new_budget(
        budget in 3i64..200, extra in 0i64..100, replicas in 1i32..8,
        events in proptest::collection::vec(any::<u8>(), 50..200),
    ) {
        if per_replica_limit(budget, i64::from(replicas)).is_err() {
            return Ok(());
        }
        let mut sim = Sim { budget, cm_limit: None, replicas: None, pods: vec![], next_id: 0 };
        for _ in 0..100 {
            for c in [0u8, 1, 2, 3, 9] { sim.step(c, replicas); }
        }
        sim.budget = budget + extra;
        for c in events {
            sim.step(c, replicas);
            prop_assert!(sim.holding() <= sim.budget, "over budget: {} > {} with {:?}", sim.holding(), sim.budget, sim);
        }
    }

    /// Two pools on one database, each with any sequence of replica targets and any
    /// interleaving of both pools' events (saturation, releases, restarts, deletions,
    /// evictions, missing reports): their pods together never hold more than the
    /// database's budget.
    #[test]
    fn two_pools_on_one_database_stay_within_its_budget(
        database in 6i64..200,
        weights in (1i64..4, 1i64..4),
        targets in proptest::collection::vec((1i32..8, 1i32..8), 1..4),
        events in proptest::collection::vec((any::<bool>(), any::<u8>()), 50..400),
    ) {
        let mut g = Group::new(database, [weights.0, weights.1]);
        let (a, b) = targets[0];
        for _ in 0..200 {
            for c in [0u8, 1, 2, 3, 9] {
                g.step(0, c, a);
                g.step(1, c, b);
            }
        }
        prop_assert!(g.holding() <= database, "over budget at start: {:?}", g);
        let chunk = events.len() / targets.len() + 1;
        for (i, (second, c)) in events.iter().enumerate() {
            let (a, b) = targets[(i / chunk).min(targets.len() - 1)];
            let which = usize::from(*second);
            g.step(which, *c, if which == 0 { a } else { b });
            prop_assert!(
                g.holding() <= database,
                "over budget: {} > {} with {:?}", g.holding(), database, g
            );
        }
    }
}
