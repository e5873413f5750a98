//! `sluice-node-agent`: the process-backed node of the local test platform.
//!
//! ```text
//! sluice-node-agent --kubeconfig /tmp/sluice-k8s-x/admin.kubeconfig \
//!     --image sluice-pooler=target/debug/sluice-pooler --image echo=/path/to/echo
//! ```
//! Stops on SIGINT or SIGTERM: pod processes are stopped and the bridge and pod
//! namespaces removed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use sluice_e2e::agent::{self, AgentConfig};

/// A process-backed Kubernetes node (test platform; see docs/test-platform.md).
#[derive(Debug, Parser)]
#[command(name = "sluice-node-agent", version)]
struct Args {
    /// Kubeconfig of the cluster (e.g. the control plane's admin.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Name of the Node object.
    #[arg(long, default_value = "sluice-node")]
    node_name: String,
    /// Image name → binary, e.g. `sluice-pooler=/path/to/sluice-pooler` (repeatable).
    #[arg(long = "image", value_name = "NAME=PATH")]
    images: Vec<String>,
    /// Directory for pod directories and logs (default: a temporary directory).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Give pods loopback addresses instead of network namespaces.
    #[arg(long)]
    loopback_only: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = AgentConfig::new(args.kubeconfig);
    config.node_name = args.node_name;
    config.state_dir = args.state_dir;
    config.loopback_only = args.loopback_only;
    config = config.image_specs(&args.images)?;
    agent::run(config, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received, shutting down");
}
