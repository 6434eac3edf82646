//! Metric names, grouped by subsystem, and the Prometheus recorder.
//!
//! Labels are bounded sets (close reasons, error codes, sources): never room or user ids. The hot
//! path records once per message (adding the fan-out count), never once per socket per frame.

use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::close::{CloseReason, ErrorCode};

// Connections.
pub const CONNECTIONS_OPEN: &str = "shardcast_connections_open";
pub const CONNECTIONS_ACCEPTED: &str = "shardcast_connections_accepted_total";
pub const CONNECTIONS_CLOSED: &str = "shardcast_connections_closed_total";
pub const HANDSHAKES_IN_PROGRESS: &str = "shardcast_handshakes_in_progress";
pub const HANDSHAKES_REFUSED: &str = "shardcast_handshakes_refused_total";
// Rooms and subscriptions.
pub const ROOMS_LOCAL: &str = "shardcast_rooms_local";
pub const TOPICS_LOCAL: &str = "shardcast_topics_local";
pub const SUBSCRIPTIONS: &str = "shardcast_channel_subscriptions";
pub const JOIN_WAIT: &str = "shardcast_join_wait_seconds";
// Messages.
pub const PUBLISHED: &str = "shardcast_messages_published_total";
pub const BUS_RECEIVED: &str = "shardcast_bus_messages_received_total";
pub const BUS_DROPPED: &str = "shardcast_bus_messages_dropped_total";
pub const DELIVERIES: &str = "shardcast_deliveries_total";
pub const DELIVERED_BYTES: &str = "shardcast_delivered_bytes_total";
pub const DELIVERED_FULL_BYTES: &str = "shardcast_delivered_full_bytes_total";
pub const DELTA_VALUES: &str = "shardcast_delta_values_total";
pub const LINKED_FRAMES: &str = "shardcast_linked_frames_total";
pub const SOCKET_WRITES: &str = "shardcast_socket_writes_total";
pub const WRITE_GATHER: &str = "shardcast_write_gather_seconds";
// History.
pub const RECOVERIES: &str = "shardcast_recoveries_total";
pub const REPLAYED: &str = "shardcast_replayed_messages_total";
pub const HISTORY_READS: &str = "shardcast_history_reads_total";
pub const GAP_FILLED: &str = "shardcast_history_gap_filled_total";
// Keyed messages.
pub const CONFLATING: &str = "shardcast_conflating_sockets";
pub const SKIPPED: &str = "shardcast_conflated_values_total";
pub const LATEST_SENT: &str = "shardcast_latest_values_sent_total";
pub const PRESENCE_ROOMS: &str = "shardcast_presence_rooms";
pub const PRESENCE_WRITES: &str = "shardcast_presence_writes_total";
pub const PRESENCE_READS: &str = "shardcast_presence_reads_total";
pub const PRESENCE_ERRORS: &str = "shardcast_presence_errors_total";
pub const PRESENCE_AGE: &str = "shardcast_presence_contribution_age_seconds";
pub const PUBLISH_WAIT: &str = "shardcast_publish_wait_seconds";
pub const UNENCODABLE: &str = "shardcast_unencodable_messages_total";
pub const LATENCY: &str = "shardcast_delivery_latency_seconds";
// Slow consumers.
pub const SLOW_CONSUMER_DROPS: &str = "shardcast_slow_consumer_drops_total";
pub const QUEUED_BYTES: &str = "shardcast_outbound_queued_bytes";
pub const QUEUE_DEPTH: &str = "shardcast_outbound_queue_depth_bytes";
// Bus health.
pub const BUS_UP: &str = "shardcast_bus_up";
pub const BUS_PUBLISH_ERRORS: &str = "shardcast_bus_publish_errors_total";
pub const BUS_RECONNECTS: &str = "shardcast_bus_reconnects_total";
pub const BUS_RESUBSCRIPTIONS: &str = "shardcast_bus_resubscriptions_total";
// Bad input.
pub const BAD_FRAMES: &str = "shardcast_bad_frames_total";
pub const AUTH_FAILURES: &str = "shardcast_auth_failures_total";
// Client frames.
pub const INFLATED_BYTES: &str = "shardcast_inflated_bytes_total";

