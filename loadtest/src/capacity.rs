//! Sizing a deployment: how many nodes and Redis masters a load needs, what each node then
//! spends, and which limit sets the count, from costs this crate's scenarios measure. Pure
//! arithmetic, no I/O: the `plan` subcommand prints [`plan`]'s answer for
//! [`Inputs::from_args`]. The model, its constants and where it stops holding are in
//! `docs/capacity.md`.
//!
//! A node's delivery workers (one per core) each write their share of the node's sockets, in
//! lanes that take turns. Adaptive writes (`src/fanout/schedule.rs`) write each socket once a period of
//! [`Constants::spread`] times what a round of turns takes, and never more than
//! [`Constants::max_write_delay_ms`]: while the period is free to grow a worker spends a fixed
//! share of its time writing, and more load makes frames wait longer instead, so each write carries
//! more of them and each frame costs less. Nodes are added until every limit holds: connections (and
//! open files), node CPU, NIC, memory and the p99 target.

use std::{collections::BTreeMap, fmt::Write};

use anyhow::{bail, ensure};
use serde::Serialize;

use crate::Args;

/// The most shard channels a room may have (`--hot-room NAME=N`, 1 to 1024).
const MAX_SHARDS: u64 = 1024;
/// Descriptors a node keeps besides its WebSockets and `--max-http-connections`.
const SPARE_FDS: u64 = 64;
/// The fewest masters a Redis Cluster has.
const MIN_MASTERS: u64 = 3;
const US_PER_S: f64 = 1e6;
const MIB: f64 = 1024.0 * 1024.0;
/// A node's lanes: 8, or one per worker when there are more (`LANES` in `src/fanout/lanes.rs`).
const LANES: f64 = 8.0;
/// Frames a socket must get in a period for the node to wait (`WORTH` in `src/fanout/schedule.rs`).
const WORTH: f64 = 2.0;

/// The load to plan for.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Concurrent connections in all, each in one room.
    pub viewers: u64,
    /// Rooms the viewers are spread over, evenly; 1 is the stadium.
    pub rooms: u64,
    /// Messages per second published to each room; every member receives each one.
    pub rate: f64,
    /// Bytes of a message's data.
    pub payload_bytes: u64,
    /// The latency the 99th percentile of deliveries must stay under, milliseconds.
    pub p99_ms: f64,
    /// Cores of one node, and so its delivery workers (`--workers` defaults to the CPUs).
    pub cores_per_node: f64,
    /// Measured costs and chosen budgets.
    pub constants: Constants,
}

/// The model's costs (measured on a 2-core shared loopback test machine; re-measure on your own
/// hardware with the command each names) and budgets (choices, not measurements).
#[derive(Debug, Clone, Serialize)]
pub struct Constants {
    /// Node CPU of a frame written alone, µs, with [`Constants::write_cost_conns`] connections on the
    /// machine, net of their idle cost; the write system call and its receive half (loopback bills
    /// it to the sender) are most of it: `shardcast-loadtest stadium-100k --clients 18000 --nodes 2
    /// --rates 1`, `node_cpu_us_per_delivery_net` (a message a second finds every socket cold,
    /// so this is the most a write costs).
    pub write_cost_us: f64,
    /// Connections on the machine when [`Constants::write_cost_us`] was measured (the run above:
    /// 18,000, their client ends on the same machine).
    pub write_cost_conns: f64,
    /// How much more a write costs, as a share of [`Constants::write_cost_us`], each time the
    /// connections on the machine double (their kernel state no longer fits the caches):
    /// `shardcast-loadtest floor --payload-bytes 200 --window-ms 1000` at `--clients 1000` and
    /// `9000`, the µs per write between them over the larger, over the 3.2 doublings between them
    /// ((5.52 - 4.39) / 5.52 / 3.17 = 0.065).
    pub write_growth_per_doubling: f64,
    /// CPU of one more frame in a write (user-space and kernel copies), µs: `shardcast-loadtest
    /// floor --clients 1000 --payload-bytes 200`, µs per write at 16 frames per write less that at
    /// 1, over 15 (about 0.07; 0.1 rounded up).
    pub frame_cost_us: f64,
    /// CPU a connection costs its node each second with nothing published (pings, timers,
    /// presence), µs: the same `stadium-100k` run, `node_idle_cores` ÷ `members_connected`.
    pub idle_us_per_conn_s: f64,
    /// A worker's turns may take one part in this many of its time before frames wait
    /// (`SPREAD` in `src/fanout/schedule.rs`, set by paired stadium runs).
    pub spread: f64,
    /// The longest a frame waits for its write (`--max-write-delay`), ms.
    pub max_write_delay_ms: f64,
    /// Bytes a frame adds to its payload (the JSON envelope and the WebSocket header):
    /// `shardcast_delivered_bytes_total` / `shardcast_deliveries_total` during a stadium run,
    /// less `--payload-bytes` (a 128-byte payload makes a 200-byte frame).
    pub frame_overhead_bytes: u64,
    /// Node RSS per connection of a room's member, bytes: the same `stadium-100k` run,
    /// `node_rss_bytes_per_conn` (taken with every member connected, after the node has returned
    /// free memory to the system).
    pub bytes_per_conn: f64,
    /// Node RSS before any connection, bytes: `shardcast-loadtest idle --clients 18000 --pid <node>`,
    /// its `before` figure.
    pub base_memory_bytes: f64,
    /// The most RSS a node may have, bytes; the rest of the machine is left to the kernel's
    /// socket buffers, which the model does not count. A budget.
    pub max_memory_per_node_bytes: f64,
    /// The most WebSockets a node should hold (the clients one restart sends elsewhere). A budget.
    pub max_conns_per_node: u64,
    /// The node's open-files limit (`ulimit -n`); with `--max-http-connections` (an eighth of it,
    /// 32 to 10,000) and 64 more it caps the WebSockets a node can hold.
    pub fd_limit: u64,
    /// A socket's outbound budget (`--max-buffered-bytes`); past it the node closes it (4008).
    pub max_buffered_bytes: f64,
    /// The share of a node's cores the plan may use. A budget.
    pub cpu_target: f64,
    /// A node's NIC, Gbit/s.
    pub nic_gbps: f64,
    /// The share of the NIC the plan may use. A budget.
    pub nic_target: f64,
    /// Redis CPU of one `SPUBLISH` besides its subscribers, µs: the masters' CPU (`--aux-pid`
    /// with each redis-server's pid) per message published over stadium runs at 2 nodes and at
    /// more; where the line through those figures meets 0 nodes. `INFO commandstats`
    /// (`cmdstat_spublish`, `usec_per_call`) shows the command's own share (5–10 µs at 2 nodes on
    /// the test machine). To be checked beyond 2 nodes.
    pub redis_us_per_publish: f64,
    /// Redis CPU per subscribed node a publish goes to, µs: the slope of the same line. To be
    /// checked beyond 2 nodes.
    pub redis_us_per_subscriber_delivery: f64,
    /// The most CPU one Redis master should spend on publishes, cores; the rest is for
    /// replication, presence and history. A budget.
    pub redis_master_cores: f64,
}

