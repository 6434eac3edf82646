use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use shardcast::config::{Args, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (config, given) = match Args::parse().with_file().and_then(|a| {
        let given = a.given();
        a.resolve().map(|c| (c, given))
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardcast: {e}");
            std::process::exit(2);
        }
    };
    logs(config.log_format);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %config.node_id,
        bus = if config.redis.is_empty() { "embedded" } else { "redis-cluster" },
        settings = %given.join(" "),
        "starting"
    );
    if config.api_key.is_none() {
        tracing::warn!("auth is off: POST /publish is open and clients name themselves with ?user=");
    }
    // Every socket is a file: take the hard limit, not the (often 1024) soft one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, node = %config.node_id, "serving");
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            shutdown.cancel();
        }
    });
    shardcast::run(listener, config, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Logs to stderr, in colour only when it is a terminal; `RUST_LOG` filters (default `info`).
/// JSON lines carry `timestamp`, `level`, `target`, `message` and the event's own fields.
fn logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
