//! `make bench-operator`: the operator at scale on the real control plane with
//! the node agent. Creates N ConnectionPools at once (1 replica each, one shared
//! PostgreSQL with a large budget), measures the time until all are Ready, the
//! operator's CPU seconds and peak RSS, the API requests it made per pool, and
//! then the mutating requests it makes in 60 s of steady state.
//!
//! Usage: sluice-bench-operator [REPORT.md]   (env POOLS, default 200; STEADY_SECS, default 60)

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use sluice_e2e::fixture::{Fixture, Options, http_get, pool_api};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Peak resident set (VmHWM) in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("VmHWM")?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// `sluice_operator_api_requests_total` by `verb resource`.
async fn api_requests(metrics_addr: &str) -> Result<BTreeMap<String, f64>> {
    let text = http_get(metrics_addr, "/metrics").await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("sluice_operator_api_requests_total{")) {
        let label = |name: &str| {
            line.split_once(&format!("{name}=\""))
                .and_then(|(_, rest)| rest.split_once('"'))
                .map_or("", |(v, _)| v)
                .to_string()
        };
        let v: f64 = line.rsplit(' ').next().unwrap_or("0").parse().unwrap_or(0.0);
        *out.entry(format!("{} {}", label("verb"), label("resource"))).or_default() += v;
    }
    Ok(out)
}

/// Requests made between two snapshots: (all, mutating, breakdown).
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, f64, String) {
    let (mut all, mut mutating, mut parts) = (0.0, 0.0, Vec::new());
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d <= 0.0 {
            continue;
        }
        all += d;
        if ["create", "patch", "update", "delete", "replace"].iter().any(|verb| k.starts_with(verb))
        {
            mutating += d;
        }
        parts.push(format!("{k}: {d}"));
    }
    (all, mutating, if parts.is_empty() { "none".into() } else { parts.join(", ") })
}

/// Names and whether each counts, as a watch reports them.
type Counted = futures::stream::BoxStream<'static, watcher::Result<watcher::Event<(String, bool)>>>;

