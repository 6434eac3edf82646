//! The built-in scenarios stadium, chat, dm and idle: one planned set of connections (which room
//! each joins, who publishes to whom, whose every message each must receive), run in four phases
//! (ramp up, publish for `--duration`, drain, finish) and counted into a [`Report`]: deliveries
//! and losses against the plan, latency, and the CPU and memory of the nodes and of this process.
//!
//! The plan from the command line ([`plan`], one planner per scenario) and the count over what
//! the connections saw ([`Counts`]) are pure and tested without a node.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::bail;
use indicatif::ProgressBar;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    conn::{self, Ctx, FeedRun, NodeUrl, Outcome, Phase, Publisher, Spec, Via},
    feeds::Published,
    procfs::{self, Readings, Sample},
    progress, reader,
    report::{AuxUsage, Connections, Delivery, Latency, NodeUsage, Publish, Report, WireRow},
    stats::{Reading, Tally, WireTally},
    wire::Target,
    Args, Scenario,
};

// ---------------------------------------------------------------------------------------------
// The plan.

/// The whole run's connections and who publishes to whom.
pub struct Plan {
    specs: Vec<Spec>,
    /// Per publisher: how many connections should receive each of its messages.
    fan: Vec<u64>,
    rate: f64,
}

/// The connections and, per publisher, its fan: what each scenario's planner makes.
type Planned = (Vec<Spec>, Vec<u64>);

/// The plan the command line asks for, over `nodes` nodes (refused for the scenarios with a
/// runner of their own).
pub fn plan(args: &Args, nodes: usize) -> anyhow::Result<Plan> {
    let clients = args.clients();
    let rate = args.rate.unwrap_or(match args.scenario {
        Scenario::Stadium | Scenario::Churn => 200.0,
        Scenario::Chat | Scenario::Hooks => 2000.0,
        Scenario::Dm => 1000.0,
        Scenario::Idle | Scenario::Floor | Scenario::Stadium100k | Scenario::Plan => 0.0,
        Scenario::Soak => 500.0,
        Scenario::Demo | Scenario::Matchday | Scenario::Weak => 20.0,
        Scenario::Kickoff => 0.0,
    });
    if args.scenario != Scenario::Idle && !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be positive");
    }
    if args.scenario == Scenario::Dm && args.publish_via == Via::Http {
        bail!("POST /publish only publishes to rooms: dm needs --publish-via ws");
    }
    check_feed(args)?;
    // A multi-process stadium's publishing process has no subscribers.
    if clients == 0 && !(args.scenario == Scenario::Stadium && args.publishers > 0) {
        bail!("--clients must be positive");
    }
    let base = Base { args, nodes };
    let (specs, fan) = match args.scenario {
        Scenario::Stadium => stadium(&base, clients, rate)?,
        Scenario::Chat => chat(&base, clients, rate),
        Scenario::Dm => dm(&base, clients, rate)?,
        Scenario::Idle => idle(&base, clients),
        Scenario::Soak
        | Scenario::Floor
        | Scenario::Churn
        | Scenario::Demo
        | Scenario::Stadium100k
        | Scenario::Matchday
        | Scenario::Weak
        | Scenario::Kickoff
        | Scenario::Hooks
        | Scenario::Plan => {
            bail!("the {:?} scenario has its own runner", args.scenario)
        }
    };
    Ok(Plan { specs, fan, rate })
}

/// A `--feed` is a stadium's, published over WebSockets and read in JSON; the ways of reading ask
/// for one.
fn check_feed(args: &Args) -> anyhow::Result<()> {
    if args.feed.is_none() {
        if args.deflate || args.delta || args.wire_split {
            bail!("--deflate, --delta and --wire-split are for feed readers: give --feed");
        }
        return Ok(());
    }
    if args.scenario != Scenario::Stadium {
        bail!("--feed is for the stadium");
    }
    if args.publish_via != Via::Ws || args.encoding != crate::Encodings::Json {
        bail!("--feed publishes over WebSockets and reads JSON: --publish-via ws, --encoding json");
    }
    Ok(())
}

