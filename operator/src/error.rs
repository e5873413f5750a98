//! The operator's one error type.

use crate::budget::Infeasible;

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A referenced Secret does not exist.
    #[error("Secret {namespace}/{name} not found")]
    MissingSecret {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
    },
    /// A referenced Secret lacks a key.
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    MissingSecretKey {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// The missing key.
        key: String,
    },
    /// A referenced ConfigMap does not exist, or lacks `key`.
    #[error("ConfigMap {namespace}/{name} {}", key.as_ref().map_or("not found".to_string(), |k| format!("has no key {k:?}")))]
    MissingConfigMap {
        /// Namespace of the ConfigMap.
        namespace: String,
        /// Name of the ConfigMap.
        name: String,
        /// The missing key, when the ConfigMap exists.
        key: Option<String>,
    },
    /// The database could not be reached or queried.
    #[error("database discovery at {target}: {}", chain(source))]
    Discovery {
        /// `host:port/db`.
        target: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database did not answer in time.
    #[error("database discovery at {target}: timed out")]
    DiscoveryTimeout {
        /// `host:port/db`.
        target: String,
    },
    /// A discovered setting could not be parsed.
    #[error("database setting {name} = {value:?} is not a number")]
    BadSetting {
        /// Setting name.
        name: String,
        /// Raw value.
        value: String,
    },
    /// The pool does not fit in the database's connection budget.
    #[error(transparent)]
    Infeasible(#[from] Infeasible),
    /// The spec is invalid in a way CEL could not catch.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// An object could not be serialized.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    /// A watch cache stopped for good (the controller is shutting down).
    #[error("watch cache closed")]
    CacheClosed,

    /// A watch whose list has not succeeded within the wait (RBAC, an unserved kind).
    #[error("the {kind} watch has not synced: listing them fails (see the operator's log)")]
    CacheNotSynced { kind: &'static str },
    /// A child's name is taken by an object this pool does not own (it lacks the pool's
    /// controller owner reference): the operator never adopts, changes or deletes it.
    #[error(
        "{kind} {namespace}/{name} already exists and is not owned by this ConnectionPool; \
         the operator does not take over objects it did not create: rename or delete it, \
         or give the pool another name"
    )]
    NotOwned {
        /// Kind of the object.
        kind: String,
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
    },
}

