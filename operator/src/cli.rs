//! Command line: `sluice-operator crd [--write-all <repo-root>]` and `sluice-operator run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use crate::api::{CRD_PATHS, crd_yaml};
use crate::cache::caches;
use crate::discovery::{HttpProbe, PostgresDiscovery};
use crate::metrics::{self, Metrics};
use crate::reconcile::{Context, Settings, run_controller};
use crate::secure_metrics;

/// Kubernetes operator for sluice-pooler.
#[derive(Debug, Parser)]
#[command(name = "sluice-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the ConnectionPool CRD as YAML.
    Crd {
        /// Write it to every place the repository keeps it, under this repository root.
        #[arg(long, value_name = "REPO_ROOT")]
        write_all: Option<PathBuf>,
    },
    /// Run the controller (kubeconfig from KUBECONFIG, ~/.kube/config or in-cluster).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Watch ConnectionPools in this namespace only (default: all namespaces).
    #[arg(long, env = "SLUICE_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SLUICE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Serve /metrics over HTTPS, only to callers whose bearer token the API server
    /// authenticates and authorises for `get` on `/metrics` (TokenReview and
    /// SubjectAccessReview); /healthz and /readyz stay open.
    #[arg(long, env = "SLUICE_METRICS_SECURE")]
    metrics_secure: bool,
    /// With --metrics-secure: a directory holding tls.crt and tls.key (default: a
    /// self-signed certificate made at start).
    #[arg(long, env = "SLUICE_METRICS_CERT_DIR")]
    metrics_cert_dir: Option<PathBuf>,
    /// Act only while holding the Lease `sluice-operator` (for more than one replica).
    #[arg(long, env = "SLUICE_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else the kubeconfig's namespace).
    #[arg(long, env = "SLUICE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Pooler image for pools that name none.
    #[arg(
        long,
        env = "SLUICE_POOLER_IMAGE",
        default_value = "ghcr.io/sluice-dev/sluice-pooler:0.1.0"
    )]
    pooler_image: String,
    /// How often database limits are re-read.
    #[arg(long, env = "SLUICE_DISCOVERY_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    discovery_interval: Duration,
    /// How long pods get to apply a lowered connection_limit before they are deleted.
    #[arg(long, env = "SLUICE_ACK_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// Requeue delay while a resize waits for pods.
    #[arg(long, env = "SLUICE_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd { write_all } => crd(write_all),
        Command::Run(args) => {
            init_logging();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")
                .and_then(|rt| rt.block_on(run(args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn crd(write_all: Option<PathBuf>) -> anyhow::Result<()> {
    let yaml = crd_yaml()?;
    match write_all {
        None => print!("{yaml}"),
        Some(root) => {
            for rel in CRD_PATHS {
                let path = root.join(rel);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, &yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// `SLUICE_LOG_FORMAT=json|text` (default json), filter from `RUST_LOG` (default info).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SLUICE_LOG_FORMAT").as_deref() == Ok("text") {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("loading the kubeconfig")?;
    let metrics = Arc::new(Metrics::default());
    let server = if args.metrics_secure {
        let tls = secure_metrics::tls_config(args.metrics_cert_dir.as_deref())
            .context("the metrics certificate")?;
        let auth = Arc::new(secure_metrics::Authorizer::new(client.clone()));
        let router = secure_metrics::router(metrics.clone(), auth);
        tokio::spawn(secure_metrics::serve(args.metrics_addr, router, tls))
    } else {
        tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()))
    };
    let settings = Settings {
        default_image: args.pooler_image.clone(),
        discovery_interval: args.discovery_interval,
        ack_timeout: args.ack_timeout,
        poll_interval: args.poll_interval,
    };
    let (caches, writers) = caches();
    let ctx = Arc::new(Context::new(
        client.clone(),
        caches,
        metrics.clone(),
        Arc::new(PostgresDiscovery::default()),
        Arc::new(HttpProbe::default()),
        settings,
    ));
    tracing::info!(namespace = ?args.namespace, leader_election = args.leader_election, "starting");

    if !args.leader_election {
        // Ready once every watch cache has its first full list: before that, a
        // reconcile would see children missing that exist.
        let (ready_ctx, ready_metrics) = (ctx.clone(), metrics.clone());
        tokio::spawn(async move {
            if ready_ctx.caches_ready().await.is_ok() {
                ready_metrics.set_ready(true);
                tracing::info!("caches synced; ready");
            }
        });
        tokio::select! {
            _ = run_controller(ctx, writers, args.namespace, shutdown_signal()) => {}
            r = server => r.context("metrics server")?.context("metrics server")?,
        }
        return Ok(());
    }

    let lease_ns = args
        .lease_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| format!("{h}-{}", std::process::id()))
        .unwrap_or_else(|| format!("sluice-operator-{}", std::process::id()));
    let manager = LeaseManagerBuilder::new(client.clone(), "sluice-operator")
        .with_namespace(lease_ns.clone())
        .with_identity(identity.clone())
        .with_field_manager(format!("sluice-operator-{identity}"))
        .build()
        .await
        .context("creating the lease manager")?;
    // A standby is ready (it is healthy, and a rolling update of the operator must be
    // able to proceed); the leader's reconciles wait for its caches themselves.
    metrics.set_ready(true);
    let (mut leader, lease_task) = manager.watch().await;
    tracing::info!(lease = %format!("{lease_ns}/sluice-operator"), %identity, "waiting for leadership");
    tokio::select! {
        r = async {
            while !*leader.borrow_and_update() {
                leader.changed().await?;
            }
            Ok::<_, tokio::sync::watch::error::RecvError>(())
        } => r.context("lease manager stopped")?,
        _ = shutdown_signal() => return Ok(()),
    }
    tracing::info!("acquired leadership");
    let lost = async move {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow() {
                return;
            }
        }
    };
    let outcome = tokio::select! {
        _ = run_controller(ctx, writers, args.namespace, shutdown_signal()) => Ok(()),
        _ = lost => Err(anyhow::anyhow!("lost leadership; exiting so that only one operator acts")),
        r = server => r.context("metrics server")?.context("metrics server"),
    };
    // The receiver is gone with `lost`: the lease task releases the Lease and ends.
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    outcome
}