/// How subscriber `i` of a feed run reads: one way for all, or with `--wire-split` the four
/// ways in turn over every `nodes` subscribers, so each way has readers on every node.
fn reading(args: &Args, i: usize, nodes: usize) -> Option<Reading> {
    args.feed?;
    Some(if args.wire_split {
        Reading::ALL[(i / nodes.max(1)) % Reading::ALL.len()]
    } else {
        Reading {
            deflate: args.deflate,
            delta: args.delta,
        }
    })
}

/// What every planned connection has in common, from the command line.
struct Base<'a> {
    args: &'a Args,
    nodes: usize,
}

impl Base<'_> {
    /// Connection `idx` as `user` on node `node` (modulo the nodes), from its source address in
    /// its encoding, joining nothing, publishing nothing, expecting nothing.
    fn spec(&self, idx: usize, node: usize, user: String) -> Spec {
        Spec {
            idx,
            node: node % self.nodes,
            source: IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                2 + (idx % usize::from(self.args.source_addrs)) as u8,
            )),
            user,
            encoding: self.args.encoding.of(idx),
            ws: true,
            join: None,
            publish: None,
            expect: 0..0,
            reading: None,
        }
    }

    fn prefix(&self) -> &str {
        &self.args.prefix
    }
}

/// The time between two publishes of each of `publishers` sharing `rate`.
fn period(publishers: usize, rate: f64) -> Duration {
    Duration::from_secs_f64(publishers as f64 / rate)
}

/// One room: `clients` subscribers, then the publishers (spread over a period), each heard by
/// every subscriber.
fn stadium(base: &Base, clients: usize, rate: f64) -> anyhow::Result<Planned> {
    let (args, pre) = (base.args, base.prefix());
    // Without publishers of its own, its subscribers expect another process's.
    let (pubs, expected) = match (args.publishers, args.expect_publishers) {
        (0, 0) => bail!("a stadium needs --publishers (or --expect-publishers)"),
        (0, n) => (0, n),
        (n, _) => (n, n as u32),
    };
    let mut specs = Vec::new();
    let mut fan = Vec::new();
    for i in 0..clients {
        specs.push(Spec {
            join: Some(args.room()),
            expect: 0..expected,
            reading: reading(args, i, base.nodes),
            ..base.spec(i, i, format!("{pre}-u{i}"))
        });
    }
    let via = args.publish_via;
    for j in 0..pubs {
        let every = period(pubs, rate);
        specs.push(Spec {
            ws: via == Via::Ws,
            publish: Some(Publisher {
                id: j as u32,
                target: Target::Room(args.room()),
                via,
                period: every,
                offset: every.mul_f64(j as f64 / pubs as f64),
            }),
            ..base.spec(clients + j, j, format!("{pre}-p{j}"))
        });
        fan.push(clients as u64);
    }
    Ok((specs, fan))
}

/// Many small rooms: every client joins its room and publishes to it, heard by every member.
fn chat(base: &Base, clients: usize, rate: f64) -> Planned {
    let pre = base.prefix();
    let rooms = base.args.rooms().clamp(1, clients);
    let per_room = clients.div_ceil(rooms);
    let slots = per_room * clients.div_ceil(per_room);
    let every = period(clients, rate);
    let mut specs = Vec::new();
    let mut fan = Vec::new();
    for i in 0..clients {
        let r = i / per_room;
        // Members of a room publish evenly spread over the period, not back to back.
        let slot = (i % per_room) * clients.div_ceil(per_room) + r;
        let members = (r * per_room) as u32..((r + 1) * per_room).min(clients) as u32;
        fan.push(members.len() as u64);
        specs.push(Spec {
            join: Some(format!("{pre}-r{r}")),
            publish: Some(Publisher {
                id: i as u32,
                target: Target::Room(format!("{pre}-r{r}")),
                via: base.args.publish_via,
                period: every,
                offset: every.mul_f64(slot as f64 / slots as f64),
            }),
            expect: members,
            ..base.spec(i, i, format!("{pre}-u{i}"))
        });
    }
    (specs, fan)
}

