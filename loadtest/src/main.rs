//! shardcast-loadtest: opens many WebSocket clients against one or more shardcast nodes, runs a
//! scenario for a fixed time, and reports deliveries, losses, latency and the nodes' CPU and
//! memory. Every phase has a deadline, so a run always ends by itself.

mod capacity;
mod churn;
mod conn;
mod demo;
mod fleet;
mod floor;
mod procfs;
mod report;
mod soak;
mod stats;
mod wire;

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    net::{IpAddr, Ipv4Addr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::{sync::watch, time::Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{
    conn::{Ctx, NodeUrl, Outcome, Phase, Publisher, Spec, Via},
    report::{AuxUsage, Connections, Delivery, Latency, NodeUsage, Publish, Report},
    stats::Tally,
    wire::{Encoding, Target},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// One hot room: many subscribers, a few publishers.
    Stadium,
    /// Many small rooms: every client publishes to and subscribes to its room.
    Chat,
    /// Direct messages: each user sends to the next, who is connected to another node.
    Dm,
    /// Connections only, to measure memory per connection.
    Idle,
    /// Steady publishing with churn of reconnects and joins; samples the nodes' RSS and open files
    /// (give --pid) and says whether they stayed flat after warm-up.
    Soak,
    /// No node: what this machine's kernel charges for loopback writes of --frames-per-write
    /// frames of --payload-bytes to --clients sockets, the floor under a node's CPU per frame.
    Floor,
    /// One room with history (start the nodes with --history matching --room): --clients
    /// subscribers, --publishers publishing --rate, --churn-per-sec of the subscribers drop their
    /// socket and resume on the next node with `since`; delivered/published per client, recovered
    /// resumes and recovery time.
    Churn,
    /// Feeds the demo page (nodes with --demo true): a scorer and --publishers chatting fans
    /// publish scores and chat lines into --room (default `demo`) at --rate (default 20).
    Demo,
    /// One room of --clients members (default 100,000) over --nodes node processes it starts on a
    /// 3-master cluster it starts, with as many generator processes as the members need, at each
    /// of --rates (default 1,2,5 msg/s); writes JSON and an SVG chart to --out. Run from the
    /// repository (it uses redis-cluster/up); it stops everything it started.
    #[value(name = "stadium-100k")]
    Stadium100k,
    /// No traffic: what a deployment needs (nodes, masters, shards per room, memory and egress
    /// per node) for --viewers over --rooms (default 1) at --rate messages/s per room (default 10),
    /// from the capacity model (docs/capacity.md).
    Plan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Encodings {
    Json,
    Msgpack,
    /// Every other connection in MessagePack (exercises transcoding).
    Mixed,
}

/// Load generator for shardcast nodes (traffic to loopback nodes only).
#[derive(Debug, Parser)]
#[command(name = "shardcast-loadtest", version)]
struct Args {
    /// What load to generate.
    #[arg(value_enum)]
    scenario: Scenario,
    /// A node's WebSocket URL; repeat to spread clients over several nodes.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    urls: Vec<String>,
    /// Loopback source addresses to connect from, 127.0.0.2 onwards (each has its own ~28k ports).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=250))]
    source_addrs: u8,
    /// Clients: subscribers (stadium, churn), room members (chat), users (dm) or connections
    /// (idle). Default: 2000, 10000, 2000, 18000; 1000 (soak, churn).
    #[arg(long)]
    clients: Option<usize>,
    /// Publishing connections of the stadium (not subscribed).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Rooms of the chat and soak scenarios (default 1000), or of the plan (default 1).
    #[arg(long)]
    rooms: Option<usize>,
    /// plan: concurrent viewers in all.
    #[arg(long, default_value_t = 100_000)]
    viewers: u64,
    /// plan: the p99 delivery latency to stay under, milliseconds.
    #[arg(long, default_value_t = 250.0)]
    p99_ms: f64,
    /// plan: cores of each node machine.
    #[arg(long, default_value_t = 8.0)]
    cores_per_node: f64,
    /// plan: node CPU of a frame written alone, µs, as measured on your hardware (docs/capacity.md).
    #[arg(long)]
    write_cost_us: Option<f64>,
    /// plan: connections on the machine when --write-cost-us was measured.
    #[arg(long)]
    write_cost_conns: Option<f64>,
    /// plan: node CPU of a connection each second with nothing published, µs.
    #[arg(long)]
    idle_cost_us: Option<f64>,
    /// plan: node memory per connection, bytes.
    #[arg(long)]
    conn_bytes: Option<f64>,
    /// plan: the nodes' open-files limit (`ulimit -n`).
    #[arg(long)]
    open_files: Option<u64>,
    /// The room of the stadium, churn and demo (give it shards on the nodes with --hot-room NAME=N).
    /// Default: `demo` for demo, else `stadium`.
    #[arg(long)]
    room: Option<String>,
    /// Prefix of generated user and chat room names.
    #[arg(long, default_value = "lt")]
    prefix: String,
    /// Messages published per second, all publishers together. Default: 200 (stadium),
    /// 2000 (chat), 1000 (dm).
    #[arg(long)]
    rate: Option<f64>,
    /// Size of each message's data.
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    #[arg(long, value_enum, default_value_t = Encodings::Json)]
    encoding: Encodings,
    /// How publishers publish; `http` is `POST /publish` (rooms only).
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    publish_via: Via,
    /// Seconds of publishing (or of holding the connections, for idle).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// At most this many seconds after publishing stops to wait for the last deliveries.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    ramp_per_sec: f64,
    /// Seconds one connection may take to connect and join.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Tries per connection that fails to connect or join, within --connect-timeout, as a client
    /// that reconnects would; the failed tries are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    connect_attempts: u32,
    /// A node process to report CPU and memory of; repeatable.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Another process (e.g. redis-server) to report CPU of; repeatable.
    #[arg(long = "aux-pid")]
    aux_pids: Vec<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// soak: clients that leave and reconnect (into another room) per second; churn: subscribers
    /// that drop their socket and resume per second.
    #[arg(long, default_value_t = 20.0)]
    churn_per_sec: f64,
    /// soak: seconds before RSS and open files must stay flat. Default: a quarter of --duration.
    #[arg(long)]
    warmup: Option<f64>,
    /// soak: seconds between samples of the nodes' RSS and open files.
    #[arg(long, default_value_t = 5.0)]
    sample_every: f64,
    /// floor: frames per write to measure, each for --duration seconds.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    frames_per_write: Vec<usize>,
    /// floor: milliseconds between two writes to the same socket.
    #[arg(long, default_value_t = 20.0)]
    window_ms: f64,
    /// stadium-100k: node processes to start.
    #[arg(long, default_value_t = 6)]
    nodes: usize,
    /// stadium-100k: the publishing rates to run, msg/s, one step each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,5")]
    rates: Vec<f64>,
    /// stadium-100k: shards of the room.
    #[arg(long, default_value_t = 16)]
    shards: u32,
    /// stadium-100k: generator processes for the members. Default: one per 15,000 members.
    #[arg(long)]
    procs: Option<usize>,
    /// stadium-100k: the node binary. Default: `shardcast` beside this program.
    #[arg(long)]
    node_bin: Option<std::path::PathBuf>,
    /// stadium-100k: where the JSON report and the chart go.
    #[arg(long, default_value = "/tmp/shardcast-stadium-100k")]
    out: std::path::PathBuf,
    /// A generator process of a multi-process run: its subscribers expect these publishers, which
    /// another process runs (with --publishers 0).
    #[arg(long, hide = true, default_value_t = 0)]
    expect_publishers: u32,
    /// A generator process of a multi-process run: once connected, print `ready` and wait for a
    /// line on standard input before the run starts.
    #[arg(long, hide = true)]
    wait_for_go: bool,
    /// Adds the end-to-end latencies, as (microseconds, count) pairs, to the JSON report, so that
    /// reports of several processes can be merged.
    #[arg(long, hide = true)]
    export_latency: bool,
}

/// Rooms of the chat and soak scenarios unless `--rooms` says otherwise.
const ROOMS: usize = 1000;

/// The whole run's connections and who publishes to whom.
struct Plan {
    specs: Vec<Spec>,
    /// Per publisher: how many connections should receive each of its messages.
    fan: Vec<u64>,
    rate: f64,
}

fn period(publishers: usize, rate: f64) -> Duration {
    Duration::from_secs_f64(publishers as f64 / rate)
}

/// `--clients`, or the scenario's default.
fn clients(args: &Args) -> usize {
    args.clients.unwrap_or(match args.scenario {
        Scenario::Stadium | Scenario::Dm => 2000,
        Scenario::Stadium100k => 100_000,
        Scenario::Plan => 0,
        Scenario::Chat => 10_000,
        Scenario::Idle => 18_000,
        Scenario::Soak | Scenario::Floor | Scenario::Churn => 1000,
        Scenario::Demo => 0,
    })
}

/// `--room`, or the scenario's default.
fn room(args: &Args) -> String {
    args.room.clone().unwrap_or_else(|| {
        if args.scenario == Scenario::Demo {
            "demo".into()
        } else {
            "stadium".into()
        }
    })
}

fn plan(args: &Args, nodes: usize) -> anyhow::Result<Plan> {
    let clients = clients(args);
    let rate = args.rate.unwrap_or(match args.scenario {
        Scenario::Stadium | Scenario::Churn => 200.0,
        Scenario::Chat => 2000.0,
        Scenario::Dm => 1000.0,
        Scenario::Idle | Scenario::Floor | Scenario::Stadium100k | Scenario::Plan => 0.0,
        Scenario::Soak => 500.0,
        Scenario::Demo => 20.0,
    });
    if args.scenario != Scenario::Idle && !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be positive");
    }
    if args.scenario == Scenario::Dm && args.publish_via == Via::Http {
        bail!("POST /publish only publishes to rooms: dm needs --publish-via ws");
    }
    // A multi-process stadium's publishing process has no subscribers.
    if clients == 0 && !(args.scenario == Scenario::Stadium && args.publishers > 0) {
        bail!("--clients must be positive");
    }
    let pre = &args.prefix;
    let base = |idx: usize, node: usize, user: String| Spec {
        idx,
        node: node % nodes,
        source: IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (idx % usize::from(args.source_addrs)) as u8,
        )),
        user,
        encoding: match args.encoding {
            Encodings::Json => Encoding::Json,
            Encodings::Msgpack => Encoding::Msgpack,
            Encodings::Mixed if idx.is_multiple_of(2) => Encoding::Json,
            Encodings::Mixed => Encoding::Msgpack,
        },
        ws: true,
        join: None,
        publish: None,
        expect: 0..0,
    };
    let via = args.publish_via;
    let mut specs = Vec::new();
    let mut fan = Vec::new();
    match args.scenario {
        Scenario::Stadium => {
            // Without publishers of its own, its subscribers expect another process's.
            let (pubs, expected) = match (args.publishers, args.expect_publishers) {
                (0, 0) => bail!("a stadium needs --publishers (or --expect-publishers)"),
                (0, n) => (0, n),
                (n, _) => (n, n as u32),
            };
            for i in 0..clients {
                specs.push(Spec {
                    join: Some(room(args)),
                    expect: 0..expected,
                    ..base(i, i, format!("{pre}-u{i}"))
                });
            }
            for j in 0..pubs {
                let every = period(pubs, rate);
                specs.push(Spec {
                    ws: via == Via::Ws,
                    publish: Some(Publisher {
                        id: j as u32,
                        target: Target::Room(room(args)),
                        via,
                        period: every,
                        offset: every.mul_f64(j as f64 / pubs as f64),
                    }),
                    ..base(clients + j, j, format!("{pre}-p{j}"))
                });
                fan.push(clients as u64);
            }
        }
        Scenario::Chat => {
            let rooms = args.rooms.unwrap_or(ROOMS).clamp(1, clients);
            let per_room = clients.div_ceil(rooms);
            let slots = per_room * clients.div_ceil(per_room);
            let every = period(clients, rate);
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
                        via,
                        period: every,
                        offset: every.mul_f64(slot as f64 / slots as f64),
                    }),
                    expect: members,
                    ..base(i, i, format!("{pre}-u{i}"))
                });
            }
        }
        Scenario::Dm => {
            if clients < 2 {
                bail!("dm needs at least 2 clients");
            }
            let every = period(clients, rate);
            for i in 0..clients {
                let prev = ((i + clients - 1) % clients) as u32;
                fan.push(1);
                specs.push(Spec {
                    publish: Some(Publisher {
                        id: i as u32,
                        target: Target::User(format!("{pre}-u{}", (i + 1) % clients)),
                        via,
                        period: every,
                        offset: every.mul_f64(i as f64 / clients as f64),
                    }),
                    expect: prev..prev + 1,
                    ..base(i, i, format!("{pre}-u{i}"))
                });
            }
        }
        Scenario::Idle => {
            for i in 0..clients {
                specs.push(base(i, i, format!("{pre}-u{i}")));
            }
        }
        Scenario::Soak
        | Scenario::Floor
        | Scenario::Churn
        | Scenario::Demo
        | Scenario::Stadium100k
        | Scenario::Plan => {
            bail!("the {:?} scenario has its own runner", args.scenario)
        }
    }
    Ok(Plan { specs, fan, rate })
}

