//! `make bench-operator`: the operator at scale on the real control plane with
//! the node agent. Creates N ConnectionPools at once (1 replica each, one shared
//! PostgreSQL with a large budget), measures the time until all are Ready, the
//! operator's CPU seconds and peak RSS, the API requests it made per pool, and
//! then the mutating requests it makes in 60 s of steady state. First it creates
//! unrelated Secrets (4 KiB each, applied as `kubectl apply` leaves them) and measures
//! how much the operator's resident memory grows with them.
//!
//! Usage: sluice-bench-operator [REPORT.md]   (env POOLS, default 200; STEADY_SECS,
//! default 60; CONTROLLER_MANAGER_QPS, default 0 = the controller-manager's own 20;
//! UNRELATED_SECRETS, default 5000)

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use sluice_e2e::fixture::{Fixture, Options, http_get, pool_api};
use sluice_testkit::ControlPlaneOptions;

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

/// A memory figure of `/proc/<pid>/status` in MiB: `VmHWM` (peak resident set) or
/// `VmRSS` (resident set now).
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| field.to_string())?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// Creates `n` Secrets no pool references, each with 4 KiB of data and the
/// `last-applied-configuration` annotation `kubectl apply` leaves (a second copy).
async fn create_unrelated_secrets(fx: &Fixture, n: usize) -> Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    let api: kube::Api<Secret> = kube::Api::namespaced(fx.client.clone(), &fx.ns);
    let value = "x".repeat(4096);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let value = value.clone();
            async move {
                let name = format!("unrelated-{i:05}");
                let body = serde_json::json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name},
                    "stringData": {"payload": value},
                });
                let mut secret: Secret = serde_json::from_value(body.clone())?;
                secret.metadata.annotations = Some(BTreeMap::from([(
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    body.to_string(),
                )]));
                api.create(&Default::default(), &secret).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
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

/// Whether a ConnectionPool's `Ready` condition is `True`.
fn is_ready(pool: &DynamicObject) -> bool {
    pool.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Watches `api` until `want` objects satisfy `pred` or `timeout` passes; returns the
/// highest count seen and the time since `start` when the watch stopped.
///
/// # Errors
/// When the watch fails.
async fn count_until<K>(
    api: kube::Api<K>,
    pred: fn(&K) -> bool,
    want: usize,
    start: Instant,
    timeout: Duration,
) -> Result<(usize, Duration)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut matching = HashSet::new();
    let mut best = 0;
    // The watcher relists after a recoverable error (410 Gone, a dropped stream); the
    // backoff paces that, and `Init` below resets the count for the relist.
    let events = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(events);
    let deadline = tokio::time::Instant::from_std(start + timeout);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                eprintln!("[bench-operator] watch error (retrying): {e}");
                continue;
            }
        };
        match event {
            watcher::Event::Init => matching.clear(),
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let name = o.meta().name.clone().unwrap_or_default();
                if pred(&o) {
                    matching.insert(name);
                } else {
                    matching.remove(&name);
                }
            }
            watcher::Event::Delete(o) => {
                matching.remove(&o.meta().name.clone().unwrap_or_default());
            }
            watcher::Event::InitDone => {}
        }
        best = best.max(matching.len());
        if best >= want {
            return Ok((best, start.elapsed()));
        }
    }
    Ok((best, start.elapsed()))
}