/// Direct messages: each user sends to the next (on the next node) and hears the one before.
fn dm(base: &Base, clients: usize, rate: f64) -> anyhow::Result<Planned> {
    if clients < 2 {
        bail!("dm needs at least 2 clients");
    }
    let pre = base.prefix();
    let every = period(clients, rate);
    let mut specs = Vec::new();
    let mut fan = Vec::new();
    for i in 0..clients {
        let prev = ((i + clients - 1) % clients) as u32;
        fan.push(1);
        specs.push(Spec {
            publish: Some(Publisher {
                id: i as u32,
                target: Target::User(format!("{pre}-u{}", (i + 1) % clients)),
                via: base.args.publish_via,
                period: every,
                offset: every.mul_f64(i as f64 / clients as f64),
            }),
            expect: prev..prev + 1,
            ..base.spec(i, i, format!("{pre}-u{i}"))
        });
    }
    Ok((specs, fan))
}

/// Connections only.
fn idle(base: &Base, clients: usize) -> Planned {
    let pre = base.prefix();
    let specs = (0..clients).map(|i| base.spec(i, i, format!("{pre}-u{i}"))).collect();
    (specs, Vec::new())
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Runs the plan the command line asks for against its nodes, phase by phase.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    let nodes = NodeUrl::resolve_all(&args.urls).await?;
    let plan = plan(args, nodes.len())?;
    let connecting = (Duration::from_secs_f64(args.connect_timeout), args.connect_attempts);
    let mut ctx = Ctx::new(nodes, args.payload_bytes, connecting, plan.fan.len())?;
    ctx.feed = args.feed.map(|feed| FeedRun {
        feed,
        seed: args.feed_seed,
        published: Published::new(plan.fan.len(), per_publisher(args, &plan)),
    });
    let ctx = Arc::new(ctx);
    let before = procfs::samples(&args.pids)?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Ramp);
    let ramped = ramp(args, &plan.specs, &ctx, &phase_rx).await;
    if args.wait_for_go {
        go(ctx.ready.load(Ordering::Relaxed)).await?;
    }
    let window = publish(args, &ctx, &phase_tx).await?;
    let drained = drain(args, &plan, ramped.handles.len(), &ctx, &window).await?;
    let clock = Clock {
        ramp_s: ramped.ramp_s,
        duration_s: window.duration_s,
        measured_s: drained.measured_s,
    };
    let outcomes = finish(&phase_tx, ramped, plan.specs.len()).await;
    let counts = Counts::of(&plan.specs, &outcomes, &drained.sent);
    let usage = Usage {
        before: &before,
        start: &window.usage,
        end: &drained.usage,
    };
    Ok(report(args, &plan, &ctx, &clock, &usage, &drained, &counts))
}

/// The values a feed publisher may publish over the run, with room to spare (a publisher ticks
/// once per period of the publishing window, and late ticks catch up, never exceed it), and at
/// most [`MAX_RECORDED`] for all publishers together: past that, values are counted unchecked.
fn per_publisher(args: &Args, plan: &Plan) -> usize {
    let publishers = plan.fan.len().max(1);
    let want = (args.duration.max(0.0) * plan.rate / publishers as f64 * 1.1) as usize + 64;
    want.min(MAX_RECORDED / publishers)
}

/// Feed values recorded for the readers' checks, all publishers together: at most some 250 MB of
/// odds tables (a run of 5 minutes at 200 msg/s).
const MAX_RECORDED: usize = 65_536;

/// The connections the ramp started, and how long it took.
struct Ramped {
    handles: Vec<JoinHandle<Outcome>>,
    ramp_s: f64,
}

