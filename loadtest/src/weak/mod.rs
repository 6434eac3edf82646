//! The `weak` run: what conflation does for viewers on a weak link, and that it costs the others
//! nothing. One room (`--room`, default `match:weak`) gets a score feed (`--rate`, 20 msg/s, of
//! `--value-bytes`, 1 KB, keyed `score`, each carrying its publish time) and a chat (`--chat-rate`,
//! 4 msg/s, unkeyed, `--payload-bytes`). Of `--clients` viewers (200), a share (`--weak-share`,
//! 0.1) is weak: a 4 KB receive buffer and reads paced at `--weak-bytes-per-sec` (4,096) over a
//! [`crate::weaklink`], so the score comes in five times faster than they read it.
//!
//! The same load runs once per mode of `--modes`, each against a node started for it with the
//! embedded bus (`--node-bin`, its log beside the report):
//!
//! - **conflate**: the node with `--conflate` on the room and `--conflate-above` (16 KiB): a weak
//!   socket past it gets the latest score instead of every score, marked with what it skipped;
//! - **plain**: no conflation: a weak socket's bytes queue until `--max-buffered-bytes` (the node's
//!   default, 1 MiB, unless given) and the node closes it with 4008.
//!
//! Per mode it reports the weak viewers' closes (as they saw them, and as the node's counter saw
//! them), the age of the score they showed (sampled every 100 ms: now less the publish time of the
//! last score they got), what they skipped, the bytes the kernel held for them when the feed
//! stopped, and the healthy viewers' score latency, which should not change between the modes.
//! The JSON report goes to `--out`. Everything started is stopped however the run ends.

mod feed;
mod report;
mod viewer;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{runtime::Runtime, sync::watch, task::JoinHandle};

pub use report::WeakReport;

use crate::{
    conn::NodeUrl,
    procfs,
    procs::{free_port, ready, Proc},
    report::{counts, Latency},
    scrape, tasks,
    weaklink::Link,
    wire, Args,
};

use self::{
    feed::{Part, PubLog, CHAT, SCORE},
    report::{increments, kernel_bytes, AgeWindow, HealthySide, ModeReport, NodeSide, Spread, WeakSide},
    viewer::{Ctx, ViewerLog},
};

/// How the node treats the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `--conflate` on the room.
    Conflate,
    /// No conflation.
    Plain,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub viewers: usize,
    pub weak: usize,
    pub link: Link,
    pub room: String,
    pub score_rate: f64,
    pub score_bytes: usize,
    pub chat_rate: f64,
    pub chat_bytes: usize,
    pub duration: Duration,
    pub drain: Duration,
    pub modes: Vec<Mode>,
    pub conflate_above: String,
    pub max_buffered_bytes: Option<String>,
    pub ramp_per_sec: f64,
    pub connect_timeout: Duration,
    pub source_addrs: u8,
    pub node_bin: PathBuf,
    pub out: PathBuf,
}

/// A run longer than this per mode is refused: the machine is shared.
const MAX_DURATION: f64 = 60.0;

impl Plan {
    /// The plan the command line asks for; refused for what cannot be run.
    pub fn from_args(args: &Args) -> anyhow::Result<Plan> {
        let positive = |v: f64, name: &str| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                bail!("{name} must be positive")
            }
        };
        let viewers = args.clients();
        if !(0.0..=1.0).contains(&args.weak_share) {
            bail!("--weak-share must be from 0 to 1");
        }
        let duration = positive(args.duration, "--duration")?;
        if duration > MAX_DURATION {
            bail!("--duration: at most {MAX_DURATION} s a mode");
        }
        if args.modes.is_empty() {
            bail!("--modes: at least one");
        }
        Ok(Plan {
            viewers,
            weak: (viewers as f64 * args.weak_share).round() as usize,
            link: Link {
                rcvbuf: args.weak_rcvbuf,
                mss: args.weak_mss,
                bytes_per_sec: positive(args.weak_bytes_per_sec, "--weak-bytes-per-sec")?,
            },
            room: args.room(),
            score_rate: positive(args.rate.unwrap_or(20.0), "--rate")?,
            score_bytes: args.value_bytes(),
            chat_rate: positive(args.chat_rate, "--chat-rate")?,
            chat_bytes: args.payload_bytes,
            duration: Duration::from_secs_f64(duration),
            drain: Duration::from_secs_f64(args.drain.clamp(0.0, 10.0)),
            modes: args.modes.clone(),
            conflate_above: args.conflate_above.clone(),
            max_buffered_bytes: args.max_buffered_bytes.clone(),
            ramp_per_sec: positive(args.ramp_per_sec, "--ramp-per-sec")?,
            connect_timeout: Duration::from_secs_f64(positive(args.connect_timeout, "--connect-timeout")?),
            source_addrs: args.source_addrs,
            node_bin: args.node_bin()?,
            out: args.out(),
        })
    }

    /// The node's flags in `mode`, beside its address and id.
    pub fn node_args(&self, mode: Mode) -> Vec<String> {
        let mut a = Vec::new();
        if mode == Mode::Conflate {
            a.extend(["--conflate".into(), conflate_rule(&self.room)]);
            a.extend(["--conflate-above".into(), self.conflate_above.clone()]);
        }
        if let Some(b) = &self.max_buffered_bytes {
            a.extend(["--max-buffered-bytes".into(), b.clone()]);
        }
        a
    }
}