/// Buckets of the histograms in seconds.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process-wide recorder, installed on first use (several nodes in one test process share it).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(JOIN_WAIT.into()), SECONDS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PUBLISH_WAIT.into()), SECONDS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WRITE_GATHER.into()), SECONDS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HOOK_LATENCY.into()), SECONDS))
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(QUEUE_DEPTH.into()),
                        &[0.0, 1024.0, 8192.0, 65536.0, 262144.0, 524288.0, 1048576.0, 4194304.0],
                    )
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (an embedding application); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            HOT.get_or_init(|| HotPath {
                bus_received: counter!(BUS_RECEIVED),
                latency: histogram!(LATENCY),
                deliveries: counter!(DELIVERIES),
                delivered_bytes: counter!(DELIVERED_BYTES),
                delivered_full_bytes: counter!(DELIVERED_FULL_BYTES),
                delta_values: counter!(DELTA_VALUES, "form" => "delta"),
                whole_values: counter!(DELTA_VALUES, "form" => "whole"),
                linked_frames: counter!(LINKED_FRAMES),
                socket_writes: counter!(SOCKET_WRITES),
                unencodable: counter!(UNENCODABLE),
                write_gather: histogram!(WRITE_GATHER),
                inflated_bytes: counter!(INFLATED_BYTES),
            });
            handle
        })
        .clone()
}

/// Handles of the metrics recorded once per message, registered when the recorder is installed:
/// recording through a handle skips the registry lookup each `counter!` call makes. Until then
/// (no recorder) these records are skipped, as the macros would be no-ops.
struct HotPath {
    bus_received: Counter,
    latency: Histogram,
    deliveries: Counter,
    delivered_bytes: Counter,
    delivered_full_bytes: Counter,
    delta_values: Counter,
    whole_values: Counter,
    linked_frames: Counter,
    socket_writes: Counter,
    unencodable: Counter,
    write_gather: Histogram,
    inflated_bytes: Counter,
}

static HOT: OnceLock<HotPath> = OnceLock::new();

// Every value the bounded labels take, so each series exists (at zero) from start-up. A variant
// added to `CloseReason` or `ErrorCode` stops the `*_slot` matches compiling until it has a slot,
// and the const checks below then fail until it is in the list at that slot.
pub const CLOSE_REASONS: [CloseReason; 11] = [
    CloseReason::Normal,
    CloseReason::SlowConsumer,
    CloseReason::FrameTooLarge,
    CloseReason::Idle,
    CloseReason::Auth,
    CloseReason::Drain,
    CloseReason::Error,
    CloseReason::RateLimited,
    CloseReason::ProtocolError,
    CloseReason::InvalidPayload,
    CloseReason::Removed,
];
/// Codes a socket's command can fail with (`unauthorized` is HTTP only).
pub const BAD_FRAME_CODES: [ErrorCode; 13] = [
    ErrorCode::BadFrame,
    ErrorCode::UnknownOp,
    ErrorCode::BadField,
    ErrorCode::BadRoom,
    ErrorCode::BadUser,
    ErrorCode::BadData,
    ErrorCode::TooManyRooms,
    ErrorCode::NotJoined,
    ErrorCode::Unavailable,
    ErrorCode::Forbidden,
    ErrorCode::RateLimited,
    ErrorCode::Unconfirmed,
    ErrorCode::TooManyKeys,
];
pub const PUBLISH_SOURCES: [&str; 2] = ["ws", "http"];
pub const DROP_REASONS: [&str; 6] = [
    "queue_full",
    "lagged",
    "undecodable",
    "mismatch",
    "too_deep",
    "duplicate",
];
pub const UPGRADE_REFUSED_REASONS: [&str; 6] = ["auth", "origin", "capacity", "draining", "bad_user", "unavailable"];
/// How an HTTP connection was shed at the cap: refused on arrival, or closed to make room.
pub const HTTP_SHED_HOW: [&str; 2] = ["refused", "evicted"];
/// What an HTTP client was too slow to send.
pub const HTTP_TIMEOUT_PHASES: [&str; 2] = ["header", "body"];