impl Error {
    /// A short, bounded label for the `errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingSecret { .. } => "missing_secret",
            Error::MissingSecretKey { .. } => "missing_secret_key",
            Error::MissingConfigMap { .. } => "missing_config_map",
            Error::Discovery { .. } | Error::DiscoveryTimeout { .. } => "discovery",
            Error::BadSetting { .. } => "bad_setting",
            Error::Infeasible(_) => "budget_exceeded",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Serialization(_) => "serialization",
            Error::CacheClosed => "cache_closed",
            Error::CacheNotSynced { .. } => "cache_not_synced",
            Error::NotOwned { .. } => "not_owned",
        }
    }

    /// The condition this error sets on the pool, and its reason, when it is the pool's
    /// to fix (reported in status and an event, children left as they are): `Degraded`,
    /// or `BudgetExceeded` for a pool that does not fit. `None` for failures retried with
    /// backoff (the API server, the watch caches).
    pub fn condition(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Error::Infeasible(_) => Some((crate::status::BUDGET_EXCEEDED, "BudgetExceeded")),
            e => e
                .degraded_reason()
                .map(|reason| (crate::status::DEGRADED, reason)),
        }
    }

    /// The `Degraded` condition's reason when this error is the pool's to fix (reported
    /// in status and an event, children left as they are); `None` for a pool that does
    /// not fit (see [`Self::condition`]) and for failures retried with backoff (the API
    /// server, the watch caches).
    pub fn degraded_reason(&self) -> Option<&'static str> {
        match self {
            Error::MissingSecret { .. } => Some("SecretNotFound"),
            Error::MissingSecretKey { .. } => Some("SecretInvalid"),
            Error::MissingConfigMap { key: None, .. } => Some("ConfigMapNotFound"),
            Error::MissingConfigMap { key: Some(_), .. } => Some("ConfigMapInvalid"),
            Error::Discovery { .. } | Error::DiscoveryTimeout { .. } | Error::BadSetting { .. } => {
                Some("DatabaseUnreachable")
            }
            Error::InvalidSpec(_) => Some("InvalidSpec"),
            Error::NotOwned { .. } => Some("NotOwned"),
            // The API server refused a child as invalid: retrying cannot help.
            Error::Kube(kube::Error::Api(e)) if matches!(e.code, 400 | 422) => {
                Some("ApplyRejected")
            }
            Error::Kube(_)
            | Error::Infeasible(_)
            | Error::Serialization(_)
            | Error::CacheClosed
            | Error::CacheNotSynced { .. } => None,
        }
    }

    /// The text for a pool's status and events: for a call the API server refused, its
    /// own message and HTTP code (not the client library's debug form of the answer).
    pub fn message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(e)) => {
                format!("the API server answered {}: {}", e.code, e.message)
            }
            e => e.to_string(),
        }
    }

    /// The reason an error retried with backoff (see [`Self::condition`]) is reported
    /// under, as a Warning event and, once it persists, the `Degraded` condition: every
    /// failed call to the API server reaches the pool's events. `None` for errors that
    /// have a condition of their own.
    pub fn retry_reason(&self) -> Option<&'static str> {
        if self.condition().is_some() {
            return None;
        }
        Some(match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 403 => "Forbidden",
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ApiUnreachable",
            Error::CacheNotSynced { .. } | Error::CacheClosed => "CacheNotSynced",
            _ => "ReconcileError",
        })
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_refusals_read_as_the_api_servers_message() {
        let m = api(422).message();
        assert_eq!(
            m,
            "the API server answered 422: Service \"db.pool\" is invalid"
        );
        assert!(!m.contains("Status {"));
    }

    #[test]
    fn failures_retried_with_backoff_have_a_reason_to_report() {
        assert_eq!(api(403).retry_reason(), Some("Forbidden"));
        assert_eq!(api(500).retry_reason(), Some("ApiError"));
        assert_eq!(api(409).retry_reason(), Some("ApiError"));
        assert_eq!(
            Error::CacheNotSynced { kind: "pods" }.retry_reason(),
            Some("CacheNotSynced")
        );
        // The pool's own errors have a condition instead.
        assert_eq!(api(422).retry_reason(), None);
        assert_eq!(Error::InvalidSpec("x".into()).retry_reason(), None);
    }

    fn api(code: u16) -> Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": "Service \"db.pool\" is invalid", "reason": "Invalid",
            "code": code
        }))
        .unwrap();
        Error::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn what_the_pool_must_fix_is_degraded_the_rest_retried() {
        assert_eq!(api(422).degraded_reason(), Some("ApplyRejected"));
        assert_eq!(api(409).degraded_reason(), None, "a conflict is retried");
        assert_eq!(api(500).degraded_reason(), None);
        let e = Error::NotOwned {
            kind: "Service".into(),
            namespace: "ns".into(),
            name: "web".into(),
        };
        assert_eq!(e.degraded_reason(), Some("NotOwned"));
        assert!(
            e.to_string().starts_with("Service ns/web already exists"),
            "{e}"
        );
        assert_eq!(Error::CacheClosed.degraded_reason(), None);
        assert_eq!(Error::CacheClosed.condition(), None);
        let over = Error::Infeasible(Infeasible::NoBudget {
            available: 0,
            max: 10,
            su: 3,
            res: 0,
            spec: 7,
        });
        assert_eq!(
            over.condition(),
            Some((crate::status::BUDGET_EXCEEDED, "BudgetExceeded"))
        );
        assert_eq!(
            over.to_string(),
            "the database leaves 0 connections for the pool (max_connections 10, superuser \
             reserved 3, reserved_connections 0, spec reserved 7)",
            "the budget's own words reach status"
        );
        assert_eq!(
            api(422).condition(),
            Some((crate::status::DEGRADED, "ApplyRejected"))
        );
    }
}
