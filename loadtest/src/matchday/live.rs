//! What every task of the match shares while it is played: the phase now and the run's clock
//! ([`Live::phase`], [`Live::secs`]), the counters the timeline samples, and the histograms each
//! phase reports (latency per room, time to connect). The viewers' and publishers' own records
//! stay in their tasks until the end ([`super::ledger`]).

use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Mutex,
};

use serde::Serialize;
use tokio::time::Instant;

use crate::stats::Latencies;

/// The phases of the match, in the order they are played.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Every viewer connects.
    Kickoff,
    /// The score room and the chat room at their steady rates.
    Steady,
    /// The chat at its goal rate.
    Goal,
    /// Every node drained with SIGTERM and started again, one at a time.
    Deploy,
    /// A Redis master killed, a replica promoted, play going on.
    Failover,
    /// The last minutes, then the feed stops and the viewers leave.
    Whistle,
}

pub const PHASES: [Phase; 6] = [
    Phase::Kickoff,
    Phase::Steady,
    Phase::Goal,
    Phase::Deploy,
    Phase::Failover,
    Phase::Whistle,
];

impl Phase {
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Kickoff => "kickoff",
            Phase::Steady => "steady",
            Phase::Goal => "goal",
            Phase::Deploy => "deploy",
            Phase::Failover => "failover",
            Phase::Whistle => "whistle",
        }
    }
}

/// The two rooms a viewer is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// With history: a viewer resumes it with `since`.
    Score,
    /// Without: what a viewer misses while away is gone.
    Chat,
}

impl Room {
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The match's shared state.
pub struct Live {
    start: Instant,
    phase: AtomicUsize,
    /// The match is over (the feed stopped): the viewers leaving is not a phase's minimum.
    ended: AtomicBool,
    /// Viewers in both rooms now.
    pub connected: AtomicUsize,
    /// Per phase, the fewest viewers in both rooms at once (sampled), once the phase is past
    /// kick-off.
    pub connected_min: Vec<AtomicUsize>,
    /// Messages the viewers received, replays and duplicates included.
    pub received: AtomicU64,
    /// Publishes acknowledged, both rooms.
    pub acked: AtomicU64,
    /// Connections of viewers the nodes (or the balancer) ended.
    pub closed: AtomicU64,
    /// Connection tries of viewers and publishers that failed.
    pub failed_tries: AtomicU64,
    /// Live messages' latency since the timeline's last sample.
    pub latency_now: Latencies,
    /// Per phase and room, live messages' latency (not replays).
    pub latency: Vec<[Latencies; 2]>,
    /// Per phase: from a viewer's start (kick-off) or the loss of its connection to both rooms
    /// joined again.
    pub to_connect: Vec<Latencies>,
    /// What happened to the processes, seconds into the run.
    pub events: Mutex<Vec<(f64, String)>>,
}

impl Live {
    pub fn new() -> Live {
        Live {
            start: Instant::now(),
            phase: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
            connected: AtomicUsize::new(0),
            connected_min: PHASES.iter().map(|_| AtomicUsize::new(usize::MAX)).collect(),
            received: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            failed_tries: AtomicU64::new(0),
            latency_now: Latencies::new(16),
            latency: PHASES.iter().map(|_| [Latencies::new(8), Latencies::new(8)]).collect(),
            to_connect: PHASES.iter().map(|_| Latencies::new(8)).collect(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        PHASES[self.phase.load(Ordering::Relaxed).min(PHASES.len() - 1)]
    }

    pub fn enter(&self, phase: Phase) {
        self.phase.store(phase.index(), Ordering::Relaxed);
        self.event(format!("{} starts", phase.name()));
    }

    /// The match is over: minimums are no longer taken.
    pub fn over(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    /// Seconds since the run started.
    pub fn secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Seconds from the run's start to `at`.
    pub fn secs_at(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// Notes what happened now, for the report and the timeline; also on standard error.
    pub fn event(&self, what: String) {
        let t = self.secs();
        eprintln!("matchday {t:7.1} s  {what}");
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push((t, what));
    }

    /// Takes a sample of the viewers connected into the phase's minimum.
    pub fn sample_connected(&self) -> usize {
        let now = self.connected.load(Ordering::Relaxed);
        let phase = self.phase();
        if phase != Phase::Kickoff && !self.ended.load(Ordering::Relaxed) {
            self.connected_min[phase.index()].fetch_min(now, Ordering::Relaxed);
        }
        now
    }
}