/// The `--conflate` rule that takes the room: `match:*` for a `match:` room, as a deployment would
/// name its match rooms, else the room's own name.
fn conflate_rule(room: &str) -> String {
    if room.starts_with("match:") {
        "match:*".into()
    } else {
        room.into()
    }
}

/// Runs every mode of the plan in turn, a node of its own each; writes `weak.json` to `plan.out`.
pub fn run(plan: &Plan, runtime: &Runtime) -> anyhow::Result<WeakReport> {
    std::fs::create_dir_all(&plan.out)?;
    let mut modes = Vec::new();
    for mode in &plan.modes {
        let m = run_mode(plan, *mode, runtime)?;
        eprintln!(
            "{}: weak closed {}, score age p99 {:.0} ms, skipped {}; healthy p99 {:.2} ms",
            m.mode,
            counts(&m.weak.closed),
            m.weak.score_age_ms.p99,
            m.weak.skipped,
            m.healthy.score_latency_ms.p99
        );
        modes.push(m);
    }
    let report = WeakReport {
        scenario: "weak",
        room: plan.room.clone(),
        viewers: plan.viewers,
        weak_viewers: plan.weak,
        weak_bytes_per_sec: plan.link.bytes_per_sec,
        weak_rcvbuf: plan.link.rcvbuf,
        weak_mss: plan.link.mss,
        score_rate: plan.score_rate,
        score_bytes: plan.score_bytes,
        chat_rate: plan.chat_rate,
        chat_bytes: plan.chat_bytes,
        duration_s: plan.duration.as_secs_f64(),
        modes,
    };
    std::fs::write(plan.out.join("weak.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

/// How long the viewers' tasks may take to end once told to.
const LEAVE: Duration = Duration::from_secs(5);

/// One mode: its node, the viewers, the feed; the node stopped at the end, however it ends.
fn run_mode(plan: &Plan, mode: Mode, runtime: &Runtime) -> anyhow::Result<ModeReport> {
    let name = mode
        .to_possible_value()
        .map_or("?".into(), |v| v.get_name().to_string());
    let port = free_port()?;
    let log = std::fs::File::create(plan.out.join(format!("node-{name}.log")))?;
    let mut node = Proc::spawn(
        Command::new(&plan.node_bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-id", &format!("weak-{name}")])
            .args(plan.node_args(mode))
            .stdout(Stdio::null())
            .stderr(log),
        format!("node ({name})"),
    )?;
    ready(port, Instant::now() + Duration::from_secs(30))?;
    let url = runtime.block_on(NodeUrl::resolve(&format!("ws://127.0.0.1:{port}/ws")))?;
    let ctx = Arc::new(Ctx {
        node: url.clone(),
        room: plan.room.clone(),
        source_addrs: plan.source_addrs,
        viewers: plan.viewers,
        weak: plan.weak,
        link: plan.link,
        connect_timeout: plan.connect_timeout,
        last_score: (0..plan.viewers).map(|_| AtomicU64::new(0)).collect(),
        open: (0..plan.viewers).map(|_| AtomicBool::new(false)).collect(),
        local: (0..plan.viewers).map(|_| OnceLock::new()).collect(),
        joined: AtomicUsize::new(0),
        healthy_latency: crate::stats::Latencies::new(8),
        feed_start: OnceLock::new(),
    });
    let (stop, stopped) = watch::channel(false);
    let viewers = start_viewers(plan, runtime, &ctx, &stopped);

    // The feed, the samplers: from here the clock of the report runs.
    let cpu_before = procfs::sample(node.pid())?;
    let started = Instant::now();
    let _ = ctx.feed_start.set(tokio::time::Instant::from_std(started));
    let watcher = NodeWatch::start(port, started);
    let parts = [
        (SCORE, plan.score_rate, plan.score_bytes),
        (CHAT, plan.chat_rate, plan.chat_bytes),
    ]
    .map(|(publisher, rate, size)| Part {
        publisher,
        room: plan.room.clone(),
        rate,
        size,
        duration: plan.duration,
    });
    let publishers: Vec<JoinHandle<anyhow::Result<PubLog>>> = parts
        .into_iter()
        .map(|p| runtime.spawn(feed::publisher(url.clone(), p)))
        .collect();
    let ages = runtime.spawn(ages(ctx.clone(), started + plan.duration));
    let ages = runtime
        .block_on(async { tokio::time::timeout(plan.duration + Duration::from_secs(5), ages).await })
        .context("the age sampler did not end")??;
    let locals: Vec<String> = ctx.weak_viewers().filter_map(|i| ctx.local[i].get().cloned()).collect();
    let held = kernel_snapshot(port, &locals);
    let open_at_end = ctx
        .weak_viewers()
        .filter(|i| ctx.open[*i].load(Ordering::Relaxed))
        .count();
    let cpu_after = procfs::sample(node.pid())?;
    let logs = runtime.block_on(async {
        let mut pubs = Vec::new();
        for p in publishers {
            pubs.push(tokio::time::timeout(Duration::from_secs(10), p).await);
        }
        pubs
    });
    let mut pubs = Vec::new();
    for l in logs {
        pubs.push(l.context("a publisher did not end")?.context("a publisher's task")??);
    }
    std::thread::sleep(plan.drain);
    let node_samples = watcher.stop();
    let _ = stop.send(true);
    let viewers = collect(runtime, viewers);
    let [conflated, drops] = scrape::sums(&[port], [scrape::CONFLATED, scrape::SLOW_DROPS]);
    node.stop(Duration::from_secs(5));

    Ok(summarize(
        plan,
        mode,
        &name,
        Outcome {
            viewers,
            pubs,
            ages,
            held,
            open_at_end,
            node_samples,
            conflated,
            drops,
            cpu_s: cpu_after.cpu_ns.saturating_sub(cpu_before.cpu_ns) as f64 / 1e9,
            rss: cpu_after.rss,
        },
        &ctx,
    ))
}

/// Starts the viewers, `--ramp-per-sec` at a time, weak ones spread among the others; waits until
/// all have joined (or `--connect-timeout` after the last started). Viewer `i` is the `i`-th.
fn start_viewers(
    plan: &Plan,
    runtime: &Runtime,
    ctx: &Arc<Ctx>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<ViewerLog>> {
    let started = Instant::now();
    let mut handles = Vec::with_capacity(plan.viewers);
    while handles.len() < plan.viewers {
        let due = crate::conn::ramp_due(started.elapsed(), plan.ramp_per_sec, plan.viewers);
        while handles.len() < due {
            let idx = handles.len();
            handles.push(runtime.spawn(viewer::viewer(ctx.clone(), idx, stop.clone())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + plan.connect_timeout;
    while handles.iter().any(|h| !h.is_finished())
        && ctx.joined.load(Ordering::Relaxed) + handles.iter().filter(|h| h.is_finished()).count() < plan.viewers
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    handles
}

/// Whether viewer `idx` of `n` is one of the `weak`: every `n / weak`-th, so both kinds connect
/// over the whole ramp and exactly `weak` are weak.
pub fn is_weak(idx: usize, n: usize, weak: usize) -> bool {
    n > 0 && idx < n && (idx * weak) / n != ((idx + 1) * weak) / n
}

/// The ages sampled: over the whole feed, and per [`AGE_WINDOW`] of it.
struct Ages {
    all: Histogram<u64>,
    windows: Vec<Histogram<u64>>,
}

/// How the ages are cut over time, to see whether they settle or grow.
const AGE_WINDOW: Duration = Duration::from_secs(5);

/// The window of a sample `elapsed` into a feed of `feed`: the feed's last moments (a window too
/// short to say anything) count in its last whole window.
fn window_of(elapsed: Duration, feed: Duration) -> usize {
    // Rounded: the sampling starts a moment after the feed, so a 40 s feed is sampled for 39.99 s.
    let whole = ((feed.as_secs_f64() / AGE_WINDOW.as_secs_f64()).round() as usize).max(1);
    ((elapsed.as_secs_f64() / AGE_WINDOW.as_secs_f64()) as usize).min(whole - 1)
}

fn age_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Samples, every 100 ms until `until`, how old the score each open weak viewer shows is: now less
/// the publish time of its last score (the sampling's start before its first).
async fn ages(ctx: Arc<Ctx>, until: Instant) -> Ages {
    let mut ages = Ages {
        all: age_histogram(),
        windows: Vec::new(),
    };
    let start = Instant::now();
    let feed = until.saturating_duration_since(start);
    let start_us = wire::now_us();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        tick.tick().await;
        let now = wire::now_us();
        let w = window_of(start.elapsed(), feed);
        while ages.windows.len() <= w {
            ages.windows.push(age_histogram());
        }
        for i in ctx.weak_viewers() {
            if ctx.open[i].load(Ordering::Relaxed) {
                let shown = ctx.last_score[i].load(Ordering::Relaxed).max(start_us);
                let age = now.saturating_sub(shown).max(1);
                ages.all.saturating_record(age);
                ages.windows[w].saturating_record(age);
            }
        }
    }
    ages
}

/// The kernel's bytes for each weak viewer in `locals`, from `ss`.
fn kernel_snapshot(port: u16, locals: &[String]) -> Vec<f64> {
    let out = Command::new("ss")
        .args([
            "-tnH",
            "state",
            "established",
            "(",
            "sport",
            "=",
            &format!(":{port}"),
            "or",
        ])
        .args(["dport", "=", &format!(":{port}"), ")"])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) => kernel_bytes(&String::from_utf8_lossy(&o.stdout), locals),
        Err(_) => Vec::new(),
    }
}

/// The node's counters over the feed: (seconds since it started, 4008 drops, conflating sockets,
/// queued bytes), every 200 ms, from a thread of its own (a scrape blocks).
struct NodeWatch {
    stop: mpsc::Sender<()>,
    samples: std::thread::JoinHandle<Vec<(f64, f64, f64, f64)>>,
}

impl NodeWatch {
    const EVERY: Duration = Duration::from_millis(200);

    fn start(port: u16, started: Instant) -> NodeWatch {
        let (stop, stopped) = mpsc::channel();
        let samples = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                let [drops, conflating, queued] =
                    scrape::sums(&[port], [scrape::SLOW_DROPS, scrape::CONFLATING, scrape::QUEUED]);
                samples.push((started.elapsed().as_secs_f64(), drops, conflating, queued));
                if stopped.recv_timeout(NodeWatch::EVERY) != Err(mpsc::RecvTimeoutError::Timeout) {
                    return samples;
                }
            }
        });
        NodeWatch { stop, samples }
    }

    fn stop(self) -> Vec<(f64, f64, f64, f64)> {
        let _ = self.stop.send(());
        self.samples.join().unwrap_or_default()
    }
}

/// Waits for the viewers' tasks, [`LEAVE`] at most; one that did not end counts as a log of
/// nothing.
fn collect(runtime: &Runtime, handles: Vec<JoinHandle<ViewerLog>>) -> Vec<ViewerLog> {
    let logs = runtime.block_on(tasks::join_by(handles, tokio::time::Instant::now() + LEAVE));
    logs.into_iter().map(Option::unwrap_or_default).collect()
}

/// What a mode left behind.
struct Outcome {
    viewers: Vec<ViewerLog>,
    pubs: Vec<PubLog>,
    ages: Ages,
    held: Vec<f64>,
    open_at_end: usize,
    node_samples: Vec<(f64, f64, f64, f64)>,
    conflated: f64,
    drops: f64,
    cpu_s: f64,
    rss: u64,
}

fn summarize(plan: &Plan, mode: Mode, name: &str, o: Outcome, ctx: &Ctx) -> ModeReport {
    let mut failed = std::collections::BTreeMap::new();
    for v in &o.viewers {
        if let Some(f) = &v.failure {
            *failed.entry(f.clone()).or_insert(0) += 1;
        }
    }
    let closes = |weak: bool| {
        let mut m = std::collections::BTreeMap::new();
        for v in o.viewers.iter().filter(|v| v.weak == weak) {
            if let Some((how, _)) = &v.closed {
                *m.entry(how.clone()).or_insert(0) += 1;
            }
        }
        m
    };
    let weak_logs = || o.viewers.iter().filter(|v| v.weak);
    let healthy_logs = || o.viewers.iter().filter(|v| !v.weak);
    let drops: Vec<(f64, f64)> = o.node_samples.iter().map(|s| (s.0, s.1)).collect();
    let mut refused = std::collections::BTreeMap::new();
    for p in &o.pubs {
        for (k, v) in &p.refused {
            *refused.entry(k.clone()).or_insert(0) += v;
        }
    }
    let max_of = |f: fn(&(f64, f64, f64, f64)) -> f64| o.node_samples.iter().map(f).fold(0.0, f64::max);
    ModeReport {
        mode: name.to_string(),
        node_args: plan.node_args(mode),
        healthy_joined: healthy_logs().filter(|v| v.joined).count(),
        weak_joined: weak_logs().filter(|v| v.joined).count(),
        failed,
        scores_sent: o.pubs[0].sent,
        scores_acked: o.pubs[0].acked,
        chat_sent: o.pubs[1].sent,
        chat_acked: o.pubs[1].acked,
        refused,
        weak: WeakSide {
            closed: closes(true),
            closed_after_s: Spread::of(weak_logs().filter_map(|v| v.closed.as_ref().map(|c| c.1)).collect()),
            node_4008_after_s: Spread::of(increments(&drops)),
            score_age_ms: Latency::of(&o.ages.all),
            score_age_by_window: o
                .ages
                .windows
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_empty())
                .map(|(k, h)| AgeWindow {
                    from_s: (k as u32 * AGE_WINDOW.as_secs() as u32) as f64,
                    p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
                    max_ms: h.max() as f64 / 1e3,
                })
                .collect(),
            scores: weak_logs().map(|v| v.scores).sum(),
            skipped: weak_logs().map(|v| v.skipped).sum(),
            chats: weak_logs().map(|v| v.chats).sum(),
            open_at_end: o.open_at_end,
            kernel_bytes_at_end: Spread::of(o.held),
        },
        healthy: HealthySide {
            score_latency_ms: Latency::of(&ctx.healthy_latency.merged()),
            scores: healthy_logs().map(|v| v.scores).sum(),
            skipped: healthy_logs().map(|v| v.skipped).sum(),
            chats: healthy_logs().map(|v| v.chats).sum(),
            closed: closes(false),
        },
        node: NodeSide {
            conflating_sockets_max: max_of(|s| s.2),
            conflated_values: o.conflated,
            slow_consumer_drops: o.drops,
            queued_bytes_max: max_of(|s| s.3),
            cpu_s: o.cpu_s,
            rss_mib: o.rss as f64 / (1024.0 * 1024.0),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_viewers_are_spread_over_the_viewers_and_exactly_as_many_as_asked() {
        let weak: Vec<usize> = (0..200).filter(|i| is_weak(*i, 200, 20)).collect();
        assert_eq!(weak.len(), 20);
        assert!(weak.windows(2).all(|w| w[1] - w[0] == 10), "{weak:?}");
        assert_eq!((0..7).filter(|i| is_weak(*i, 7, 3)).count(), 3);
        assert_eq!((0..50).filter(|i| is_weak(*i, 50, 0)).count(), 0);
        assert_eq!((0..5).filter(|i| is_weak(*i, 5, 5)).count(), 5);
        assert!(!is_weak(0, 0, 0) && !is_weak(9, 5, 5));
    }

    #[test]
    fn the_feeds_last_moments_count_in_its_last_whole_window() {
        let s = Duration::from_secs_f64;
        let feed = s(40.0);
        assert_eq!(window_of(s(0.1), feed), 0);
        assert_eq!(window_of(s(5.0), feed), 1);
        assert_eq!(window_of(s(39.9), feed), 7);
        assert_eq!(window_of(s(40.05), feed), 7, "not a window of its own");
        assert_eq!(
            window_of(s(39.9), s(39.99)),
            7,
            "a feed sampled a moment late keeps its windows"
        );
        assert_eq!(window_of(s(42.0), s(42.0)), 7);
        assert_eq!(window_of(s(3.0), s(3.0)), 0, "a feed shorter than a window has one");
    }

    #[test]
    fn the_conflate_rule_takes_the_room() {
        assert_eq!(conflate_rule("match:weak"), "match:*");
        assert_eq!(conflate_rule("scores"), "scores");
        let plan = Plan::from_args(&Args::of("lt weak --node-bin /bin/true")).unwrap();
        assert_eq!((plan.viewers, plan.weak, plan.score_bytes), (200, 20, 1024));
        assert_eq!(
            plan.node_args(Mode::Conflate),
            ["--conflate", "match:*", "--conflate-above", "16KiB"]
        );
        assert!(plan.node_args(Mode::Plain).is_empty());
        assert!(
            Plan::from_args(&Args::of("lt weak --duration 90")).is_err(),
            "held under a minute"
        );
        assert!(Plan::from_args(&Args::of("lt weak --weak-share 1.5")).is_err());
    }
}
