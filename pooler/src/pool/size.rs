//! The database's size as this process last verified it. `max_connections` changes only
//! with a restart, which ends every server connection; so after a server connection is
//! lost or fails its check, while none is open (a restart then shows nowhere), and at
//! startup, the next connection opened is a scout: it asks the server for
//! `max_connections` before any other opens, and a smaller database lowers the limit in
//! proportion at once ([`sluice_contract::BudgetBasis::limit_for`]), before the operator's
//! next refresh has seen the change.
//!
//! # Guarantees
//! While the size is unverified at most one server connection is being opened; the
//! others wait for the scout's answer and then check their slot against the limit it set.

use std::sync::Mutex;

use tokio::sync::Notify;

/// See the module docs.
#[derive(Debug, Default)]
pub struct DatabaseSize {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    verified: bool,
    scouting: bool,
    /// `max_connections` the last scout saw.
    observed: Option<u32>,
}

/// What an opener does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// Open: the size is known.
    Open,
    /// Open, then verify the size ([`DatabaseSize::scouted`] or [`DatabaseSize::scout_failed`]).
    Scout,
}

impl DatabaseSize {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `max_connections` the last scout saw, if any.
    pub fn observed(&self) -> Option<u32> {
        self.lock().observed
    }

    /// Waits for this opener's turn; `waited` tells whether it waited for a scout (its
    /// slot must then be checked against the limit again).
    pub async fn turn(&self) -> (Turn, bool) {
        let mut waited = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.verified {
                    return (Turn::Open, waited);
                }
                if !s.scouting {
                    s.scouting = true;
                    return (Turn::Scout, waited);
                }
            }
            waited = true;
            changed.await;
        }
    }

    /// The scout saw `max_connections` (`None`: it could not tell; the limit stays).
    pub fn scouted(&self, max_connections: Option<u32>) {
        let mut s = self.lock();
        s.scouting = false;
        s.verified = true;
        if max_connections.is_some() {
            s.observed = max_connections;
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// The scout's connection failed: the next opener scouts.
    pub fn scout_failed(&self) {
        self.lock().scouting = false;
        self.changed.notify_waiters();
    }

    /// A server connection was lost: the server may have restarted with another size.
    pub fn unverify(&self) {
        self.lock().verified = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn one_scout_at_a_time_and_the_others_wait_for_it() {
        let size = Arc::new(DatabaseSize::default());
        assert_eq!(size.turn().await, (Turn::Scout, false));
        let waiter = {
            let size = size.clone();
            tokio::spawn(async move { size.turn().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the scout is out");
        size.scouted(Some(60));
        assert_eq!(waiter.await.unwrap(), (Turn::Open, true));
        assert_eq!(size.observed(), Some(60));
        assert_eq!(size.turn().await, (Turn::Open, false));

        size.unverify();
        assert_eq!(size.turn().await, (Turn::Scout, false));
        let waiter = {
            let size = size.clone();
            tokio::spawn(async move { size.turn().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        size.scout_failed();
        assert_eq!(
            waiter.await.unwrap(),
            (Turn::Scout, true),
            "the next opener scouts"
        );
        size.scouted(None);
        assert_eq!(
            size.observed(),
            Some(60),
            "an unknown answer keeps the last size"
        );
    }
}