const fn close_reason_slot(r: CloseReason) -> usize {
    match r {
        CloseReason::Normal => 0,
        CloseReason::SlowConsumer => 1,
        CloseReason::FrameTooLarge => 2,
        CloseReason::Idle => 3,
        CloseReason::Auth => 4,
        CloseReason::Drain => 5,
        CloseReason::Error => 6,
        CloseReason::RateLimited => 7,
        CloseReason::ProtocolError => 8,
        CloseReason::InvalidPayload => 9,
        CloseReason::Removed => 10,
    }
}

const fn bad_frame_slot(c: ErrorCode) -> usize {
    match c {
        ErrorCode::BadFrame => 0,
        ErrorCode::UnknownOp => 1,
        ErrorCode::BadField => 2,
        ErrorCode::BadRoom => 3,
        ErrorCode::BadUser => 4,
        ErrorCode::BadData => 5,
        ErrorCode::TooManyRooms => 6,
        ErrorCode::NotJoined => 7,
        ErrorCode::Unavailable => 8,
        ErrorCode::Forbidden => 9,
        ErrorCode::RateLimited => 10,
        ErrorCode::Unconfirmed => 11,
        ErrorCode::TooManyKeys => 12,
        ErrorCode::Unauthorized => usize::MAX,
    }
}

const _: () = {
    let mut i = 0;
    while i < CLOSE_REASONS.len() {
        assert!(close_reason_slot(CLOSE_REASONS[i]) == i);
        i += 1;
    }
    let mut i = 0;
    while i < BAD_FRAME_CODES.len() {
        assert!(bad_frame_slot(BAD_FRAME_CODES[i]) == i);
        i += 1;
    }
};

