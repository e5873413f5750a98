//! End to end: the connection budget holds, measured at the database.
//!
//! Each test starts its own PostgreSQL (`max_connections = 60`), control plane,
//! node agent and operator, creates the pool from `config/samples/`, runs load
//! through the pool's Service, samples `pg_stat_activity` every 50 ms and the
//! pods' limits every 100 ms, and prints its figures. Run with `--nocapture`
//! (as `make e2e` does) to see them; run one test at a time (`--test-threads=1`):
//! the node agent owns the machine's pod network.

mod budget {
    pub mod load;
    pub mod probe;
}

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use budget::load::{Load, Sampler, Samples, Shape, Totals};
use budget::probe::{LimitProbe, LimitSample, worst};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;
use sluice_e2e::agent::BRIDGE_IP;
use sluice_e2e::fixture::{Converged, Fixture, pool_api, pooler_status};

const MAX_CONNECTIONS: u32 = 60;
const CONVERGE: Duration = Duration::from_secs(180);

/// Everything measured while a change happened.
struct Run {
    samples: Samples,
    limits: Vec<LimitSample>,
    totals: Totals,
}

struct Measuring {
    sampler: Sampler,
    probe: LimitProbe,
    load: Load,
}

/// The saturating load of issue 16 for a pool converged at `c`: three clients per
/// budget connection, each transaction holding its server connection 100–500 ms.
async fn measure(fx: &Fixture, c: &Converged) -> Result<Measuring> {
    measure_shaped(fx, 3 * c.available as usize, Shape::saturating(None)).await
}

async fn measure_shaped(fx: &Fixture, clients: usize, shape: Shape) -> Result<Measuring> {
    let sampler = Sampler::start(
        &fx.superuser_conn_str(),
        sluice_testkit::APP_USER.0,
        &BRIDGE_IP.to_string(),
        Duration::from_millis(50),
    )
    .await?;
    let probe =
        LimitProbe::start(fx.client.clone(), fx.ns.clone(), fx.pool.clone(), fx.selector().await?);
    let load = Load::start_shaped(fx.service_conn_str().await?, clients, shape);
    // Let the load reach steady state before the change.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        load.totals().ok > 0,
        "no transaction succeeded through the Service before the change: {:?}",
        load.totals()
    );
    Ok(Measuring { sampler, probe, load })
}

impl Measuring {
    async fn finish(self) -> Result<Run> {
        // A little steady state after convergence too.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let totals = self.load.stop().await;
        let samples = self.sampler.stop().await?;
        let limits = self.probe.stop().await?;
        Ok(Run { samples, limits, totals })
    }
}

async fn setup(replicas: i32) -> Result<(Fixture, Converged)> {
    let mut fx = Fixture::start(MAX_CONNECTIONS).await?;
    fx.apply_sample(replicas).await?;
    let c = fx.wait_converged(replicas.into(), CONVERGE).await?;
    println!(
        "[setup] {replicas} replicas ready in {:.1}s: limit/replica {}, budget {}",
        c.secs, c.limit, c.available
    );
    Ok((fx, c))
}

fn report(name: &str, run: &Run, budget: i64, before: &Converged, after: &Converged) {
    let w = worst(&run.limits);
    println!(
        "[{name}] max sampled server connections {} / budget {budget} ({} samples); \
         worst Σ pod limits {} over {} pods / budget {budget} ({} probes); \
         limit/replica {} -> {}; converged in {:.1}s; \
         tx ok {} failed {} interrupted {} reconnects {} connect errors {}; \
         pool timeouts {} refused by PostgreSQL {}",
        run.samples.max(),
        run.samples.count(),
        w.map(|w| w.sum).unwrap_or(0),
        w.map(|w| w.pods).unwrap_or(0),
        run.limits.len(),
        before.limit,
        after.limit,
        after.secs,
        run.totals.ok,
        run.totals.failed,
        run.totals.interrupted,
        run.totals.reconnects,
        run.totals.connect_errors,
        run.totals.pool_timeouts,
        run.totals.refused_by_database,
    );
}

