//! shardcast-loadtest: opens many WebSocket clients against one or more shardcast nodes, runs a
//! scenario for a fixed time, and reports deliveries, losses, latency and the nodes' CPU and
//! memory. Every phase has a deadline, so a run always ends by itself.
//!
//! This file is the command line only: the flags ([`Args`]), their per-scenario defaults, and the
//! dispatch to each scenario's module, which builds its plan from the flags and runs it.

mod balancer;
mod capacity;
mod churn;
mod conn;
mod demo;
mod feeds;
mod fleet;
mod floor;
mod hooks;
mod keyed;
mod kickoff;
mod matchday;
mod procfs;
mod procs;
mod progress;
mod rawws;
mod reader;
mod rebuild;
mod report;
mod scrape;
mod soak;
mod sockopt;
mod stats;
mod tasks;
mod traffic;
mod weak;
mod weaklink;
mod wire;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::{
    conn::{NodeUrl, Via},
    wire::Encoding,
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
    /// A match played as a test: --clients viewers (default 2,000) through HAProxy over --nodes
    /// node processes (default 3) on a cluster of 3 masters and 3 replicas it starts, in a score
    /// room with history and a chat room, live through kick-off, a steady feed, a goal (chat
    /// x--goal-factor), a rolling deploy, a master killed and the final whistle; per phase:
    /// connected, closes by code, acknowledged messages lost, duplicates, reorders, latency, time
    /// to reconnect. Writes JSON and an SVG timeline to --out. Run from the repository.
    Matchday,
    /// Keyed messages and weak links: one room (--room, default `match:weak`) with a score feed
    /// (--rate 20 msg/s of --value-bytes 1024, key `score`) and a chat (--chat-rate 4), --clients
    /// viewers (200) of which --weak-share (0.1) read at --weak-bytes-per-sec (4096) through a
    /// small receive buffer; once per --modes (`conflate`: the node conflates the room past
    /// --conflate-above; `plain`: it does not), each on a node it starts (embedded bus): weak
    /// viewers closed with 4008 and when, the age of the score they show, values skipped, and the
    /// healthy viewers' latency. Writes weak.json to --out.
    Weak,
    /// Joins with `latest` at kick-off: --keys keys (100, `odds:N`, of --value-bytes 128)
    /// published into --room (default `kickoff`), then --joins joins (10,000) over --join-window
    /// seconds (10) from --clients sockets (1,000, leaving between joins) over --nodes node
    /// processes (2) on a 3-master cluster it starts; per join, the time to every latest value and
    /// the `ok`, and errors. Writes kickoff.json to --out. Run from the repository.
    Kickoff,
    /// The publish hook at chat rates: --clients members (10,000) in --rooms rooms (1,000)
    /// publishing --rate (2,000 msg/s) over a node it starts, three times: without hooks, with
    /// `--hook-publish` to a backend it runs (allows, masks every tenth line), and
    /// with that backend stopped from 30 % to 60 % of --duration; per run: lost, reorders, masked
    /// lines, latency beside the backend's, node CPU per publish, and the outage's timeline.
    /// Writes hooks.json to --out.
    Hooks,
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
    /// (idle). Default: 2000, 10000, 2000, 18000; 1000 (soak, churn); viewers (weak, 200);
    /// sockets making the joins (kickoff, 1000).
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
    /// Default: `demo` for demo, `match:weak` for weak, `kickoff` for kickoff, else `stadium`.
    #[arg(long)]
    room: Option<String>,
    /// Prefix of generated user and chat room names.
    #[arg(long, default_value = "lt")]
    prefix: String,
    /// Messages published per second, all publishers together. Default: 200 (stadium),
    /// 2000 (chat), 1000 (dm); the score feed's (weak, 20).
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
    /// stadium-100k, matchday, kickoff: node processes to start. Default: 6 (stadium-100k), 3
    /// (matchday), 2 (kickoff).
    #[arg(long)]
    nodes: Option<usize>,
    /// stadium-100k: the publishing rates to run, msg/s, one step each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,5")]
    rates: Vec<f64>,
    /// stadium-100k: shards of the room.
    #[arg(long, default_value_t = 16)]
    shards: u32,
    /// stadium-100k: generator processes for the members. Default: one per 15,000 members.
    #[arg(long)]
    procs: Option<usize>,
    /// stadium-100k, matchday, weak, kickoff: the node binary. Default: `shardcast` beside this
    /// program.
    #[arg(long)]
    node_bin: Option<std::path::PathBuf>,
    /// stadium-100k, matchday, weak, kickoff: where the JSON report (and the chart) go. Default:
    /// /tmp/shardcast-SCENARIO.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// matchday: seconds the kick-off may take for every viewer to be in both rooms.
    #[arg(long, default_value_t = 15.0)]
    kickoff: f64,
    /// matchday: seconds of the steady feed.
    #[arg(long, default_value_t = 20.0)]
    steady: f64,
    /// matchday: seconds of the goal's chat.
    #[arg(long, default_value_t = 10.0)]
    goal: f64,
    /// matchday: seconds of play after a replica took the killed master's slots.
    #[arg(long, default_value_t = 8.0)]
    after_kill: f64,
    /// matchday: seconds of play before the feed stops.
    #[arg(long, default_value_t = 5.0)]
    whistle: f64,
    /// matchday: messages a second of the score feed (the chat's are --rate, default 20).
    #[arg(long, default_value_t = 2.0)]
    score_rate: f64,
    /// matchday: how many times faster the chat goes during the goal.
    #[arg(long, default_value_t = 10.0)]
    goal_factor: f64,
    /// matchday: the nodes' --drain-jitter, seconds: a drained node's clients come back spread
    /// over it.
    #[arg(long, default_value_t = 2.0)]
    drain_jitter: f64,
    /// matchday: the clients' first full-jitter ceiling, milliseconds (the JS client's default).
    #[arg(long, default_value_t = 500.0)]
    backoff_base_ms: f64,
    /// matchday: the clients' largest full-jitter ceiling, milliseconds (the JS client's default).
    #[arg(long, default_value_t = 20_000.0)]
    backoff_cap_ms: f64,
    /// A generator process of a multi-process run: its subscribers expect these publishers, which
    /// another process runs (with --publishers 0).
    #[arg(long, hide = true, default_value_t = 0)]
    expect_publishers: u32,
    /// A generator process of a multi-process run: once connected, print `ready` and wait for a
    /// line on standard input before the run starts.
    #[arg(long, hide = true)]
    wait_for_go: bool,
    /// weak: the share of --clients that read over a weak link.
    #[arg(long, default_value_t = 0.1)]
    weak_share: f64,
    /// weak: bytes a second a weak viewer reads.
    #[arg(long, default_value_t = 4096.0)]
    weak_bytes_per_sec: f64,
    /// weak: the receive buffer (SO_RCVBUF) a weak viewer asks for before it connects.
    #[arg(long, default_value_t = 4096)]
    weak_rcvbuf: u32,
    /// weak: the TCP segment size a weak viewer announces (TCP_MAXSEG) before it connects, as a
    /// client beyond loopback would (1400); 0 keeps loopback's ~64 KiB, with which the node's
    /// kernel sizes the socket's send buffer at megabytes.
    #[arg(long, default_value_t = 0)]
    weak_mss: u32,
    /// weak: chat lines a second (unkeyed, of --payload-bytes).
    #[arg(long, default_value_t = 4.0)]
    chat_rate: f64,
    /// weak, kickoff: bytes of each keyed value. Default: 1024 (weak), 128 (kickoff).
    #[arg(long)]
    value_bytes: Option<usize>,
    /// weak: how the node runs, one pass each: `conflate` (--conflate on the room) and `plain`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "conflate,plain")]
    modes: Vec<weak::Mode>,
    /// weak: the node's --conflate-above in the conflate mode.
    #[arg(long, default_value = "16KiB")]
    conflate_above: String,
    /// weak: the node's --max-buffered-bytes. Default: the node's (1MiB).
    #[arg(long)]
    max_buffered_bytes: Option<String>,
    /// kickoff: keys published before the joins, `odds:0` onwards.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// kickoff: joins with `latest`, all sockets together.
    #[arg(long, default_value_t = 10_000)]
    joins: usize,
    /// kickoff: seconds the joins are spread over.
    #[arg(long, default_value_t = 10.0)]
    join_window: f64,
    /// stadium: publish a realistic feed instead of padded data, `--publishers` of them (keyed
    /// `match:P` and `odds:P`; chat unkeyed), and subscribe with feed readers that rebuild and
    /// check every value and count the bytes their sockets read per message (JSON only).
    #[arg(long, value_enum)]
    feed: Option<feeds::Feed>,
    /// The seed of the feed's values.
    #[arg(long, default_value_t = 29)]
    feed_seed: u64,
    /// Feed readers offer permessage-deflate (plain frames when the node declines).
    #[arg(long)]
    deflate: bool,
    /// Feed readers join with `"delta":true`.
    #[arg(long)]
    delta: bool,
    /// Feed readers are split evenly over the four ways of reading (plain, delta, deflate,
    /// delta+deflate), on every node, each reported apart: the comparison in one run.
    #[arg(long)]
    wire_split: bool,
    /// hooks: the nodes' --hook-timeout, milliseconds.
    #[arg(long, default_value_t = 1000)]
    hook_timeout_ms: u64,
    /// hooks: what the publish hook's failure means on the nodes (`--hook-on-error publish=…`):
    /// `deny` (publishes answered `unavailable`) or `allow` (published as sent).
    #[arg(long, default_value = "deny", value_parser = ["deny", "allow"])]
    hook_on_error: String,
    /// Adds the end-to-end latencies, as (microseconds, count) pairs, to the JSON report, so that
    /// reports of several processes can be merged.
    #[arg(long, hide = true)]
    export_latency: bool,
}