/// What kind of metric a row of [`METRICS`] describes.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric's kind, name, unit and help text, as `/metrics` describes it.
const METRICS: &[(Kind, &str, Unit, &str)] = &[
    (Kind::Gauge, CONNECTIONS_OPEN, Unit::Count, "WebSocket connections open now."),
    (Kind::Counter, CONNECTIONS_ACCEPTED, Unit::Count, "WebSocket connections accepted (upgraded)."),
    (Kind::Counter, CONNECTIONS_CLOSED, Unit::Count, "WebSocket connections closed, by reason."),
    (Kind::Gauge, HANDSHAKES_IN_PROGRESS, Unit::Count, "WebSocket handshakes being answered now (token, inbox subscription); at most --max-handshakes."),
    (Kind::Counter, HANDSHAKES_REFUSED, Unit::Count, "WebSocket upgrades answered 503 with Retry-After at once because --max-handshakes were in progress (a connect storm)."),
    (Kind::Gauge, ROOMS_LOCAL, Unit::Count, "Rooms with local members (sampled every second)."),
    (Kind::Gauge, TOPICS_LOCAL, Unit::Count, "Rooms and user inboxes with local members (sampled every second)."),
    (Kind::Gauge, SUBSCRIPTIONS, Unit::Count, "Bus channels (room shards and user inboxes) this node is subscribed to."),
    (Kind::Counter, PUBLISHED, Unit::Count, "Messages this node handed to the bus, by source (ws or http)."),
    (Kind::Counter, BUS_RECEIVED, Unit::Count, "Envelopes received from the bus and decoded."),
    (Kind::Counter, BUS_DROPPED, Unit::Count, "Bus messages dropped before delivery, by reason."),
    (Kind::Counter, DELIVERIES, Unit::Count, "Frames queued to local sockets (one per message per socket)."),
    (Kind::Counter, DELIVERED_BYTES, Unit::Bytes, "Bytes queued to local sockets."),
    (Kind::Counter, DELIVERED_FULL_BYTES, Unit::Bytes, "What the bytes queued to local sockets would have been uncompressed and without deltas; shardcast_delivered_bytes_total over this is the share of bytes that went on the wire."),
    (Kind::Counter, DELTA_VALUES, Unit::Count, "Keyed values queued to sockets that joined with delta, by form (delta: the difference to the socket's previous value; whole)."),
    (Kind::Counter, LINKED_FRAMES, Unit::Count, "Frames queued compressed after their room's last messages (--compress-context) to sockets that keep the node's context; the rest of their compressed frames went compressed alone."),
    (Kind::Counter, SOCKET_WRITES, Unit::Count, "Writes of delivered frames to local sockets (one per socket per delivery batch or paced turn); deliveries per write is how well writes are coalesced."),
    (Kind::Counter, UNENCODABLE, Unit::Count, "Deliveries skipped because the message has no form in the socket's encoding."),
    (Kind::Histogram, LATENCY, Unit::Seconds, "Time from publish (envelope timestamp) to fan-out on this node."),
    (Kind::Histogram, WRITE_GATHER, Unit::Seconds, "Adaptive writes: after each turn of a delivery worker, how long frames gather before a socket's next write (0 when quiet)."),
    (Kind::Histogram, JOIN_WAIT, Unit::Seconds, "Time a join (a room, or a new socket's inbox) waited for its channels to be subscribed."),
    (Kind::Counter, SLOW_CONSUMER_DROPS, Unit::Count, "Sockets closed with 4008 because their queued bytes passed the budget."),
    (Kind::Gauge, QUEUED_BYTES, Unit::Bytes, "Outbound bytes queued over all local sockets (sampled every second)."),
    (Kind::Histogram, QUEUE_DEPTH, Unit::Bytes, "Per-socket outbound queued bytes (sampled every second)."),
    (Kind::Gauge, BUS_UP, Unit::Count, "1 when the bus is connected and every subscription is in place, else 0."),
    (Kind::Counter, BUS_PUBLISH_ERRORS, Unit::Count, "Publishes the bus refused or failed."),
    (Kind::Counter, BUS_RECONNECTS, Unit::Count, "Redis connections rebuilt."),
    (Kind::Counter, BUS_RESUBSCRIPTIONS, Unit::Count, "Channels subscribed again after a reconnect or slot move."),
    (Kind::Counter, BAD_FRAMES, Unit::Count, "Client commands refused with an error frame, by error code."),
    (Kind::Counter, AUTH_FAILURES, Unit::Count, "Requests and upgrades refused for missing or wrong credentials."),
    (Kind::Counter, INFLATED_BYTES, Unit::Bytes, "Bytes of compressed client messages (permessage-deflate) after inflating them."),
    (Kind::Counter, RATE_LIMITED, Unit::Count, "Client commands refused by the per-connection rate limit."),
    (Kind::Counter, RECOVERIES, Unit::Count, "Joins with `since`, by outcome: recovered (everything missed was replayed) or not_recovered."),
    (Kind::Counter, REPLAYED, Unit::Count, "Messages replayed to joins that recovered."),
    (Kind::Gauge, CONFLATING, Unit::Count, "Sockets conflating now: behind past --conflate-above, served the latest value of each key of their --conflate rooms."),
    (Kind::Counter, SKIPPED, Unit::Count, "Values of a key a socket did not get, replaced by a newer one, by reason: conflated (in a conflating socket's queue) or max_rate (waiting for the join's max_rate)."),
    (Kind::Counter, LATEST_SENT, Unit::Count, "Latest values sent to joins with `latest`."),
    (Kind::Counter, HISTORY_READS, Unit::Count, "History reads by source: store (sent to Redis, or the embedded ring) or shared (a join served by another join's read)."),
    (Kind::Histogram, PUBLISH_WAIT, Unit::Seconds, "With --publish-replicas: how long a publish waited for its replicas to confirm it (one WAIT covers a batch)."),
    (Kind::Counter, GAP_FILLED, Unit::Count, "Messages of a shard with history the node missed (a reconnect, failover or slot move) and read back, by outcome: filled, or lost (no longer in history)."),
    (Kind::Counter, UPGRADES_REFUSED, Unit::Count, "WebSocket upgrades refused before the socket opened, by reason."),
    (Kind::Gauge, HTTP_CONNECTIONS_OPEN, Unit::Count, "Connections open now that are not upgraded WebSockets (HTTP requests, keep-alive, upgrades in progress)."),
    (Kind::Counter, HTTP_CONNECTIONS_SHED, Unit::Count, "HTTP connections shed at --max-http-connections: refused on arrival, or evicted (closed to make room after waiting on their client)."),
    (Kind::Counter, HTTP_TIMEOUTS, Unit::Count, "HTTP connections closed because the client was too slow to send its headers (or idled) or its body, by phase."),
    (Kind::Counter, PUBLISH_RATE_LIMITED, Unit::Count, "POST /publish requests answered 429 by the per-address rate limit."),
    (Kind::Gauge, PRESENCE_ROOMS, Unit::Count, "Rooms whose presence this node tracks: with local members or watchers, or a contribution still to withdraw."),
    (Kind::Counter, PRESENCE_WRITES, Unit::Count, "Presence writes to the store, by kind: a room's contribution, or this node's users."),
    (Kind::Counter, PRESENCE_READS, Unit::Count, "Presence reads from the store: a room's total (each tick per tracked room, or on demand) or a user's connections."),
    (Kind::Counter, PRESENCE_ERRORS, Unit::Count, "Presence writes and reads that failed (retried next tick)."),
    (Kind::Gauge, PRESENCE_AGE, Unit::Seconds, "Age of this node's oldest room contribution at the last tick; near --presence-ttl means refreshes are late and counts may blink."),
];

