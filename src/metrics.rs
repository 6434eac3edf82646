//! Metric names, grouped by subsystem, and the Prometheus recorder.
//!
//! Labels are bounded sets (close reasons, error codes, sources): never room or user ids. The hot
//! path records once per message (adding the fan-out count), never once per socket per frame.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{close::CloseReason, hub::Delivery};

// Connections.
pub const CONNECTIONS_OPEN: &str = "shardcast_connections_open";
pub const CONNECTIONS_ACCEPTED: &str = "shardcast_connections_accepted_total";
pub const CONNECTIONS_CLOSED: &str = "shardcast_connections_closed_total";
// Rooms and subscriptions.
pub const ROOMS_LOCAL: &str = "shardcast_rooms_local";
pub const TOPICS_LOCAL: &str = "shardcast_topics_local";
pub const SUBSCRIPTIONS: &str = "shardcast_channel_subscriptions";
// Messages.
pub const PUBLISHED: &str = "shardcast_messages_published_total";
pub const BUS_RECEIVED: &str = "shardcast_bus_messages_received_total";
pub const BUS_DROPPED: &str = "shardcast_bus_messages_dropped_total";
pub const DELIVERIES: &str = "shardcast_deliveries_total";
pub const DELIVERED_BYTES: &str = "shardcast_delivered_bytes_total";
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

/// The process-wide recorder, installed on first use (several nodes in one test process share it).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(LATENCY.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(QUEUE_DEPTH.into()),
                        &[
                            0.0, 1024.0, 8192.0, 65536.0, 262144.0, 524288.0, 1048576.0, 4194304.0,
                        ],
                    )
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (an embedding application); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
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

pub fn published(source: &'static str) {
    counter!(PUBLISHED, "source" => source).increment(1);
}

pub fn publish_error() {
    counter!(BUS_PUBLISH_ERRORS).increment(1);
}

pub fn bus_received(latency_s: f64) {
    counter!(BUS_RECEIVED).increment(1);
    histogram!(LATENCY).record(latency_s.max(0.0));
}

pub fn bus_dropped(reason: &'static str, n: u64) {
    counter!(BUS_DROPPED, "reason" => reason).increment(n);
}

pub fn delivered(d: &Delivery) {
    counter!(DELIVERIES).increment(d.delivered as u64);
    counter!(DELIVERED_BYTES).increment(d.bytes as u64);
    if d.unencodable > 0 {
        counter!(UNENCODABLE).increment(d.unencodable as u64);
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