/// Rooms of the chat and soak scenarios unless `--rooms` says otherwise.
const ROOMS: usize = 1000;

impl Scenario {
    /// Its name on the command line and in reports.
    fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}").to_lowercase(), |v| v.get_name().to_string())
    }
}

impl Encodings {
    /// The encoding of connection `idx`.
    fn of(self, idx: usize) -> Encoding {
        match self {
            Encodings::Json => Encoding::Json,
            Encodings::Msgpack => Encoding::Msgpack,
            Encodings::Mixed if idx.is_multiple_of(2) => Encoding::Json,
            Encodings::Mixed => Encoding::Msgpack,
        }
    }
}

impl Args {
    /// `--clients`, or the scenario's default.
    fn clients(&self) -> usize {
        self.clients.unwrap_or(match self.scenario {
            Scenario::Stadium | Scenario::Dm => 2000,
            Scenario::Stadium100k => 100_000,
            Scenario::Matchday => 2000,
            Scenario::Plan => 0,
            Scenario::Chat | Scenario::Hooks => 10_000,
            Scenario::Idle => 18_000,
            Scenario::Soak | Scenario::Floor | Scenario::Churn => 1000,
            Scenario::Demo => 0,
            Scenario::Weak => 200,
            Scenario::Kickoff => 1000,
        })
    }

