//! `sluice-pooler --config PATH`: parse arguments, set up logging, run.

use clap::Parser;

/// mimalloc instead of the C library's allocator: a login allocates and frees many small
/// buffers, and musl's allocator (the static image's) is slow at that and under threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fast, bounded PostgreSQL transaction and session pooler.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Path of the config file (TOML).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: std::path::PathBuf,
    /// Override `listen_addr`.
    #[arg(long)]
    listen: Option<String>,
    /// Override `admin_addr`.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Largest client message accepted, in bytes.
    #[arg(long, env = "SLUICE_MAX_MESSAGE_SIZE", default_value_t = sluice_pooler::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: usize,
    /// Runtime worker threads; default: the CPUs this process may use (cgroup quota
    /// included). With 1, a single-threaded runtime serves everything.
    #[arg(long, env = "SLUICE_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log format: `json` or `plain` (env SLUICE_LOG_FORMAT); level via RUST_LOG.
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "plain")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let threads = match args.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // One thread: a current-thread runtime, without the work-stealing machinery.
    let mut runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = runtime.enable_all().build()?;
    let options = sluice_pooler::Options {
        config: args.config,
        listen: args.listen,
        admin_listen: args.admin_listen,
        max_message_size: args.max_message_size,
    };
    runtime.block_on(sluice_pooler::run(options))?;
    Ok(())
}