impl Default for Constants {
    fn default() -> Constants {
        Constants {
            write_cost_us: 7.5,
            write_cost_conns: 18_000.0,
            write_growth_per_doubling: 0.065,
            frame_cost_us: 0.1,
            idle_us_per_conn_s: 1.1,
            spread: 6.0,
            max_write_delay_ms: 250.0,
            frame_overhead_bytes: 72,
            bytes_per_conn: 4500.0,
            base_memory_bytes: 30.0 * MIB,
            max_memory_per_node_bytes: 8.0 * 1024.0 * MIB,
            max_conns_per_node: 50_000,
            fd_limit: 1_048_576,
            max_buffered_bytes: MIB,
            cpu_target: 0.6,
            nic_gbps: 10.0,
            nic_target: 0.8,
            redis_us_per_publish: 5.0,
            redis_us_per_subscriber_delivery: 1.5,
            redis_master_cores: 0.5,
        }
    }
}

impl Inputs {
    /// The load the command line asks to plan for: one room at 10 messages a second unless it
    /// says otherwise.
    pub fn from_args(args: &Args) -> Inputs {
        Inputs {
            viewers: args.viewers,
            rooms: args.rooms() as u64,
            rate: args.rate.unwrap_or(10.0),
            payload_bytes: args.payload_bytes as u64,
            p99_ms: args.p99_ms,
            cores_per_node: args.cores_per_node,
            constants: Constants::from_args(args),
        }
    }
}

impl Constants {
    /// The model's default constants, with those measured on the operator's hardware in their
    /// place.
    pub fn from_args(args: &Args) -> Constants {
        let mut c = Constants::default();
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
}

/// What the load needs.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Nodes behind the load balancer.
    pub nodes: u64,
    /// Redis Cluster masters.
    pub masters: u64,
    /// Shard channels each room needs (`--hot-room NAME=N`), a power of two.
    pub shards_per_hot_room: u64,
    /// WebSockets each node holds.
    pub conns_per_node: u64,
    /// Frames delivered per second, all nodes.
    pub deliveries_per_sec: f64,
    /// Frames each node delivers per second.
    pub deliveries_per_node_per_sec: f64,
    /// Frames one write carries, on average (1: each frame goes out alone).
    pub frames_per_write: f64,
    /// The period adaptive writes use: from one write of a socket to its next, as
    /// `shardcast_write_gather_seconds` shows it (0: each frame goes out as it comes).
    pub write_wait_ms: f64,
    /// How long a lane's turn takes (when frames go at once: a message's writes on a worker), ms.
    pub write_turn_ms: f64,
    /// The wait plus a turn, ms.
    pub predicted_p99_ms: f64,
    /// The p99 asked for, ms.
    pub p99_target_ms: f64,
    /// Node CPU per delivered frame at these frames per write, µs.
    pub node_cpu_per_delivery_us: f64,
    /// Cores each node spends delivering.
    pub node_cores_each: f64,
    /// Cores of a node, as asked.
    pub cores_per_node: f64,
    /// Bytes of one delivered frame: payload and envelope.
    pub frame_bytes: u64,
    /// RSS of a node: a base, each connection's state, and the frames waiting for their write.
    pub memory_per_node_bytes: u64,
    /// Bytes of frames a node sends per second (TCP/IP headers not counted).
    pub egress_per_node_bytes_per_sec: f64,
    /// The same in Gbit/s.
    pub egress_per_node_gbps: f64,
    /// Nodes subscribed to each room (every node for a room larger than the fleet).
    pub nodes_per_room: f64,
    /// Redis CPU of one room's publishes, cores, before it is split over shards.
    pub redis_cores_per_room: f64,
    /// Redis CPU of every room's publishes, cores.
    pub redis_cores_total: f64,
    /// The limit that sets the plan: `connections`, `open files`, `node cpu`, `nic`, `memory`,
    /// `p99`, or `redis master` (one master's CPU for a room's shard).
    pub bound_by: String,
    /// The fewest nodes each limit allows (`None`: not even one viewer per node holds it).
    pub nodes_needed_by: BTreeMap<String, Option<u64>>,
    /// Where the answer stops holding or costs more than it seems.
    pub warnings: Vec<String>,
}

/// Node CPU of a frame written alone with `conns` connections on the machine, µs: the measured
/// cost, more by [`Constants::write_growth_per_doubling`] for each doubling of the connections
/// past those it was measured with, less for each halving down to 1/16 of them (about the fewest
/// the floor measured).
pub fn write_cost_at(conns: f64, c: &Constants) -> f64 {
    let doublings = (conns.max(1.0) / c.write_cost_conns).log2().max(-4.0);
    c.write_cost_us * (1.0 + c.write_growth_per_doubling * doublings)
}

