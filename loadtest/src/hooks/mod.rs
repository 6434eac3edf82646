//! The `hooks` run: what the publish hook costs a chat, and what a dead backend does to it. A chat
//! of `--clients` members (10,000) in `--rooms` rooms (1,000), every member publishing to its room
//! and reading it at `--rate` messages a second all together (2,000), runs three times, each on a
//! node of its own (embedded bus, `--node-bin`, its log beside the report):
//!
//! - **plain**: no hook, the baseline for latency and the node's CPU per publish;
//! - **hooks**: `--hook-publish` to a [`backend`] this process runs, which allows every line and
//!   masks every tenth ([`backend::masks`]); after the run the lines the members received are
//!   held against the lines the backend masked: masked exactly when it masked them;
//! - **outage**: the same, with the backend stopped from 30 % to 60 % of `--duration`: publishes
//!   must be answered `unavailable` (or `ok`, with `--hook-on-error allow`) within
//!   `--hook-timeout-ms`, the node's breaker open (its `shardcast_hook_breakers_open`, scraped
//!   every 100 ms), lines already acknowledged still delivered, and publishing back within one
//!   breaker cool-down ([`COOL_DOWN`]) of the return.
//!
//! Per run it reports deliveries, lines lost among the acknowledged, reorders and duplicates per
//! sender, masked lines, end-to-end latency, the backend's own latency, and the node's CPU per
//! acknowledged publish (utime + stime from /proc, from the first publish to the end of the
//! drain). The JSON report goes to `--out`. Everything started is stopped however the run ends.

mod backend;
mod chatter;
mod ledger;
mod report;

use std::{
    collections::HashSet,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use tokio::{runtime::Runtime, sync::watch, task::JoinHandle};

pub use report::HooksReport;

use crate::{
    conn::{NodeUrl, Phase},
    procfs,
    procs::{free_port, ready, Proc},
    report::Latency,
    scrape, stats, tasks, wire, Args,
};

use self::{
    backend::Backend,
    chatter::{Ctx, Log},
    ledger::Answer,
    report::{BackendSide, OutageSide, RunReport},
};

/// The node's breaker cool-down (`src/hooks/breaker.rs`): publishing must resume within it of the
/// backend's return.
pub const COOL_DOWN: Duration = Duration::from_secs(2);

/// The node's gauge of open breakers.
const BREAKERS_OPEN: &str = "shardcast_hook_breakers_open";

/// A run longer than this is refused: the machine is shared.
const MAX_DURATION: f64 = 60.0;

/// The three runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Hooks,
    Outage,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Hooks => "hooks",
            Kind::Outage => "outage",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub clients: usize,
    pub rooms: usize,
    pub rate: f64,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub drain: Duration,
    pub ramp_per_sec: f64,
    pub connect_timeout: Duration,
    pub source_addrs: u8,
    pub hook_timeout: Duration,
    /// `--hook-on-error publish=allow` rather than deny.
    pub allow: bool,
    pub prefix: String,
    pub node_bin: PathBuf,
    pub out: PathBuf,
}

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
        let clients = args.clients();
        if clients < 2 {
            bail!("--clients: at least 2");
        }
        let duration = positive(args.duration, "--duration")?;
        if duration > MAX_DURATION {
            bail!("--duration: at most {MAX_DURATION} s a run");
        }
        Ok(Plan {
            clients,
            rooms: args.rooms().clamp(1, clients),
            rate: positive(args.rate.unwrap_or(2000.0), "--rate")?,
            payload_bytes: args.payload_bytes,
            duration: Duration::from_secs_f64(duration),
            drain: Duration::from_secs_f64(args.drain.clamp(0.5, 10.0)),
            ramp_per_sec: positive(args.ramp_per_sec, "--ramp-per-sec")?,
            connect_timeout: Duration::from_secs_f64(positive(args.connect_timeout, "--connect-timeout")?),
            source_addrs: args.source_addrs,
            hook_timeout: Duration::from_millis(args.hook_timeout_ms.max(1)),
            allow: args.hook_on_error == "allow",
            prefix: args.prefix.clone(),
            node_bin: args.node_bin()?,
            out: args.out(),
        })
    }

    /// Members per room (the last room may have fewer).
    fn per_room(&self) -> usize {
        self.clients.div_ceil(self.rooms)
    }

    /// The members of the room of member `idx`.
    fn room_members(&self, idx: usize) -> std::ops::Range<usize> {
        let r = idx / self.per_room();
        r * self.per_room()..((r + 1) * self.per_room()).min(self.clients)
    }

    /// The node's flags for `kind`, the backend at `url`.
    pub fn node_args(&self, kind: Kind, url: Option<&str>) -> Vec<String> {
        match (kind, url) {
            (Kind::Plain, _) | (_, None) => Vec::new(),
            (_, Some(url)) => vec![
                "--hook-publish".into(),
                format!("{}-r*={url}", self.prefix),
                "--hook-timeout".into(),
                format!("{}ms", self.hook_timeout.as_millis()),
                "--hook-on-error".into(),
                format!("publish={}", if self.allow { "allow" } else { "deny" }),
            ],
        }
    }
}

