//! The invariant, measured from the pods' side: the sum of the connection limits
//! that all pooler pods of a pool can hold at one moment (terminating pods
//! included) never exceeds the budget.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use sluice_e2e::fixture::pooler_status;

/// One look at the pool.
#[derive(Debug, Clone, Copy)]
pub struct LimitSample {
    /// Σ over pod objects of the limit each can hold: its `/status` limit when it
    /// answers, else the ConfigMap's (what it starts with); see [`sample`].
    pub sum: i64,
    pub pods: usize,
    pub configmap_limit: i64,
    pub deployment_replicas: i32,
}

pub struct LimitProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<LimitSample>>,
}

/// `connection_limit = N` from a rendered pooler.toml.
pub fn limit_in_config(toml: &str) -> Option<i64> {
    toml.lines().map(str::trim).find_map(|l| {
        l.strip_prefix("connection_limit")?.trim_start().strip_prefix('=')?.trim().parse().ok()
    })
}

async fn configmap_limit(client: &Client, ns: &str, pool: &str) -> Result<i64> {
    let cm =
        Api::<ConfigMap>::namespaced(client.clone(), ns).get(&format!("{pool}-config")).await?;
    let toml = cm.data.as_ref().and_then(|d| d.get("pooler.toml")).context("no pooler.toml")?;
    limit_in_config(toml).context("no connection_limit in pooler.toml")
}

/// One consistent look: every pod's `/status` is asked at once, so the answers come from
/// one moment even when some pods are gone (a dead pod's address takes the whole HTTP
/// timeout to fail). A pod that does not answer counts with the highest ConfigMap limit
/// seen around the probes (it starts with what the ConfigMap holds then), unless its
/// object is gone by the end: the node removes a pod object only after its process
/// exited, so it holds nothing.
async fn sample(client: &Client, ns: &str, pool: &str, selector: &str) -> Result<LimitSample> {
    let before = configmap_limit(client, ns, pool).await?;
    let deploy = Api::<Deployment>::namespaced(client.clone(), ns).get(pool).await?;
    let deployment_replicas = deploy.spec.and_then(|s| s.replicas).unwrap_or(1);
    let pod_api = Api::<Pod>::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(selector);
    let pods = pod_api.list(&lp).await?;
    // A deleted pod's address may already be a new pod's (the node reuses addresses):
    // its answer is the new pod's, and the deleted pod's process is gone.
    let live_ips: HashSet<String> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect();
    let reused = |p: &Pod| {
        p.metadata.deletion_timestamp.is_some()
            && p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .is_some_and(|ip| live_ips.contains(ip))
    };
    let reports = futures::future::join_all(pods.items.iter().map(|p| async move {
        if reused(p) {
            return Some(0);
        }
        // No address yet, or a pod that was never Ready and does not answer: no process
        // yet, and once started it waits for admission (which makes it Ready).
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            return Some(0);
        };
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let may_hold = ready || p.metadata.deletion_timestamp.is_some();
        // A process waiting for admission may hold nothing: it counts what it holds.
        match pooler_status(&ip).await {
            Ok(s) if s["admitted"] == false => s["server_connections"]["open"].as_i64(),
            Ok(s) => s["connection_limit"].as_i64(),
            Err(_) if !may_hold => Some(0),
            Err(_) => None,
        }
    }))
    .await;
    let after = configmap_limit(client, ns, pool).await?;
    // Only a pod that did not answer needs the second look.
    let still_there: HashSet<String> = if reports.iter().any(Option::is_none) {
        pod_api.list(&lp).await?.items.iter().map(|p| p.name_any()).collect()
    } else {
        HashSet::new()
    };
    let sum = pods
        .items
        .iter()
        .zip(&reports)
        .map(|(p, r)| match r {
            Some(limit) => *limit,
            None if still_there.contains(&p.name_any()) => before.max(after),
            None => 0,
        })
        .sum();
    Ok(LimitSample { sum, pods: pods.items.len(), configmap_limit: before, deployment_replicas })
}

impl LimitProbe {
    pub fn start(client: Client, ns: String, pool: String, selector: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(s) = sample(&client, &ns, &pool, &selector).await {
                    out.push(s);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> Result<Vec<LimitSample>> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// The sample with the largest sum.
pub fn worst(samples: &[LimitSample]) -> Option<LimitSample> {
    samples.iter().copied().max_by_key(|s| s.sum)
}

#[test]
fn parses_the_limit_from_a_rendered_config() {
    assert_eq!(limit_in_config("pool_mode = \"transaction\"\nconnection_limit = 17\n"), Some(17));
    assert_eq!(limit_in_config("connection_limit=3"), Some(3));
    assert_eq!(limit_in_config("max_client_connections = 5"), None);
}