/// Node CPU per delivered frame at `frames_per_write` frames per write, each write costing
/// `write_us`, µs: a write's cost shared by its frames, plus each frame's own.
pub fn predict_node_cpu_per_delivery_us(frames_per_write: f64, write_us: f64, c: &Constants) -> f64 {
    write_us / frames_per_write.max(1.0) + c.frame_cost_us
}

/// Cores `conns` connections on one machine cost at `rate` messages a second each, every frame
/// written at once (one frame per write): the check of a run whose nodes share a machine.
pub fn predict_cores_one_frame_per_write(conns: f64, rate: f64, c: &Constants) -> f64 {
    let per_delivery = predict_node_cpu_per_delivery_us(1.0, write_cost_at(conns, c), c);
    cores_for(conns, rate, per_delivery, c)
}

/// Cores `conns` connections cost at `rate` messages a second each, a delivery costing
/// `per_delivery_us`, with their idle cost.
fn cores_for(conns: f64, rate: f64, per_delivery_us: f64, c: &Constants) -> f64 {
    conns * (rate * per_delivery_us + c.idle_us_per_conn_s) / US_PER_S
}

/// Sizes the fleet for `inputs`; errors on zero, negative or non-finite inputs, and on more rooms
/// than viewers.
pub fn plan(inputs: &Inputs) -> anyhow::Result<Plan> {
    check(inputs)?;
    let i = inputs;
    let c = &i.constants;
    let cap = conn_cap(c);
    let needed: Vec<(&'static str, Option<u64>)> = LIMITS
        .iter()
        .map(|&limit| {
            let name = match limit {
                Limit::Connections if cap < c.max_conns_per_node => "open files",
                _ => limit.name(),
            };
            let fewest = fewest_nodes(i.viewers, |n| limit.holds(i, n, &node_at(i, n)));
            (name, fewest)
        })
        .collect();
    let nodes = needed.iter().filter_map(|(_, n)| *n).max().unwrap_or(i.viewers);
    let node = node_at(i, nodes);
    let redis = redis_at(i, nodes);
    let unmet = needed.iter().find(|(_, n)| n.is_none()).map(|(name, _)| *name);
    let binding = needed
        .iter()
        .find(|(_, n)| *n == Some(nodes))
        .map_or("connections", |(name, _)| *name);
    let bound_by = if redis.over {
        "redis master"
    } else {
        unmet.unwrap_or(binding)
    };

    let cpu_per_delivery = predict_node_cpu_per_delivery_us(node.frames_per_write, node.write_us, c);
    let egress = node.conns as f64 * i.rate * frame_bytes(i) as f64;
    let mut plan = Plan {
        nodes,
        masters: redis.masters,
        shards_per_hot_room: redis.shards,
        conns_per_node: node.conns,
        deliveries_per_sec: i.viewers as f64 * i.rate,
        deliveries_per_node_per_sec: node.conns as f64 * i.rate,
        frames_per_write: node.frames_per_write,
        write_wait_ms: node.wait_us / 1e3,
        write_turn_ms: node.turn_us / 1e3,
        predicted_p99_ms: node.p99_ms(),
        p99_target_ms: i.p99_ms,
        node_cpu_per_delivery_us: cpu_per_delivery,
        node_cores_each: cores_for(node.conns as f64, i.rate, cpu_per_delivery, c),
        cores_per_node: i.cores_per_node,
        frame_bytes: frame_bytes(i),
        memory_per_node_bytes: node.memory_bytes.round() as u64,
        egress_per_node_bytes_per_sec: egress,
        egress_per_node_gbps: egress * 8.0 / 1e9,
        nodes_per_room: redis.nodes_per_room,
        redis_cores_per_room: redis.cores_per_room,
        redis_cores_total: redis.cores_total,
        bound_by: bound_by.into(),
        nodes_needed_by: needed.iter().map(|(name, n)| (name.to_string(), *n)).collect(),
        warnings: Vec::new(),
    };
    plan.warnings = warnings(i, &plan, &needed, &node);
    Ok(plan)
}

fn check(i: &Inputs) -> anyhow::Result<()> {
    let c = &i.constants;
    ensure!(i.viewers > 0, "viewers must be at least 1");
    ensure!(i.rooms > 0, "rooms must be at least 1");
    ensure!(
        i.rooms <= i.viewers,
        "rooms ({}) must not outnumber viewers ({})",
        i.rooms,
        i.viewers
    );
    ensure!(i.payload_bytes > 0, "payload bytes must be at least 1");
    ensure!(c.max_conns_per_node > 0, "max connections per node must be at least 1");
    let positive = [
        ("rate", i.rate),
        ("p99 ms", i.p99_ms),
        ("write cost", c.write_cost_us),
        ("write cost connections", c.write_cost_conns),
        ("frame cost", c.frame_cost_us),
        ("max write delay", c.max_write_delay_ms),
        ("bytes per connection", c.bytes_per_conn),
        ("max memory per node", c.max_memory_per_node_bytes),
        ("max buffered bytes", c.max_buffered_bytes),
        ("NIC Gbit/s", c.nic_gbps),
        ("Redis µs per publish", c.redis_us_per_publish),
        ("Redis master cores", c.redis_master_cores),
    ];
    for (name, v) in positive {
        ensure!(v.is_finite() && v > 0.0, "{name} must be a positive number, not {v}");
    }
    let at_least = [
        ("cores per node", i.cores_per_node, 1.0),
        ("spread", c.spread, 1.0),
        ("write growth per doubling", c.write_growth_per_doubling, 0.0),
        ("base memory", c.base_memory_bytes, 0.0),
        ("Redis µs per subscriber", c.redis_us_per_subscriber_delivery, 0.0),
    ];
    for (name, v, least) in at_least {
        ensure!(
            v.is_finite() && v >= least,
            "{name} must be a number of at least {least}, not {v}"
        );
    }
    for (name, v) in [("CPU target", c.cpu_target), ("NIC target", c.nic_target)] {
        ensure!(
            v > 0.0 && v <= 1.0,
            "{name} must be a share over 0 and at most 1, not {v}"
        );
    }
    if conn_cap(c) == 0 {
        bail!("an open-files limit of {} leaves no room for WebSockets", c.fd_limit);
    }
    Ok(())
}

/// The most WebSockets a node holds: the budget, or what the open-files limit leaves after
/// `--max-http-connections` (an eighth of it, 32 to 10,000) and 64 more.
fn conn_cap(c: &Constants) -> u64 {
    let room = c.fd_limit.saturating_sub(http_cap(c.fd_limit) + SPARE_FDS);
    c.max_conns_per_node.min(room)
}

/// `--max-http-connections`' default at an open-files limit.
fn http_cap(fd_limit: u64) -> u64 {
    (fd_limit / 8).clamp(32, 10_000)
}

fn frame_bytes(i: &Inputs) -> u64 {
    i.payload_bytes + i.constants.frame_overhead_bytes
}

/// What a node can run out of, in the order a tie is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Connections,
    NodeCpu,
    Nic,
    Memory,
    P99,
}