/// Ramp: starts connections at `--ramp-per-sec`, then waits until each is ready or has failed,
/// at most until the ramp's deadline (those not started by then are never started).
async fn ramp(args: &Args, specs: &[Spec], ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) -> Ramped {
    let total = specs.len();
    let ramp_start = Instant::now();
    let progress = progress::bar(total as u64, "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed})");
    progress.set_prefix("connect");
    let mut handles = Vec::with_capacity(total);
    let mut specs = specs.iter();
    let ramp_deadline =
        ramp_start + Duration::from_secs_f64(total as f64 / args.ramp_per_sec.max(1.0) + args.connect_timeout + 5.0);
    loop {
        let due = conn::ramp_due(ramp_start.elapsed(), args.ramp_per_sec, total);
        while handles.len() < due {
            let Some(spec) = specs.next() else { break };
            let (spec, ctx, phase) = (spec.clone(), ctx.clone(), phase.clone());
            handles.push(match spec.reading {
                Some(_) => tokio::spawn(reader::run(spec, ctx, phase)),
                None => tokio::spawn(conn::run(spec, ctx, phase)),
            });
        }
        let ready = ctx.ready.load(Ordering::Relaxed);
        let failed = ctx.failed.load(Ordering::Relaxed);
        progress.set_position((ready + failed) as u64);
        progress.set_message(format!("failed {failed}"));
        if ready + failed >= total || Instant::now() >= ramp_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    progress.finish_and_clear();
    Ramped {
        handles,
        ramp_s: ramp_start.elapsed().as_secs_f64(),
    }
}

/// A generator process of a multi-process run, connected: says so on standard output and waits
/// (at most ten minutes) for a line on standard input before its run starts.
async fn go(ready: usize) -> anyhow::Result<()> {
    use std::io::Write;
    println!("ready {ready}");
    std::io::stdout().flush()?;
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    match tokio::time::timeout(Duration::from_secs(600), line).await {
        Ok(Ok(Ok(line))) if !line.is_empty() => Ok(()),
        Ok(_) => bail!("standard input closed before the run started"),
        Err(_) => bail!("no word to start within ten minutes"),
    }
}

/// The publishing window: when it started, how long it lasted, the readings at its start, and
/// its progress bar, which the drain goes on with.
struct Window {
    start: Instant,
    duration_s: f64,
    usage: Readings,
    progress: ProgressBar,
}

/// Run: publish for `--duration` (or hold the connections, for idle), then turn quiet.
async fn publish(args: &Args, ctx: &Ctx, phase_tx: &watch::Sender<Phase>) -> anyhow::Result<Window> {
    let usage = Readings::take(&args.pids, &args.aux_pids)?;
    let run_start = Instant::now();
    let _ = phase_tx.send(Phase::Run(run_start));
    let duration = Duration::from_secs_f64(args.duration.max(0.0));
    let progress = progress::bar(duration.as_secs(), "{prefix:>8} [{bar:30}] {pos}/{len} s {msg}");
    progress.set_prefix(args.scenario.name());
    while run_start.elapsed() < duration {
        let left = duration.saturating_sub(run_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        let t = run_start.elapsed().as_secs_f64();
        let delivered = ctx.delivered.load(Ordering::Relaxed);
        progress.set_position(t as u64);
        progress.set_message(format!(
            "delivered {delivered} ({:.0}/s), closed {}",
            delivered as f64 / t.max(1e-3),
            ctx.closed.load(Ordering::Relaxed)
        ));
    }
    let _ = phase_tx.send(Phase::Quiet);
    Ok(Window {
        start: run_start,
        duration_s: run_start.elapsed().as_secs_f64(),
        usage,
        progress,
    })
}

/// What the publishers sent, what that made the connections owe, and the readings at the end of
/// the measured window.
struct Drained {
    /// Per publisher.
    sent: Vec<u64>,
    expected: u64,
    usage: Readings,
    measured_s: f64,
}

/// Drain: wait for every expected delivery, for a bounded time. What was sent is read once every
/// started publisher has stopped: a publish in flight when the run turned quiet and counted after
/// would otherwise be delivered beyond `expected` and could end the wait before another
/// publisher's last message reached everyone.
async fn drain(args: &Args, plan: &Plan, started: usize, ctx: &Ctx, window: &Window) -> anyhow::Result<Drained> {
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain.max(0.0));
    let started = plan.specs[..started].iter().filter(|s| s.publish.is_some()).count();
    while ctx.stopped.load(Ordering::Acquire) < started && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sent: Vec<u64> = ctx.sent.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    let expected: u64 = sent.iter().zip(&plan.fan).map(|(s, f)| s * f).sum();
    window.progress.set_prefix("drain");
    while ctx.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let usage = Readings::take(&args.pids, &args.aux_pids)?;
    let measured_s = window.start.elapsed().as_secs_f64();
    window.progress.finish_and_clear();
    Ok(Drained {
        sent,
        expected,
        usage,
        measured_s,
    })
}

/// Finish: close everything and gather what each of the `planned` connections saw, in the plan's
/// order.
async fn finish(phase_tx: &watch::Sender<Phase>, ramped: Ramped, planned: usize) -> Vec<Outcome> {
    let _ = phase_tx.send(Phase::Finish);
    let mut outcomes = Vec::with_capacity(planned);
    for h in ramped.handles {
        // Each task ends within its close wait after Finish (or its connect timeout).
        outcomes.push(h.await.unwrap_or_else(|_| Outcome {
            failure: Some("task panicked".into()),
            ..Outcome::default()
        }));
    }
    // Connections never started (the ramp deadline passed) count as failed.
    outcomes.resize_with(planned, || Outcome {
        failure: Some("not started".into()),
        ..Outcome::default()
    });
    outcomes
}

// ---------------------------------------------------------------------------------------------
// The count and the report.

/// What the connections saw, summed over them and held against what each was to receive.
#[derive(Default)]
struct Counts {
    tally: Tally,
    /// Messages never received by a connection that stayed open.
    lost: u64,
    lost_on_closed: u64,
    unexpected: u64,
    silent: u64,
    error_frames: u64,
    reconnect_frames: u64,
    unparsed_frames: u64,
    positioned: u64,
    failed: BTreeMap<String, u64>,
    closed_by_node: BTreeMap<String, u64>,
    connected: usize,
    retried: u64,
    /// Feed readers' bytes and payloads, per way of reading.
    wire: BTreeMap<Reading, WireTally>,
}

impl Counts {
    /// The count over `outcomes`, one per spec of `specs` in order, against `sent` per publisher.
    fn of(specs: &[Spec], outcomes: &[Outcome], sent: &[u64]) -> Counts {
        let mut c = Counts {
            retried: outcomes.iter().map(|o| o.retries).sum(),
            ..Counts::default()
        };
        for (spec, out) in specs.iter().zip(outcomes) {
            c.add(spec, out, sent);
        }
        c
    }

    fn add(&mut self, spec: &Spec, out: &Outcome, sent: &[u64]) {
        if let Some(f) = &out.failure {
            *self.failed.entry(f.clone()).or_insert(0) += 1;
            return;
        }
        self.connected += 1;
        self.tally.add(&out.tally);
        if let Some((reading, wire)) = &out.wire {
            self.wire.entry(*reading).or_default().add(wire);
        }
        self.error_frames += out.error_frames;
        self.reconnect_frames += out.reconnects;
        self.unparsed_frames += out.unparsed;
        self.positioned += out.positioned;
        let missing = missing(spec, out, sent);
        self.unexpected += out
            .streams
            .iter()
            .filter(|(p, _)| !spec.expect.contains(p))
            .map(|(_, s)| s.distinct)
            .sum::<u64>();
        self.silent += u64::from(is_silent(spec, out));
        match &out.closed {
            Some(why) => {
                *self.closed_by_node.entry(why.clone()).or_insert(0) += 1;
                self.lost_on_closed += missing;
            }
            None => self.lost += missing,
        }
    }
}

/// Messages of its expected publishers a connection did not receive. Another process's
/// publishers (beyond `sent`): what they sent is known there, and losses are counted where the
/// reports are merged.
fn missing(spec: &Spec, out: &Outcome, sent: &[u64]) -> u64 {
    spec.expect
        .clone()
        .filter_map(|p| {
            let sent = *sent.get(p as usize)?;
            let got = out.streams.iter().find(|(q, _)| *q == p);
            Some(got.map_or(sent, |(_, s)| s.lost(sent)))
        })
        .sum()
}

/// Whether a connection expecting messages received none of them.
fn is_silent(spec: &Spec, out: &Outcome) -> bool {
    let heard: u64 = out
        .streams
        .iter()
        .filter(|(p, _)| spec.expect.contains(p))
        .map(|(_, s)| s.distinct)
        .sum();
    heard == 0 && !spec.expect.is_empty()
}

/// The run's phases, seconds: the ramp, publishing, and publishing plus the drain.
struct Clock {
    ramp_s: f64,
    duration_s: f64,
    measured_s: f64,
}

/// The readings of the nodes before the first connection, and all readings at the start of
/// publishing and at the end of the drain.
struct Usage<'a> {
    before: &'a [Sample],
    start: &'a Readings,
    end: &'a Readings,
}