/// Help text and units for every metric, and a zero for every series, so dashboards and `rate()`
/// work before the first event.
pub fn describe() {
    for &(kind, name, unit, help) in METRICS.iter().chain(HOOK_METRICS) {
        match kind {
            Kind::Counter => describe_counter!(name, unit, help),
            Kind::Gauge => describe_gauge!(name, unit, help),
            Kind::Histogram => describe_histogram!(name, unit, help),
        }
    }
    start_at_zero();
    hooks_at_zero();
}

/// A zero for every counter series (each value of its bounded labels) and every gauge, and the
/// histograms below registered, so each exists from start-up. `shardcast_bus_up` is left to the
/// bus, which sets it on connect: a zero here would read as "bus down" on a node that never sets
/// it (the embedded bus).
fn start_at_zero() {
    for name in [
        CONNECTIONS_ACCEPTED,
        BUS_RECEIVED,
        DELIVERIES,
        DELIVERED_BYTES,
        DELIVERED_FULL_BYTES,
        LINKED_FRAMES,
        SOCKET_WRITES,
        UNENCODABLE,
        SLOW_CONSUMER_DROPS,
        BUS_PUBLISH_ERRORS,
        BUS_RECONNECTS,
        BUS_RESUBSCRIPTIONS,
        AUTH_FAILURES,
        RATE_LIMITED,
        REPLAYED,
        LATEST_SENT,
        PUBLISH_RATE_LIMITED,
        PRESENCE_READS,
        PRESENCE_ERRORS,
        HANDSHAKES_REFUSED,
        INFLATED_BYTES,
    ] {
        counter!(name).increment(0);
    }
    for kind in ["room", "users"] {
        counter!(PRESENCE_WRITES, "kind" => kind).increment(0);
    }
    for outcome in ["recovered", "not_recovered"] {
        counter!(RECOVERIES, "outcome" => outcome).increment(0);
    }
    for outcome in ["filled", "lost"] {
        counter!(GAP_FILLED, "outcome" => outcome).increment(0);
    }
    for source in ["store", "shared"] {
        counter!(HISTORY_READS, "source" => source).increment(0);
    }
    for name in [
        CONNECTIONS_OPEN,
        ROOMS_LOCAL,
        TOPICS_LOCAL,
        SUBSCRIPTIONS,
        QUEUED_BYTES,
        HTTP_CONNECTIONS_OPEN,
        PRESENCE_ROOMS,
        PRESENCE_AGE,
        HANDSHAKES_IN_PROGRESS,
        CONFLATING,
    ] {
        gauge!(name).increment(0.0);
    }
    for reason in CLOSE_REASONS {
        counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(0);
    }
    for form in ["delta", "whole"] {
        counter!(DELTA_VALUES, "form" => form).increment(0);
    }
    for reason in ["conflated", "max_rate"] {
        counter!(SKIPPED, "reason" => reason).increment(0);
    }
    for source in PUBLISH_SOURCES {
        counter!(PUBLISHED, "source" => source).increment(0);
    }
    for reason in DROP_REASONS {
        counter!(BUS_DROPPED, "reason" => reason).increment(0);
    }
    for code in BAD_FRAME_CODES {
        counter!(BAD_FRAMES, "code" => code.as_str()).increment(0);
    }
    for reason in UPGRADE_REFUSED_REASONS {
        counter!(UPGRADES_REFUSED, "reason" => reason).increment(0);
    }
    for how in HTTP_SHED_HOW {
        counter!(HTTP_CONNECTIONS_SHED, "how" => how).increment(0);
    }
    for phase in HTTP_TIMEOUT_PHASES {
        counter!(HTTP_TIMEOUTS, "phase" => phase).increment(0);
    }
    // Registering a histogram renders it with empty buckets.
    let _ = histogram!(LATENCY);
    let _ = histogram!(QUEUE_DEPTH);
    let _ = histogram!(JOIN_WAIT);
    let _ = histogram!(WRITE_GATHER);
}

