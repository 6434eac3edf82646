//! The `kickoff` run's report: how the joins went (answered with every key's latest value, short of
//! some, refused, unanswered, cut), how long a join took to have all its values and its `ok`, how
//! late the joins went out, beside what the nodes and Redis spent. JSON for scripts
//! ([`KickoffReport`]), a table for people ([`KickoffReport::table`]); [`Joins::of`] is the pure
//! summary of the sockets' logs.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::report::{counts, Latency};

use super::joiner::{End, SocketLog};

#[derive(Debug, Serialize)]
pub struct KickoffReport {
    pub scenario: &'static str,
    pub room: String,
    pub keys: usize,
    pub value_bytes: usize,
    pub nodes: usize,
    pub redis_masters: usize,
    /// The nodes' flags beside their address, Redis and id.
    pub node_args: Vec<String>,
    /// Keys published before the joins, acknowledged, and refused by code.
    pub keys_acked: u64,
    pub keys_refused: BTreeMap<String, u64>,
    /// The values `GET /rooms/<room>/latest` listed on each node before the joins.
    pub latest_listed: Vec<usize>,
    pub sockets: usize,
    pub sockets_connected: usize,
    pub connect_failed: BTreeMap<String, u64>,
    pub connect_s: f64,
    pub joins_planned: usize,
    pub join_window_s: f64,
    /// From the first join sent to the last answered.
    pub joins_took_s: f64,
    pub joins: Joins,
    /// `shardcast_latest_values_sent_total` over the nodes, gained in the joins.
    pub node_latest_values_sent: f64,
    /// CPU seconds over the joins: each node's, each master's, this generator's.
    pub node_cpu_s: Vec<f64>,
    pub master_cpu_s: Vec<f64>,
    pub generator_cpu_s: f64,
    pub node_pids: Vec<u32>,
    pub master_pids: Vec<u32>,
}

/// The joins, summed over the sockets.
#[derive(Debug, Serialize)]
pub struct Joins {
    pub sent: u64,
    /// Answered `ok` after every key's latest value.
    pub complete: u64,
    /// Answered `ok` short of some keys.
    pub incomplete: u64,
    /// Every way a join went wrong, by what happened: `refused: CODE`, `timeout`, `closed: HOW`,
    /// `not sent: WHY`, `incomplete`.
    pub errors: BTreeMap<String, u64>,
    /// Send to `ok`, joins answered `ok`.
    pub to_ok_ms: Latency,
    /// Send to the last latest value, complete joins.
    pub to_all_latest_ms: Latency,
    /// Latest frames received before the answers, and after them (none expected).
    pub latest_frames: u64,
    pub latest_after_ok: u64,
    /// Joins sent more than [`LATE`] after their planned time, and the latest.
    pub late: u64,
    pub late_max_ms: f64,
    pub leaves_unanswered: u64,
    /// Complete joins by node: their send to `ok`.
    pub to_ok_ms_by_node: Vec<Latency>,
}

/// A join sent this much after its time is counted late.
pub const LATE: Duration = Duration::from_millis(50);

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

impl Joins {
    /// The summary of the sockets' logs of a run with `keys` keys over `nodes` nodes.
    pub fn of(logs: &[SocketLog], keys: usize, nodes: usize) -> Joins {
        let mut j = Joins {
            sent: 0,
            complete: 0,
            incomplete: 0,
            errors: BTreeMap::new(),
            to_ok_ms: Latency::of(&histogram()),
            to_all_latest_ms: Latency::of(&histogram()),
            latest_frames: 0,
            latest_after_ok: 0,
            late: 0,
            late_max_ms: 0.0,
            leaves_unanswered: 0,
            to_ok_ms_by_node: Vec::new(),
        };
        let (mut to_ok, mut to_all) = (histogram(), histogram());
        let mut by_node: Vec<Histogram<u64>> = (0..nodes).map(|_| histogram()).collect();
        let mut late_max = Duration::ZERO;
        for log in logs {
            j.leaves_unanswered += log.leaves_unanswered;
            for join in &log.joins {
                let why = match &join.end {
                    End::NotSent(why) => {
                        *j.errors.entry(format!("not sent: {why}")).or_insert(0) += 1;
                        continue;
                    }
                    End::Ok if join.keys == keys => None,
                    End::Ok => Some("incomplete".to_string()),
                    End::Refused(code) => Some(format!("refused: {code}")),
                    End::Timeout => Some("timeout".to_string()),
                    End::Closed(how) => Some(format!("closed: {how}")),
                };
                j.sent += 1;
                j.latest_frames += join.frames as u64;
                j.latest_after_ok += join.after_ok as u64;
                if join.late > LATE {
                    j.late += 1;
                }
                late_max = late_max.max(join.late);
                let us = join.took.as_micros() as u64;
                if join.end == End::Ok {
                    to_ok.saturating_record(us.max(1));
                    if let Some(h) = by_node.get_mut(join.node) {
                        h.saturating_record(us.max(1));
                    }
                }
                match why {
                    None => {
                        j.complete += 1;
                        if let Some(last) = join.last_latest {
                            to_all.saturating_record((last.as_micros() as u64).max(1));
                        }
                    }
                    Some(why) => {
                        j.incomplete += u64::from(why == "incomplete");
                        *j.errors.entry(why).or_insert(0) += 1;
                    }
                }
            }
        }
        j.to_ok_ms = Latency::of(&to_ok);
        j.to_all_latest_ms = Latency::of(&to_all);
        j.to_ok_ms_by_node = by_node.iter().map(Latency::of).collect();
        j.late_max_ms = late_max.as_secs_f64() * 1e3;
        j
    }
}

