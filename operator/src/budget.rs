//! The connection budget: pure arithmetic from database limits and replicas to a per-replica limit.
//!
//! budget = `max_connections − superuser_reserved_connections − reserved_connections − reserved`
//! and `limit = ⌊budget ÷ (replicas + ROLLOUT_EXTRA_PODS)⌋`.
//!
//! # Why one extra pod
//! The Deployment uses `maxSurge: 0`, `maxUnavailable: 1` and `minReadySeconds` ≥ the pods'
//! `terminationGracePeriodSeconds` (which is ≥ the pooler's drain timeout). A rollout first
//! deletes one old pod (it drains, still holding connections) and then creates its
//! replacement; the next old pod is only deleted once the replacement has been available for
//! `minReadySeconds`, by which time the drained pod is gone. So at most `replicas + 1` pods
//! hold server connections at any moment, and `(replicas + 1) × limit ≤ budget`.

use crate::api::BudgetSource;

/// Pods beyond `replicas` that can hold server connections at once during a rollout.
pub const ROLLOUT_EXTRA_PODS: i64 = 1;

/// What the database allows, discovered with `SHOW` or given in the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatabaseLimits {
    /// `max_connections`.
    pub max_connections: i64,
    /// `superuser_reserved_connections`.
    pub superuser_reserved: i64,
    /// `reserved_connections` (PostgreSQL 16+; 0 before).
    pub reserved_connections: i64,
    /// Whether `max_connections` came from the spec or the server.
    pub source: BudgetSource,
}

impl DatabaseLimits {
    /// The limits of a database whose `max_connections` the spec gives (no discovery):
    /// PostgreSQL's defaults for the server's own reservations are assumed.
    pub fn from_spec(max_connections: i64) -> Self {
        Self {
            max_connections,
            superuser_reserved: 3,
            reserved_connections: 0,
            source: BudgetSource::Spec,
        }
    }
}

/// A computed budget for one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The limits it was computed from.
    pub limits: DatabaseLimits,
    /// Connections kept free by the spec (or its default).
    pub reserved: i64,
    /// Server connections all replicas together may hold.
    pub available: i64,
}

/// Why a pool does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Infeasible {
    /// The database leaves nothing for the pool.
    #[error(
        "the database leaves {available} connections for the pool (max_connections {max}, superuser reserved {su}, reserved_connections {res}, spec reserved {spec})"
    )]
    NoBudget {
        /// Budget left.
        available: i64,
        /// `max_connections`.
        max: i64,
        /// `superuser_reserved_connections`.
        su: i64,
        /// `reserved_connections`.
        res: i64,
        /// Reserved by the spec.
        spec: i64,
    },
    /// Too many replicas for the budget.
    #[error(
        "{replicas} replicas (+{extra} during rollouts) need at least {needed} connections, the budget is {available}"
    )]
    TooManyReplicas {
        /// Requested replicas.
        replicas: i64,
        /// Rollout extra pods.
        extra: i64,
        /// Smallest budget that fits.
        needed: i64,
        /// Budget.
        available: i64,
    },
}

/// Default of `spec.database.reservedConnections`: 10% of `max_connections` rounded up, at
/// least 3.
pub fn default_reserved(max_connections: i64) -> i64 {
    let tenth = (max_connections.max(0) + 9) / 10;
    tenth.max(3)
}

/// Computes the budget.
///
/// # Errors
/// [`Infeasible::NoBudget`] when nothing is left for the pool.
pub fn budget(limits: DatabaseLimits, spec_reserved: Option<i64>) -> Result<Budget, Infeasible> {
    let reserved = spec_reserved.unwrap_or_else(|| default_reserved(limits.max_connections));
    let available =
        limits.max_connections - limits.superuser_reserved - limits.reserved_connections - reserved;
    if available < 1 {
        return Err(Infeasible::NoBudget {
            available,
            max: limits.max_connections,
            su: limits.superuser_reserved,
            res: limits.reserved_connections,
            spec: reserved,
        });
    }
    Ok(Budget {
        limits,
        reserved,
        available,
    })
}

/// `connection_limit` per replica when `replicas` pods run (plus the rollout extra).
///
/// # Errors
/// [`Infeasible::TooManyReplicas`] when the limit would be below 1.
pub fn per_replica_limit(available: i64, replicas: i64) -> Result<i64, Infeasible> {
    let pods = replicas.max(0) + ROLLOUT_EXTRA_PODS;
    let limit = available / pods;
    if limit < 1 {
        return Err(Infeasible::TooManyReplicas {
            replicas,
            extra: ROLLOUT_EXTRA_PODS,
            needed: pods,
            available,
        });
    }
    Ok(limit)
}

/// Most server connections `replicas` pods at `limit` can hold at once, rollouts included.
pub fn worst_case_total(limit: i64, replicas: i64) -> i64 {
    limit * (replicas + ROLLOUT_EXTRA_PODS)
}

/// The budget group of a pool: `spec.database.budgetGroup`, else the server's
/// `host:port` (host case-insensitive), so pools naming one server share its budget.
pub fn group_key(db: &crate::api::DatabaseSpec) -> String {
    match &db.budget_group {
        Some(g) => format!("group:{g}"),
        None => format!("{}:{}", db.host.to_ascii_lowercase(), db.port),
    }
}

