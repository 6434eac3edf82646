//! The `weak` run's report: per mode (the node conflating the room, or not) what became of the
//! weak viewers (closed with 4008 and when, how old the score they showed was, what their
//! conflated frames skipped) and the healthy viewers' score latency, beside the node's own
//! counters. JSON for scripts ([`WeakReport`]), a table for people ([`WeakReport::table`]), and
//! the small pure helpers the summary is made of.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::{counts, Latency};

#[derive(Debug, Serialize)]
pub struct WeakReport {
    pub scenario: &'static str,
    pub room: String,
    pub viewers: usize,
    pub weak_viewers: usize,
    /// A weak viewer's read rate and the receive buffer it asked for (the kernel doubles it).
    pub weak_bytes_per_sec: f64,
    pub weak_rcvbuf: u32,
    /// The segment size a weak viewer announces (`TCP_MAXSEG`); 0: loopback's own.
    pub weak_mss: u32,
    pub score_rate: f64,
    pub score_bytes: usize,
    pub chat_rate: f64,
    pub chat_bytes: usize,
    /// Seconds of publishing in each mode.
    pub duration_s: f64,
    pub modes: Vec<ModeReport>,
}

/// One mode: one node started for it, the same load.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    pub mode: String,
    /// The node's flags beside its address and id.
    pub node_args: Vec<String>,
    pub healthy_joined: usize,
    pub weak_joined: usize,
    /// Viewers that did not join, by why.
    pub failed: BTreeMap<String, u64>,
    pub scores_sent: u64,
    pub scores_acked: u64,
    pub chat_sent: u64,
    pub chat_acked: u64,
    pub refused: BTreeMap<String, u64>,
    pub weak: WeakSide,
    pub healthy: HealthySide,
    pub node: NodeSide,
}

#[derive(Debug, Serialize)]
pub struct WeakSide {
    /// Weak viewers' connections the node ended, by close code (`eof`, `error` without one).
    pub closed: BTreeMap<String, u64>,
    /// Seconds from the feed's start to the close, as the weak viewers saw it (a close frame
    /// arrives behind everything the kernel still holds for the socket).
    pub closed_after_s: Spread,
    /// The node's 4008 closes as its counter saw them (sampled every 200 ms), seconds from the
    /// feed's start: every socket's, weak or not.
    pub node_4008_after_s: Spread,
    /// Now less the publish time of the last score a weak viewer got, sampled every 100 ms over
    /// the weak viewers still open while the feed ran (the feed's start before its first score).
    pub score_age_ms: Latency,
    /// The same over each 5 s of the feed: whether the age settles or keeps growing.
    pub score_age_by_window: Vec<AgeWindow>,
    pub scores: u64,
    /// The sum of the `skipped` of their score frames: values they never got.
    pub skipped: u64,
    pub chats: u64,
    /// Weak viewers still open when the feed stopped.
    pub open_at_end: usize,
    /// Bytes the kernel held between the node and a weak viewer when the feed stopped (the node
    /// side's Send-Q and the viewer's Recv-Q, from `ss`), over the weak viewers still open.
    pub kernel_bytes_at_end: Spread,
}

