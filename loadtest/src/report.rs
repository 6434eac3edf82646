//! The run's results: a table for people, JSON for scripts.

use std::{collections::BTreeMap, fmt::Write};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    feeds::Feed,
    procfs::Sample,
    stats::{Reading, WireTally},
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub urls: Vec<String>,
    pub encoding: String,
    pub publish_via: String,
    pub payload_bytes: usize,
    /// Publishing window, seconds.
    pub duration_s: f64,
    /// Publishing window plus the drain until the last delivery, seconds.
    pub measured_s: f64,
    pub connections: Connections,
    pub publish: Publish,
    pub delivery: Delivery,
    pub latency_ms: Latency,
    /// The latencies behind `latency_ms` as (microseconds, count) pairs, when asked for
    /// (`--export-latency`): reports of several generator processes merge through them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Vec<(u64, u64)>>,
    /// From sending a publish to its answer: a node answers one socket's commands one after
    /// another, so a publisher falls behind once this passes the time between its publishes.
    pub publish_answer_ms: Latency,
    pub nodes: Vec<NodeUsage>,
    pub node_cpu_s: f64,
    /// Node CPU over the measured window divided by frames delivered in it.
    pub node_cpu_ns_per_frame: Option<f64>,
    /// Growth of the nodes' resident memory since before the first connection, per connection.
    pub node_rss_bytes_per_conn: Option<f64>,
    /// The feed published (`--feed`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed: Option<Feed>,
    /// Feed readers' bytes on the wire beside their payloads, one row per way of reading.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wire: Vec<WireRow>,
    pub aux: Vec<AuxUsage>,
    pub loadtest_cpu_s: f64,
}

/// What the sockets of one way of reading a feed carried.
#[derive(Debug, Serialize)]
pub struct WireRow {
    /// `plain`, `delta`, `deflate` or `delta+deflate`.
    pub reading: &'static str,
    pub readers: u64,
    /// Readers whose node agreed to permessage-deflate.
    pub deflate_negotiated: u64,
    /// Values rebuilt.
    pub messages: u64,
    /// Bytes the readers' sockets read (framing and envelope included), and of the values.
    pub read_bytes: u64,
    pub payload_bytes: u64,
    pub read_bytes_per_message: f64,
    pub payload_bytes_per_message: f64,
    /// `read_bytes / payload_bytes`.
    pub wire_per_payload: f64,
    /// Bytes read per message over the plain readers' of the same run, when there are some.
    pub vs_plain: Option<f64>,
    pub compressed_messages: u64,
    pub deltas: u64,
    pub wholes: u64,
    /// Values that could not be rebuilt or were not what was published.
    pub corrupted: u64,
    /// Values with nothing recorded to check them against.
    pub unchecked: u64,
}

impl WireRow {
    /// One row per way of reading, plain first.
    pub fn all(tallies: &BTreeMap<Reading, WireTally>) -> Vec<WireRow> {
        let per = |t: &WireTally, bytes: u64| bytes as f64 / t.messages.max(1) as f64;
        let plain = tallies
            .get(&Reading::default())
            .filter(|t| t.messages > 0)
            .map(|t| per(t, t.read_bytes));
        tallies
            .iter()
            .map(|(r, t)| WireRow {
                reading: r.name(),
                readers: t.readers,
                deflate_negotiated: t.negotiated,
                messages: t.messages,
                read_bytes: t.read_bytes,
                payload_bytes: t.payload_bytes,
                read_bytes_per_message: per(t, t.read_bytes),
                payload_bytes_per_message: per(t, t.payload_bytes),
                wire_per_payload: t.read_bytes as f64 / t.payload_bytes.max(1) as f64,
                vs_plain: plain.map(|p| per(t, t.read_bytes) / p),
                compressed_messages: t.compressed,
                deltas: t.deltas,
                wholes: t.wholes,
                corrupted: t.corrupted,
                unchecked: t.unchecked,
            })
            .collect()
    }

    /// Its row of a report table.
    pub fn row(&self) -> (String, String) {
        let vs = self
            .vs_plain
            .map_or(String::new(), |v| format!(" = {:.1} % of plain", 100.0 * v));
        (
            format!("wire {}", self.reading),
            format!(
                "{:.0} B read per message for {:.0} B of value = {:.1} %{vs}; {} readers (deflate agreed {}); \
                 compressed {}, deltas {}, whole {}; corrupted {}, unchecked {}",
                self.read_bytes_per_message,
                self.payload_bytes_per_message,
                100.0 * self.wire_per_payload,
                self.readers,
                self.deflate_negotiated,
                self.compressed_messages,
                self.deltas,
                self.wholes,
                self.corrupted,
                self.unchecked
            ),
        )
    }
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub planned: usize,
    pub connected: usize,
    /// Connect or join failures by class.
    pub failed: BTreeMap<String, u64>,
    /// Established connections the node ended before the run was over, by close code.
    pub closed_by_node: BTreeMap<String, u64>,
    /// Failed tries of connections, before they connected or gave up (`--connect-attempts`).
    pub retried: u64,
    pub ramp_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Publish {
    pub publishers: usize,
    pub target_rate: f64,
    pub sent: u64,
    pub rate: f64,
    /// Publishes refused (HTTP status other than 202, or a failed request).
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct Delivery {
    /// Sent messages times their planned receivers.
    pub expected: u64,
    pub received: u64,
    pub rate: f64,
    /// Messages never received by a connection that stayed open.
    pub lost: u64,
    /// Messages not received by connections the node closed (counted apart).
    pub lost_on_closed: u64,
    /// Sequence numbers skipped when a later one arrived first.
    pub gap_missing: u64,
    /// Connections expecting messages that received none of them.
    pub silent_members: u64,
    pub reordered: u64,
    pub duplicates: u64,
    /// Messages from publishers a connection was not expecting.
    pub unexpected: u64,
    pub error_frames: u64,
    pub reconnect_frames: u64,
    pub unparsed_frames: u64,
    /// Messages that carried a shard and position (the room keeps history).
    pub positioned: u64,
}

/// Milliseconds, from a histogram of microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// `p50 … p90 … p99 … max … (n=…)`, for quantities without a p99.9 worth showing.
    pub fn brief(&self) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  (n={})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }

    /// `p50 … p90 … p99 … p99.9 … max … (n=…)`.
    pub fn full(&self) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }

    pub fn of(us: &Histogram<u64>) -> Latency {
        let ms = |q: f64| us.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: us.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: us.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NodeUsage {
    pub pid: u32,
    pub cpu_s: f64,
    pub rss_before_mib: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
}

impl NodeUsage {
    /// A node's usage from its samples: before the first connection, and at the start and end of
    /// the measured window.
    pub fn of(pid: u32, before: &Sample, start: &Sample, end: &Sample) -> NodeUsage {
        NodeUsage {
            pid,
            cpu_s: end.cpu_ns.saturating_sub(start.cpu_ns) as f64 / 1e9,
            rss_before_mib: mib(before.rss),
            rss_mib: mib(end.rss),
            hwm_mib: mib(end.hwm),
        }
    }

    /// The node's row of a report table: its label and its figures.
    pub fn row(&self) -> (String, String) {
        (
            format!("node pid {}", self.pid),
            format!(
                "cpu {:.2} s; rss {:.1} MiB (before {:.1}), peak {:.1} MiB",
                self.cpu_s, self.rss_mib, self.rss_before_mib, self.hwm_mib
            ),
        )
    }
}

#[derive(Debug, Serialize)]
pub struct AuxUsage {
    pub pid: u32,
    pub cpu_s: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

pub fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    m.iter()
        .map(|(k, v)| format!("{v} ({k})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let c = &self.connections;
        let p = &self.publish;
        let d = &self.delivery;
        let l = &self.latency_ms;
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "{k:<24} {v}");
        };
        row(
            "scenario",
            format!(
                "{} ({} encoding, publish via {}, {} B payload)",
                self.scenario, self.encoding, self.publish_via, self.payload_bytes
            ),
        );
        row("nodes", self.urls.join(" "));
        row(
            "connections",
            format!(
                "{} of {} in {:.1} s; failed {} (tries failed before: {}); closed by node {}",
                c.connected,
                c.planned,
                c.ramp_s,
                counts(&c.failed),
                c.retried,
                counts(&c.closed_by_node)
            ),
        );
        row(
            "published",
            format!(
                "{} by {} publishers in {:.1} s = {:.0}/s (target {:.0}/s); errors {}",
                p.sent, p.publishers, self.duration_s, p.rate, p.target_rate, p.errors
            ),
        );
        row(
            "delivered",
            format!("{} of {} expected = {:.0}/s", d.received, d.expected, d.rate),
        );
        row(
            "lost",
            format!(
                "{} (on closed connections {}); gaps {}, reordered {}, duplicates {}, unexpected {}",
                d.lost, d.lost_on_closed, d.gap_missing, d.reordered, d.duplicates, d.unexpected
            ),
        );
        row(
            "frames",
            format!(
                "error {}, reconnect {}, unparsed {}; messages with a position {}",
                d.error_frames, d.reconnect_frames, d.unparsed_frames, d.positioned
            ),
        );
        if let Some(feed) = self.feed {
            row("feed", format!("{feed:?}").to_lowercase());
        }
        for w in &self.wire {
            let (label, figures) = w.row();
            row(&label, figures);
        }
        row("latency ms", l.full());
        let a = &self.publish_answer_ms;
        row("publish answer ms", a.brief());
        for n in &self.nodes {
            let (label, figures) = n.row();
            row(&label, figures);
        }
        if !self.nodes.is_empty() {
            row(
                "node cpu",
                format!(
                    "{:.2} s over {:.1} s = {} per delivered frame",
                    self.node_cpu_s,
                    self.measured_s,
                    self.node_cpu_ns_per_frame
                        .map_or("n/a".into(), |ns| format!("{ns:.0} ns"))
                ),
            );
            row(
                "node rss per conn",
                self.node_rss_bytes_per_conn
                    .map_or("n/a".into(), |b| format!("{b:.0} bytes")),
            );
        }
        for a in &self.aux {
            row(&format!("aux pid {}", a.pid), format!("cpu {:.2} s", a.cpu_s));
        }
        row("loadtest cpu", format!("{:.2} s", self.loadtest_cpu_s));
        s
    }
}