fn assert_within_budget(name: &str, run: &Run, budget: i64) -> Result<()> {
    ensure!(
        run.samples.count() > 20,
        "[{name}] too few pg_stat_activity samples: {}",
        run.samples.count()
    );
    ensure!(!run.limits.is_empty(), "[{name}] no limit probes");
    ensure!(
        run.samples.max() <= budget,
        "[{name}] PostgreSQL saw {} pooler connections, budget {budget}",
        run.samples.max()
    );
    let w = worst(&run.limits).context("limit probes")?;
    ensure!(
        w.sum <= budget,
        "[{name}] pods could together hold {} connections (budget {budget}): {w:?}",
        w.sum
    );
    ensure!(run.totals.ok > 0, "[{name}] no transaction succeeded");
    ensure!(
        run.totals.refused_by_database == 0,
        "[{name}] PostgreSQL refused {} connections",
        run.totals.refused_by_database
    );
    Ok(())
}

/// Server connections the pool's pods hold now (`/status`), summed.
async fn held_now(fx: &Fixture) -> Result<i64> {
    let mut sum = 0;
    for (_, ip) in fx.pooler_pods().await? {
        sum += pooler_status(&ip).await?["server_connections"]["open"].as_i64().unwrap_or(0);
    }
    Ok(sum)
}

/// Issue 16: every pod at its limit with session-mode clients (three per budget
/// connection, each transaction holding its connection 100–500 ms, three per session):
/// scaling 2 → 5 waits until the pods hold no more than the lowered limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_session_mode_scale_up_2_to_5() -> Result<()> {
    scale("saturated session 2->5", 2, 5, true).await
}

/// Issue 16: two ConnectionPools on one database divide its budget, saturated
/// (transaction mode, 120 clients each holding connections 100–500 ms), while the
/// second is created and then both are scaled in opposite directions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_saturated_pools_share_one_database_budget() -> Result<()> {
    let name = "two pools, one database";
    let (mut fx, first) = setup(2).await?;
    let budget = first.available;
    let sampler = Sampler::start(
        &fx.superuser_conn_str(),
        sluice_testkit::APP_USER.0,
        &BRIDGE_IP.to_string(),
        Duration::from_millis(50),
    )
    .await?;
    let load_a = Load::start_shaped(fx.service_conn_str().await?, 120, Shape::saturating(None));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = fx.pool.clone();
    fx.create_pool_with("second", 2, json!({})).await?;
    fx.pool = "second".into();
    let second = fx.wait_converged(2, CONVERGE).await?;
    let load_b = Load::start_shaped(fx.service_conn_str().await?, 120, Shape::saturating(None));
    fx.pool = a.clone();
    let first_shared = fx.wait_converged(2, CONVERGE).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Opposite directions at once.
    fx.scale(3)?;
    fx.pool = "second".into();
    fx.scale(1)?;
    let second_after = fx.wait_converged(1, CONVERGE).await?;
    fx.pool = a;
    let first_after = fx.wait_converged(3, CONVERGE).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ta, tb) = (load_a.stop().await, load_b.stop().await);
    let samples = sampler.stop().await?;
    println!(
        "[{name}] max sampled server connections {} / database budget {budget} ({} samples); \
         shares {} + {} after the second joined, {} + {} after scaling 3 / 1; \
         first pool: tx ok {} pool timeouts {} refused {}; second: tx ok {} pool timeouts {} refused {}",
        samples.max(),
        samples.count(),
        first_shared.available,
        second.available,
        first_after.available,
        second_after.available,
        ta.ok,
        ta.pool_timeouts,
        ta.refused_by_database,
        tb.ok,
        tb.pool_timeouts,
        tb.refused_by_database,
    );
    ensure!(samples.count() > 20, "[{name}] too few samples");
    ensure!(
        samples.max() <= budget,
        "[{name}] PostgreSQL saw {} pooler connections, budget {budget}",
        samples.max()
    );
    ensure!(first_shared.available + second.available <= budget);
    ensure!(first_after.available + second_after.available <= budget);
    ensure!(ta.ok > 0 && tb.ok > 0, "[{name}] both pools served transactions");
    ensure!(
        ta.refused_by_database + tb.refused_by_database == 0,
        "[{name}] PostgreSQL refused connections"
    );
    ensure!(ta.failed + tb.failed == 0, "[{name}] transactions failed");
    fx.shutdown().await
}