/// The age of the weak viewers' score over a few seconds of the feed.
#[derive(Debug, Serialize)]
pub struct AgeWindow {
    /// Seconds into the feed.
    pub from_s: f64,
    pub p50_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct HealthySide {
    /// Publish to receipt of every score frame.
    pub score_latency_ms: Latency,
    pub scores: u64,
    pub skipped: u64,
    pub chats: u64,
    pub closed: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct NodeSide {
    /// The most sockets `shardcast_conflating_sockets` showed at once.
    pub conflating_sockets_max: f64,
    pub conflated_values: f64,
    pub slow_consumer_drops: f64,
    /// The most `shardcast_outbound_queued_bytes` showed (all sockets; sampled by the node every
    /// second).
    pub queued_bytes_max: f64,
    pub cpu_s: f64,
    pub rss_mib: f64,
}

/// A few values' count, median and largest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50: Option<f64>,
    pub max: Option<f64>,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Spread {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        Spread {
            count: values.len(),
            p50: values.get(values.len().saturating_sub(1) / 2).copied(),
            max: values.last().copied(),
        }
    }

    /// `n: median / max` with `unit`, or `0` when there are none.
    fn show(&self, digits: usize, unit: &str) -> String {
        match (self.p50, self.max) {
            (Some(p50), Some(max)) => format!("{}: {p50:.digits$} / {max:.digits$} {unit}", self.count),
            _ => "0".into(),
        }
    }
}

/// When each increment of a counter happened, from its samples (seconds, value): the time of the
/// first sample that showed it. A counter that restarts lower is read from its new value.
pub fn increments(samples: &[(f64, f64)]) -> Vec<f64> {
    let mut times = Vec::new();
    let mut last = samples.first().map_or(0.0, |s| s.1);
    for &(t, v) in samples {
        let n = (v - last).max(0.0).round() as usize;
        times.extend(std::iter::repeat_n(t, n));
        last = v;
    }
    times
}

/// From `ss -tnH` lines (`Recv-Q Send-Q Local Peer`), the bytes the kernel holds for each of
/// `viewers` (their local addresses): the node side's Send-Q (its peer is the viewer) and the
/// viewer's own Recv-Q.
pub fn kernel_bytes(ss: &str, viewers: &[String]) -> Vec<f64> {
    let mut held: BTreeMap<&str, f64> = viewers.iter().map(|v| (v.as_str(), 0.0)).collect();
    let mut seen: BTreeMap<&str, bool> = BTreeMap::new();
    for line in ss.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [recv_q, send_q, local, peer, ..] = f[..] else {
            continue;
        };
        let (Ok(recv_q), Ok(send_q)) = (recv_q.parse::<f64>(), send_q.parse::<f64>()) else {
            continue;
        };
        if let Some(h) = held.get_mut(peer) {
            *h += send_q;
            seen.insert(peer, true);
        }
        if let Some(h) = held.get_mut(local) {
            *h += recv_q;
        }
    }
    viewers
        .iter()
        .filter(|v| seen.contains_key(v.as_str()))
        .map(|v| held[v.as_str()])
        .collect()
}

