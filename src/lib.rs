//! shardcast: a WebSocket fan-out node. Many identical nodes run behind a plain load balancer;
//! clients join rooms on any node and receive every message published to a room on any node. Nodes
//! never talk to each other: Redis Cluster sharded pub/sub carries one envelope per message per
//! interested node, and each node serializes a message once per encoding for all its sockets.
//!
//! # Layout
//! Lower modules never import higher ones; where a lower one must call up, it defines the small
//! trait it needs ([`bus::Sink`]) and a higher one plugs in.
//!
//! A message's route in: [`session`] (a client's `pub` or `dm`) or [`routes`] (`POST /publish`)
//! → [`publish`] (one envelope, its channel; [`publish::outbox`] keeps a sender's order) →
//! [`bus`] → Redis Cluster or the in-process twin.
//!
//! Its route out, on every node with members: [`bus`] → [`fanout::worker`] (decoded once, put in
//! order against history by [`history::gaps`]) → [`hub`] (frames built once per encoding,
//! recorded for the lanes of [`fanout::lanes`]) → [`fanout::writer`] (a lane's members on the
//! turn [`fanout::schedule`] sets, one write each) → [`fanout::gate`] → the socket. Every other
//! frame the node sends enters the same writer through [`fanout::writer::Outbound`].
//!
//! Modules, from the edge of the node inwards:
//! - [`config`]: settings, their defaults and validation.
//! - [`accept`]: the HTTP/1.1 accept loop and its connection cap; [`routes`]: HTTP and WebSocket
//!   routes on one listener; [`upgrade`]: the WebSocket handshake, handing the TCP socket over,
//!   and the bound on handshakes in progress;
//!   [`throttle`]: the per-address rate of `POST /publish`; [`demo`]: the demo page.
//! - [`auth`]: tokens and what they grant; [`names`]: what a room or user name may be;
//!   [`hooks`]: the app's backend deciding connects, joins and publishes over HTTP.
//! - [`session`]: one socket: its reader, rate limit, pings and the end of the session;
//!   [`inflate`]: a socket's compressed frames (permessage-deflate) inflated for its reader.
//! - [`cmd`]: one file per client command (join, leave, history, presence, ping) and the socket's
//!   [`cmd::Membership`].
//! - [`publish`]: a message wrapped in its envelope and handed to the bus; a client's publishes
//!   checked, sent in order through the connection's [`publish::outbox`], answered.
//! - [`frame`]: client frames in both encodings; [`wire`]: server frames as bytes on the wire;
//!   [`envelope`]: the bus envelope; [`encoding`]: JSON and MessagePack, and transcoding between
//!   them; [`close`]: close and error codes.
//! - [`topic`]: a room or a user's inbox, what sockets are in.
//! - [`interest`]: subscribe on first member, unsubscribe after the last.
//! - [`bus`]: the transport seam, channel names and shard choice: [`bus::redis`] (Redis Cluster)
//!   and [`bus::memory`] (embedded); [`bus::presence`] keeps presence contributions.
//! - [`history`]: rooms that keep their messages: positions ([`history::pos`], the lowest
//!   module), the store's reads, shard heads, the node's own gaps, and the replay on join.
//! - [`latest`]: keyed messages' latest values: what the stores keep beside each channel, and a
//!   room's values read for a join with `latest` and `GET /rooms/<room>/latest`.
//! - [`presence`]: rooms' counts and member lists and users' online status over every node,
//!   from each node's own contribution.
//! - [`hub`]: local sockets and topics: who is in which, subscriptions, held frames.
//! - [`fanout`]: the way out: delivery workers, lanes, their schedule, the writer, a join's
//!   `max_rate` ([`fanout::rate`]) and the gate (with conflation for a socket that falls behind).
//! - [`node`]: the shared handle; [`shutdown`]: the drain; [`metrics`]: names and recorder.

pub mod accept;
pub mod auth;
pub mod bus;
pub mod close;
pub mod cmd;
pub mod compress;
pub mod config;
pub mod demo;
pub mod encoding;
pub mod envelope;
pub mod fanout;
pub mod frame;
pub mod history;
pub mod hooks;
pub mod hub;
pub mod inflate;
pub mod interest;
pub mod latest;
pub mod metrics;
pub mod names;
pub mod node;
pub mod presence;
pub mod publish;
pub mod routes;
pub mod session;
pub mod shutdown;
pub mod throttle;
pub mod topic;
pub mod upgrade;
pub mod wire;

use std::{sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::{memory::MemoryBus, redis::RedisBus, Bus, BusError, Naming},
    config::Config,
    fanout::{
        lanes::{Lanes, Shaping},
        worker,
    },
    history::gaps::Gaps,
    hub::Hub,
    node::Node,
};

/// How often gauges of local state are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples between two returns of free memory to the system (see [`release_free_memory`]).
const TRIM_EVERY_TICKS: u64 = 10;
/// Connections the `--metrics-listen` listener holds at once: a scraper or two.
const METRICS_CONNECTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("hooks: {0}")]
    Hooks(#[from] hooks::HookError),
}

