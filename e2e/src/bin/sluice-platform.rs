//! `sluice-platform`: the whole local test platform in one process, for `make demo`
//! and for trying things by hand: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager) and the node agent, until Ctrl-C or SIGTERM.
//!
//! ```text
//! sluice-platform --image sluice-pooler=target/debug/sluice-pooler \
//!     --kubeconfig-out /tmp/sluice.kubeconfig
//! kubectl --kubeconfig /tmp/sluice.kubeconfig get nodes,pods -A
//! ```
//! Prints `KUBECONFIG=<path>` on stdout once the node is registered.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use k8s_openapi::api::core::v1::Node;
use sluice_e2e::agent::{self, AgentConfig};
use sluice_testkit::ControlPlane;

/// Local Kubernetes test platform: control plane + process-backed node.
#[derive(Debug, Parser)]
#[command(name = "sluice-platform", version)]
struct Args {
    /// Image name → binary, e.g. `sluice-pooler=/path/to/sluice-pooler` (repeatable).
    #[arg(long = "image", value_name = "NAME=PATH")]
    images: Vec<String>,
    /// Also copy the admin kubeconfig here (it stays valid while this process runs).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
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
    let cp = ControlPlane::start().await?;
    let kubeconfig = match &args.kubeconfig_out {
        Some(out) => {
            std::fs::copy(cp.kubeconfig_path(), out)
                .with_context(|| format!("writing {}", out.display()))?;
            out.clone()
        }
        None => cp.kubeconfig_path(),
    };
    let mut config = AgentConfig::new(cp.kubeconfig_path());
    config.loopback_only = args.loopback_only;
    config = config.image_specs(&args.images)?;
    let node = config.node_name.clone();
    let client = cp.client().await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(config, async move {
        let _ = stop_rx.await;
    }));
    let nodes: kube::Api<Node> = kube::Api::all(client);
    for _ in 0..300 {
        if nodes.get_opt(&node).await?.is_some() || agent.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("KUBECONFIG={}", kubeconfig.display());
    eprintln!(
        "platform ready: API server {} (pods: {}), control plane dir {}; Ctrl-C to stop",
        cp.server_url(),
        cp.pod_server_url(),
        cp.dir().display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::pin!(agent);
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        r = &mut agent => Some(r),
    };
    let result = match result {
        Some(r) => r,
        None => {
            let _ = stop_tx.send(());
            agent.await
        }
    };
    drop(cp);
    result?
}
