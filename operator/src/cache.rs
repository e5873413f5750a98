//! Watch-fed caches of everything a reconcile reads, so that a reconcile makes no read
//! request to the API server: one watch per kind, shared by all pools.
//!
//! The controller ([`crate::run_controller`]) feeds each [`Writer`] from its watch stream and
//! uses the same stream as a reconcile trigger; tests fill the writers by hand.
//!
//! Secrets are the exception: all of them are watched as metadata only (so memory does
//! not grow with every Secret in the cluster), and a pool's own Secrets are read by GET
//! into [`SecretData`] when their resourceVersion changes.
//!
//! # Guarantees
//! - [`Caches::ready`] resolves only after every cache has seen its first full list, so a
//!   reconcile never mistakes "not listed yet" for "absent" (which could roll a config that
//!   ignores a resize in flight).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};

use crate::error::{Error, Result};

/// Read handles of the caches.
#[derive(Clone)]
pub struct Caches {
    /// Every Secret's metadata (annotations and managed fields dropped).
    pub(crate) secrets: Store<PartialObjectMeta<Secret>>,
    /// The Secrets pools reference, whole.
    pub(crate) secret_data: SecretData,
    pub(crate) config_maps: Store<ConfigMap>,
    pub(crate) deployments: Store<Deployment>,
    pub(crate) services: Store<Service>,
    pub(crate) pdbs: Store<PodDisruptionBudget>,
    pub(crate) service_accounts: Store<ServiceAccount>,
    pub(crate) pods: Store<Pod>,
}

/// Write handles of the caches, consumed by the watches that keep them current.
pub struct CacheWriters {
    pub(crate) secrets: Writer<PartialObjectMeta<Secret>>,
    pub(crate) config_maps: Writer<ConfigMap>,
    pub(crate) deployments: Writer<Deployment>,
    pub(crate) services: Writer<Service>,
    pub(crate) pdbs: Writer<PodDisruptionBudget>,
    pub(crate) service_accounts: Writer<ServiceAccount>,
    pub(crate) pods: Writer<Pod>,
}

/// Empty caches and their writers.
pub fn caches() -> (Caches, CacheWriters) {
    let (secrets, w_secrets) = reflector::store();
    let (config_maps, w_config_maps) = reflector::store();
    let (deployments, w_deployments) = reflector::store();
    let (services, w_services) = reflector::store();
    let (pdbs, w_pdbs) = reflector::store();
    let (service_accounts, w_service_accounts) = reflector::store();
    let (pods, w_pods) = reflector::store();
    (
        Caches {
            secrets,
            secret_data: SecretData::default(),
            config_maps,
            deployments,
            services,
            pdbs,
            service_accounts,
            pods,
        },
        CacheWriters {
            secrets: w_secrets,
            config_maps: w_config_maps,
            deployments: w_deployments,
            services: w_services,
            pdbs: w_pdbs,
            service_accounts: w_service_accounts,
            pods: w_pods,
        },
    )
}

impl Caches {
    /// Waits until every cache holds its first full list.
    ///
    /// # Errors
    /// [`Error::CacheClosed`] when a watch ended for good (the controller is shutting down).
    pub async fn ready(&self) -> Result<()> {
        self.ready_within(Duration::MAX).await
    }

    /// [`Self::ready`], waiting at most `wait` for each watch.
    ///
    /// # Errors
    /// [`Error::CacheNotSynced`] naming the first kind not synced in time.
    pub async fn ready_within(&self, wait: Duration) -> Result<()> {
        async fn one<K>(s: &Store<K>, kind: &'static str, wait: Duration) -> Result<()>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            match tokio::time::timeout(wait, s.wait_until_ready()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Error::CacheClosed),
                Err(_) => Err(Error::CacheNotSynced { kind }),
            }
        }
        one(&self.secrets, "secrets", wait).await?;
        one(&self.config_maps, "configmaps", wait).await?;
        one(&self.deployments, "deployments", wait).await?;
        one(&self.services, "services", wait).await?;
        one(&self.pdbs, "poddisruptionbudgets", wait).await?;
        one(&self.service_accounts, "serviceaccounts", wait).await?;
        one(&self.pods, "pods", wait).await
    }
}

/// Whole Secrets read by GET, each kept while its resourceVersion is the one the
/// metadata watch reports; memory grows with the Secrets pools reference only.
#[derive(Clone, Default)]
pub struct SecretData(Arc<Mutex<HashMap<NamespacedName, Arc<Secret>>>>);

/// (namespace, name)
type NamespacedName = (String, String);

impl SecretData {
    /// The kept copy of `namespace/name` when it is at `resource_version` (never for an
    /// object without one).
    pub(crate) fn get(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> Option<Arc<Secret>> {
        let rv = resource_version?;
        let map = self.0.lock().expect("secret data lock");
        let s = map.get(&(namespace.to_string(), name.to_string()))?;
        (s.metadata.resource_version.as_deref() == Some(rv)).then(|| s.clone())
    }

    /// Keeps `secret` (read whole), replacing an older copy.
    pub(crate) fn put(&self, secret: Secret) -> Arc<Secret> {
        let key = (
            secret.metadata.namespace.clone().unwrap_or_default(),
            secret.metadata.name.clone().unwrap_or_default(),
        );
        let s = Arc::new(secret);
        self.0
            .lock()
            .expect("secret data lock")
            .insert(key, s.clone());
        s
    }

    /// Drops the copies of Secrets the metadata watch no longer lists.
    pub(crate) fn retain_listed(&self, listed: &Store<PartialObjectMeta<Secret>>) {
        self.0
            .lock()
            .expect("secret data lock")
            .retain(|(ns, name), _| listed.get(&ObjectRef::new(name).within(ns)).is_some());
    }

    /// How many Secrets are kept whole.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.lock().expect("secret data lock").len()
    }
}

/// The cached object `name` in `namespace`, cloned out of the cache.
pub(crate) fn get<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|o| K::clone(&o))
}

/// Cached pods in `namespace` whose labels include all of `selector`, sorted by name.
pub(crate) fn pods_matching(
    store: &Store<Pod>,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Vec<Pod> {
    let mut pods: Vec<Pod> = store
        .state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && p.metadata.labels.as_ref().is_some_and(|l| {
                    selector
                        .iter()
                        .all(|(k, v)| l.get(k).is_some_and(|x| x == v))
                })
        })
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    pods
}