/// Runs plain, hooks and outage in turn; writes `hooks.json` to `plan.out`.
pub fn run(plan: &Plan, runtime: &Runtime) -> anyhow::Result<HooksReport> {
    std::fs::create_dir_all(&plan.out)?;
    let mut runs = Vec::new();
    for kind in [Kind::Plain, Kind::Hooks, Kind::Outage] {
        let r = run_one(plan, kind, runtime)?;
        eprintln!(
            "{}: acked {}, delivered {}, lost {}, reordered {}, p99 {:.2} ms, node CPU {:.1} µs/publish",
            r.run,
            r.acked,
            r.delivered,
            r.lost,
            r.reordered,
            r.latency_ms.p99,
            r.node_cpu_us_per_publish.unwrap_or(0.0)
        );
        runs.push(r);
    }
    let report = HooksReport::new(plan, runs);
    std::fs::write(plan.out.join("hooks.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

/// How long the members' tasks may take to end once told to.
const LEAVE: Duration = Duration::from_secs(10);

/// One run: its backend and node, the members, the load; everything stopped at the end.
fn run_one(plan: &Plan, kind: Kind, runtime: &Runtime) -> anyhow::Result<RunReport> {
    let mut backend = match kind {
        Kind::Plain => None,
        _ => Some(runtime.block_on(Backend::start())?),
    };
    let url = backend.as_ref().map(Backend::url);
    let node_args = plan.node_args(kind, url.as_deref());
    let port = free_port()?;
    let log = std::fs::File::create(plan.out.join(format!("node-{}.log", kind.name())))?;
    let mut node = Proc::spawn(
        Command::new(&plan.node_bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-id", &format!("hooks-{}", kind.name())])
            .args(&node_args)
            .stdout(Stdio::null())
            .stderr(log),
        format!("node ({})", kind.name()),
    )?;
    ready(port, Instant::now() + Duration::from_secs(30))?;
    let ctx = Arc::new(Ctx {
        node: runtime.block_on(NodeUrl::resolve(&format!("ws://127.0.0.1:{port}/ws")))?,
        prefix: plan.prefix.clone(),
        per_room: plan.per_room(),
        rooms: plan.rooms,
        source_addrs: plan.source_addrs,
        period: Duration::from_secs_f64(plan.clients as f64 / plan.rate),
        payload_bytes: plan.payload_bytes,
        connect_timeout: plan.connect_timeout,
        latencies: stats::Latencies::new(8),
        delivered: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        joined: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let (phase, phased) = watch::channel(Phase::Ramp);
    let members = start_members(plan, runtime, &ctx, &phased);

    // From here the window of the node's CPU runs.
    let cpu_before = procfs::sample(node.pid())?;
    let started = Instant::now();
    let _ = phase.send(Phase::Run(tokio::time::Instant::from_std(started)));
    let watch = (kind == Kind::Outage).then(|| BreakerWatch::start(port, started));
    let mut times = None;
    if kind == Kind::Outage {
        std::thread::sleep(plan.duration.mul_f64(0.3));
        let stop_us = wire::now_us();
        let stopped = runtime.block_on(backend.take().expect("a backend").stop());
        std::thread::sleep((started + plan.duration.mul_f64(0.6)).saturating_duration_since(Instant::now()));
        let back_us = wire::now_us();
        backend = Some(runtime.block_on(stopped.start())?);
        times = Some((stop_us, back_us, started.elapsed().as_secs_f64()));
    }
    std::thread::sleep((started + plan.duration).saturating_duration_since(Instant::now()));
    let _ = phase.send(Phase::Quiet);
    drain(plan, &ctx);
    let cpu_after = procfs::sample(node.pid())?;
    let window_s = started.elapsed().as_secs_f64();
    let breakers = watch.map(BreakerWatch::stop).unwrap_or_default();
    let _ = phase.send(Phase::Finish);
    let logs = collect(runtime, members);
    let answered = backend.as_ref().map(Backend::answered);
    let masked_by_backend = answered.as_ref().map(|a| a.masked.clone()).unwrap_or_default();
    node.stop(Duration::from_secs(5));
    if let Some(b) = backend {
        runtime.block_on(b.stop());
    }

    let mut r = summarize(plan, kind, node_args, &logs, &ctx, &masked_by_backend);
    r.node_cpu_s = cpu_after.cpu_ns.saturating_sub(cpu_before.cpu_ns) as f64 / 1e9;
    r.window_s = window_s;
    r.node_cpu_us_per_publish = ledger::cpu_per_publish_us(cpu_after.cpu_ns.saturating_sub(cpu_before.cpu_ns), r.acked);
    let answered_at_us = answered.as_ref().map(|a| a.answered_at_us.clone()).unwrap_or_default();
    r.backend = answered.map(|a| BackendSide {
        latency_ms: Latency::of(&a.latency_us),
        allowed: a.allowed,
        masked: a.masked.len() as u64,
        bad: a.bad,
    });
    r.added_p99_ms = r
        .backend
        .as_ref()
        .map(|b| ledger::added_ms(r.latency_ms.p99, b.latency_ms.p99));
    r.outage = times.map(|(stop_us, back_us, back_at_s)| {
        let opened = breakers
            .iter()
            .find(|(t, open)| *t >= 0.3 * plan.duration.as_secs_f64() && *open > 0.0);
        OutageSide {
            stop_at_s: 0.3 * plan.duration.as_secs_f64(),
            back_at_s,
            publishing: ledger::outage(
                logs.iter().flat_map(|l| l.sent.iter()),
                stop_us,
                back_us,
                &answered_at_us,
            ),
            breaker_opened_after_ms: opened.map(|(t, _)| (t - 0.3 * plan.duration.as_secs_f64()) * 1e3),
            breakers_open_max: breakers.iter().map(|b| b.1).fold(0.0, f64::max),
            breakers_open_at_end: breakers.last().map_or(0.0, |b| b.1),
        }
    });
    Ok(r)
}

/// Starts the members, `--ramp-per-sec` at a time; waits until all have joined or failed (or
/// `--connect-timeout` after the last started).
fn start_members(
    plan: &Plan,
    runtime: &Runtime,
    ctx: &Arc<Ctx>,
    phase: &watch::Receiver<Phase>,
) -> Vec<JoinHandle<Log>> {
    let started = Instant::now();
    let mut handles = Vec::with_capacity(plan.clients);
    while handles.len() < plan.clients {
        let due = crate::conn::ramp_due(started.elapsed(), plan.ramp_per_sec, plan.clients);
        while handles.len() < due {
            handles.push(runtime.spawn(chatter::run(ctx.clone(), handles.len(), phase.clone())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + plan.connect_timeout;
    while ctx.joined.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed) < plan.clients
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    handles
}

/// After the last publish: waits until every acknowledged line reached its room (at most
/// `--drain`), and at least long enough for the last answers.
fn drain(plan: &Plan, ctx: &Ctx) {
    let deadline = Instant::now() + plan.drain;
    std::thread::sleep(Duration::from_millis(300));
    let fan = plan.per_room() as u64;
    while ctx.delivered.load(Ordering::Relaxed) < ctx.acked.load(Ordering::Relaxed) * fan && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node's open breakers (seconds since the first publish, gauge), every 100 ms, from a thread
/// of its own (a scrape blocks).
struct BreakerWatch {
    stop: mpsc::Sender<()>,
    samples: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl BreakerWatch {
    fn start(port: u16, started: Instant) -> BreakerWatch {
        let (stop, stopped) = mpsc::channel();
        let samples = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                let [open] = scrape::sums(&[port], [BREAKERS_OPEN]);
                samples.push((started.elapsed().as_secs_f64(), open));
                if stopped.recv_timeout(Duration::from_millis(100)) != Err(mpsc::RecvTimeoutError::Timeout) {
                    return samples;
                }
            }
        });
        BreakerWatch { stop, samples }
    }

    fn stop(self) -> Vec<(f64, f64)> {
        let _ = self.stop.send(());
        self.samples.join().unwrap_or_default()
    }
}

/// Waits for the members' tasks, [`LEAVE`] at most; one that did not end counts as a failure.
fn collect(runtime: &Runtime, handles: Vec<JoinHandle<Log>>) -> Vec<Log> {
    let logs = runtime.block_on(tasks::join_by(handles, tokio::time::Instant::now() + LEAVE));
    logs.into_iter()
        .map(|log| {
            log.unwrap_or_else(|| Log {
                failure: Some("did not end".into()),
                ..Log::default()
            })
        })
        .collect()
}

/// The run's count over the members' logs (member `i` is publisher `i`).
fn summarize(
    plan: &Plan,
    kind: Kind,
    node_args: Vec<String>,
    logs: &[Log],
    ctx: &Ctx,
    masked_by_backend: &HashSet<(u32, u64)>,
) -> RunReport {
    let mut failed = std::collections::BTreeMap::new();
    let mut closed = std::collections::BTreeMap::new();
    for l in logs {
        if let Some(f) = &l.failure {
            *failed.entry(f.clone()).or_insert(0) += 1;
        }
        if let Some(c) = &l.closed {
            *closed.entry(c.clone()).or_insert(0) += 1;
        }
    }
    let answers = |want: Option<Answer>| {
        logs.iter()
            .flat_map(|l| &l.sent)
            .filter(|s| s.answer.map(|a| a.1) == want)
            .count() as u64
    };
    let acked: Vec<Vec<u64>> = logs.iter().map(|l| ledger::acked(&l.sent)).collect();
    let (mut lost, mut masked_expected, mut delivered_unacked, mut masked, mut mask_wrong) = (0, 0, 0, 0, 0);
    for (m, log) in logs.iter().enumerate() {
        if log.failure.is_some() || log.closed.is_some() {
            continue;
        }
        let (seen, wrong) = ledger::masks_seen(&log.received, masked_by_backend);
        (masked, mask_wrong) = (masked + seen, mask_wrong + wrong);
        let mut got: Vec<(u32, u64)> = log.received.iter().map(|r| (r.0, r.1)).collect();
        got.sort_unstable();
        for p in plan.room_members(m) {
            let from: Vec<u64> = got.iter().filter(|(q, _)| *q as usize == p).map(|g| g.1).collect();
            lost += ledger::missed(&acked[p], &from);
            masked_expected += acked[p]
                .iter()
                .filter(|s| masked_by_backend.contains(&(p as u32, **s)))
                .count() as u64;
        }
        delivered_unacked += log
            .received
            .iter()
            .filter(|(p, s, _)| acked.get(*p as usize).is_none_or(|a| a.binary_search(s).is_err()))
            .count() as u64;
    }
    RunReport {
        run: kind.name(),
        node_args,
        joined: ctx.joined.load(Ordering::Relaxed),
        failed,
        closed,
        published: logs.iter().map(|l| l.sent.len() as u64).sum(),
        acked: answers(Some(Answer::Ok)),
        unavailable: answers(Some(Answer::Unavailable)),
        refused: answers(Some(Answer::Refused)),
        unanswered: answers(None),
        delivered: logs.iter().map(|l| l.tally.received).sum(),
        lost,
        delivered_unacked,
        reordered: logs.iter().map(|l| l.tally.reordered).sum(),
        duplicates: logs.iter().map(|l| l.tally.duplicates).sum(),
        masked,
        masked_expected,
        mask_wrong,
        latency_ms: Latency::of(&ctx.latencies.merged()),
        backend: None,
        added_p99_ms: None,
        over_plain_p99_ms: None,
        node_cpu_s: 0.0,
        window_s: 0.0,
        node_cpu_us_per_publish: None,
        outage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_takes_every_chat_room_and_only_with_a_backend() {
        let plan = Plan::from_args(&Args::of("lt hooks --node-bin /bin/true --clients 25 --rooms 3")).unwrap();
        assert_eq!(plan.per_room(), 9);
        assert_eq!(plan.room_members(10), 9..18);
        assert_eq!(plan.room_members(24), 18..25, "the last room is short");
        assert!(plan.node_args(Kind::Plain, Some("http://b/publish")).is_empty());
        assert_eq!(
            plan.node_args(Kind::Outage, Some("http://b/publish")),
            [
                "--hook-publish",
                "lt-r*=http://b/publish",
                "--hook-timeout",
                "1000ms",
                "--hook-on-error",
                "publish=deny"
            ]
        );
        assert!(Plan::from_args(&Args::of("lt hooks --duration 90")).is_err());
    }
}