async fn resolve(url: &str) -> anyhow::Result<NodeUrl> {
    let req = url.into_client_request().with_context(|| format!("bad --url {url}"))?;
    let uri = req.uri();
    if uri.scheme_str() != Some("ws") {
        bail!("--url {url}: only ws:// is supported");
    }
    let host = uri.host().context("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("{host} does not resolve"))?;
    if !addr.ip().is_loopback() {
        bail!("--url {url}: only loopback nodes may be loaded ({addr})");
    }
    Ok(NodeUrl {
        ws: url.to_string(),
        addr,
        publish: format!("http://{host}:{port}/publish"),
    })
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn samples(pids: &[u32]) -> anyhow::Result<Vec<procfs::Sample>> {
    pids.iter().map(|p| procfs::sample(*p)).collect()
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

async fn run(args: Args) -> anyhow::Result<Report> {
    let mut nodes = Vec::new();
    for u in &args.urls {
        nodes.push(resolve(u).await?);
    }
    let plan = plan(&args, nodes.len())?;
    let publishers = plan.fan.len();
    let connecting = (Duration::from_secs_f64(args.connect_timeout), args.connect_attempts);
    let ctx = Arc::new(Ctx::new(nodes, args.payload_bytes, connecting, publishers)?);
    let before = samples(&args.pids)?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Ramp);

    // Ramp: start connections at the set rate, then wait until each is ready or has failed.
    let total = plan.specs.len();
    let ramp_start = Instant::now();
    let progress = bar(total as u64, "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed})");
    progress.set_prefix("connect");
    let mut handles = Vec::with_capacity(total);
    let mut specs = plan.specs.clone().into_iter();
    let ramp_deadline =
        ramp_start + Duration::from_secs_f64(total as f64 / args.ramp_per_sec.max(1.0) + args.connect_timeout + 5.0);
    loop {
        let due = ((ramp_start.elapsed().as_secs_f64() * args.ramp_per_sec) as usize + 1).min(total);
        while handles.len() < due {
            let Some(spec) = specs.next() else { break };
            handles.push(tokio::spawn(conn::run(spec, ctx.clone(), phase_rx.clone())));
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
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    if args.wait_for_go {
        go(ctx.ready.load(Ordering::Relaxed)).await?;
    }

    // Run: publish for the duration (or hold the connections, for idle).
    let start = samples(&args.pids)?;
    let aux_start = samples(&args.aux_pids)?;
    let own_start = procfs::own()?;
    let run_start = Instant::now();
    let _ = phase_tx.send(Phase::Run(run_start));
    let duration = Duration::from_secs_f64(args.duration.max(0.0));
    let progress = bar(duration.as_secs(), "{prefix:>8} [{bar:30}] {pos}/{len} s {msg}");
    progress.set_prefix(format!("{:?}", args.scenario).to_lowercase());
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
    let duration_s = run_start.elapsed().as_secs_f64();

    // Drain: wait for every expected delivery, for a bounded time. What was sent is read once
    // every started publisher has stopped: a publish in flight when the run turned quiet and
    // counted after would otherwise be delivered beyond `expected` and could end the wait
    // before another publisher's last message reached everyone.
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain.max(0.0));
    let started = plan.specs[..handles.len()]
        .iter()
        .filter(|s| s.publish.is_some())
        .count();
    while ctx.stopped.load(Ordering::Acquire) < started && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sent: Vec<u64> = ctx.sent.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    let expected: u64 = sent.iter().zip(&plan.fan).map(|(s, f)| s * f).sum();
    progress.set_prefix("drain");
    while ctx.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = samples(&args.pids)?;
    let aux_end = samples(&args.aux_pids)?;
    let own_end = procfs::own()?;
    let measured_s = run_start.elapsed().as_secs_f64();
    progress.finish_and_clear();

    // Finish: close everything and gather what each connection saw.
    let _ = phase_tx.send(Phase::Finish);
    let mut outcomes = Vec::with_capacity(total);
    for h in handles {
        // Each task ends within its close wait after Finish (or its connect timeout).
        outcomes.push(h.await.unwrap_or_else(|_| Outcome {
            failure: Some("task panicked".into()),
            ..Outcome::default()
        }));
    }
    // Connections never started (the ramp deadline passed) count as failed.
    outcomes.extend(specs.map(|_| Outcome {
        failure: Some("not started".into()),
        ..Outcome::default()
    }));

    let mut tally = Tally::default();
    let (mut lost, mut lost_on_closed, mut unexpected, mut silent) = (0, 0, 0, 0);
    let (mut error_frames, mut reconnect_frames, mut unparsed_frames, mut positioned) = (0, 0, 0, 0);
    let mut failed = BTreeMap::new();
    let mut closed_by_node = BTreeMap::new();
    let mut connected = 0;
    let retried = outcomes.iter().map(|o| o.retries).sum();
    for (spec, out) in plan.specs.iter().zip(&outcomes) {
        if let Some(f) = &out.failure {
            *failed.entry(f.clone()).or_insert(0) += 1;
            continue;
        }
        connected += 1;
        tally.add(&out.tally);
        error_frames += out.error_frames;
        reconnect_frames += out.reconnects;
        unparsed_frames += out.unparsed;
        positioned += out.positioned;
        // Another process's publishers: what they sent is known there, and losses are counted
        // where the reports are merged.
        let missing: u64 = spec
            .expect
            .clone()
            .filter_map(|p| {
                let sent = *sent.get(p as usize)?;
                let got = out.streams.iter().find(|(q, _)| *q == p);
                Some(got.map_or(sent, |(_, s)| s.lost(sent)))
            })
            .sum();
        unexpected += out
            .streams
            .iter()
            .filter(|(p, _)| !spec.expect.contains(p))
            .map(|(_, s)| s.distinct)
            .sum::<u64>();
        silent += u64::from(is_silent(spec, out));
        match &out.closed {
            Some(why) => {
                *closed_by_node.entry(why.clone()).or_insert(0) += 1;
                lost_on_closed += missing;
            }
            None => lost += missing,
        }
    }

    let hist = ctx.latencies.merged();
    let node_cpu_ns: u64 = start
        .iter()
        .zip(&end)
        .map(|(a, b)| b.cpu_ns.saturating_sub(a.cpu_ns))
        .sum();
    let rss_growth: i64 = before.iter().zip(&end).map(|(a, b)| b.rss as i64 - a.rss as i64).sum();
    let sent_total: u64 = sent.iter().sum();
    Ok(Report {
        scenario: format!("{:?}", args.scenario).to_lowercase(),
        urls: args.urls.clone(),
        encoding: format!("{:?}", args.encoding).to_lowercase(),
        publish_via: format!("{:?}", args.publish_via).to_lowercase(),
        payload_bytes: args.payload_bytes,
        duration_s,
        measured_s,
        connections: Connections {
            planned: total,
            connected,
            failed,
            closed_by_node,
            retried,
            ramp_s,
        },
        publish: Publish {
            publishers,
            target_rate: if publishers == 0 { 0.0 } else { plan.rate },
            sent: sent_total,
            rate: sent_total as f64 / duration_s,
            errors: ctx.publish_errors.load(Ordering::Relaxed),
        },
        delivery: Delivery {
            expected,
            received: tally.received,
            rate: tally.received as f64 / duration_s,
            lost,
            lost_on_closed,
            gap_missing: tally.gap_missing,
            silent_members: silent,
            reordered: tally.reordered,
            duplicates: tally.duplicates,
            unexpected,
            error_frames,
            reconnect_frames,
            unparsed_frames,
            positioned,
        },
        latency_ms: Latency::of(&hist),
        latency_us: args.export_latency.then(|| {
            hist.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        }),
        publish_answer_ms: Latency::of(&ctx.answers.merged()),
        nodes: args
            .pids
            .iter()
            .enumerate()
            .map(|(i, pid)| NodeUsage::of(*pid, &before[i], &start[i], &end[i]))
            .collect(),
        node_cpu_s: secs(node_cpu_ns),
        node_cpu_ns_per_frame: (tally.received > 0 && !args.pids.is_empty())
            .then(|| node_cpu_ns as f64 / tally.received as f64),
        node_rss_bytes_per_conn: (connected > 0 && !args.pids.is_empty()).then(|| rss_growth as f64 / connected as f64),
        aux: args
            .aux_pids
            .iter()
            .enumerate()
            .map(|(i, pid)| AuxUsage {
                pid: *pid,
                cpu_s: secs(aux_end[i].cpu_ns.saturating_sub(aux_start[i].cpu_ns)),
            })
            .collect(),
        loadtest_cpu_s: secs(own_end.cpu_ns.saturating_sub(own_start.cpu_ns)),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every connection is a file: take the hard limit.
    let files = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-files limit")?;
    let needed = match args.scenario {
        // Both ends of every socket are in this process.
        Scenario::Floor => 2 * clients(&args) as u64,
        // The members are held by the generator processes it starts; a plan opens nothing.
        Scenario::Stadium100k | Scenario::Plan => 0,
        _ => clients(&args) as u64 + args.publishers as u64,
    } + 64;
    if files < needed {
        eprintln!("warning: open-files limit {files} may be too low for this run");
    }
    let json = args.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let (json_text, table) = if args.scenario == Scenario::Soak {
        let report = runtime.block_on(soak_run(&args))?;
        (serde_json::to_string_pretty(&report)?, report.table())
    } else if args.scenario == Scenario::Churn {
        let report = runtime.block_on(churn_run(&args))?;
        (serde_json::to_string_pretty(&report)?, report.table())
    } else if args.scenario == Scenario::Demo {
        let report = runtime.block_on(demo_run(&args))?;
        (serde_json::to_string_pretty(&report)?, report.table())
    } else if args.scenario == Scenario::Floor {
        let report = runtime.block_on(floor::run(floor_plan(&args)?))?;
        (serde_json::to_string_pretty(&report)?, report.table())
    } else if args.scenario == Scenario::Plan {
        let plan = capacity::plan(&capacity_inputs(&args))?;
        (serde_json::to_string_pretty(&plan)?, plan.table())
    } else if args.scenario == Scenario::Stadium100k {
        // Processes, not connections: no runtime needed.
        let report = fleet::run(&fleet_plan(&args)?)?;
        (serde_json::to_string_pretty(&report)?, report.table())
    } else {
        let report = runtime.block_on(run(args))?;
        (serde_json::to_string_pretty(&report)?, report.table())
    };
    // Tasks still closing sockets are dropped with the runtime, without waiting.
    runtime.shutdown_background();
    if json {
        println!("{json_text}");
    } else {
        print!("{table}");
    }
    Ok(())
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

fn capacity_inputs(args: &Args) -> capacity::Inputs {
    capacity::Inputs {
        viewers: args.viewers,
        rooms: args.rooms.unwrap_or(1) as u64,
        rate: args.rate.unwrap_or(10.0),
        payload_bytes: args.payload_bytes as u64,
        p99_ms: args.p99_ms,
        cores_per_node: args.cores_per_node,
        constants: plan_constants(args),
    }
}

/// The model's default constants, with those measured on the operator's hardware in their place.
fn plan_constants(args: &Args) -> capacity::Constants {
    let mut c = capacity::Constants::default();
    let given = [
        (args.write_cost_us, &mut c.write_cost_us),
        (args.write_cost_conns, &mut c.write_cost_conns),
        (args.idle_cost_us, &mut c.idle_us_per_conn_s),
        (args.conn_bytes, &mut c.bytes_per_conn),
    ];
    for (value, constant) in given {
        if let Some(v) = value {
            *constant = v;
        }
    }
    if let Some(files) = args.open_files {
        c.fd_limit = files;
    }
    c
}

fn fleet_plan(args: &Args) -> anyhow::Result<fleet::Plan> {
    let members = clients(args);
    let node_bin = match &args.node_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("shardcast"),
    };
    let duration = Duration::try_from_secs_f64(args.duration.max(1.0)).context("--duration")?;
    Ok(fleet::Plan {
        members,
        nodes: args.nodes,
        // A process may hold about 17,000 sockets under this machine's 20,000 descriptors.
        procs: args.procs.unwrap_or(members.div_ceil(15_000)).max(1),
        rates: args.rates.clone(),
        shards: args.shards,
        publishers: args.publishers.max(1),
        payload_bytes: args.payload_bytes,
        duration,
        ramp_per_sec: args.ramp_per_sec,
        // About 28,000 ports per source address, with room to spare.
        source_addrs: args.source_addrs.max((members.div_ceil(20_000) + 1).min(250) as u8),
        node_bin,
        out: args.out.clone(),
    })
}

fn floor_plan(args: &Args) -> anyhow::Result<floor::Plan> {
    // A zero window is refused by the floor itself; these refuse what is not a duration at all.
    let window = Duration::try_from_secs_f64(args.window_ms / 1e3).context("--window-ms")?;
    let duration = Duration::try_from_secs_f64(args.duration.max(0.1)).context("--duration")?;
    Ok(floor::Plan {
        sockets: clients(args),
        frame_bytes: args.payload_bytes,
        frames_per_write: args.frames_per_write.clone(),
        window,
        duration,
    })
}

fn churn_plan(args: &Args, nodes: Vec<NodeUrl>) -> anyhow::Result<churn::Plan> {
    let rate = args.rate.unwrap_or(200.0);
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be positive");
    }
    if args.publish_via == Via::Http {
        bail!("churn publishes with pub frames: give --publish-via ws");
    }
    let positive = |v: f64, name: &str| Duration::try_from_secs_f64(v.max(0.0)).with_context(|| name.to_string());
    Ok(churn::Plan {
        nodes,
        source_addrs: args.source_addrs,
        clients: clients(args).max(1),
        publishers: args.publishers.max(1),
        room: room(args),
        prefix: args.prefix.clone(),
        rate,
        churn_per_sec: args.churn_per_sec,
        payload_bytes: args.payload_bytes,
        encodings: match args.encoding {
            Encodings::Json => [Encoding::Json; 2],
            Encodings::Msgpack => [Encoding::Msgpack; 2],
            Encodings::Mixed => [Encoding::Json, Encoding::Msgpack],
        },
        duration: positive(args.duration, "--duration")?,
        drain: positive(args.drain, "--drain")?,
        ramp_per_sec: args.ramp_per_sec,
        connect_timeout: positive(args.connect_timeout, "--connect-timeout")?,
        pids: args.pids.clone(),
    })
}

async fn churn_run(args: &Args) -> anyhow::Result<churn::ChurnReport> {
    let mut nodes = Vec::new();
    for u in &args.urls {
        nodes.push(resolve(u).await?);
    }
    churn::run(churn_plan(args, nodes)?).await
}

async fn demo_run(args: &Args) -> anyhow::Result<demo::DemoReport> {
    let mut nodes = Vec::new();
    for u in &args.urls {
        nodes.push(resolve(u).await?);
    }
    demo::run(demo_plan(args, nodes)?).await
}

fn demo_plan(args: &Args, nodes: Vec<NodeUrl>) -> anyhow::Result<demo::Plan> {
    let positive = |v: f64, name: &str| Duration::try_from_secs_f64(v.max(0.0)).with_context(|| name.to_string());
    Ok(demo::Plan {
        nodes,
        source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        room: room(args),
        prefix: args.prefix.clone(),
        publishers: args.publishers.max(1),
        rate: args.rate.unwrap_or(20.0),
        duration: positive(args.duration, "--duration")?,
        drain: positive(args.drain, "--drain")?,
    })
}

async fn soak_run(args: &Args) -> anyhow::Result<soak::SoakReport> {
    let mut nodes = Vec::new();
    for u in &args.urls {
        let n = resolve(u).await?;
        nodes.push((n.ws, n.addr));
    }
    let duration = Duration::from_secs_f64(args.duration.max(1.0));
    soak::run(soak::Plan {
        nodes,
        source_addrs: args.source_addrs,
        clients: clients(args).max(1),
        rooms: args.rooms.unwrap_or(ROOMS).max(1),
        rate: args.rate.unwrap_or(500.0).max(0.001),
        churn_per_sec: args.churn_per_sec.max(0.001),
        payload_bytes: args.payload_bytes,
        duration,
        warmup: args.warmup.map(Duration::from_secs_f64).unwrap_or(duration / 4),
        sample_every: Duration::from_secs_f64(args.sample_every.max(0.1)),
        pids: args.pids.clone(),
        prefix: args.prefix.clone(),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn args(line: &str) -> Args {
        Args::parse_from(line.split_whitespace())
    }

    #[test]
    fn floor_plan_takes_the_defaults_and_refuses_what_is_no_duration() {
        let p = floor_plan(&args("lt floor --duration 2")).unwrap();
        assert_eq!((p.sockets, p.frame_bytes), (1000, 128));
        assert_eq!(p.frames_per_write, vec![1, 2, 4, 8, 16]);
        assert_eq!(
            (p.window, p.duration),
            (Duration::from_millis(20), Duration::from_secs(2))
        );
        assert!(floor_plan(&args("lt floor --window-ms=-1")).is_err());
        assert!(floor_plan(&args("lt floor --window-ms NaN")).is_err());
        assert!(floor_plan(&args("lt floor --duration inf")).is_err());
    }

    #[test]
    fn churn_plan_takes_the_defaults_and_refuses_what_it_cannot_run() {
        let p = churn_plan(
            &args("lt churn --room room --churn-per-sec 40 --encoding mixed"),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            (p.clients, p.publishers, p.rate, p.churn_per_sec),
            (1000, 4, 200.0, 40.0)
        );
        assert_eq!(p.room, "room");
        assert_eq!(p.encodings, [Encoding::Json, Encoding::Msgpack]);
        assert_eq!((p.duration, p.drain), (Duration::from_secs(20), Duration::from_secs(5)));
        assert!(churn_plan(&args("lt churn --publish-via http"), Vec::new()).is_err());
        assert!(churn_plan(&args("lt churn --rate 0"), Vec::new()).is_err());
        assert!(churn_plan(&args("lt churn --duration inf"), Vec::new()).is_err());
        assert!(plan(&args("lt churn"), 2).is_err(), "churn has its own runner");
    }

    #[test]
    fn demo_plan_takes_the_demo_room_and_refuses_what_is_no_duration() {
        let p = demo_plan(&args("lt demo --duration 5"), Vec::new()).unwrap();
        assert_eq!((p.room.as_str(), p.rate, p.publishers), ("demo", 20.0, 4));
        assert_eq!(p.duration, Duration::from_secs(5));
        assert_eq!(
            demo_plan(&args("lt demo --room match"), Vec::new()).unwrap().room,
            "match"
        );
        assert!(demo_plan(&args("lt demo --duration inf"), Vec::new()).is_err());
        assert_eq!(room(&args("lt stadium")), "stadium");
    }

    #[test]
    fn plan_takes_the_stadium_defaults_and_refuses_bad_input() {
        let i = capacity_inputs(&args("lt plan --viewers 1000000"));
        assert_eq!((i.viewers, i.rooms, i.rate, i.payload_bytes), (1_000_000, 1, 10.0, 128));
        assert!(capacity::plan(&i).unwrap().nodes > 1);
        assert!(capacity::plan(&capacity_inputs(&args("lt plan --rate 0"))).is_err());
        // Constants measured on the operator's hardware replace the defaults, and are checked.
        let c = capacity_inputs(&args(
            "lt plan --write-cost-us 3 --write-cost-conns 5000 --idle-cost-us 1 --conn-bytes 6000 --open-files 20000",
        ))
        .constants;
        let measured = (
            c.write_cost_us,
            c.write_cost_conns,
            c.idle_us_per_conn_s,
            c.bytes_per_conn,
        );
        assert_eq!((measured, c.fd_limit), ((3.0, 5000.0, 1.0, 6000.0), 20_000));
        assert!(capacity::plan(&capacity_inputs(&args("lt plan --write-cost-us=-1"))).is_err());
        assert!(capacity::plan(&capacity_inputs(&args("lt plan --viewers 5 --rooms 10"))).is_err());
    }

    #[test]
    fn fleet_plan_sizes_processes_and_addresses_for_the_members() {
        let p = fleet_plan(&args("lt stadium-100k --node-bin /x/shardcast")).unwrap();
        assert_eq!((p.members, p.nodes, p.procs, p.shards), (100_000, 6, 7, 16));
        assert_eq!((p.rates.clone(), p.source_addrs), (vec![1.0, 2.0, 5.0], 6));
        let small = fleet_plan(&args("lt stadium-100k --clients 5000 --nodes 5 --rates 5")).unwrap();
        assert_eq!((small.procs, small.source_addrs), (1, 2));
        assert!(small.node_bin.ends_with("shardcast"));
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
