//! The `matchday` run: a match played as a test. On a Redis Cluster it starts (3 masters, 3
//! replicas) and `--nodes` node processes behind HAProxy as `deploy/` ships it, viewers that
//! behave like the JS client (one socket each, through the balancer, in the score room with
//! history and the chat room without) live through the match's phases ([`live::Phase`]):
//!
//! 1. **kick-off**: every viewer connects, `--ramp-per-sec` at a time; at most `--kickoff` s;
//! 2. **steady**: the score feed at `--score-rate`, the chat at `--rate`, for `--steady` s;
//! 3. **goal**: the chat at `--goal-factor` times its rate for `--goal` s;
//! 4. **deploy**: every node drained with SIGTERM and started again on its port, one at a time,
//!    each back in HAProxy's rotation before the next;
//! 5. **failover**: the Redis master with the score room's history killed (SIGKILL), a replica
//!    promoted, then `--after-kill` s of play;
//! 6. **whistle**: `--whistle` s more; the feed stops, the last messages arrive (`--drain` s at
//!    most) and the viewers leave.
//!
//! Per phase it reports what [`report::PhaseReport`] holds; what counts as lost is written in
//! [`ledger`]. The processes are driven from the calling thread while the clients run on the
//! runtime; everything started is stopped however the run ends. The JSON report and the SVG
//! timeline go to `--out`. [`Plan::from_args`] is the subcommand's plan.

mod backoff;
mod client;
mod feed;
mod ledger;
mod live;
mod report;
mod timeline;
mod venue;
mod viewer;

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::{runtime::Runtime, sync::watch, task::JoinHandle};

pub use report::MatchReport;

use crate::{conn::NodeUrl, report::Latency, tasks, wire::Encoding, Args};

use self::{
    client::{Counts, Ctx},
    feed::{Part, PubLog},
    ledger::{tally, Received, Sent, Tally, GRACE},
    live::{Live, Phase, Room, PHASES},
    report::{Event, PhaseReport, RoomReport},
    timeline::{Band, Sampler},
    venue::{Ground, Venue},
    viewer::ViewerLog,
};

/// What to play.
#[derive(Debug, Clone)]
pub struct Plan {
    pub viewers: usize,
    pub nodes: usize,
    pub chatters: usize,
    pub score_rate: f64,
    pub chat_rate: f64,
    pub goal_factor: f64,
    pub payload_bytes: usize,
    pub encodings: [Encoding; 2],
    pub kickoff: Duration,
    pub steady: Duration,
    pub goal: Duration,
    pub after_kill: Duration,
    pub whistle: Duration,
    pub drain: Duration,
    pub ramp_per_sec: f64,
    pub connect_timeout: Duration,
    pub backoff: (Duration, Duration),
    pub drain_jitter: Duration,
    pub source_addrs: u8,
    pub node_bin: PathBuf,
    pub out: PathBuf,
}

/// The rooms of the match: the chat's is this, or the first of `chat-2`, `chat-3`, … served by
/// the score room's master, so the failover hits both.
const SCORE: &str = "score";
const CHAT: &str = "chat";