/// Another pool of the group as the division sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// `spec.database.budgetWeight` (default 1).
    pub weight: i64,
    /// What its pods may hold now (`status.budget.committed`).
    pub committed: i64,
}

/// A pool's part of its group's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Its steady share: `available × weight ÷ Σ weights`.
    pub share: i64,
    /// What it may plan with now: its share, less what the other pools still hold beyond
    /// theirs (a pool that has not yet lowered to its share after another joined).
    pub usable: i64,
}

/// Divides `available` (the database budget) among this pool (`weight`) and `others`.
///
/// # Guarantees
/// The shares of all pools sum to at most `available`; and this pool's `usable` plus the
/// others' `committed` is at most `available`, so planning within `usable` never takes
/// connections another pool may still hold.
pub fn share(available: i64, weight: i64, others: &[Member]) -> Share {
    let total = weight + others.iter().map(|m| m.weight).sum::<i64>();
    let share = available * weight / total.max(1);
    let held_by_others: i64 = others.iter().map(|m| m.committed).sum();
    Share {
        share,
        usable: share.min(available - held_by_others),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(max: i64, su: i64, res: i64) -> DatabaseLimits {
        DatabaseLimits {
            max_connections: max,
            superuser_reserved: su,
            reserved_connections: res,
            source: BudgetSource::Discovered,
        }
    }

    #[test]
    fn defaults_match_the_issue() {
        assert_eq!(default_reserved(100), 10);
        assert_eq!(default_reserved(101), 11);
        assert_eq!(default_reserved(20), 3);
        let b = budget(limits(60, 3, 0), None).unwrap();
        assert_eq!(b.reserved, 6);
        assert_eq!(b.available, 51);
        assert_eq!(per_replica_limit(51, 2).unwrap(), 17);
        assert_eq!(per_replica_limit(51, 4).unwrap(), 10);
    }

    #[test]
    fn infeasible_is_an_error_not_zero() {
        assert!(budget(limits(5, 3, 0), None).is_err());
        assert!(matches!(
            per_replica_limit(3, 3),
            Err(Infeasible::TooManyReplicas { .. })
        ));
        assert_eq!(per_replica_limit(4, 3).unwrap(), 1);
    }

    proptest! {
        /// replicas + 1 pods at the limit never exceed the budget, and the limit is the
        /// largest that does.
        #[test]
        fn rollout_never_exceeds_budget(available in 1i64..100_000, replicas in 1i64..500) {
            match per_replica_limit(available, replicas) {
                Ok(limit) => {
                    prop_assert!(limit >= 1);
                    prop_assert!(worst_case_total(limit, replicas) <= available);
                    prop_assert!(worst_case_total(limit + 1, replicas) > available);
                }
                Err(_) => prop_assert!(available < replicas + ROLLOUT_EXTRA_PODS),
            }
        }

        /// The budget never hands out connections the database reserved.
        #[test]
        fn budget_respects_reservations(max in 1i64..20_000, su in 0i64..50, res in 0i64..50,
                                        spec in proptest::option::of(0i64..500)) {
            if let Ok(b) = budget(limits(max, su, res), spec) {
                prop_assert!(b.available >= 1);
                prop_assert_eq!(b.available + su + res + b.reserved, max);
                prop_assert!(spec.is_some() || b.reserved >= 3);
            }
        }

        /// A replica change never makes the limit grow when replicas grow.
        #[test]
        fn limit_is_monotone_in_replicas(available in 1i64..10_000, a in 1i64..200, b in 1i64..200) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            if let (Ok(l_lo), Ok(l_hi)) = (per_replica_limit(available, lo), per_replica_limit(available, hi)) {
                prop_assert!(l_hi <= l_lo);
            }
        }
    }

    #[test]
    fn a_group_divides_the_budget_by_weight() {
        let m = |weight, committed| Member { weight, committed };
        assert_eq!(
            share(51, 1, &[]),
            Share {
                share: 51,
                usable: 51
            }
        );
        assert_eq!(
            share(51, 1, &[m(1, 24)]),
            Share {
                share: 25,
                usable: 25
            }
        );
        assert_eq!(
            share(51, 2, &[m(1, 17)]),
            Share {
                share: 34,
                usable: 34
            }
        );
        // The other pool still holds the whole budget: nothing until it has lowered.
        assert_eq!(share(51, 1, &[m(1, 51)]).usable, 0);
        assert_eq!(share(51, 1, &[m(1, 30)]).usable, 21);
    }

    proptest! {
        /// Shares never sum above the budget, and what each pool may plan with leaves
        /// what the others hold.
        #[test]
        fn shares_fit_the_budget(
            available in 1i64..500,
            pools in proptest::collection::vec((1i64..10, 0i64..200), 1..6),
        ) {
            let mut sum = 0;
            for i in 0..pools.len() {
                let others: Vec<Member> = pools.iter().enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (w, c))| Member { weight: *w, committed: *c })
                    .collect();
                let s = share(available, pools[i].0, &others);
                sum += s.share;
                let held: i64 = others.iter().map(|m| m.committed).sum();
                prop_assert!(s.usable + held <= available);
                prop_assert!(s.usable <= s.share);
            }
            prop_assert!(sum <= available);
        }
    }
}
