//! The match's report, phase by phase: the viewers connected, what closed their connections,
//! refused their joins or failed their tries, their time to connect again, and per room what was
//! sent and acknowledged, the acknowledged messages lost, the duplicates and reorders, and the
//! latency. JSON for scripts ([`MatchReport`]), a table for people ([`MatchReport::table`]).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{report::Latency, wire::Encoding};

use super::{live::Phase, timeline::Sample};

#[derive(Debug, Serialize)]
pub struct MatchReport {
    pub scenario: &'static str,
    pub viewers: usize,
    pub nodes: usize,
    pub redis_masters: usize,
    pub redis_replicas: usize,
    /// The score room (history) and the chat room, served by the same master.
    pub rooms: [String; 2],
    pub chat_publishers: usize,
    /// Messages a second of the score feed, and of the chat together (outside the goal).
    pub score_rate: f64,
    pub chat_rate: f64,
    pub goal_factor: f64,
    pub payload_bytes: usize,
    pub encodings: [Encoding; 2],
    /// The nodes' settings beside their address, Redis and id.
    pub node_args: Vec<String>,
    pub duration_s: f64,
    /// Viewers in both rooms when the run ended.
    pub viewers_joined_at_end: usize,
    /// Score publishes acknowledged with the message's position (the room keeps history).
    pub score_acked_with_pos: u64,
    /// Messages of no publisher of the run (none expected).
    pub unexpected: u64,
    pub phases: Vec<PhaseReport>,
    pub events: Vec<Event>,
    pub timeline: Vec<Sample>,
    /// The processes it started, all stopped when it reports.
    pub node_pids: Vec<u32>,
    pub redis_pids: Vec<u32>,
    pub haproxy_pid: u32,
}

#[derive(Debug, Serialize)]
pub struct Event {
    pub t_s: f64,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    /// Seconds into the run, and long.
    pub start_s: f64,
    pub secs: f64,
    /// Viewers in both rooms at the phase's end, and the fewest at once during it (sampled
    /// every 100 ms; none for the kick-off, which starts from zero).
    pub viewers_connected: usize,
    pub viewers_connected_min: Option<usize>,
    /// Viewers' connections the nodes or the balancer ended: close code, `eof` or `error`.
    pub closed_by_node: BTreeMap<String, u64>,
    /// Viewers' connections they left themselves at the `reconnect` frame's time.
    pub left_on_time: u64,
    /// Viewers' tries that did not connect, by why.
    pub failed_tries: BTreeMap<String, u64>,
    /// Viewers' joins answered with an error, by code (asked again after `unavailable`).
    pub joins_refused: BTreeMap<String, u64>,
    /// Score-room joins with `since`, by their `recovered`.
    pub resumes_recovered: u64,
    pub resumes_not_recovered: u64,
    /// Viewers back in both rooms after a loss.
    pub rejoined: u64,
    /// From a viewer's start (kick-off) or the loss of its connection to both rooms joined.
    pub time_to_connect_ms: Latency,
    /// The publishers' connections the nodes ended, and their failed tries.
    pub publishers_closed: BTreeMap<String, u64>,
    pub publishers_failed_tries: BTreeMap<String, u64>,
    pub score: RoomReport,
    pub chat: RoomReport,
}

/// One room over one phase; the messages are those sent in the phase.
#[derive(Debug, Serialize)]
pub struct RoomReport {
    pub sent: u64,
    pub acked: u64,
    pub refused: BTreeMap<String, u64>,
    /// Neither acknowledged nor refused: the publisher's connection ended first.
    pub unanswered: u64,
    /// The publishers' turns that passed while they were away.
    pub not_sent: u64,
    /// Viewers counted for losses (docs/performance.md, "Match day", says which).
    pub viewers_counted: u64,
    /// Acknowledged messages times the viewers counted.
    pub expected: u64,
    pub lost: u64,
    /// Received in this phase, by every viewer.
    pub duplicates: u64,
    pub reordered: u64,
    /// Live messages received in this phase (replays left out).
    pub latency_ms: Latency,
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    crate::report::counts(m)
}

impl RoomReport {
    fn cells(&self) -> String {
        let refused: u64 = self.refused.values().sum();
        format!(
            "{:>6} {:>6} {:>5} {:>4} {:>7} {:>6} {:>4} {:>4} {:>7.1} {:>8.1}",
            self.sent,
            self.acked,
            refused,
            self.not_sent,
            self.viewers_counted,
            self.lost,
            self.duplicates,
            self.reordered,
            self.latency_ms.p50,
            self.latency_ms.p99
        )
    }
}

impl MatchReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "matchday: {} viewers through HAProxy over {} nodes; Redis {} masters + {} replicas; `{}` {}/s \
             (history), `{}` {}/s by {} publishers (x{} for the goal); {:.0} s; {} of {} viewers in both rooms at the end\n",
            self.viewers,
            self.nodes,
            self.redis_masters,
            self.redis_replicas,
            self.rooms[0],
            self.score_rate,
            self.rooms[1],
            self.chat_rate,
            self.chat_publishers,
            self.goal_factor,
            self.duration_s,
            self.viewers_joined_at_end,
            self.viewers
        );
        t += "\nviewers  phase      secs  conn.end  conn.min  rejoined  time to connect p50/p99/max ms\n";
        for p in &self.phases {
            let c = &p.time_to_connect_ms;
            t += &format!(
                "         {:<9} {:>5.1} {:>9} {:>9} {:>9}  {:.0} / {:.0} / {:.0} (n={})\n",
                p.phase.name(),
                p.secs,
                p.viewers_connected,
                p.viewers_connected_min.map_or("-".into(), |m| m.to_string()),
                p.rejoined,
                c.p50,
                c.p99,
                c.max,
                c.count
            );
        }
        t += "\nrooms    phase      room    sent  acked  refd  away counted   lost  dup  ord  p50 ms   p99 ms\n";
        for p in &self.phases {
            let name = p.phase.name();
            t += &format!("         {name:<9}  score {}\n", p.score.cells());
            t += &format!("         {name:<9}  chat  {}\n", p.chat.cells());
        }
        t += "\nconnections, by phase\n";
        for p in &self.phases {
            t += &format!(
                "         {:<9}  closed by the node {}; left at after_ms {}; tries failed {}; joins refused {}; \
                 resumes recovered {}, not {}; publishers closed {}, tries failed {}\n",
                p.phase.name(),
                counts(&p.closed_by_node),
                p.left_on_time,
                counts(&p.failed_tries),
                counts(&p.joins_refused),
                p.resumes_recovered,
                p.resumes_not_recovered,
                counts(&p.publishers_closed),
                counts(&p.publishers_failed_tries)
            );
        }
        t += "\nevents\n";
        for e in &self.events {
            t += &format!("  {:7.1} s  {}\n", e.t_s, e.what);
        }
        t
    }
}