impl Plan {
    /// The plan the command line asks for; refused for what cannot be played.
    pub fn from_args(args: &Args) -> anyhow::Result<Plan> {
        let secs = |v: f64, name: &str| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|_| v.is_finite())
                .with_context(|| format!("{name} must be a finite number of seconds, 0 or more"))
        };
        let rate = |v: f64, name: &str| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                bail!("{name} must be positive")
            }
        };
        let nodes = args.nodes.unwrap_or(3);
        if nodes < 3 {
            bail!("a match needs 3 nodes at least (--nodes)");
        }
        Ok(Plan {
            viewers: args.clients().max(1),
            nodes,
            chatters: args.publishers.max(1),
            score_rate: rate(args.score_rate, "--score-rate")?,
            chat_rate: rate(args.rate.unwrap_or(20.0), "--rate")?,
            goal_factor: rate(args.goal_factor, "--goal-factor")?,
            payload_bytes: args.payload_bytes,
            encodings: [args.encoding.of(0), args.encoding.of(1)],
            kickoff: secs(args.kickoff, "--kickoff")?,
            steady: secs(args.steady, "--steady")?,
            goal: secs(args.goal, "--goal")?,
            after_kill: secs(args.after_kill, "--after-kill")?,
            whistle: secs(args.whistle, "--whistle")?,
            drain: secs(args.drain, "--drain")?,
            ramp_per_sec: rate(args.ramp_per_sec, "--ramp-per-sec")?,
            connect_timeout: secs(args.connect_timeout, "--connect-timeout")?,
            backoff: (
                secs(args.backoff_base_ms / 1e3, "--backoff-base-ms")?,
                secs(args.backoff_cap_ms / 1e3, "--backoff-cap-ms")?,
            ),
            drain_jitter: secs(args.drain_jitter, "--drain-jitter")?,
            source_addrs: args.source_addrs,
            node_bin: args.node_bin()?,
            out: args.out(),
        })
    }

    /// The nodes' settings beside their address, Redis and id: the score room keeps history, a
    /// publish is acknowledged once a replica has it (so a master's death loses none), and a
    /// drain spreads its clients over `--drain-jitter`.
    fn node_args(&self) -> Vec<String> {
        let jitter_ms = self.drain_jitter.as_millis();
        [
            "--history",
            &format!("{SCORE}=1000/10m"),
            "--publish-replicas",
            "1",
            "--drain-jitter",
            &format!("{jitter_ms}ms"),
            "--drain-timeout",
            &format!("{}ms", jitter_ms + 3000),
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// Each publisher's part: the score's first, then the chat's, sharing its rate.
    fn parts(&self) -> Vec<Part> {
        let score = Part {
            id: 0,
            room: Room::Score,
            rate: self.score_rate,
            goal_factor: 1.0,
        };
        let chat = (1..=self.chatters).map(|id| Part {
            id: id as u32,
            room: Room::Chat,
            rate: self.chat_rate / self.chatters as f64,
            goal_factor: self.goal_factor,
        });
        std::iter::once(score).chain(chat).collect()
    }
}

/// How long the viewers' tasks may take to end once told to.
const LEAVE: Duration = Duration::from_secs(10);

/// What the clients left behind.
struct Played {
    viewers: Vec<ViewerLog>,
    publishers: Vec<PubLog>,
    /// Each phase's (start, end), seconds into the run.
    windows: Vec<(f64, f64)>,
    /// Viewers in both rooms at each phase's end.
    connected_at_end: Vec<usize>,
}

/// Plays the plan: the venue, the clients, the phases; writes the JSON report and the timeline
/// to `plan.out`. Everything started is stopped however it ends.
pub fn run(plan: &Plan, runtime: &Runtime) -> anyhow::Result<MatchReport> {
    std::fs::create_dir_all(&plan.out)?;
    let scratch = plan.out.join("run");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let mut venue = Venue::open(Ground {
        nodes: plan.nodes,
        node_bin: plan.node_bin.clone(),
        node_args: plan.node_args(),
        drain_deadline: plan.drain_jitter + Duration::from_secs(10),
        scratch,
    })?;
    let live = Arc::new(Live::new());
    let ctx = Arc::new(Ctx {
        lb: runtime.block_on(NodeUrl::resolve(&venue.lb.url()))?,
        score_room: SCORE.into(),
        chat_room: venue.room_beside(SCORE, CHAT)?,
        publishers: plan.chatters + 1,
        payload_bytes: plan.payload_bytes,
        encodings: plan.encodings,
        source_addrs: plan.source_addrs,
        backoff: plan.backoff,
        connect_timeout: plan.connect_timeout,
        live: live.clone(),
    });
    let sampler = Sampler::start(live.clone());
    let played = play(plan, runtime, &mut venue, &ctx);
    let samples = sampler.stop();
    let (node_pids, redis_pids, haproxy_pid) =
        (venue.node_pids.clone(), venue.redis_pids().to_vec(), venue.haproxy_pid);
    venue.close();
    let played = played?;
    let rooms = [ctx.score_room.clone(), ctx.chat_room.clone()];
    let report = summarize(
        plan,
        &live,
        played,
        samples,
        rooms,
        (node_pids, redis_pids, haproxy_pid),
    );
    std::fs::write(plan.out.join("matchday.json"), serde_json::to_string_pretty(&report)?)?;
    let bands: Vec<Band> = report
        .phases
        .iter()
        .map(|p| (p.phase.name(), p.start_s, p.start_s + p.secs))
        .collect();
    let events: Vec<(f64, String)> = report.events.iter().map(|e| (e.t_s, e.what.clone())).collect();
    std::fs::write(
        plan.out.join("matchday.svg"),
        timeline::svg(&report.timeline, &bands, &events, plan.viewers),
    )?;
    Ok(report)
}

/// The match itself, phase by phase.
fn play(plan: &Plan, runtime: &Runtime, venue: &mut Venue, ctx: &Arc<Ctx>) -> anyhow::Result<Played> {
    let live = &ctx.live;
    let (stop_feed, feed_stopped) = watch::channel(false);
    let (stop_viewers, viewers_stopped) = watch::channel(false);
    let mut starts = Vec::new();
    let mut connected_at_end = Vec::new();
    let mut enter = |phase: Phase, starts: &mut Vec<f64>| {
        if !starts.is_empty() {
            connected_at_end.push(live.connected.load(Ordering::Relaxed));
        }
        live.enter(phase);
        starts.push(live.secs());
    };

    enter(Phase::Kickoff, &mut starts);
    let publishers: Vec<JoinHandle<PubLog>> = plan
        .parts()
        .into_iter()
        .map(|part| runtime.spawn(feed::publisher(ctx.clone(), part, feed_stopped.clone())))
        .collect();
    let viewers = kick_off(plan, runtime, ctx, &viewers_stopped);

    enter(Phase::Steady, &mut starts);
    std::thread::sleep(plan.steady);
    enter(Phase::Goal, &mut starts);
    std::thread::sleep(plan.goal);
    enter(Phase::Deploy, &mut starts);
    for i in 0..venue.nodes() {
        venue.redeploy(i, live)?;
    }
    enter(Phase::Failover, &mut starts);
    venue.kill_master(&ctx.score_room, live)?;
    std::thread::sleep(plan.after_kill);
    enter(Phase::Whistle, &mut starts);
    std::thread::sleep(plan.whistle);
    connected_at_end.push(live.connected.load(Ordering::Relaxed));
    live.over();
    let whistle_end = live.secs();
    let _ = stop_feed.send(true);
    live.event("the feed stops".into());
    settle(live, plan.drain);
    let _ = stop_viewers.send(true);
    live.event("the viewers leave".into());

    let (viewers, publishers) = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + LEAVE;
        let viewers = tasks::join_by(viewers, deadline).await;
        (viewers, tasks::join_by(publishers, deadline).await)
    });
    let publishers = publishers
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("a publisher's task did not end")?;
    let viewers = viewers
        .into_iter()
        .map(|v| {
            // A viewer whose task did not end in time counts as gone, with nothing received.
            v.unwrap_or_else(|| ViewerLog {
                received: Received::new(ctx.publishers),
                counts: Counts::per_phase(),
            })
        })
        .collect();
    let mut windows: Vec<(f64, f64)> = starts.windows(2).map(|w| (w[0], w[1])).collect();
    windows.push((*starts.last().unwrap_or(&0.0), whistle_end));
    Ok(Played {
        viewers,
        publishers,
        windows,
        connected_at_end,
    })
}