/// How long a delivery worker's frames gather after a turn (0: they go at once).
pub fn write_gathered(wait: std::time::Duration) {
    if let Some(h) = HOT.get() {
        h.write_gather.record(wait.as_secs_f64());
    }
}

/// A join that waited for its subscription, however it ended.
pub fn join_waited(waited: std::time::Duration) {
    histogram!(JOIN_WAIT).record(waited.as_secs_f64());
}

pub fn connection_opened() {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
    gauge!(CONNECTIONS_OPEN).increment(1.0);
}

pub fn connection_closed(reason: CloseReason) {
    counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
    if reason == CloseReason::SlowConsumer {
        counter!(SLOW_CONSUMER_DROPS).increment(1);
    }
}

pub fn handshake_started() {
    gauge!(HANDSHAKES_IN_PROGRESS).increment(1.0);
}

pub fn handshake_ended() {
    gauge!(HANDSHAKES_IN_PROGRESS).decrement(1.0);
}

/// An upgrade refused at `--max-handshakes`.
pub fn handshake_refused() {
    counter!(HANDSHAKES_REFUSED).increment(1);
}

pub fn published(source: &'static str) {
    counter!(PUBLISHED, "source" => source).increment(1);
}

pub fn publish_error() {
    counter!(BUS_PUBLISH_ERRORS).increment(1);
}

pub fn bus_received(latency_s: f64) {
    if let Some(h) = HOT.get() {
        h.bus_received.increment(1);
        h.latency.record(latency_s.max(0.0));
    }
}

pub fn bus_dropped(reason: &'static str, n: u64) {
    counter!(BUS_DROPPED, "reason" => reason).increment(n);
}

/// What one fan-out did (a message to a topic's members, or a lane's turn), as it is counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: usize,
    pub bytes: usize,
    pub overflowed: usize,
    pub unencodable: usize,
    /// Sockets written (each once, with all its frames).
    pub writes: usize,
    /// What the delivered frames would have been uncompressed and whole (no delta).
    pub full_bytes: usize,
    /// Keyed values delivered to sockets that joined with `delta`: as deltas, and whole.
    pub deltas: usize,
    pub wholes: usize,
    /// Frames delivered compressed after their room's last messages (`--compress-context`).
    pub linked: usize,
}

pub fn delivered(d: &Delivery) {
    if let Some(h) = HOT.get() {
        h.deliveries.increment(d.delivered as u64);
        h.delivered_bytes.increment(d.bytes as u64);
        h.delivered_full_bytes.increment(d.full_bytes as u64);
        if d.deltas + d.wholes > 0 {
            h.delta_values.increment(d.deltas as u64);
            h.whole_values.increment(d.wholes as u64);
        }
        if d.linked > 0 {
            h.linked_frames.increment(d.linked as u64);
        }
        h.socket_writes.increment(d.writes as u64);
        if d.unencodable > 0 {
            h.unencodable.increment(d.unencodable as u64);
        }
    }
}

