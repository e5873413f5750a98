//! `sluice-pooler`: a fast, bounded PostgreSQL transaction and session pooler.
//!
//! [`run`] is the whole program; [`bind`] + [`Bound::serve`] let tests run it
//! in-process on `127.0.0.1:0` with their own shutdown future.

mod admin;
mod auth;
mod config;
mod error;
mod http;
mod memory;
mod metrics;
mod params;
mod pool;
mod prepared;
mod protocol;
mod server;
mod session;
mod state;
mod stream;
mod tls;
mod tracker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use admin::status;
pub use auth::{ScramServer, ScramVerifier, Secret};
pub use config::{AuthMethod, Config, PoolMode};
pub use error::{ClientError, Error, Result};
pub use pool::{Limiter, PoolKey};
pub use sluice_contract::Status;
pub use state::Shared;

/// Default bound on one client message (16 MiB); larger ones close the client with
/// SQLSTATE 08P01.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// How to start: the config file plus command-line overrides.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Overrides `listen_addr`.
    pub listen: Option<String>,
    /// Overrides `admin_addr`.
    pub admin_listen: Option<String>,
    pub max_message_size: usize,
}

impl Options {
    pub fn new(config: impl Into<PathBuf>) -> Self {
        Self {
            config: config.into(),
            listen: None,
            admin_listen: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// A pooler with its sockets bound, ready to serve.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    admin: TcpListener,
    /// The HTTP front door, when `[http]` is on.
    http: Option<TcpListener>,
    shared: Arc<Shared>,
    options: Options,
}

/// Loads the config and binds the client and admin sockets.
///
/// # Errors
/// When the config is invalid or a socket cannot be bound.
pub async fn bind(options: Options) -> Result<Bound> {
    let mut cfg = Config::load(&options.config)?;
    if let Some(l) = &options.listen {
        cfg.listen_addr = l.clone();
    }
    if let Some(a) = &options.admin_listen {
        cfg.admin_addr = a.clone();
    }
    let listener = TcpListener::bind(&cfg.listen_addr).await?;
    let admin = TcpListener::bind(&cfg.admin_addr).await?;
    let http = match &cfg.http {
        Some(h) => Some(TcpListener::bind(h.listen_addr()).await?),
        None => None,
    };
    tracing::info!(
        listen = %listener.local_addr()?, admin = %admin.local_addr()?,
        config_hash = %cfg.hash, connection_limit = cfg.connection_limit,
        pool_mode = cfg.pool_mode.as_str(), "sluice-pooler starting"
    );
    let shared = Arc::new(Shared::new(cfg, options.max_message_size));
    Ok(Bound {
        listener,
        admin,
        http,
        shared,
        options,
    })
}

impl Bound {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Where the HTTP front door listens, when on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared state (for tests and embedding).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then drains (see [`server::serve`]).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Bound {
            listener,
            admin,
            http,
            shared,
            options,
        } = self;
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_task = http.map(|l| {
            tokio::spawn(http::serve(l, shared.clone(), async move {
                let _ = http_stopped.await;
            }))
        });
        let admin_task = tokio::spawn({
            let router = admin::router(shared.clone());
            async move {
                if let Err(e) = axum::serve(admin, router).await {
                    tracing::error!(error = %e, "admin server failed");
                }
            }
        });
        let reload_task = tokio::spawn(reload_loop(options, shared.clone()));
        let reaper_task = tokio::spawn(reaper_loop(shared.clone()));
        server::serve(listener, shared, async move {
            shutdown.await;
            let _ = http_stop.send(());
        })
        .await;
        if let Some(t) = http_task {
            let _ = t.await;
        }
        reload_task.abort();
        reaper_task.abort();
        admin_task.abort();
    }
}

/// Polls the config file and everything it references once a second, by content.
async fn reload_loop(options: Options, shared: Arc<Shared>) {
    let path = options.config.clone();
    let mut last = tokio::task::spawn_blocking({
        let p = path.clone();
        move || config::fingerprint(&p)
    })
    .await
    .unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let p = path.clone();
        // Parsing (and deriving SCRAM verifiers) only when something changed. A change
        // between fingerprint and load is loaded now and seen again next tick: harmless.
        let last_fp = last;
        let Ok(Some((fp, loaded))) = tokio::task::spawn_blocking(move || {
            let fp = config::fingerprint(&p);
            (fp != last_fp).then(|| {
                let loaded = Config::load(&p);
                (fp, loaded)
            })
        })
        .await
        else {
            continue;
        };
        last = fp;
        match loaded {
            Ok(mut cfg) => {
                if let Some(l) = &options.listen {
                    cfg.listen_addr = l.clone();
                }
                if let Some(a) = &options.admin_listen {
                    cfg.admin_addr = a.clone();
                }
                shared.apply(cfg);
            }
            Err(e) => {
                tracing::error!(error = %e, "config change rejected; keeping the last good config")
            }
        }
    }
}

/// Closes idle server connections past `idle_timeout` or `server_lifetime`.
async fn reaper_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let cfg = shared.config();
        pool::close_all(
            shared
                .pools
                .limiter()
                .reap(cfg.idle_timeout, cfg.server_lifetime, |c| {
                    // The server may have restarted: the next connection checks its size.
                    let dead = c.is_broken();
                    if dead {
                        shared.pools.size.unverify();
                    }
                    dead
                }),
        );
        let snap = shared.pools.limiter().snapshot();
        if snap.in_use + snap.idle == 0 {
            // No connection is left to show a restart (a lost one would): the database
            // may restart smaller meanwhile, and the next opener checks its size before
            // any other opens.
            shared.pools.size.unverify();
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The whole program: bind, serve, drain on SIGTERM/SIGINT.
///
/// # Errors
/// When startup fails (invalid config, address in use).
pub async fn run(options: Options) -> Result<()> {
    let bound = bind(options).await?;
    bound.serve(shutdown_signal()).await;
    Ok(())
}