/// How long the operator must make no request before the steady state begins.
const QUIET_SECS: u64 = 5;

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
    // 0 keeps the controller-manager's upstream default (20 requests/s per controller).
    let cm_qps = env_num("CONTROLLER_MANAGER_QPS", 0) as u32;
    let fx = Fixture::start_with(Options {
        max_connections: 400,
        control_plane: ControlPlaneOptions {
            controller_manager_qps: (cm_qps > 0).then_some(cm_qps),
        },
        ..Options::default()
    })
    .await?;
    fx.create_secrets().await?;
    let pid = fx.operator_pid().context("operator runs")?;
    let unrelated = env_num("UNRELATED_SECRETS", 5000) as usize;
    eprintln!("[bench-operator] creating {unrelated} unrelated Secrets");
    let rss_before = status_mib(pid, "VmRSS")?;
    let t = Instant::now();
    create_unrelated_secrets(&fx, unrelated).await?;
    // The operator's watch has them a moment after the last create.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_secrets = status_mib(pid, "VmRSS")?;
    eprintln!(
        "[bench-operator] {unrelated} Secrets in {:.1}s; operator RSS {rss_before:.1} -> {rss_secrets:.1} MiB",
        t.elapsed().as_secs_f64()
    );
    let secrets_mib = unrelated as f64 * 2.0 * 4096.0 / (1024.0 * 1024.0);
    let grew = rss_secrets - rss_before;
    let metrics = fx.operator_metrics_addr();
    let cpu0 = cpu_secs(pid)?;
    let req0 = api_requests(&metrics).await.unwrap_or_default();

    // Watches, not polls: the observer should not add list load to the API server it
    // measures. Each watch reports when its count first reaches `pools`.
    let timeout = Duration::from_secs(600);
    let start = Instant::now();
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(fx.client.clone(), &fx.ns);
    let pods: kube::Api<Pod> = kube::Api::namespaced(fx.client.clone(), &fx.ns);
    let all_deployments = tokio::spawn(count_until(deployments, |_| true, pools, start, timeout));
    let all_pods = tokio::spawn(count_until(pods, |_| true, pools, start, timeout));
    let all_ready =
        tokio::spawn(count_until(pool_api(&fx.client, &fx.ns), is_ready, pools, start, timeout));

    eprintln!("[bench-operator] creating {pools} ConnectionPools at once");
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
    let (ready, all_ready) = all_ready.await??;
    let reached = |(n, t): (usize, Duration)| (n >= pools).then_some(t);
    let all_deployments = reached(all_deployments.await??);
    let all_pods = reached(all_pods.await??);
    // Converged = all Ready and then no operator request for QUIET_SECS: the last
    // status patches (a rollout finishing after Ready) count as converging, not as
    // steady state.
    let quiet_for = Duration::from_secs(QUIET_SECS);
    let mut req1 = api_requests(&metrics).await?;
    let mut last_change = Instant::now();
    while last_change.elapsed() < quiet_for && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = api_requests(&metrics).await?;
        if now != req1 {
            req1 = now;
            last_change = Instant::now();
        }
    }
    let quiet = last_change.duration_since(start);
    let reached_quiet = last_change.elapsed() >= quiet_for;
    if !reached_quiet {
        eprintln!(
            "[bench-operator] the operator never went {QUIET_SECS} s without a request; \
             the steady-state figures include converging requests"
        );
    }
    let cpu1 = cpu_secs(pid)?;
    eprintln!(
        "[bench-operator] {ready}/{pools} Ready after {:.1}s, last request at {:.1}s; steady state for {steady}s",
        all_ready.as_secs_f64(),
        quiet.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(steady)).await;
    let req2 = api_requests(&metrics).await?;
    let rss = status_mib(pid, "VmHWM")?;
    let (converge_all, converge_writes, converge_parts) = delta(&req0, &req1);
    let per_pool = converge_writes / pools as f64;
    // Reads: one GET per child the first time (an object of that name must not be
    // adopted) and one per referenced Secret whose resourceVersion changed.
    let reads_per_pool = (converge_all - converge_writes) / pools as f64;
    let (_, steady_writes, steady_parts) = delta(&req1, &req2);
    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    let cm = if cm_qps > 0 {
        format!("`--kube-api-qps={cm_qps}`, upstream default 20")
    } else {
        "upstream default `--kube-api-qps=20`".to_string()
    };
    let report = format!(
        "### Operator: {pools} ConnectionPools at once\n\n\
         Real kube-apiserver v1.34 + controller-manager ({cm}), process-backed node agent running {pools} pooler pods, operator as a local process.\n\n\
         | measure | value | target |\n|---|---:|---|\n\
         | pools Ready | {ready}/{pools} | all |\n\
         | time until all Ready (create took {:.1}s) | {:.1} s | ≤ 60 s {} |\n\
         | time until the operator had written all {pools} Deployments | {} | - |\n\
         | time until all {pools} pods existed (controller-manager) | {} | - |\n\
         | time of the operator's last request while converging (then {QUIET_SECS} s quiet) | {} | - |\n\
         | operator CPU while converging | {:.1} s | - |\n\
         | operator RSS growth from {unrelated} unrelated Secrets ({secrets_mib:.0} MiB of data and annotations) | {grew:.1} MiB ({rss_before:.1} → {rss_secrets:.1}) | ≤ 25 % of their size {} |\n\
         | operator peak RSS | {:.1} MiB | ≤ 150 MiB {} |\n\
         | API writes per pool to converge (and reads: {reads_per_pool:.1}) | {:.1} | ≤ 10 {} |\n\
         | mutating API requests in {steady} s of steady state | {} | 0 {} |\n\n\
         Requests while converging: {converge_parts}.  \n\
         Requests in steady state: {steady_parts}.\n",
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        mark(ready == pools && all_ready.as_secs() <= 60),
        secs(all_deployments),
        secs(all_pods),
        if reached_quiet {
            format!("{:.1} s", quiet.as_secs_f64())
        } else {
            "never quiet".to_string()
        },
        cpu1 - cpu0,
        mark(grew <= 0.25 * secrets_mib),
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
    let stopping = Instant::now();
    fx.shutdown().await?;
    eprintln!(
        "[bench-operator] stopped {pools} pods and the control plane in {:.1}s",
        stopping.elapsed().as_secs_f64()
    );
    Ok(())
}