/// Bytes of a compressed client message handed on after inflating them.
pub fn inflated(bytes: u64) {
    if let Some(h) = HOT.get() {
        h.inflated_bytes.increment(bytes);
    }
}

/// A join with `since`: whether everything missed was replayed.
pub fn recovery(recovered: bool) {
    let outcome = if recovered { "recovered" } else { "not_recovered" };
    counter!(RECOVERIES, "outcome" => outcome).increment(1);
}

pub fn replayed(messages: usize) {
    counter!(REPLAYED).increment(messages as u64);
}

/// A socket began (1) or stopped (-1) conflating.
pub fn conflating(change: i8) {
    gauge!(CONFLATING).increment(f64::from(change));
}

/// Values of a key a socket will not get: `conflated` or `max_rate`.
pub fn skipped(reason: &'static str, values: u64) {
    counter!(SKIPPED, "reason" => reason).increment(values);
}

/// Latest values sent to a join.
pub fn latest_sent(values: usize) {
    counter!(LATEST_SENT).increment(values as u64);
}

/// One read of a channel's history sent to the store, shared by `waiters` joins.
pub fn history_read(waiters: usize) {
    counter!(HISTORY_READS, "source" => "store").increment(1);
    counter!(HISTORY_READS, "source" => "shared").increment(waiters.saturating_sub(1) as u64);
}

/// Messages a node read back from history after its shard skipped them, and those it could not.
pub fn gap_filled(filled: usize, lost: usize) {
    counter!(GAP_FILLED, "outcome" => "filled").increment(filled as u64);
    counter!(GAP_FILLED, "outcome" => "lost").increment(lost as u64);
}

pub fn presence_write(kind: &'static str) {
    counter!(PRESENCE_WRITES, "kind" => kind).increment(1);
}

pub fn presence_read() {
    counter!(PRESENCE_READS).increment(1);
}

pub fn presence_error() {
    counter!(PRESENCE_ERRORS).increment(1);
}

/// Rooms tracked at a tick, and the age of the oldest contribution then.
pub fn presence_rooms(rooms: usize, oldest: std::time::Duration) {
    gauge!(PRESENCE_ROOMS).set(rooms as f64);
    gauge!(PRESENCE_AGE).set(oldest.as_secs_f64());
}

/// One WAIT round confirming `publishes` publishes to rooms with history.
pub fn publish_wait(took: std::time::Duration, publishes: usize) {
    let h = histogram!(PUBLISH_WAIT);
    for _ in 0..publishes {
        h.record(took.as_secs_f64());
    }
}

pub fn bad_frame(code: &'static str) {
    counter!(BAD_FRAMES, "code" => code).increment(1);
}