/// Follows `stream` until `n` names count at once; returns that moment (since `start`).
/// `seen` holds how many counted last.
async fn until_all(
    mut stream: Counted,
    n: usize,
    start: Instant,
    seen: Option<&std::sync::atomic::AtomicUsize>,
) -> Option<Duration> {
    let mut counted = HashSet::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply((name, yes)) | watcher::Event::InitApply((name, yes))) => {
                if yes {
                    counted.insert(name);
                } else {
                    counted.remove(&name);
                }
            }
            Ok(watcher::Event::Delete((name, _))) => {
                counted.remove(&name);
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => eprintln!("[bench-operator] watch error (retrying): {e}"),
        }
        if let Some(seen) = seen {
            seen.store(counted.len(), std::sync::atomic::Ordering::Relaxed);
        }
        if counted.len() >= n {
            return Some(start.elapsed());
        }
    }
    None
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,kube_client::client::builder=off".into()),
        )
        .init();
    let pools = env_num("POOLS", 200) as usize;
    let steady = env_num("STEADY_SECS", 60);
    let report_path = std::env::args().nth(1);
    eprintln!("[bench-operator] starting PostgreSQL, control plane, node agent and operator");
    let fx = Fixture::start_with(Options { max_connections: 400, ..Options::default() }).await?;
    fx.create_secrets().await?;
    let pid = fx.operator_pid().context("operator runs")?;
    let metrics = fx.operator_metrics_addr();
    let cpu0 = cpu_secs(pid)?;
    let req0 = api_requests(&metrics).await.unwrap_or_default();

    eprintln!("[bench-operator] creating {pools} ConnectionPools at once");
    let start = Instant::now();
    futures::stream::iter(0..pools)
        .map(|i| {
            let fx = &fx;
            async move {
                fx.create_pool(
                    &format!("bench-{i:03}"),
                    1,
                    serde_json::json!({"maxConnections": 100000}),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let created = start.elapsed();
    // Watches, not polling lists, so the observer adds little load to the API server it
    // measures. Records when the operator had written every Deployment, when every pod
    // existed (the rest of the time is the controller-manager and the node agent starting
    // pods), and when every pool was Ready.
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(fx.client.clone(), &fx.ns);
    let pods: kube::Api<Pod> = kube::Api::namespaced(fx.client.clone(), &fx.ns);
    let name_of = |m: &kube::api::ObjectMeta| m.name.clone().unwrap_or_default();
    let exists = |m: &kube::api::ObjectMeta| (name_of(m), true);
    let deployment_names = watcher::metadata_watcher(deployments, watcher::Config::default())
        .default_backoff()
        .map_ok(move |ev| ev.map(|o| exists(&o.metadata)))
        .boxed();
    let pod_names = watcher::metadata_watcher(pods, watcher::Config::default())
        .default_backoff()
        .map_ok(move |ev| ev.map(|o| exists(&o.metadata)))
        .boxed();
    let ready_pools = watcher::watcher(pool_api(&fx.client, &fx.ns), watcher::Config::default())
        .default_backoff()
        .map_ok(move |ev| {
            ev.map(|p| {
                let v = serde_json::to_value(&p).unwrap_or_default();
                let ready = v["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                (name_of(&p.metadata), ready)
            })
        })
        .boxed();
    let ready_count = std::sync::atomic::AtomicUsize::new(0);
    let watched = futures::future::join3(
        until_all(deployment_names, pools, start, None),
        until_all(pod_names, pools, start, None),
        until_all(ready_pools, pools, start, Some(&ready_count)),
    );
    let (all_deployments, all_pods, all_ready_at) =
        tokio::time::timeout(Duration::from_secs(600), watched).await.unwrap_or((None, None, None));
    let ready = ready_count.load(std::sync::atomic::Ordering::Relaxed);
    let all_ready = all_ready_at.unwrap_or_else(|| start.elapsed());
    let cpu1 = cpu_secs(pid)?;
    let req1 = api_requests(&metrics).await?;
    eprintln!(
        "[bench-operator] {ready}/{pools} Ready after {:.1}s; steady state for {steady}s",
        all_ready.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(steady)).await;
    let req2 = api_requests(&metrics).await?;
    let rss = peak_rss_mib(pid)?;
    let (converge_all, _, converge_parts) = delta(&req0, &req1);
    let per_pool = converge_all / pools as f64;
    let (_, steady_writes, steady_parts) = delta(&req1, &req2);
    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    let report = format!(
        "### Operator: {pools} ConnectionPools at once\n\n\
         Real kube-apiserver v1.34 + controller-manager, process-backed node agent running {pools} pooler pods, operator as a local process.\n\n\
         | measure | value | target |\n|---|---:|---|\n\
         | pools Ready | {ready}/{pools} | all |\n\
         | time until all Ready (create took {:.1}s) | {:.1} s | ≤ 60 s {} |\n\
         | time until the operator had written all {pools} Deployments | {} | - |\n\
         | time until all {pools} pods existed (controller-manager) | {} | - |\n\
         | operator CPU while converging | {:.1} s | - |\n\
         | operator peak RSS | {:.1} MiB | ≤ 150 MiB {} |\n\
         | API requests per pool to converge | {:.1} | ≤ 10 {} |\n\
         | mutating API requests in {steady} s of steady state | {} | 0 {} |\n\n\
         Requests while converging: {converge_parts}.  \n\
         Requests in steady state: {steady_parts}.\n",
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        mark(ready == pools && all_ready.as_secs_f64() <= 60.0),
        secs(all_deployments),
        secs(all_pods),
        cpu1 - cpu0,
        rss,
        mark(rss <= 150.0),
        per_pool,
        mark(per_pool <= 10.0),
        steady_writes,
        mark(steady_writes == 0.0),
    );
    println!("{report}");
    if let Some(path) = report_path {
        std::fs::write(path, &report)?;
    }
    fx.shutdown().await
}
