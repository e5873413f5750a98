//! The client listener: accepts connections, runs sessions, and drains on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::session::serve_client;
use crate::state::Shared;
use crate::stream::Stream;

/// Accepts clients on `listener` until `shutdown` resolves, then drains: stops
/// accepting, tells every session (each closes at its next idle point), and waits up
/// to `drain_timeout` before cancelling what still runs.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    // Boxed: the session's state machine is large, and spawning moves
                    // a box instead of copying it.
                    sessions.spawn(Box::pin(serve_client(Stream::Plain(tcp), shared.clone())));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = &mut shutdown => break,
        }
        while sessions.try_join_next().is_some() {}
    }
    drop(listener);
    let timeout = shared.config().drain_timeout;
    tracing::info!(clients = sessions.len(), ?timeout, "draining");
    shared.start_drain();
    let drained = tokio::time::timeout(timeout, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            clients = sessions.len(),
            "drain_timeout reached; cancelling what still runs"
        );
        shared.cancel_all().await;
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    tracing::info!("drained");
}