impl WeakReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "weak: {} viewers in `{}`, {} of them weak (reading {:.0} B/s, SO_RCVBUF {} B); score {}/s of {} B \
             (key `score`), chat {}/s of {} B; {:.0} s of feed per mode\n\n",
            self.viewers,
            self.room,
            self.weak_viewers,
            self.weak_bytes_per_sec,
            self.weak_rcvbuf,
            self.score_rate,
            self.score_bytes,
            self.chat_rate,
            self.chat_bytes,
            self.duration_s
        );
        let mut rows: Vec<(&str, Vec<String>)> = Vec::new();
        let mut row = |label: &'static str, cell: &dyn Fn(&ModeReport) -> String| {
            rows.push((label, self.modes.iter().map(cell).collect()));
        };
        row("mode", &|m| m.mode.clone());
        row("node flags", &|m| {
            if m.node_args.is_empty() {
                "(defaults)".into()
            } else {
                m.node_args.join(" ")
            }
        });
        row("joined: healthy, weak", &|m| {
            format!("{}, {} (failed {})", m.healthy_joined, m.weak_joined, counts(&m.failed))
        });
        row("scores sent (acked); chat", &|m| {
            format!(
                "{} ({}); {} ({})",
                m.scores_sent, m.scores_acked, m.chat_sent, m.chat_acked
            )
        });
        row("weak: closed by the node", &|m| counts(&m.weak.closed));
        row("weak: close seen after (n: p50/max)", &|m| {
            m.weak.closed_after_s.show(1, "s")
        });
        row("node: 4008 after (n: p50/max)", &|m| {
            m.weak.node_4008_after_s.show(1, "s")
        });
        row("weak: score age p50/p99/max ms", &|m| {
            let a = &m.weak.score_age_ms;
            format!("{:.0} / {:.0} / {:.0} (n={})", a.p50, a.p99, a.max, a.count)
        });
        row("weak: age p50 per 5 s, s", &|m| {
            m.weak
                .score_age_by_window
                .iter()
                .map(|w| format!("{:.1}", w.p50_ms / 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        });
        row("weak: scores got, skipped", &|m| {
            format!("{}, {}", m.weak.scores, m.weak.skipped)
        });
        row("weak: open at the end", &|m| m.weak.open_at_end.to_string());
        row("weak: kernel bytes at end p50/max", &|m| {
            m.weak.kernel_bytes_at_end.show(0, "B")
        });
        row("healthy: score latency p50/p99 ms", &|m| {
            let l = &m.healthy.score_latency_ms;
            format!("{:.2} / {:.2} (n={})", l.p50, l.p99, l.count)
        });
        row("healthy: skipped, closed", &|m| {
            format!("{}, {}", m.healthy.skipped, counts(&m.healthy.closed))
        });
        row("node: conflating max, conflated", &|m| {
            format!("{:.0}, {:.0}", m.node.conflating_sockets_max, m.node.conflated_values)
        });
        row("node: 4008 drops, queued max", &|m| {
            format!("{:.0}, {:.0} B", m.node.slow_consumer_drops, m.node.queued_bytes_max)
        });
        row("node: cpu, rss", &|m| {
            format!("{:.2} s, {:.1} MiB", m.node.cpu_s, m.node.rss_mib)
        });
        // Each mode's column as wide as its widest cell.
        let widths: Vec<usize> = (0..self.modes.len())
            .map(|k| rows.iter().map(|(_, c)| c[k].chars().count()).max().unwrap_or(0))
            .collect();
        for (label, cells) in &rows {
            t += &format!("{label:<38}");
            for (cell, w) in cells.iter().zip(&widths) {
                t += &format!(" {cell:<w$} ");
            }
            t = t.trim_end().to_string() + "\n";
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_its_count_median_and_max() {
        let s = Spread::of(vec![3.0, 1.0, 2.0, f64::NAN, 10.0]);
        assert_eq!((s.count, s.p50, s.max), (4, Some(2.0), Some(10.0)));
        assert_eq!(Spread::of(vec![]), Spread::default());
        assert_eq!(Spread::of(vec![]).show(1, "s"), "0");
        assert_eq!(Spread::of(vec![1.25]).show(1, "s"), "1: 1.2 / 1.2 s");
    }

    #[test]
    fn a_counters_increments_are_timed_by_the_sample_that_showed_them() {
        let samples = [(0.0, 2.0), (0.2, 2.0), (0.4, 4.0), (0.6, 5.0), (0.8, 5.0)];
        assert_eq!(increments(&samples), vec![0.4, 0.4, 0.6]);
        assert!(increments(&[]).is_empty());
        // A counter that went back (a node restarted) counts from its new value.
        assert_eq!(increments(&[(0.0, 5.0), (1.0, 1.0), (2.0, 2.0)]), vec![2.0]);
    }

    #[test]
    fn kernel_bytes_add_the_nodes_send_queue_and_the_viewers_receive_queue() {
        let ss = "0      28960  127.0.0.1:4000  127.0.0.2:51000\n\
                  8192   0      127.0.0.2:51000 127.0.0.1:4000\n\
                  0      0      127.0.0.1:4000  127.0.0.2:51001\n\
                  0      0      127.0.0.2:51001 127.0.0.1:4000\n\
                  0      99     127.0.0.1:4000  127.0.0.2:59999\n\
                  garbage\n";
        let viewers = ["127.0.0.2:51000", "127.0.0.2:51001", "127.0.0.2:51002"].map(String::from);
        // The third has no connection any more: left out.
        assert_eq!(kernel_bytes(ss, &viewers), vec![28960.0 + 8192.0, 0.0]);
    }
}