pub fn bus_up(up: bool) {
    gauge!(BUS_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn bus_reconnect() {
    counter!(BUS_RECONNECTS).increment(1);
}

pub fn resubscribed(channels: usize) {
    counter!(BUS_RESUBSCRIPTIONS).increment(channels as u64);
}

pub fn subscriptions(channels: usize) {
    gauge!(SUBSCRIPTIONS).set(channels as f64);
}

/// Sampled state: topic counts and per-socket queue depths.
pub fn sample(rooms: usize, topics: usize, depths: &[usize]) {
    gauge!(ROOMS_LOCAL).set(rooms as f64);
    gauge!(TOPICS_LOCAL).set(topics as f64);
    gauge!(QUEUED_BYTES).set(depths.iter().sum::<usize>() as f64);
    let h = histogram!(QUEUE_DEPTH);
    for d in depths {
        h.record(*d as f64);
    }
}

// Limits and auth (appended by the security work).
pub const RATE_LIMITED: &str = "shardcast_rate_limited_total";
pub const UPGRADES_REFUSED: &str = "shardcast_upgrades_refused_total";

pub fn rate_limited() {
    counter!(RATE_LIMITED).increment(1);
}

/// An upgrade refused before the socket opened: `auth`, `origin`, `capacity`, `draining`, `bad_user`, `unavailable`.
pub fn upgrade_refused(reason: &'static str) {
    counter!(UPGRADES_REFUSED, "reason" => reason).increment(1);
    if reason == "auth" {
        counter!(AUTH_FAILURES).increment(1);
    }
}

// HTTP connections and the publish rate (appended by the hardening work).
pub const HTTP_CONNECTIONS_OPEN: &str = "shardcast_http_connections_open";
pub const HTTP_CONNECTIONS_SHED: &str = "shardcast_http_connections_shed_total";
pub const HTTP_TIMEOUTS: &str = "shardcast_http_timeouts_total";
pub const PUBLISH_RATE_LIMITED: &str = "shardcast_publish_rate_limited_total";

pub fn http_connection_opened() {
    gauge!(HTTP_CONNECTIONS_OPEN).increment(1.0);
}

pub fn http_connection_closed() {
    gauge!(HTTP_CONNECTIONS_OPEN).decrement(1.0);
}

/// An HTTP connection shed at the cap: `refused` or `evicted`.
pub fn http_shed(how: &'static str) {
    counter!(HTTP_CONNECTIONS_SHED, "how" => how).increment(1);
}

/// A client too slow with its `header` or `body`.
pub fn http_timeout(phase: &'static str) {
    counter!(HTTP_TIMEOUTS, "phase" => phase).increment(1);
}

pub fn publish_rate_limited() {
    counter!(PUBLISH_RATE_LIMITED).increment(1);
}

// Backend hooks (appended by the hooks work).
pub const HOOK_REQUESTS: &str = "shardcast_hook_requests_total";
pub const HOOK_LATENCY: &str = "shardcast_hook_latency_seconds";
pub const HOOK_ERRORS: &str = "shardcast_hook_errors_total";
pub const HOOK_BREAKERS_OPEN: &str = "shardcast_hook_breakers_open";

/// The hooks, the `hook` label.
pub const HOOKS: [&str; 4] = ["connect", "join", "publish", "disconnect"];
/// Why a hook failed, the `kind` label ([`crate::hooks::HookError::kind`]).
pub const HOOK_ERROR_KINDS: [&str; 8] = [
    "timeout",
    "request",
    "redirect",
    "status",
    "too_large",
    "answer",
    "open",
    "busy",
];

const HOOK_METRICS: &[(Kind, &str, Unit, &str)] = &[
    (Kind::Counter, HOOK_REQUESTS, Unit::Count, "Requests sent to hook backends, by hook (connect, join, publish, disconnect)."),
    (Kind::Histogram, HOOK_LATENCY, Unit::Seconds, "Time a hook backend took to answer (or to fail), by hook."),
    (Kind::Counter, HOOK_ERRORS, Unit::Count, "Hook requests that had no usable answer, by hook and kind (timeout, request, redirect, status, too_large, answer; open: failed at once by an open circuit breaker; busy: --hook-max-inflight reached)."),
    (Kind::Gauge, HOOK_BREAKERS_OPEN, Unit::Count, "Hook backends whose circuit breaker is open now (requests fail at once for a cool-down), by hook."),
];

fn hooks_at_zero() {
    for hook in HOOKS {
        counter!(HOOK_REQUESTS, "hook" => hook).increment(0);
        for kind in HOOK_ERROR_KINDS {
            counter!(HOOK_ERRORS, "hook" => hook, "kind" => kind).increment(0);
        }
        let _ = histogram!(HOOK_LATENCY, "hook" => hook);
        gauge!(HOOK_BREAKERS_OPEN, "hook" => hook).increment(0.0);
    }
}

/// A hook request answered or failed after `took`.
pub fn hook_request(hook: &'static str, took: std::time::Duration) {
    counter!(HOOK_REQUESTS, "hook" => hook).increment(1);
    histogram!(HOOK_LATENCY, "hook" => hook).record(took.as_secs_f64());
}

pub fn hook_error(hook: &'static str, kind: &'static str) {
    counter!(HOOK_ERRORS, "hook" => hook, "kind" => kind).increment(1);
}

/// A breaker of one of `hook`'s backends opened (`true`) or closed.
pub fn hook_breaker(hook: &'static str, open: bool) {
    gauge!(HOOK_BREAKERS_OPEN, "hook" => hook).increment(if open { 1.0 } else { -1.0 });
}