/// Scales a saturated pool `from` → `to` replicas; `session`: a session-mode pool whose
/// clients reconnect every three transactions.
async fn scale(name: &str, from: i32, to: i32, session: bool) -> Result<()> {
    let (fx, before) = if session {
        let mut fx = Fixture::start(MAX_CONNECTIONS).await?;
        fx.wait_crd_established().await?;
        fx.create_secrets().await?;
        fx.pool = "app".into();
        fx.create_pool_with("app", from, json!({"poolMode": "session", "poolTimeout": "2s"}))
            .await?;
        let before = fx.wait_converged(from.into(), CONVERGE).await?;
        (fx, before)
    } else {
        setup(from).await?
    };
    let clients = 3 * before.available as usize;
    let m = measure_shaped(&fx, clients, Shape::saturating(session.then_some(3))).await?;
    let mut saturated = 0;
    for _ in 0..20 {
        saturated = saturated.max(held_now(&fx).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let full = i64::from(from) * before.limit;
    ensure!(saturated >= full - 1, "[{name}] pods not saturated: they held {saturated} of {full}");
    fx.scale(to)?;
    let after = fx.wait_converged(to.into(), CONVERGE).await?;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    println!("[{name}] {clients} clients; pods held {saturated} of {full} before the change");
    assert_within_budget(name, &run, after.available)?;
    ensure!(run.totals.failed == 0, "[{name}] {} transactions failed", run.totals.failed);
    if to > from {
        ensure!(after.limit < before.limit, "scaling up lowers the per-replica limit");
    } else {
        ensure!(after.limit > before.limit, "scaling down raises the per-replica limit");
        ensure!(run.totals.reconnects > 0, "clients of removed pods reconnected (drain), got none");
    }
    // The ordering, as seen in the objects: never more replicas at a limit than fit.
    for s in &run.limits {
        ensure!(
            i64::from(s.deployment_replicas) * s.configmap_limit <= after.available,
            "[{name}] Deployment had {} replicas while the ConfigMap limit was {} (budget {})",
            s.deployment_replicas,
            s.configmap_limit,
            after.available
        );
    }
    fx.shutdown().await
}

/// Waits until the pool has converged on `replicas` pods, none of them in `old`, by
/// `deadline`.
async fn wait_replaced(
    fx: &Fixture,
    replicas: i64,
    old: &[String],
    deadline: Instant,
    name: &str,
) -> Result<Converged> {
    loop {
        let c = fx.wait_converged(replicas, CONVERGE).await?;
        let now: Vec<String> = fx.pooler_pods().await?.into_iter().map(|p| p.0).collect();
        if now.iter().all(|p| !old.contains(p)) {
            return Ok(c);
        }
        ensure!(Instant::now() < deadline, "[{name}] pods were not replaced: {old:?} -> {now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_scale_up_2_to_5() -> Result<()> {
    scale("saturated 2->5", 2, 5, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_scale_down_5_to_2() -> Result<()> {
    scale("saturated 5->2", 5, 2, false).await
}

/// Session mode: the removed pods' clients hold their server connections until they
/// disconnect; the survivors' limit rises only once those are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_session_mode_scale_down_5_to_2() -> Result<()> {
    scale("saturated session 5->2", 5, 2, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_rollout_of_a_restart_requiring_change() -> Result<()> {
    let name = "rollout";
    let (fx, before) = setup(2).await?;
    let old: Vec<String> = fx.pooler_pods().await?.into_iter().map(|p| p.0).collect();
    let m = measure(&fx, &before).await?;
    fx.patch_pool(
        json!({"spec": {"podTemplate": {"annotations": {"e2e.sluice.dev/rollout": "1"}}}}),
    )
    .await?;
    let after = wait_replaced(&fx, 2, &old, Instant::now() + CONVERGE, name).await?;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    assert_within_budget(name, &run, after.available)?;
    ensure!(run.totals.failed == 0, "[{name}] {} transactions failed", run.totals.failed);
    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_budget_follows_max_connections() -> Result<()> {
    let name = "budget-change";
    let (mut fx, before) = setup(2).await?;
    let m = measure(&fx, &before).await?;
    let mut last_refresh = Instant::now();
    let mut shrunk = Instant::now();
    for target in [90u32, MAX_CONNECTIONS] {
        let changed = Instant::now();
        fx.pg.restart_with_max_connections(target)?;
        // From here the database runs with `target`: samples taken while the restart
        // was still stopping the old one (its connections counted against the old
        // size) are not held against the new budget.
        shrunk = Instant::now();
        // Wait for the operator's refresh to see the new value.
        let deadline = Instant::now() + Duration::from_secs(60);
        let refreshed = loop {
            let pool = fx.pool_json().await?;
            if pool["status"]["budget"]["databaseMaxConnections"].as_i64() == Some(target.into()) {
                break Instant::now();
            }
            ensure!(
                Instant::now() < deadline,
                "operator never saw max_connections {target}: {}",
                pool["status"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let c = fx.wait_converged(2, CONVERGE).await?;
        println!(
            "[{name}] max_connections -> {target}: refresh seen after {:.1}s, limit/replica {} budget {} (converged {:.1}s after the refresh)",
            (refreshed - changed).as_secs_f64(),
            c.limit,
            c.available,
            c.secs
        );
        ensure!(
            c.limit * 3 <= c.available,
            "limit {} × (2 + 1) within budget {}",
            c.limit,
            c.available
        );
        last_refresh = refreshed;
    }
    let after = fx.wait_converged(2, CONVERGE).await?;
    let ok_when_converged = m.load.totals().ok;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    println!(
        "[{name}] the budget went 51 -> 78 -> 51; Σ pod limits above are compared with the final budget only"
    );
    ensure!(
        after.limit == before.limit,
        "back at max_connections {MAX_CONNECTIONS}, the limit is the original"
    );
    // The pods' limits were computed for 90: after the restart with 60 the first server
    // connection each pod opens learns the new size, and the pod lowers its limit in
    // proportion before the operator's refresh has seen the change.
    println!(
        "[{name}] max sampled since the restart with {MAX_CONNECTIONS}: {} (budget {}); before the operator's refresh {}, after it {}",
        run.samples.max_since(shrunk),
        after.available,
        run.samples.max_before(last_refresh),
        run.samples.max_since(last_refresh),
    );
    ensure!(
        run.samples.max_since(shrunk) <= after.available,
        "over budget after the database shrank"
    );
    ensure!(run.samples.max() <= 90 - 3, "never above what PostgreSQL allowed");
    // Restarting PostgreSQL ends the transactions running on it (the failures
    // counted above); what matters is that clients keep working afterwards.
    ensure!(run.totals.ok > ok_when_converged, "[{name}] transactions succeed after the restarts");
    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_pod_killed_restarts_and_budget_holds() -> Result<()> {
    let name = "pod-killed";
    let (fx, before) = setup(2).await?;
    let m = measure(&fx, &before).await?;
    let (victim, ip) = fx.pooler_pods().await?.into_iter().next().context("a pod")?;
    let pid = pooler_pid_with_ip(&ip)?;
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    println!("[{name}] SIGKILLed pooler pid {pid} of pod {victim} ({ip})");
    let pods: Api<Pod> = Api::namespaced(fx.client.clone(), &fx.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pods.get(&victim).await?;
        let restarts = p
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|cs| cs.first().map(|c| c.restart_count))
            .unwrap_or(0);
        if restarts >= 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "pod {victim} was not restarted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = fx.wait_converged(2, CONVERGE).await?;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    assert_within_budget(name, &run, after.available)?;
    ensure!(run.totals.failed == 0, "[{name}] {} transactions failed", run.totals.failed);
    ensure!(
        fx.pooler_pods().await?.iter().any(|p| p.0 == victim),
        "the same pod came back (restart, not replace)"
    );
    fx.shutdown().await
}

/// PID of the `sluice-pooler` process whose network namespace has `ip`.
fn pooler_pid_with_ip(ip: &str) -> Result<u32> {
    let out = std::process::Command::new("pgrep").args(["-x", "sluice-pooler"]).output()?;
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let addrs = std::process::Command::new("nsenter")
            .args(["-t", pid, "-n", "ip", "-4", "-o", "addr", "show"])
            .output()?;
        if String::from_utf8_lossy(&addrs.stdout).contains(&format!(" {ip}/")) {
            return Ok(pid.parse()?);
        }
    }
    anyhow::bail!("no sluice-pooler process has address {ip}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_operator_killed_mid_resize_resumes() -> Result<()> {
    let name = "operator-killed";
    let (mut fx, before) = setup(2).await?;
    let m = measure(&fx, &before).await?;
    fx.scale(5)?;
    // Kill it once the resize has begun (Progressing=True), not before.
    let progressing = fx.wait_condition(&fx.pool, "Progressing", Duration::from_secs(60)).await?;
    println!("[{name}] killing the operator mid-resize: {progressing}");
    fx.kill_operator();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fx.start_operator()?;
    let after = fx.wait_converged(5, CONVERGE).await?;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    assert_within_budget(name, &run, after.available)?;
    ensure!(run.totals.failed == 0, "[{name}] {} transactions failed", run.totals.failed);
    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_reported_and_changes_nothing() -> Result<()> {
    let (fx, before) = setup(2).await?;
    let pods_before: Vec<String> = fx.pooler_pods().await?.into_iter().map(|p| p.0).collect();
    let cm_api: Api<ConfigMap> = Api::namespaced(fx.client.clone(), &fx.ns);
    let cm_before = cm_api.get(&format!("{}-config", fx.pool)).await?.data;

    // 1. More replicas than the budget can give one connection each.
    fx.scale(80)?;
    let cond = fx.wait_condition(&fx.pool, "BudgetExceeded", Duration::from_secs(60)).await?;
    let message = cond["message"].as_str().unwrap_or_default().to_string();
    println!("[bad-input] BudgetExceeded: {message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events: Api<Event> = Api::namespaced(fx.client.clone(), &fx.ns);
    let evs = events.list(&ListParams::default()).await?;
    ensure!(
        evs.items.iter().any(|e| e.involved_object.name.as_deref() == Some(fx.pool.as_str())
            && e.type_.as_deref() == Some("Warning")),
        "a Warning event on the pool"
    );
    let deploy: Api<Deployment> = Api::namespaced(fx.client.clone(), &fx.ns);
    let replicas = deploy.get(&fx.pool).await?.spec.and_then(|s| s.replicas);
    ensure!(replicas == Some(2), "Deployment untouched, has {replicas:?} replicas");
    ensure!(
        cm_api.get(&format!("{}-config", fx.pool)).await?.data == cm_before,
        "ConfigMap untouched"
    );
    let pods_after: Vec<String> = fx.pooler_pods().await?.into_iter().map(|p| p.0).collect();
    ensure!(pods_after == pods_before, "pods untouched: {pods_before:?} -> {pods_after:?}");
    for (_, ip) in fx.pooler_pods().await? {
        let s = pooler_status(&ip).await?;
        ensure!(
            s["connection_limit"].as_i64() == Some(before.limit),
            "pods keep their last good limit"
        );
    }
    fx.scale(2)?;
    fx.wait_converged(2, CONVERGE).await?;

    // 2. A pool whose credentials Secret does not exist.
    let mut other = fx.pool_json().await?;
    other["metadata"] = json!({"name": "orphan", "namespace": fx.ns});
    other["spec"]["database"]["credentialsSecret"] = json!("no-such-secret");
    other.as_object_mut().unwrap().remove("status");
    let obj: kube::core::DynamicObject = serde_json::from_value(other)?;
    let pools = pool_api(&fx.client, &fx.ns);
    pools.create(&Default::default(), &obj).await?;
    let degraded = fx.wait_condition("orphan", "Degraded", Duration::from_secs(60)).await?;
    let msg = degraded["message"].as_str().unwrap_or_default();
    println!("[bad-input] Degraded: {msg}");
    ensure!(msg.contains("no-such-secret"), "Degraded names the Secret: {msg}");
    // Issue 18: `kubectl get cpool` shows it.
    let row = fx.kubectl(&["get", "cpool", "orphan", "--no-headers"])?;
    println!("[bad-input] kubectl get cpool orphan: {}", row.trim());
    ensure!(
        row.contains("Degraded") && row.contains("SecretNotFound"),
        "STATUS and REASON columns: {row}"
    );

    // 3. CEL validation rejects what can be checked statically, with the rule's message.
    for (patch, needle) in [
        (r#"{"spec":{"replicas":0}}"#, "replicas must be at least 1"),
        (r#"{"spec":{"database":{"port":70000}}}"#, "database.port must be between 1 and 65535"),
        (r#"{"spec":{"poolTimeout":"soon"}}"#, "poolTimeout must be a duration"),
        (
            r#"{"spec":{"database":{"maxConnections":10,"reservedConnections":10}}}"#,
            "reservedConnections must be less than maxConnections",
        ),
    ] {
        let err =
            fx.kubectl(&["patch", "cpool", &fx.pool, "--type=merge", "-p", patch]).unwrap_err();
        println!("[bad-input] kubectl patch {patch}: {}", format!("{err:#}").trim());
        ensure!(
            format!("{err:#}").contains(needle),
            "rejection names the rule ({needle}): {err:#}"
        );
    }
    // Issue 18: a name that cannot name the pool's Service (`db.pool`) is refused at once.
    let mut dotted = fx.pool_json().await?;
    dotted["metadata"] = json!({"name": "db.pool", "namespace": fx.ns});
    dotted.as_object_mut().unwrap().remove("status");
    let obj: kube::core::DynamicObject = serde_json::from_value(dotted)?;
    let err = pools.create(&Default::default(), &obj).await.unwrap_err();
    println!("[bad-input] ConnectionPool db.pool: {err}");
    ensure!(
        err.to_string().contains("metadata.name must be a DNS label"),
        "the name is refused with the rule's message: {err}"
    );
    let bad = sluice_e2e::fixture::repo_root().join("e2e/tests/budget/invalid-pool.yaml");
    let err = fx.kubectl(&["apply", "-f", bad.to_str().unwrap()]).unwrap_err();
    ensure!(
        format!("{err:#}").contains("replicas must be at least 1"),
        "kubectl apply rejected: {err:#}"
    );
    fx.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitops_apply_shows_no_drift() -> Result<()> {
    let (fx, _) = setup(2).await?;
    // Apply the same pool as a GitOps tool would: server-side, its own field manager.
    let mut desired = fx.pool_json().await?;
    desired.as_object_mut().unwrap().remove("status");
    desired["metadata"] = json!({"name": fx.pool, "namespace": fx.ns});
    let file = fx.cp.dir().join("gitops-pool.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&desired)?)?;
    let path = file.to_str().unwrap();
    for _ in 0..2 {
        fx.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=argocd-controller",
            "--force-conflicts",
            "-f",
            path,
        ])?;
    }
    fx.wait_converged(2, CONVERGE).await?;
    let diff = std::process::Command::new(sluice_testkit::k8s_bin_dir()?.join("kubectl"))
        .arg(format!("--kubeconfig={}", fx.cp.kubeconfig_path().display()))
        .args(["diff", "--server-side", "--field-manager=argocd-controller", "-f", path])
        .output()?;
    let out = String::from_utf8_lossy(&diff.stdout);
    println!("[gitops] kubectl diff exit {:?}, {} bytes of diff", diff.status.code(), out.len());
    ensure!(diff.status.code() == Some(0), "kubectl diff shows drift:\n{out}");
    // The operator owns no spec field: its managed fields are status only.
    let pool = fx.pool_json().await?;
    for mf in pool["metadata"]["managedFields"].as_array().context("managedFields")? {
        if mf["manager"].as_str().is_some_and(|m| m.starts_with("sluice-operator")) {
            ensure!(mf["subresource"] == "status", "operator manages non-status fields: {mf}");
        }
    }
    fx.shutdown().await
}

/// Issue 16: every pod deleted at once (`kubectl delete pods`), saturated: the
/// ReplicaSet replaces them at once while they drain with their connections; the
/// replacements are admitted only as the budget has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_every_pod_deleted_at_once() -> Result<()> {
    let name = "saturated, every pod deleted";
    let (fx, before) = setup(2).await?;
    let old: Vec<String> = fx.pooler_pods().await?.into_iter().map(|p| p.0).collect();
    let m = measure_shaped(&fx, 3 * before.available as usize, Shape::saturating(None)).await?;
    fx.kubectl(&["delete", "pods", "-l", &fx.selector().await?, "--wait=false"])?;
    let after = wait_replaced(&fx, 2, &old, Instant::now() + CONVERGE, name).await?;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    assert_within_budget(name, &run, after.available)?;
    fx.shutdown().await
}

/// Issue 16: pods evicted one after another through the Eviction API, as `kubectl
/// drain` and cluster upgrades do, saturated. The PodDisruptionBudget allows the next
/// eviction once the replacement is Ready, possibly while the evicted pod still drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_pods_evicted_one_after_another() -> Result<()> {
    let name = "saturated, evictions";
    let (fx, before) = setup(2).await?;
    let old: Vec<String> = fx.pooler_pods().await?.into_iter().map(|p| p.0).collect();
    let m = measure_shaped(&fx, 3 * before.available as usize, Shape::saturating(None)).await?;
    let pods: Api<Pod> = Api::namespaced(fx.client.clone(), &fx.ns);
    let deadline = Instant::now() + CONVERGE;
    let mut evicted = 0;
    for pod in &old {
        // The PDB refuses (429) until the previous replacement is available.
        loop {
            match pods.evict(pod, &Default::default()).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 429 => {}
                Err(e) => return Err(e.into()),
            }
            ensure!(Instant::now() < deadline, "[{name}] eviction of {pod} refused too long");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        evicted += 1;
    }
    let after = wait_replaced(&fx, 2, &old, deadline, name).await?;
    let run = m.finish().await?;
    report(name, &run, after.available, &before, &after);
    println!("[{name}] {evicted} pods evicted");
    assert_within_budget(name, &run, after.available)?;
    fx.shutdown().await
}
