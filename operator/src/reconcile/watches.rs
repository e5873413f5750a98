//! The controller: one watch per kind feeds the caches and triggers reconciles of the
//! pools each change concerns.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Context, error_policy, reconcile};
use crate::api::ConnectionPool;
use crate::cache::CacheWriters;
use crate::desired;

/// Trailing-edge debounce of reconcile triggers (see [`run_controller`]).
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Pools that reference `secret` by name (credentials, users or TLS).
pub(super) fn pools_referencing(
    pools: &[Arc<ConnectionPool>],
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<ConnectionPool>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    pools
        .iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| p.spec.secrets().any(|s| s == name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The pool a pooler pod belongs to, from its `sluice.dev/pool` label.
fn pool_of_pod(pod: &Pod) -> Option<ObjectRef<ConnectionPool>> {
    let pool = pod.labels().get(desired::POOL_LABEL)?;
    Some(ObjectRef::new(pool).within(&pod.namespace()?))
}

/// Runs the controller until `shutdown` resolves, feeding `writers` (the caches in `ctx`)
/// from one watch per kind; each watch also triggers reconciles of the pools it concerns.
///
/// `namespace`: watch one namespace, or all when `None`.
pub async fn run_controller(
    ctx: Arc<Context>,
    writers: CacheWriters,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    /// A watch of `K` that keeps `writer`'s cache and yields each changed object.
    fn cached<K>(
        api: Api<K>,
        config: watcher::Config,
        writer: reflector::store::Writer<K>,
    ) -> impl futures::Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        watcher(api, config)
            .default_backoff()
            // Managed fields are most of an object's size and never read here.
            .modify(|o| o.managed_fields_mut().clear())
            .reflect(writer)
            .touched_objects()
    }
    let pools: Api<ConnectionPool> = scoped(&client, &namespace);
    let all = watcher::Config::default();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    let pods = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/name=sluice-pooler,{}",
        desired::POOL_LABEL
    ));
    let controller = Controller::new(pools, all.clone());
    let store = controller.store();
    ctx.set_pool_store(store.clone());
    let w = writers;
    controller
        .owns_stream(cached(
            scoped::<Deployment>(&client, &namespace),
            owned.clone(),
            w.deployments,
        ))
        .owns_stream(cached(
            scoped::<ConfigMap>(&client, &namespace),
            owned.clone(),
            w.config_maps,
        ))
        .owns_stream(cached(
            scoped::<Service>(&client, &namespace),
            owned.clone(),
            w.services,
        ))
        .owns_stream(cached(
            scoped::<PodDisruptionBudget>(&client, &namespace),
            owned.clone(),
            w.pdbs,
        ))
        .owns_stream(cached(
            scoped::<ServiceAccount>(&client, &namespace),
            owned,
            w.service_accounts,
        ))
        .watches_stream(
            cached(scoped::<Pod>(&client, &namespace), pods, w.pods),
            |p| pool_of_pod(&p),
        )
        .watches_stream(
            // Metadata only: the pools' own Secrets are read whole when they change
            // (see `Reconciler::secret`), so memory does not grow with every Secret.
            watcher(
                scoped::<PartialObjectMeta<Secret>>(&client, &namespace),
                all,
            )
            .default_backoff()
            .modify(|s| {
                // Only the name and resourceVersion are read; annotations may even hold
                // a copy of the data (`last-applied-configuration`).
                let m = &mut s.metadata;
                *m = kube::core::ObjectMeta {
                    name: m.name.take(),
                    namespace: m.namespace.take(),
                    resource_version: m.resource_version.take(),
                    ..Default::default()
                };
            })
            .reflect(w.secrets)
            .touched_objects(),
            move |secret| pools_referencing(&store.state(), &secret),
        )
        // Child and pod events come in bursts while a pool starts or rolls; one reconcile
        // per burst writes one status instead of several.
        .with_config(controller::Config::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| {
            let ctx = ctx.clone();
            async move {
                match res {
                    Ok((obj, _)) => tracing::debug!(pool = %obj, "reconciled"),
                    // A pool deleted without a finalizer is never reconciled as deleted:
                    // its children's deletions ask for it, and it is gone.
                    Err(controller::Error::ObjectNotFound(obj)) => {
                        ctx.metrics
                            .forget_pool(obj.namespace.as_deref().unwrap_or_default(), &obj.name);
                    }
                    // Already logged (and reported) by `error_policy`.
                    Err(e @ controller::Error::ReconcilerFailed(..)) => {
                        tracing::debug!(error = %e, "reconcile error");
                    }
                    // A watch failing (RBAC, an unserved kind): retried with backoff.
                    Err(e) => tracing::warn!(error = %e, "watch error"),
                }
            }
        })
        .await;
}