impl KickoffReport {
    pub fn table(&self) -> String {
        let j = &self.joins;
        let cpu = |v: &[f64]| v.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join(", ");
        let mut t = format!(
            "kickoff: `{}` with {} keys of {} B; {} joins with `latest` over {:.0} s from {} sockets over {} nodes \
             (Redis Cluster, {} masters)\n\n",
            self.room,
            self.keys,
            self.value_bytes,
            self.joins_planned,
            self.join_window_s,
            self.sockets,
            self.nodes,
            self.redis_masters
        );
        let mut row = |k: &str, v: String| t += &format!("{k:<30} {v}\n");
        row(
            "keys published",
            format!(
                "{} acked, refused {}; listed by GET …/latest on each node: {:?}",
                self.keys_acked,
                counts(&self.keys_refused),
                self.latest_listed
            ),
        );
        row(
            "sockets",
            format!(
                "{} of {} connected in {:.1} s; failed {}",
                self.sockets_connected,
                self.sockets,
                self.connect_s,
                counts(&self.connect_failed)
            ),
        );
        row(
            "joins",
            format!(
                "{} sent in {:.1} s: {} complete, {} short of keys; errors {}",
                j.sent,
                self.joins_took_s,
                j.complete,
                j.incomplete,
                counts(&j.errors)
            ),
        );
        row("join to ok ms", j.to_ok_ms.brief());
        row("join to all latest ms", j.to_all_latest_ms.brief());
        for (n, l) in j.to_ok_ms_by_node.iter().enumerate() {
            row(&format!("  node {} join to ok ms", n + 1), l.brief());
        }
        row(
            "latest frames",
            format!(
                "{} before the oks, {} after (node counted {:.0})",
                j.latest_frames, j.latest_after_ok, self.node_latest_values_sent
            ),
        );
        row(
            "late joins",
            format!(
                "{} sent over {} ms late (latest {:.0} ms); leaves unanswered {}",
                j.late,
                LATE.as_millis(),
                j.late_max_ms,
                j.leaves_unanswered
            ),
        );
        row(
            "cpu s over the joins",
            format!(
                "nodes {}; masters {}; generator {:.2}",
                cpu(&self.node_cpu_s),
                cpu(&self.master_cpu_s),
                self.generator_cpu_s
            ),
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kickoff::joiner::Join;

    fn join(node: usize, end: End, ms: u64, keys: usize) -> Join {
        Join {
            node,
            late: Duration::from_millis(ms / 10),
            end,
            took: Duration::from_millis(ms),
            last_latest: Some(Duration::from_millis(ms.saturating_sub(1))),
            keys,
            frames: keys,
            after_ok: 0,
        }
    }

    #[test]
    fn joins_are_sorted_into_complete_short_and_failed() {
        let logs = vec![
            SocketLog {
                connected: true,
                failure: None,
                joins: vec![
                    join(0, End::Ok, 10, 100),
                    join(0, End::Ok, 1000, 100),
                    join(0, End::Ok, 20, 99),
                ],
                leaves_unanswered: 1,
            },
            SocketLog {
                connected: true,
                failure: None,
                joins: vec![
                    join(1, End::Refused("unavailable".into()), 5, 0),
                    join(1, End::Timeout, 10_000, 40),
                    join(1, End::Closed("4008".into()), 3, 0),
                    join(1, End::NotSent("4008".into()), 0, 0),
                ],
                leaves_unanswered: 0,
            },
        ];
        let j = Joins::of(&logs, 100, 2);
        assert_eq!((j.sent, j.complete, j.incomplete), (6, 2, 1));
        let want: BTreeMap<String, u64> = [
            ("incomplete", 1),
            ("refused: unavailable", 1),
            ("timeout", 1),
            ("closed: 4008", 1),
            ("not sent: 4008", 1),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into_iter()
        .collect();
        assert_eq!(j.errors, want);
        // Send to ok over the three answered `ok`, the short one too; all latest over the complete.
        assert_eq!(j.to_ok_ms.count, 3);
        assert_eq!(j.to_all_latest_ms.count, 2);
        assert!((j.to_ok_ms.max - 1000.0).abs() < 1.0, "{}", j.to_ok_ms.max);
        assert_eq!(j.to_ok_ms_by_node[1].count, 0);
        // 10 s unanswered is 1 s late by this test's rule, and the latest.
        assert_eq!(j.late, 2);
        assert!((j.late_max_ms - 1000.0).abs() < 1e-6);
        assert_eq!(j.leaves_unanswered, 1);
        assert_eq!(j.latest_frames, 100 + 100 + 99 + 40);
    }
}