impl Usage<'_> {
    /// The nodes' CPU over the measured window, nanoseconds.
    fn node_cpu_ns(&self) -> u64 {
        let (start, end) = (&self.start.nodes, &self.end.nodes);
        start
            .iter()
            .zip(end)
            .map(|(a, b)| b.cpu_ns.saturating_sub(a.cpu_ns))
            .sum()
    }

    /// Growth of the nodes' resident memory since before the first connection, bytes.
    fn rss_growth(&self) -> i64 {
        let end = &self.end.nodes;
        self.before
            .iter()
            .zip(end)
            .map(|(a, b)| b.rss as i64 - a.rss as i64)
            .sum()
    }

    /// Each node of `pids`.
    fn nodes(&self, pids: &[u32]) -> Vec<NodeUsage> {
        let (before, start, end) = (self.before, &self.start.nodes, &self.end.nodes);
        pids.iter()
            .enumerate()
            .map(|(i, pid)| NodeUsage::of(*pid, &before[i], &start[i], &end[i]))
            .collect()
    }

    /// Each process of `pids`, over the measured window.
    fn aux(&self, pids: &[u32]) -> Vec<AuxUsage> {
        let (start, end) = (&self.start.aux, &self.end.aux);
        pids.iter()
            .enumerate()
            .map(|(i, pid)| AuxUsage {
                pid: *pid,
                cpu_s: secs(end[i].cpu_ns.saturating_sub(start[i].cpu_ns)),
            })
            .collect()
    }

    /// This process's CPU over the measured window, seconds.
    fn own_cpu_s(&self) -> f64 {
        secs(self.end.own.cpu_ns.saturating_sub(self.start.own.cpu_ns))
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn report(
    args: &Args,
    plan: &Plan,
    ctx: &Ctx,
    clock: &Clock,
    usage: &Usage<'_>,
    drained: &Drained,
    c: &Counts,
) -> Report {
    let hist = ctx.latencies.merged();
    let node_cpu_ns = usage.node_cpu_ns();
    let measured_nodes = !args.pids.is_empty();
    Report {
        scenario: args.scenario.name(),
        urls: args.urls.clone(),
        encoding: format!("{:?}", args.encoding).to_lowercase(),
        publish_via: format!("{:?}", args.publish_via).to_lowercase(),
        payload_bytes: args.payload_bytes,
        duration_s: clock.duration_s,
        measured_s: clock.measured_s,
        connections: connections(plan, clock, c),
        publish: publishing(plan, ctx, clock, &drained.sent),
        delivery: delivery(clock, drained.expected, c),
        latency_ms: Latency::of(&hist),
        latency_us: args.export_latency.then(|| {
            hist.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        }),
        publish_answer_ms: Latency::of(&ctx.answers.merged()),
        nodes: usage.nodes(&args.pids),
        node_cpu_s: secs(node_cpu_ns),
        node_cpu_ns_per_frame: (c.tally.received > 0 && measured_nodes)
            .then(|| node_cpu_ns as f64 / c.tally.received as f64),
        node_rss_bytes_per_conn: (c.connected > 0 && measured_nodes)
            .then(|| usage.rss_growth() as f64 / c.connected as f64),
        feed: args.feed,
        wire: WireRow::all(&c.wire),
        aux: usage.aux(&args.aux_pids),
        loadtest_cpu_s: usage.own_cpu_s(),
    }
}

fn connections(plan: &Plan, clock: &Clock, c: &Counts) -> Connections {
    Connections {
        planned: plan.specs.len(),
        connected: c.connected,
        failed: c.failed.clone(),
        closed_by_node: c.closed_by_node.clone(),
        retried: c.retried,
        ramp_s: clock.ramp_s,
    }
}

fn publishing(plan: &Plan, ctx: &Ctx, clock: &Clock, sent: &[u64]) -> Publish {
    let publishers = plan.fan.len();
    let sent: u64 = sent.iter().sum();
    Publish {
        publishers,
        target_rate: if publishers == 0 { 0.0 } else { plan.rate },
        sent,
        rate: sent as f64 / clock.duration_s,
        errors: ctx.publish_errors.load(Ordering::Relaxed),
    }
}

fn delivery(clock: &Clock, expected: u64, c: &Counts) -> Delivery {
    Delivery {
        expected,
        received: c.tally.received,
        rate: c.tally.received as f64 / clock.duration_s,
        lost: c.lost,
        lost_on_closed: c.lost_on_closed,
        gap_missing: c.tally.gap_missing,
        silent_members: c.silent,
        reordered: c.tally.reordered,
        duplicates: c.tally.duplicates,
        unexpected: c.unexpected,
        error_frames: c.error_frames,
        reconnect_frames: c.reconnect_frames,
        unparsed_frames: c.unparsed_frames,
        positioned: c.positioned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats;

    fn args(line: &str) -> Args {
        Args::of(line)
    }

    #[test]
    fn a_member_that_heard_none_of_its_publishers_is_silent() {
        let spec = Spec::member;
        let heard = |from: &[u32]| Outcome {
            streams: from
                .iter()
                .map(|p| {
                    let mut s = stats::Stream::default();
                    s.observe(0);
                    (*p, s)
                })
                .collect(),
            ..Outcome::default()
        };
        assert!(is_silent(&spec(0..2), &heard(&[])));
        assert!(
            is_silent(&spec(0..2), &heard(&[5])),
            "only from a publisher it did not expect"
        );
        assert!(!is_silent(&spec(0..2), &heard(&[1])));
        assert!(
            !is_silent(&spec(0..0), &heard(&[])),
            "expecting nothing, it is not silent"
        );
    }

    #[test]
    fn a_generator_process_holds_members_for_another_processs_publishers() {
        let holder = plan(&args("lt stadium --clients 4 --publishers 0 --expect-publishers 3"), 2).unwrap();
        assert!(holder.fan.is_empty(), "no publisher of its own");
        assert!(holder.specs.iter().all(|s| s.publish.is_none() && s.expect == (0..3)));
        let feed = plan(&args("lt stadium --clients 0 --publishers 2"), 2).unwrap();
        assert_eq!((feed.specs.len(), feed.fan.len()), (2, 2));
        assert!(plan(&args("lt stadium --publishers 0"), 2).is_err());
        assert!(plan(&args("lt chat --clients 0"), 2).is_err());
    }

    #[test]
    fn stadium_plan_spreads_subscribers_and_publishers() {
        let a = args("lt stadium --clients 10 --publishers 2 --rate 100 --source-addrs 3");
        let p = plan(&a, 2).unwrap();
        assert_eq!(p.specs.len(), 12);
        assert_eq!(p.fan, vec![10, 10]);
        let subs = &p.specs[..10];
        assert!(subs
            .iter()
            .all(|s| s.join.as_deref() == Some("stadium") && s.expect == (0..2)));
        assert_eq!(subs.iter().filter(|s| s.node == 1).count(), 5);
        assert_eq!(subs[4].source, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        let pubs: Vec<_> = p.specs[10..].iter().map(|s| s.publish.clone().unwrap()).collect();
        assert_eq!(pubs[0].period, Duration::from_millis(20));
        assert_eq!(pubs[1].offset, Duration::from_millis(10));
    }

    #[test]
    fn feed_readers_read_one_way_or_four_ways_on_every_node() {
        let one = plan(&args("lt stadium --clients 8 --feed odds --delta"), 2).unwrap();
        let want = Reading {
            deflate: false,
            delta: true,
        };
        assert!(one.specs[..8].iter().all(|s| s.reading == Some(want)));
        assert!(
            one.specs[8..].iter().all(|s| s.reading.is_none()),
            "publishers read nothing"
        );
        let split = plan(&args("lt stadium --clients 16 --feed chat --wire-split"), 2).unwrap();
        for way in Reading::ALL {
            let nodes: Vec<usize> = split.specs[..16]
                .iter()
                .filter(|s| s.reading == Some(way))
                .map(|s| s.node)
                .collect();
            assert_eq!(nodes.len(), 4, "{}", way.name());
            assert!(nodes.contains(&0) && nodes.contains(&1), "{} on both nodes", way.name());
        }
        assert!(plan(&args("lt stadium --clients 8"), 2)
            .unwrap()
            .specs
            .iter()
            .all(|s| s.reading.is_none()));
        assert!(plan(&args("lt stadium --delta"), 2).is_err(), "--delta without a feed");
        assert!(
            plan(&args("lt chat --feed chat"), 2).is_err(),
            "a feed is the stadium's"
        );
        assert!(plan(&args("lt stadium --feed chat --encoding msgpack"), 2).is_err());
    }

    #[test]
    fn chat_rooms_span_nodes_and_dm_partners_too() {
        let p = plan(&args("lt chat --clients 100 --rooms 10 --rate 50"), 2).unwrap();
        assert_eq!(p.fan, vec![10; 100]);
        let room3: Vec<_> = p.specs.iter().filter(|s| s.join.as_deref() == Some("lt-r3")).collect();
        assert_eq!(room3.len(), 10);
        assert!(room3.iter().any(|s| s.node == 0) && room3.iter().any(|s| s.node == 1));
        assert!(room3.iter().all(|s| s.expect == (30..40)));
        let r3: Vec<_> = room3.iter().map(|s| s.publish.clone().unwrap()).collect();
        assert_eq!(r3[0].period, Duration::from_secs(2));
        // Ten members of a room, a tenth of the period apart.
        assert_eq!(r3[1].offset - r3[0].offset, Duration::from_millis(200));

        let d = plan(&args("lt dm --clients 4 --rate 4"), 2).unwrap();
        let s1 = &d.specs[1];
        assert_eq!(s1.publish.as_ref().unwrap().target, Target::User("lt-u2".into()));
        assert_eq!(s1.expect, 0..1);
        assert_ne!(d.specs[1].node, d.specs[2].node);
        assert!(plan(&args("lt dm --publish-via http"), 2).is_err());
    }
}