const LIMITS: [Limit; 5] = [
    Limit::Connections,
    Limit::NodeCpu,
    Limit::Nic,
    Limit::Memory,
    Limit::P99,
];

impl Limit {
    fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::NodeCpu => "node cpu",
            Limit::Nic => "nic",
            Limit::Memory => "memory",
            Limit::P99 => "p99",
        }
    }

    /// Whether a fleet of `nodes` nodes, each like `node`, holds this limit.
    fn holds(self, i: &Inputs, nodes: u64, node: &Node) -> bool {
        let c = &i.constants;
        match self {
            Limit::Connections => i.viewers.div_ceil(nodes) <= conn_cap(c),
            Limit::NodeCpu => node.busy + node.idle <= c.cpu_target,
            Limit::Nic => node.conns as f64 * i.rate * frame_bytes(i) as f64 * 8.0 <= c.nic_target * c.nic_gbps * 1e9,
            Limit::Memory => node.memory_bytes <= c.max_memory_per_node_bytes,
            Limit::P99 => node.busy <= 1.0 && node.p99_ms() <= i.p99_ms,
        }
    }
}

/// The fewest nodes from 1 to `viewers` (one viewer each) for which `holds` is true, or `None`;
/// `holds` must stay true once it is. Node CPU steps up where frames switch to going at once, but
/// only to [`WORTH`] ÷ `spread` of each worker, under the CPU target.
fn fewest_nodes(viewers: u64, holds: impl Fn(u64) -> bool) -> Option<u64> {
    if !holds(viewers) {
        return None;
    }
    let (mut lo, mut hi) = (1, viewers);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if holds(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// One node of a fleet of a given size, its writes in a steady state.
#[derive(Debug, Clone, Copy)]
struct Node {
    conns: u64,
    /// Node CPU of a frame written alone, µs, at this node's connections.
    write_us: f64,
    frames_per_write: f64,
    /// Time between a socket's writes while frames gather; 0 when each message goes out as it
    /// comes.
    wait_us: f64,
    /// A lane's turn, or when frames go at once a message's writes on one worker.
    turn_us: f64,
    /// The share of each worker's time spent writing (over 1: it cannot keep up).
    busy: f64,
    /// The share of each worker's time its connections cost idle.
    idle: f64,
    memory_bytes: f64,
}

impl Node {
    /// A frame waits at most a period for its lane's turn and the turn for its socket's write.
    fn p99_ms(&self) -> f64 {
        (self.wait_us + self.turn_us) / 1e3
    }
}

/// A node of a fleet of `nodes`: while writing every frame at once keeps a worker busy under
/// one part in `spread`, frames go out as they come. Past that the period settles where a round
/// of turns takes one part in `spread` of it, `W = spread × m × write / (1 - spread × m × rate ×
/// frame)` for `m` sockets per worker, until it reaches `--max-write-delay`, where CPU grows
/// instead; unless a socket would get under [`WORTH`] frames a period, when frames go at once.
fn node_at(i: &Inputs, nodes: u64) -> Node {
    let c = &i.constants;
    let conns = i.viewers.div_ceil(nodes);
    let per_worker = conns as f64 / i.cores_per_node;
    let write_us = write_cost_at(conns as f64, c);
    let one_frame = write_us + c.frame_cost_us;
    let max_wait = c.max_write_delay_ms * 1e3;
    let left = 1.0 - c.spread * per_worker * i.rate * c.frame_cost_us / US_PER_S;
    let period = if left > 0.0 {
        (c.spread * per_worker * write_us / left).min(max_wait)
    } else {
        max_wait
    };
    let quiet = per_worker * i.rate * one_frame / US_PER_S * c.spread <= 1.0 || i.rate * period / US_PER_S < WORTH;
    let wait_us = if quiet { 0.0 } else { period };
    let frames_per_write = (i.rate * wait_us / US_PER_S).max(1.0);
    let busy = per_worker * i.rate * predict_node_cpu_per_delivery_us(frames_per_write, write_us, c) / US_PER_S;
    let turn_us = if quiet {
        // A message's writes: its room's members on this worker.
        let room_members = i.viewers as f64 / i.rooms as f64 / nodes as f64;
        (room_members / i.cores_per_node).clamp(1.0, per_worker.max(1.0)) * one_frame
    } else {
        // A lane's turn: the round of turns, a `spread`th of the period, over the worker's lanes.
        let lanes_per_worker = (LANES.max(i.cores_per_node) / i.cores_per_node).floor();
        busy * wait_us / lanes_per_worker
    };
    let queued = i.rate * wait_us / US_PER_S * frame_bytes(i) as f64;
    Node {
        conns,
        write_us,
        frames_per_write,
        wait_us,
        turn_us,
        busy,
        idle: per_worker * c.idle_us_per_conn_s / US_PER_S,
        memory_bytes: c.base_memory_bytes + conns as f64 * (c.bytes_per_conn + queued),
    }
}

/// Redis for a fleet of `nodes`.
#[derive(Debug, Clone, Copy)]
struct Redis {
    nodes_per_room: f64,
    cores_per_room: f64,
    cores_total: f64,
    shards: u64,
    masters: u64,
    /// Even the most shards leave a room's shard over one master's budget.
    over: bool,
}

/// One `SPUBLISH` per message, on the shard's master, which sends it to every node subscribed
/// to the room: a node with at least one member, `N × (1 - (1 - 1/N)^members)` of `N` when the
/// load balancer spreads connections evenly at random.
fn redis_at(i: &Inputs, nodes: u64) -> Redis {
    let c = &i.constants;
    let members = i.viewers as f64 / i.rooms as f64;
    let n = nodes as f64;
    let nodes_per_room = n * (1.0 - (1.0 - 1.0 / n).powf(members));
    let per_message = c.redis_us_per_publish + c.redis_us_per_subscriber_delivery * nodes_per_room;
    let cores_per_room = i.rate * per_message / US_PER_S;
    let cores_total = cores_per_room * i.rooms as f64;
    let shards_needed = (cores_per_room / c.redis_master_cores).ceil().max(1.0) as u64;
    let shards = shards_needed.next_power_of_two().min(MAX_SHARDS);
    let masters = ((cores_total / c.redis_master_cores).ceil() as u64).max(MIN_MASTERS);
    Redis {
        nodes_per_room,
        cores_per_room,
        cores_total,
        shards,
        masters,
        over: shards_needed > MAX_SHARDS,
    }
}

fn warnings(i: &Inputs, plan: &Plan, needed: &[(&str, Option<u64>)], node: &Node) -> Vec<String> {
    let c = &i.constants;
    let mut w = Vec::new();
    let others = needed
        .iter()
        .filter(|(name, _)| *name != "p99")
        .filter_map(|(_, n)| *n)
        .max();
    let p99_needs = needed.iter().find(|(name, _)| *name == "p99").and_then(|(_, n)| *n);
    match (p99_needs, others) {
        (None, _) => {
            let best = node_at(i, i.viewers).p99_ms();
            w.push(format!(
                "a p99 of {} ms cannot be met: even one viewer per node needs about {best:.3} ms; at {} nodes \
                 the p99 is about {:.1} ms",
                i.p99_ms, plan.nodes, plan.predicted_p99_ms
            ));
        }
        (Some(p99), Some(others)) if p99 > others => {
            let there = node_at(i, others).p99_ms();
            w.push(format!(
                "the p99 target of {} ms sets the node count: {others} nodes would hold every other limit, \
                 but the wait adaptive writes need there makes the p99 about {there:.1} ms",
                i.p99_ms
            ));
        }
        _ => {}
    }
    for (name, n) in needed {
        if n.is_none() && *name != "p99" {
            w.push(format!("{name} cannot be held even with one viewer per node"));
        }
    }
    if node.wait_us >= c.max_write_delay_ms * 1e3 {
        w.push(format!(
            "frames wait the full --max-write-delay ({} ms): frames per write no longer grow with the load, \
             CPU does; the nodes are near their limit",
            c.max_write_delay_ms
        ));
    }
    let cap = conn_cap(c);
    if cap < c.max_conns_per_node {
        w.push(format!(
            "an open-files limit of {} leaves room for {cap} WebSockets per node (less --max-http-connections \
             {} and {SPARE_FDS}); raise it to hold {}",
            c.fd_limit,
            http_cap(c.fd_limit),
            c.max_conns_per_node
        ));
    }
    if plan.bound_by == "nic" {
        w.push(format!(
            "egress sets the node count: {:.2} Gbit/s per node of a {} Gbit/s NIC; TCP/IP headers (some 66 B \
             per write) and TLS are not counted",
            plan.egress_per_node_gbps, c.nic_gbps
        ));
    }
    let queued = i.rate * node.wait_us / US_PER_S * plan.frame_bytes as f64;
    if queued > c.max_buffered_bytes / 2.0 {
        w.push(format!(
            "each socket holds about {:.0} KiB between writes, over half of --max-buffered-bytes ({:.0} KiB): \
             a client that falls a little behind is closed (4008)",
            queued / 1024.0,
            c.max_buffered_bytes / 1024.0
        ));
    }
    let shards = plan.shards_per_hot_room;
    if shards > 1 {
        w.push(format!(
            "each room needs {shards} shard channels (--hot-room NAME={shards} on every node); the shard is \
             chosen by sender, so a room with fewer than {shards} senders uses fewer masters, and one sender \
             puts all {:.2} cores of the room on one master",
            plan.redis_cores_per_room
        ));
    }
    if plan.bound_by == "redis master" {
        w.push(format!(
            "one room needs {:.1} cores of Redis, more than {MAX_SHARDS} shards of {} core hold: fewer nodes \
             per room (fewer subscribers per publish) or a lower rate",
            plan.redis_cores_per_room, c.redis_master_cores
        ));
    }
    w
}

impl Plan {
    /// The plan as lines for people, like the other reports.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "{k:<24} {v}");
        };
        let needed = self
            .nodes_needed_by
            .iter()
            .map(|(name, n)| format!("{name} {}", n.map_or("never".into(), grouped)))
            .collect::<Vec<_>>()
            .join(", ");
        row("nodes", format!("{} (bound by {})", grouped(self.nodes), self.bound_by));
        row("fewest nodes per limit", needed);
        row("connections per node", grouped(self.conns_per_node));
        row(
            "deliveries/s",
            format!(
                "{} in all, {} per node ({} B frames)",
                grouped(self.deliveries_per_sec.round() as u64),
                grouped(self.deliveries_per_node_per_sec.round() as u64),
                self.frame_bytes
            ),
        );
        row(
            "writes",
            format!(
                "{:.2} frames per write; each socket written every {:.1} ms (0: at once), a turn {:.1} ms",
                self.frames_per_write, self.write_wait_ms, self.write_turn_ms
            ),
        );
        row(
            "p99 ms",
            format!("{:.1} predicted (target {})", self.predicted_p99_ms, self.p99_target_ms),
        );
        row(
            "node cpu",
            format!(
                "{:.2} cores of {} ({:.0}%), {:.2} µs per delivery",
                self.node_cores_each,
                self.cores_per_node,
                100.0 * self.node_cores_each / self.cores_per_node,
                self.node_cpu_per_delivery_us
            ),
        );
        row(
            "memory per node",
            format!("{:.0} MiB", self.memory_per_node_bytes as f64 / MIB),
        );
        row(
            "egress per node",
            format!(
                "{:.1} MB/s = {:.2} Gbit/s",
                self.egress_per_node_bytes_per_sec / 1e6,
                self.egress_per_node_gbps
            ),
        );
        row(
            "redis",
            format!(
                "masters {}, shard channels per room {}; CPU {} per room, {} in all",
                self.masters,
                self.shards_per_hot_room,
                cores(self.redis_cores_per_room),
                cores(self.redis_cores_total)
            ),
        );
        row(
            "nodes per room",
            format!("{:.1} (each gets every message of the room)", self.nodes_per_room),
        );
        for warning in &self.warnings {
            row("warning", warning.clone());
        }
        s
    }
}