/// Kick-off: the viewers start, `--ramp-per-sec` at a time, and the phase lasts until every one
/// is in both rooms, `--kickoff` at most.
fn kick_off(
    plan: &Plan,
    runtime: &Runtime,
    ctx: &Arc<Ctx>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<ViewerLog>> {
    let started = Instant::now();
    let deadline = started + plan.kickoff;
    let mut viewers = Vec::with_capacity(plan.viewers);
    while viewers.len() < plan.viewers {
        let due = crate::conn::ramp_due(started.elapsed(), plan.ramp_per_sec, plan.viewers);
        while viewers.len() < due {
            viewers.push(runtime.spawn(viewer::viewer(ctx.clone(), viewers.len(), stop.clone())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    while ctx.live.connected.load(Ordering::Relaxed) < plan.viewers && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ctx.live.event(format!(
        "{} of {} viewers in both rooms",
        ctx.live.connected.load(Ordering::Relaxed),
        plan.viewers
    ));
    viewers
}

/// After the feed stopped: waits until the viewers have received nothing for a second, and at
/// least the chat's grace (a phase's last messages may still arrive that long after it), at most
/// `drain` (or the grace, if longer).
fn settle(live: &Live, drain: Duration) {
    let start = Instant::now();
    let grace = Duration::from_secs_f64(GRACE + 0.5);
    let deadline = start + drain.max(grace);
    let mut last = (live.received.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = live.received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) && start.elapsed() >= grace {
            return;
        }
    }
}

/// The report from what the clients left behind.
fn summarize(
    plan: &Plan,
    live: &Live,
    played: Played,
    timeline: Vec<timeline::Sample>,
    rooms: [String; 2],
    (node_pids, redis_pids, haproxy_pid): (Vec<u32>, Vec<u32>, u32),
) -> MatchReport {
    let Played {
        viewers,
        publishers,
        windows,
        connected_at_end,
    } = played;
    let received: Vec<Received> = viewers.iter().map(|v| v.received.clone()).collect();
    let sent: Vec<Sent> = publishers.iter().map(|p| p.sent.clone()).collect();
    let tallies = tally(&sent, &received, PHASES.len());
    let phases = PHASES
        .iter()
        .enumerate()
        .map(|(k, phase)| {
            let mut viewer_counts = Counts::default();
            for v in &viewers {
                viewer_counts.add(&v.counts[k]);
            }
            let mut publisher_counts = Counts::default();
            for p in &publishers {
                publisher_counts.add(&p.counts[k]);
            }
            let (start, end) = windows[k];
            let room = |room: Room| room_report(live, &publishers, &tallies[k][room.index()], k, room);
            PhaseReport {
                phase: *phase,
                start_s: start,
                secs: end - start,
                viewers_connected: connected_at_end[k],
                viewers_connected_min: Some(live.connected_min[k].load(Ordering::Relaxed)).filter(|m| *m != usize::MAX),
                closed_by_node: viewer_counts.closed,
                left_on_time: viewer_counts.left_on_time,
                failed_tries: viewer_counts.failed,
                joins_refused: viewer_counts.refused,
                resumes_recovered: viewer_counts.recovered,
                resumes_not_recovered: viewer_counts.not_recovered,
                rejoined: viewer_counts.rejoined,
                time_to_connect_ms: Latency::of(&live.to_connect[k].merged()),
                publishers_closed: publisher_counts.closed,
                publishers_failed_tries: publisher_counts.failed,
                score: room(Room::Score),
                chat: room(Room::Chat),
            }
        })
        .collect();
    let events = live
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(t, what)| Event {
            t_s: *t,
            what: what.clone(),
        })
        .collect();
    MatchReport {
        scenario: "matchday",
        viewers: plan.viewers,
        nodes: plan.nodes,
        redis_masters: 3,
        redis_replicas: 3,
        rooms,
        chat_publishers: plan.chatters,
        score_rate: plan.score_rate,
        chat_rate: plan.chat_rate,
        goal_factor: plan.goal_factor,
        payload_bytes: plan.payload_bytes,
        encodings: plan.encodings,
        node_args: plan.node_args(),
        duration_s: live.secs(),
        viewers_joined_at_end: received.iter().filter(|r| r.joined_at_end).count(),
        score_acked_with_pos: publishers
            .iter()
            .filter(|p| p.sent.room == Room::Score)
            .map(|p| p.acked_with_pos)
            .sum(),
        unexpected: received.iter().map(|r| r.unexpected).sum(),
        phases,
        events,
        timeline,
        node_pids,
        redis_pids,
        haproxy_pid,
    }
}

/// One room's publishing over phase `k`, beside its books.
fn room_report(live: &Live, publishers: &[PubLog], books: &Tally, k: usize, room: Room) -> RoomReport {
    let mut r = RoomReport {
        sent: 0,
        acked: 0,
        refused: Default::default(),
        unanswered: 0,
        not_sent: 0,
        viewers_counted: books.viewers_counted,
        expected: books.expected,
        lost: books.lost,
        duplicates: books.duplicates,
        reordered: books.reordered,
        latency_ms: Latency::of(&live.latency[k][room.index()].merged()),
    };
    for p in publishers.iter().filter(|p| p.sent.room == room) {
        let of_phase = p
            .sent
            .phase
            .iter()
            .zip(&p.sent.acked)
            .filter(|(ph, _)| **ph as usize == k);
        let (sent, acked) = of_phase.fold((0, 0), |(s, a), (_, ack)| (s + 1, a + u64::from(*ack)));
        let refused: u64 = p.refused[k].values().sum();
        r.sent += sent;
        r.acked += acked;
        r.unanswered += sent.saturating_sub(acked + refused);
        r.not_sent += p.not_sent[k];
        for (code, n) in &p.refused[k] {
            *r.refused.entry(code.clone()).or_insert(0) += n;
        }
    }
    r
}