/// Serves a node on `listener` until `shutdown` is cancelled, then drains and returns.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    // The recorder first, so what the bus records while connecting is kept.
    let metrics = metrics::handle();
    let tracker = TaskTracker::new();
    let internal = CancellationToken::new();
    let (hub, interest_rx) = Hub::shaping(
        Lanes::new(worker::lanes(&config), config.workers),
        config.conflate.clone(),
        Shaping {
            compress_min_bytes: config.compress_min_bytes,
            compress_context: config.compress_context,
            delta_full_every: config.delta_full_every,
        },
    );
    let naming = Naming::new(
        &config.channel_prefix,
        &config.user_channel_prefix,
        config.default_shards,
        config.hot_rooms.clone(),
    );
    let (dispatch, queues) = worker::Dispatch::new(&config);
    let bus = Arc::new(connect(&config, Arc::new(dispatch), &tracker, &internal).await?);
    worker::start(
        queues,
        hub.clone(),
        naming.clone(),
        Gaps::new(bus.clone(), config.clone()),
        &config,
        &tracker,
        internal.clone(),
    );
    tracker.spawn(interest::run(
        hub.clone(),
        bus.clone(),
        naming.clone(),
        interest_rx,
        config.unsubscribe_delay,
        internal.clone(),
    ));
    tracker.spawn(sample(hub.clone(), metrics.clone(), internal.clone()));
    let verifier = config
        .jwt
        .as_ref()
        .map(|key| auth::Verifier::new(key).map(|v| v.require_exp(config.require_exp)))
        .transpose()?;
    let limits = http_limits(&config);
    let hooks = hooks::Hooks::new(config.hooks.clone())?;
    let node = Node::new(config, hub, bus.clone(), naming, metrics, verifier, hooks);
    if let Some(batches) = node.hooks().disconnects(internal.clone()) {
        tracker.spawn(batches);
    }
    if let Some(presence) = node.presence() {
        tracker.spawn(presence.clone().run(internal.clone()));
    }

    if let Some(addr) = node.config().metrics_listen {
        let listener = TcpListener::bind(addr).await?;
        tracker.spawn(serve_metrics(listener, node.clone(), limits, internal.clone()));
    }
    let app = routes::router(node.clone());
    let drained = {
        let node = node.clone();
        async move {
            shutdown.cancelled().await;
            shutdown::drain(&node).await;
        }
    };
    accept::serve(listener, app, limits, drained).await?;

    bus.close().await;
    internal.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Serves `/metrics` alone on `--metrics-listen` until `stop`, with room for a scraper or two.
async fn serve_metrics(listener: TcpListener, node: Node, limits: accept::Limits, stop: CancellationToken) {
    let app = routes::metrics_router(node);
    let limits = accept::Limits {
        max_connections: METRICS_CONNECTIONS,
        ..limits
    };
    if let Err(e) = accept::serve(listener, app, limits, stop.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

/// The bus `config` asks for, handing what it receives to `sink`: the embedded one without
/// `--redis`, else Redis Cluster.
async fn connect(
    config: &Config,
    sink: Arc<worker::Dispatch>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Bus, BusError> {
    if config.redis.is_empty() {
        tracing::info!("no --redis: running alone on the embedded in-process bus");
        metrics::bus_up(true);
        return Ok(Bus::Memory(MemoryBus::new(sink)));
    }
    let bus = RedisBus::connect(
        &config.redis,
        &config.node_id,
        config.redis_timeout,
        config.publish_replicas,
        sink,
        tracker,
        cancel.clone(),
    )
    .await?;
    Ok(Bus::Redis(bus))
}

/// The main listener's limits; the HTTP connection cap derived from the open-files limit unless
/// set. Warns when WebSockets up to `--max-connections` could use up the descriptors left.
fn http_limits(config: &Config) -> accept::Limits {
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
    let max_connections = config
        .max_http_connections
        .unwrap_or_else(|| config::http_connection_cap(open_files));
    let left = open_files.saturating_sub(max_connections as u64 + config::RESERVED_FILES);
    if config.max_connections as u64 > left {
        tracing::warn!(
            open_files,
            max_http_connections = max_connections,
            max_connections = config.max_connections,
            "--max-connections is more than the open-files limit leaves for WebSockets ({left}): \
             raise the limit or lower --max-connections, or the node may run out of descriptors"
        );
    }
    tracing::info!(
        open_files,
        max_http_connections = max_connections,
        "HTTP connection cap"
    );
    accept::Limits {
        header_timeout: config.http_header_timeout,
        max_connections,
    }
}

async fn sample(hub: Hub, recorder: PrometheusHandle, cancel: CancellationToken) {
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = cancel.cancelled() => return,
        }
        metrics::sample(hub.rooms(), hub.topics(), &hub.queue_depths());
        // Histogram samples wait in the recorder until folded into their buckets, which a scrape
        // does too; without this a node nobody scrapes would keep every sample (one per socket per
        // second for the queue depths).
        recorder.run_upkeep();
        if ticks % TRIM_EVERY_TICKS == 0 {
            release_free_memory();
        }
    }
}

/// Hands memory that is free but kept by the allocator back to the system. A burst of connections
/// leaves a lot of it behind (every pending upgrade holds HTTP buffers), which glibc keeps in its
/// arenas: measured after 18,000 connections ramped at 3,000/s, 14.7 KB of RSS per connection
/// without this, 9.2 KB with it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap under its locks; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