/// CPU in cores, or millicores under a tenth of a core.
fn cores(cores: f64) -> String {
    if cores >= 0.1 {
        format!("{cores:.2} cores")
    } else {
        format!("{:.2} millicores", cores * 1e3)
    }
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let backwards: Vec<char> = n.to_string().chars().rev().collect();
    let groups: Vec<String> = backwards.chunks(3).map(|g| g.iter().rev().collect()).collect();
    groups.into_iter().rev().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::of(line)
    }

    #[test]
    fn plan_takes_the_stadium_defaults_and_refuses_bad_input() {
        let i = Inputs::from_args(&args("lt plan --viewers 1000000"));
        assert_eq!((i.viewers, i.rooms, i.rate, i.payload_bytes), (1_000_000, 1, 10.0, 128));
        assert!(plan(&i).unwrap().nodes > 1);
        assert!(plan(&Inputs::from_args(&args("lt plan --rate 0"))).is_err());
        // Constants measured on the operator's hardware replace the defaults, and are checked.
        let c = Inputs::from_args(&args(
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
        assert!(plan(&Inputs::from_args(&args("lt plan --write-cost-us=-1"))).is_err());
        assert!(plan(&Inputs::from_args(&args("lt plan --viewers 5 --rooms 10"))).is_err());
    }

    fn load(viewers: u64, rooms: u64, rate: f64) -> Inputs {
        Inputs {
            viewers,
            rooms,
            rate,
            payload_bytes: 128,
            p99_ms: 250.0,
            cores_per_node: 8.0,
            constants: Constants::default(),
        }
    }

    #[test]
    fn the_stadium_is_bound_by_its_p99_with_connections_close_behind() {
        let p = plan(&load(1_000_000, 1, 10.0)).unwrap();
        println!("{}", p.table());
        // 20 nodes of 50,000 hold every limit but the p99: their wait would reach the full 250 ms.
        assert_eq!((p.nodes, p.conns_per_node, p.bound_by.as_str()), (29, 34_483, "p99"));
        assert_eq!(p.nodes_needed_by["connections"], Some(20));
        assert_eq!(p.deliveries_per_sec, 10_000_000.0);
        assert_eq!(p.deliveries_per_node_per_sec, 344_830.0);
        // A write with 34,483 connections on the machine: 7.5 µs × (1 + 0.065 × log2(34,483 /
        // 18,000)) = 7.96 µs. Each of 8 workers writes 4,310 sockets, its one lane a turn:
        // W = 6 × 4,310.4 × 7.96 µs / (1 - 6 × 4,310.4 × 10/s × 0.1 µs) = 211.3 ms, 2.11 frames a
        // write (two or more: worth the wait).
        let write = 7.5 * (1.0 + 0.065 * (34_483.0f64 / 18_000.0).log2());
        assert!((write - 7.957).abs() < 1e-3, "{write}");
        assert!((p.write_wait_ms - 211.26).abs() < 0.01, "{}", p.write_wait_ms);
        assert!((p.frames_per_write - 2.1126).abs() < 1e-3, "{}", p.frames_per_write);
        // A turn is a sixth of the period: the p99 is the period and a turn.
        assert!((p.write_turn_ms - p.write_wait_ms / 6.0).abs() < 0.01);
        assert!((p.predicted_p99_ms - 7.0 / 6.0 * p.write_wait_ms).abs() < 0.01);
        assert!(p.predicted_p99_ms <= 250.0);
        // A worker writes a sixth of its time, 8 / 6 cores, and 34,483 idle connections cost
        // 34,483 × 1.1 µs each second.
        assert!((p.node_cores_each - 1.3713).abs() < 1e-4, "{}", p.node_cores_each);
        let writing = 344_830.0 * p.node_cpu_per_delivery_us / 1e6;
        assert!((p.node_cores_each - writing - 34_483.0 * 1.1e-6).abs() < 1e-9);
        // 34,483 × 10/s × 200 B.
        assert_eq!(p.egress_per_node_bytes_per_sec, 68_966_000.0);
        let memory = 30.0 * MIB + 34_483.0 * (4500.0 + 2.1126 * 200.0);
        assert!((p.memory_per_node_bytes as f64 - memory).abs() < 0.01 * memory);
        assert_eq!((p.masters, p.shards_per_hot_room), (3, 1));
        assert!((p.nodes_per_room - 29.0).abs() < 1e-6);
        assert!((p.redis_cores_per_room - 10.0 * (5.0 + 1.5 * 29.0) / 1e6).abs() < 1e-9);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("the p99 target of 250 ms sets the node count"));
    }

    #[test]
    fn a_socket_with_under_two_frames_a_period_gets_them_at_once() {
        // With a 50 ms target: 31 nodes, whose period (about 194 ms) would give each socket under
        // two of the 10 frames a second, so frames go at once, a message a third of a worker's
        // time, and the p99 is a message's writes: a long wait would buy nothing.
        let mut tight = load(1_000_000, 1, 10.0);
        tight.p99_ms = 50.0;
        let p = plan(&tight).unwrap();
        assert_eq!((p.nodes, p.frames_per_write, p.write_wait_ms), (31, 1.0, 0.0));
        let per_worker = 1_000_000.0 / 31.0 / 8.0;
        let write = 7.5 * (1.0 + 0.065 * (p.conns_per_node as f64 / 18_000.0).log2());
        assert!((p.predicted_p99_ms - per_worker * (write + 0.1) / 1e3).abs() < 1e-6);
        assert!(p.predicted_p99_ms < 50.0);
    }

    #[test]
    fn on_fewer_cores_than_lanes_a_turn_is_a_lane_of_a_workers_sockets() {
        // 2-core nodes: 8 lanes, 4 a worker, so a frame that just missed its lane's turn waits a
        // period and a quarter of the worker's writing, not all of it.
        let mut i = load(1_000_000, 1, 10.0);
        i.cores_per_node = 2.0;
        let p = plan(&i).unwrap();
        assert!(p.write_wait_ms > 0.0, "{}", p.table());
        assert!(
            (p.write_turn_ms - p.write_wait_ms / 6.0 / 4.0).abs() < 0.01,
            "{}",
            p.table()
        );
    }

    #[test]
    fn more_viewers_never_need_fewer_nodes() {
        for (rooms, rate) in [(1, 10.0), (1, 200.0), (100, 1.0), (1_000, 50.0)] {
            let mut last = 0;
            let mut viewers = rooms;
            while viewers <= 20_000_000 {
                let p = plan(&load(viewers, rooms, rate)).unwrap();
                assert!(
                    p.nodes >= last,
                    "{viewers} viewers in {rooms} rooms at {rate}/s: {} < {last}",
                    p.nodes
                );
                last = p.nodes;
                viewers = viewers * 3 / 2 + 1;
            }
        }
    }

    #[test]
    fn a_room_too_busy_for_one_master_gets_more_shards() {
        // 10M viewers at 500 msg/s need 1,000 nodes for their NIC; each message goes to them all,
        // 500 × (5 + 1.5 × 1,000) µs = 0.75 core, over one master's half a core.
        let p = plan(&load(10_000_000, 1, 500.0)).unwrap();
        println!("{}", p.table());
        assert_eq!(p.bound_by, "nic");
        assert!(p.redis_cores_per_room > 0.5, "{}", p.redis_cores_per_room);
        assert_eq!(p.shards_per_hot_room, 2);
        assert!(p.redis_cores_per_room / p.shards_per_hot_room as f64 <= 0.5);
        assert!(
            p.warnings.iter().any(|w| w.contains("--hot-room NAME=2")),
            "{:?}",
            p.warnings
        );
        // The same room at a tenth of the rate fits one shard.
        assert_eq!(plan(&load(10_000_000, 1, 50.0)).unwrap().shards_per_hot_room, 1);

        // Past 1,024 shards no split helps: the master binds.
        let mut slow = load(1_000_000, 1, 10.0);
        slow.constants.redis_us_per_publish = 1e8;
        let p = plan(&slow).unwrap();
        assert_eq!((p.shards_per_hot_room, p.bound_by.as_str()), (1024, "redis master"));
        assert!(
            p.warnings.iter().any(|w| w.contains("more than 1024 shards")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        type Spoil = fn(&mut Inputs);
        let cases: Vec<(&str, Spoil)> = vec![
            ("no viewers", |i| i.viewers = 0),
            ("no rooms", |i| i.rooms = 0),
            ("more rooms than viewers", |i| i.rooms = i.viewers + 1),
            ("no rate", |i| i.rate = 0.0),
            ("negative rate", |i| i.rate = -1.0),
            ("NaN rate", |i| i.rate = f64::NAN),
            ("infinite rate", |i| i.rate = f64::INFINITY),
            ("no payload", |i| i.payload_bytes = 0),
            ("no p99", |i| i.p99_ms = 0.0),
            ("NaN p99", |i| i.p99_ms = f64::NAN),
            ("no cores", |i| i.cores_per_node = 0.0),
            ("NaN cores", |i| i.cores_per_node = f64::NAN),
            ("NaN write cost", |i| i.constants.write_cost_us = f64::NAN),
            ("negative frame cost", |i| i.constants.frame_cost_us = -0.1),
            ("CPU target over 1", |i| i.constants.cpu_target = 1.5),
            ("no write cost connections", |i| i.constants.write_cost_conns = 0.0),
            ("negative write growth", |i| {
                i.constants.write_growth_per_doubling = -0.1
            }),
            ("no NIC", |i| i.constants.nic_gbps = 0.0),
            ("no connections", |i| i.constants.max_conns_per_node = 0),
            ("too few files", |i| i.constants.fd_limit = 90),
        ];
        for (what, spoil) in cases {
            let mut i = load(1_000, 10, 10.0);
            spoil(&mut i);
            assert!(plan(&i).is_err(), "{what} was accepted");
        }
        assert!(plan(&load(1, 1, 0.001)).is_ok(), "the smallest load plans");
    }

    #[test]
    fn a_p99_target_under_what_the_wait_needs_is_said() {
        // At 20 nodes the stadium's wait makes a p99 of 303 ms: 50 ms takes more nodes, and says so.
        let mut tight = load(1_000_000, 1, 10.0);
        tight.p99_ms = 50.0;
        let p = plan(&tight).unwrap();
        println!("{}", p.table());
        assert_eq!(p.bound_by, "p99");
        assert!(
            p.nodes > 20 && p.predicted_p99_ms <= 50.0,
            "{} nodes, {} ms",
            p.nodes,
            p.predicted_p99_ms
        );
        let said = p
            .warnings
            .iter()
            .find(|w| w.contains("p99 target of 50 ms"))
            .expect("a p99 warning");
        assert!(said.contains("20 nodes") && said.contains("302.9 ms"), "{said}");

        // Below one write's cost it cannot be met at all; the nodes are what the rest needs.
        tight.p99_ms = 0.001;
        let p = plan(&tight).unwrap();
        assert_eq!((p.bound_by.as_str(), p.nodes), ("p99", 20));
        assert!(
            p.warnings.iter().any(|w| w.contains("cannot be met")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn a_busy_node_waits_the_full_delay_and_cpu_sets_the_count() {
        // A p99 target past the delay lets the wait hit --max-write-delay; CPU then binds.
        let mut i = load(1_000_000, 1, 500.0);
        i.p99_ms = 10_000.0;
        i.constants.nic_gbps = 1000.0;
        i.constants.max_conns_per_node = 1_000_000;
        // 125 frames of 200 B wait a write: 25,000 B, over half of a 32 KiB budget.
        i.constants.max_buffered_bytes = 32.0 * 1024.0;
        let p = plan(&i).unwrap();
        assert_eq!(p.bound_by, "node cpu");
        assert_eq!(p.write_wait_ms, 250.0);
        assert!(p.node_cores_each <= 0.6 * 8.0 + 1e-9);
        assert!(
            p.warnings.iter().any(|w| w.contains("--max-write-delay")),
            "{:?}",
            p.warnings
        );
        assert!(
            p.warnings.iter().any(|w| w.contains("--max-buffered-bytes")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn a_quiet_node_writes_each_frame_at_once() {
        let p = plan(&load(10_000, 1_000, 1.0)).unwrap();
        assert_eq!((p.nodes, p.frames_per_write, p.write_wait_ms), (1, 1.0, 0.0));
        // Rooms of 10 over 8 workers: a message is a write or two on a worker.
        assert!(p.predicted_p99_ms < 0.01, "{}", p.predicted_p99_ms);
        // One frame a write with 10,000 connections on the machine, and the frame's own cost.
        let write = 7.5 * (1.0 + 0.065 * (10_000.0f64 / 18_000.0).log2());
        assert!((p.node_cpu_per_delivery_us - (write + 0.1)).abs() < 1e-9);
    }

    #[test]
    fn a_low_open_files_limit_caps_the_connections_and_says_so() {
        let mut i = load(1_000_000, 1, 10.0);
        i.constants.fd_limit = 20_000;
        let p = plan(&i).unwrap();
        // 20,000 - 2,500 - 64 = 17,436 per node.
        assert_eq!(
            (p.bound_by.as_str(), p.nodes, p.conns_per_node),
            ("open files", 58, 17_242)
        );
        assert!(
            p.warnings.iter().any(|w| w.contains("17436 WebSockets")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn a_write_costs_more_the_more_connections_the_machine_holds() {
        let c = Constants::default();
        assert_eq!(write_cost_at(18_000.0, &c), 7.5, "where it was measured, the measure");
        // The floor's own growth at a write a second: 5.52 µs at 9,000 sockets, 4.39 at 1,000.
        let ratio = write_cost_at(18_000.0, &c) / write_cost_at(2_000.0, &c);
        assert!((ratio / (5.52 / 4.39) - 1.0).abs() < 0.01, "{ratio}");
        assert!(write_cost_at(91_464.0, &c) > write_cost_at(50_000.0, &c));
        // Never cheaper than at a sixteenth of the measured connections.
        assert_eq!(write_cost_at(1.0, &c), write_cost_at(18_000.0 / 16.0, &c));
        assert!(write_cost_at(0.0, &c) > 0.0);
        // A write's cost is shared by its frames; each frame still costs its own.
        let at = |f| predict_node_cpu_per_delivery_us(f, 7.5, &c);
        assert!((at(1.0) - 7.6).abs() < 1e-9);
        assert!((at(5.0) - 1.6).abs() < 1e-9);
        assert_eq!(at(0.5), at(1.0), "a write carries one frame at least");
    }

    #[test]
    fn the_model_holds_at_the_100k_run_within_a_quarter() {
        // docs/performance.md#one-room-of-100000-members at 1 msg/s: 100,000 members, all on one
        // machine with their nodes, which used 0.93 cores and 4,950 B of RSS per member.
        let c = Constants::default();
        let cores = predict_cores_one_frame_per_write(100_000.0, 1.0, &c);
        assert!((0.93 / cores - 1.0).abs() <= 0.25, "predicted {cores} cores");
        // And per delivery (11.4 µs measured), the idle cost's share included.
        let per_delivery = cores * 1e6 / 100_000.0;
        assert!((11.4 / per_delivery - 1.0).abs() <= 0.25, "predicted {per_delivery} µs");
        assert!((4_950.0 / c.bytes_per_conn - 1.0).abs() <= 0.25);
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(10_000_000), "10,000,000");
    }
}