    /// `--rooms`, or the scenario's default: one for the plan, else [`ROOMS`].
    fn rooms(&self) -> usize {
        self.rooms
            .unwrap_or(if self.scenario == Scenario::Plan { 1 } else { ROOMS })
    }

    /// `--room`, or the scenario's default.
    fn room(&self) -> String {
        self.room.clone().unwrap_or_else(|| {
            match self.scenario {
                Scenario::Demo => "demo",
                Scenario::Weak => "match:weak",
                Scenario::Kickoff => "kickoff",
                _ => "stadium",
            }
            .into()
        })
    }

    /// `--value-bytes`, or the scenario's default.
    fn value_bytes(&self) -> usize {
        self.value_bytes
            .unwrap_or(if self.scenario == Scenario::Weak { 1024 } else { 128 })
    }

    /// `--node-bin`, or `shardcast` beside this program.
    fn node_bin(&self) -> anyhow::Result<std::path::PathBuf> {
        match &self.node_bin {
            Some(bin) => Ok(bin.clone()),
            None => Ok(std::env::current_exe()?.with_file_name("shardcast")),
        }
    }

    /// `--out`, or `/tmp/shardcast-SCENARIO`.
    fn out(&self) -> std::path::PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| format!("/tmp/shardcast-{}", self.scenario.name()).into())
    }

    /// The open files the run needs, at least.
    fn files_needed(&self) -> u64 {
        let files = match self.scenario {
            // Both ends of every socket are in this process.
            Scenario::Floor => 2 * self.clients() as u64,
            // The members are held by the generator processes it starts; a plan opens nothing.
            Scenario::Stadium100k | Scenario::Plan => 0,
            // HAProxy, started from here with this limit, holds two descriptors per client.
            Scenario::Matchday => 2 * (self.clients() as u64 + self.publishers as u64 + 1),
            _ => self.clients() as u64 + self.publishers as u64,
        };
        files + 64
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every connection is a file: take the hard limit.
    let files = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-files limit")?;
    if files < args.files_needed() {
        eprintln!("warning: open-files limit {files} may be too low for this run");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let (json_text, table) = dispatch(&args, &runtime)?;
    // Tasks still closing sockets are dropped with the runtime, without waiting.
    runtime.shutdown_background();
    if args.json {
        println!("{json_text}");
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Runs the scenario asked for; its report as JSON and as a table.
fn dispatch(args: &Args, runtime: &tokio::runtime::Runtime) -> anyhow::Result<(String, String)> {
    match args.scenario {
        Scenario::Stadium | Scenario::Chat | Scenario::Dm | Scenario::Idle => {
            shown(runtime.block_on(traffic::run(args))?, report::Report::table)
        }
        Scenario::Soak => runtime.block_on(async {
            let plan = soak::Plan::from_args(args, NodeUrl::resolve_all(&args.urls).await?);
            shown(soak::run(plan).await?, soak::SoakReport::table)
        }),
        Scenario::Churn => runtime.block_on(async {
            let plan = churn::Plan::from_args(args, NodeUrl::resolve_all(&args.urls).await?)?;
            shown(churn::run(plan).await?, churn::ChurnReport::table)
        }),
        Scenario::Demo => runtime.block_on(async {
            let plan = demo::Plan::from_args(args, NodeUrl::resolve_all(&args.urls).await?)?;
            shown(demo::run(plan).await?, demo::DemoReport::table)
        }),
        Scenario::Floor => shown(
            runtime.block_on(floor::run(floor::Plan::from_args(args)?))?,
            floor::FloorReport::table,
        ),
        Scenario::Plan => shown(
            capacity::plan(&capacity::Inputs::from_args(args))?,
            capacity::Plan::table,
        ),
        // Processes, not connections: no runtime needed.
        Scenario::Stadium100k => shown(fleet::run(&fleet::Plan::from_args(args)?)?, fleet::FleetReport::table),
        // Processes driven from this thread, the clients on the runtime.
        Scenario::Matchday => shown(
            matchday::run(&matchday::Plan::from_args(args)?, runtime)?,
            matchday::MatchReport::table,
        ),
        // A node per mode started from this thread, the clients on the runtime.
        Scenario::Weak => shown(
            weak::run(&weak::Plan::from_args(args)?, runtime)?,
            weak::WeakReport::table,
        ),
        // A node per run started from this thread, the members and the backend on the runtime.
        Scenario::Hooks => shown(
            hooks::run(&hooks::Plan::from_args(args)?, runtime)?,
            hooks::HooksReport::table,
        ),
        Scenario::Kickoff => shown(
            kickoff::run(&kickoff::Plan::from_args(args)?, runtime)?,
            kickoff::KickoffReport::table,
        ),
    }
}

/// A report as JSON and as its table for people.
fn shown<R: Serialize>(report: R, table: impl FnOnce(&R) -> String) -> anyhow::Result<(String, String)> {
    Ok((serde_json::to_string_pretty(&report)?, table(&report)))
}

#[cfg(test)]
impl Args {
    /// The flags of a command line such as `lt floor --duration 2`.
    fn of(line: &str) -> Args {
        Args::parse_from(line.split_whitespace())
    }
}
