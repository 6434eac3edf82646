//! The `stadium-100k` run: one room of many members over several node processes, more than one
//! generator process can hold (each process here may have at most ~20,000 descriptors).
//!
//! It starts a 3-master cluster (`redis-cluster/up`), `nodes` node processes on free loopback
//! ports, and per rate step: `procs` generator processes (this program's own `stadium` with
//! `--publishers 0`), each holding its share of the members and saying `ready` once connected;
//! once all are, it tells them to go and starts one more process that publishes at the step's
//! rate. Their JSON reports are merged: losses against what the publisher sent, latencies from
//! each process's histogram. Node and Redis CPU come from `/proc`, sampled around the step, and
//! the machine's floor is measured once before the steps. Every wait has a deadline, and
//! everything started is stopped when the run ends, however it ends. [`Plan::from_args`] is the
//! `stadium-100k` subcommand's plan.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::{
    capacity, procfs,
    procs::{free_port, get, ready, Cluster, Proc},
    report::Latency,
    Args,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub members: usize,
    pub nodes: usize,
    pub procs: usize,
    pub rates: Vec<f64>,
    pub shards: u32,
    pub publishers: usize,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub ramp_per_sec: f64,
    pub source_addrs: u8,
    pub node_bin: PathBuf,
    pub out: PathBuf,
}

impl Plan {
    /// The plan the command line asks for.
    pub fn from_args(args: &Args) -> anyhow::Result<Plan> {
        let members = args.clients();
        let node_bin = args.node_bin()?;
        let duration = Duration::try_from_secs_f64(args.duration.max(1.0)).context("--duration")?;
        Ok(Plan {
            members,
            nodes: args.nodes.unwrap_or(6),
            // A process may hold about 17,000 sockets under this machine's 20,000 descriptors.
            procs: args.procs.unwrap_or(members.div_ceil(15_000)).max(1),
            rates: args.rates.clone(),
            shards: args.shards,
            publishers: args.publishers.max(1),
            payload_bytes: args.payload_bytes,
            duration,
            ramp_per_sec: args.ramp_per_sec,
            // About 28,000 ports per source address, but a connect searches them for one whose
            // four-tuple is free, in the kernel and on the connecting thread, and the search grows
            // with what the address holds: at 17,000 sockets an address it took most of the machine
            // at the end of the ramp. Sparse addresses keep it short.
            source_addrs: args.source_addrs.max((members.div_ceil(2_000) + 1).min(250) as u8),
            node_bin,
            out: args.out(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct FleetReport {
    pub members: usize,
    pub nodes: usize,
    pub generator_procs: usize,
    pub shards: u32,
    pub masters: usize,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub cores: usize,
    /// The processes it started, all stopped when it reports.
    pub node_pids: Vec<u32>,
    pub master_pids: Vec<u32>,
    /// This machine's floor, measured before the steps: µs of CPU per frame at N frames per write.
    pub floor_us_per_frame: BTreeMap<String, f64>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub rate: f64,
    pub members_connected: usize,
    /// Members that never connected, by why their last try failed.
    pub connect_errors: BTreeMap<String, u64>,
    /// Connections the nodes shed at `--max-http-connections` while the members connected
    /// (`shardcast_http_connections_shed_total`): handshakes that waited on a slow client.
    pub node_shed_handshakes: u64,
    /// Connections the nodes closed while the members connected because a request was not read
    /// in time (`shardcast_http_timeouts_total`: the headers within `--http-header-timeout`).
    pub node_http_timeouts: u64,
    /// Handshakes the nodes answered 503 with Retry-After at `--max-handshakes` while the members
    /// connected (`shardcast_handshakes_refused_total`): the storm turned away, to come back.
    pub node_refused_handshakes: u64,
    /// Failed tries of members before they connected or gave up: refusals and cut handshakes
    /// that their members tried again.
    pub retried: u64,
    /// From starting the generators to the last member joined.
    pub connect_s: f64,
    pub sent: u64,
    /// Publishes the nodes answered with an error (`unavailable`: a Redis link down or too slow
    /// for `--redis-timeout`), which reached nobody and are not expected of the members.
    pub publish_refused: u64,
    pub expected: u64,
    pub delivered: u64,
    pub deliveries_per_sec: f64,
    /// Deliveries missing, counted against what the publisher sent, at every member that
    /// connected (those the nodes closed during the step too).
    pub lost: u64,
    /// Members the nodes closed during the step, by close code (`4008`: fell behind its budget),
    /// as the members saw it; `error: …` when the connection ended without a close frame.
    pub closed_by_node: BTreeMap<String, u64>,
    /// Connections the nodes ended from the members' connecting to the step's end, by the nodes'
    /// own reason (`shardcast_connections_closed_total`; the members' own closes at the end,
    /// `normal`, left out): the nodes' side of `closed_by_node`.
    pub node_closed: BTreeMap<String, u64>,
    /// Of the lost: messages a member missed before one it received (the rest are at the end).
    pub lost_in_gaps: u64,
    /// Members that received none of the messages.
    pub silent_members: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub latency_ms: Latency,
    /// Cores the nodes used together over the step.
    pub node_cores: f64,
    pub node_cpu_us_per_delivery: Option<f64>,
    /// Cores the nodes used over 5 s with every member connected and nothing published.
    pub node_idle_cores: f64,
    /// Node CPU per delivery less what the connections cost idle over the step: the delivery's
    /// own cost, what the capacity model's write and frame costs predict.
    pub node_cpu_us_per_delivery_net: Option<f64>,
    /// Growth of the nodes' resident memory from before the members connected, per member.
    pub node_rss_bytes_per_conn: Option<f64>,
    /// What the capacity model (`docs/capacity.md`, its default constants) predicts for this
    /// step's members and rate on one machine: the nodes' cores with every frame written at
    /// once, and their memory per member.
    pub model: Model,
    /// Cores each Redis master used over the step.
    pub master_cores: Vec<f64>,
    /// Cores the generator processes used over the step.
    pub generator_cores: f64,
    /// Publish to a node's delivery worker taking the message, p99 over the nodes (the upper
    /// bound of its histogram bucket): how far the nodes were behind, before their writes.
    pub node_queue_p99_ms: Option<f64>,
    pub bound_by: String,
}

/// The nodes' counter of connections shed at their HTTP connection cap.
const SHED: &str = "shardcast_http_connections_shed_total";
/// The nodes' counter of handshakes answered 503 at `--max-handshakes`.
const REFUSED: &str = "shardcast_handshakes_refused_total";
/// The nodes' counter of connections closed for a request not read in time.
const TIMEOUTS: &str = "shardcast_http_timeouts_total";

/// How long the members are held after the publisher's run, for its last messages.
const HOLD: Duration = Duration::from_secs(8);

/// How long the nodes' idle cost is sampled, members connected, before a step publishes: longer
/// than a node takes between two returns of free memory to the system (10 s), so the memory
/// taken at its end is what the members hold, not what their handshakes left behind.
const IDLE: Duration = Duration::from_secs(11);

/// The nodes' `shardcast_delivery_latency_seconds` buckets (publish to a worker taking the
/// message), summed over the nodes: upper bound in seconds, cumulative count.
fn node_latency(ports: &[u16]) -> BTreeMap<String, f64> {
    let mut buckets = BTreeMap::new();
    for port in ports {
        for line in get(*port, "/metrics").lines() {
            let Some(rest) = line.strip_prefix("shardcast_delivery_latency_seconds_bucket{le=\"") else {
                continue;
            };
            let Some((le, count)) = rest.split_once("\"}") else {
                continue;
            };
            *buckets.entry(le.to_string()).or_insert(0.0) += count.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    buckets
}

/// The nodes' counter of connections ended, by reason.
const CLOSED: &str = "shardcast_connections_closed_total";

/// Counter `name` summed over the nodes per value of its one label.
fn node_counter_by_label(ports: &[u16], name: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for port in ports {
        add_by_label(&get(*port, "/metrics"), name, &mut sums);
    }
    sums
}

/// Adds counter `name` of one scrape, `name{label="value"} count`, to `sums` by value.
fn add_by_label(scrape: &str, name: &str, sums: &mut BTreeMap<String, f64>) {
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, count)) = rest.split_once("} ") else {
            continue;
        };
        let value = labels
            .split_once("=\"")
            .map_or(labels, |(_, v)| v.trim_end_matches('"'));
        *sums.entry(value.to_string()).or_insert(0.0) += count.trim().parse::<f64>().unwrap_or(0.0);
    }
}

/// What each label value of a counter gained between two scrapes, those that gained.
fn gained(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).copied().unwrap_or(0.0)).max(0.0) as u64))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Counters summed over the nodes, each with all its label sets together: one scrape per node.
fn node_counters<const N: usize>(ports: &[u16], names: [&str; N]) -> [f64; N] {
    let mut sums = [0.0; N];
    for port in ports {
        for line in get(*port, "/metrics").lines() {
            for (name, sum) in names.iter().zip(&mut sums) {
                if line.starts_with(name) && line[name.len()..].starts_with([' ', '{']) {
                    *sum += line
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0);
                }
            }
        }
    }
    sums
}

/// The 99th percentile of what the buckets gained between two scrapes, as the upper bound of its
/// bucket, in milliseconds (`None` without samples; infinite past the last bound).
fn node_p99_ms(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Option<f64> {
    let mut gained: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            (bound, n - before.get(le).copied().unwrap_or(0.0))
        })
        .collect();
    gained.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = gained.last()?.1;
    (total > 0.0).then(|| {
        gained
            .iter()
            .find(|(_, n)| *n >= 0.99 * total)
            .map_or(f64::INFINITY, |b| b.0 * 1e3)
    })
}

/// CPU seconds of `pids` now.
fn cpu(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter()
        .map(|p| Ok(procfs::sample(*p)?.cpu_ns as f64 / 1e9))
        .collect()
}

/// CPU seconds of the nodes (together) and of each master, sampled every [`Sampler::EVERY`] from
/// a step's start until it is stopped: the step's work is then taken over its own window (the
/// publishing and the last delivery), not over the members' hold and disconnects after it.
struct Sampler {
    stop: std::sync::mpsc::Sender<()>,
    samples: std::thread::JoinHandle<Vec<Sample>>,
}

/// One sample: since the step's start, the nodes' CPU seconds together, each master's.
type Sample = (Duration, f64, Vec<f64>);

impl Sampler {
    const EVERY: Duration = Duration::from_millis(100);

    fn start(nodes: &[u32], masters: &[u32]) -> Sampler {
        let (nodes, masters) = (nodes.to_vec(), masters.to_vec());
        let (stop, stopped) = std::sync::mpsc::channel();
        let samples = std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            loop {
                if let (Ok(n), Ok(m)) = (cpu(&nodes), cpu(&masters)) {
                    samples.push((start.elapsed(), n.iter().sum(), m));
                }
                if stopped.recv_timeout(Sampler::EVERY) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    return samples;
                }
            }
        });
        Sampler { stop, samples }
    }

    /// Stops sampling; the nodes' CPU seconds and each master's from the start to `took` after it.
    fn over(self, took: Duration) -> anyhow::Result<(f64, Vec<f64>)> {
        let _ = self.stop.send(());
        let samples = self
            .samples
            .join()
            .map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
        window(&samples, took).context("no CPU sample over the step")
    }
}

/// The growth from the first sample to the first at or after `took` (the last, if none is).
fn window(samples: &[Sample], took: Duration) -> Option<(f64, Vec<f64>)> {
    let first = samples.first()?;
    let end = samples.iter().find(|s| s.0 >= took).or(samples.last())?;
    let masters = end.2.iter().zip(&first.2).map(|(b, a)| b - a).collect();
    Some((end.1 - first.1, masters))
}

/// RSS of `pids` together, bytes.
fn rss(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| Ok(procfs::sample(*p)?.rss)).sum()
}

/// Runs the plan: a cluster and the nodes, the machine's floor, then a step per rate; writes the
/// report and its chart to `plan.out`. Everything started is stopped however it ends.
pub fn run(plan: &Plan) -> anyhow::Result<FleetReport> {
    check(plan)?;
    std::fs::create_dir_all(&plan.out)?;
    let scratch = plan.out.join("run");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let me = std::env::current_exe()?;

    let cluster = Cluster::up(&scratch.join("cluster"), 0, 2000)?;
    let (mut nodes, ports) = start_nodes(plan, &scratch, &cluster.seed)?;
    let urls: Vec<String> = ports.iter().map(|p| format!("ws://127.0.0.1:{p}/ws")).collect();
    let node_pids: Vec<u32> = nodes.iter().map(Proc::pid).collect();

    let floor = measure_floor(&me, plan)?;
    let idle_rss = rss(&node_pids)?;
    let mut steps = Vec::new();
    for rate in &plan.rates {
        let fleet = Fleet {
            urls: &urls,
            ports: &ports,
            node_pids: &node_pids,
            masters: cluster.master_pids(),
            idle_rss,
        };
        let step = run_step(&me, plan, *rate, &fleet)?;
        eprintln!(
            "rate {rate}: {:.0} deliveries/s, lost {}, p99 {:.1} ms, {}",
            step.deliveries_per_sec, step.lost, step.latency_ms.p99, step.bound_by
        );
        steps.push(step);
    }
    for node in &mut nodes {
        node.stop(Duration::from_secs(20));
    }
    let master_pids = cluster.master_pids().to_vec();
    drop(cluster);
    let report = FleetReport {
        members: plan.members,
        nodes: plan.nodes,
        generator_procs: plan.procs,
        shards: plan.shards,
        masters: 3,
        payload_bytes: plan.payload_bytes,
        duration_s: plan.duration.as_secs_f64(),
        cores: cores(),
        node_pids,
        master_pids,
        floor_us_per_frame: floor,
        steps,
    };
    std::fs::write(
        plan.out.join("stadium-100k.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(plan.out.join("stadium-100k.svg"), chart(&report))?;
    Ok(report)
}

/// Refuses a plan with nothing to run.
fn check(plan: &Plan) -> anyhow::Result<()> {
    if plan.members == 0 || plan.nodes == 0 || plan.procs == 0 || plan.rates.is_empty() {
        bail!("stadium-100k needs members, nodes, generator processes and rates");
    }
    if plan.rates.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        bail!("--rates must be positive");
    }
    Ok(())
}

/// Starts the plan's nodes on free loopback ports against the cluster at `seed`, each logging to
/// `scratch`, and waits (a minute at most) until every one answers; the nodes and their ports.
fn start_nodes(plan: &Plan, scratch: &Path, seed: &str) -> anyhow::Result<(Vec<Proc>, Vec<u16>)> {
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for i in 0..plan.nodes {
        let port = free_port()?;
        let log = std::fs::File::create(scratch.join(format!("node-{i}.log")))?;
        nodes.push(Proc::spawn(
            Command::new(&plan.node_bin)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--redis", seed])
                .args(["--hot-room", &format!("stadium={}", plan.shards)])
                .args(["--node-id", &format!("fleet-{i}")])
                .stdout(Stdio::null())
                .stderr(log),
            format!("node {i}"),
        )?);
        ports.push(port);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for port in &ports {
        ready(*port, deadline)?;
    }
    Ok((nodes, ports))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The machine's floor at 1, 4 and 8 frames per write, with the stadium's frames.
fn measure_floor(me: &Path, plan: &Plan) -> anyhow::Result<BTreeMap<String, f64>> {
    let overhead = capacity::Constants::default().frame_overhead_bytes as usize;
    let out = Command::new(me)
        .args([
            "floor",
            "--clients",
            "1000",
            "--duration",
            "3",
            "--frames-per-write",
            "1,4,8",
            "--json",
        ])
        // The frames the stadium delivers: its payload and the envelope around it.
        .args(["--payload-bytes", &(plan.payload_bytes + overhead).to_string()])
        .stderr(Stdio::null())
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("the floor's report")?;
    let mut floor = BTreeMap::new();
    for s in v["steps"].as_array().context("floor steps")? {
        floor.insert(
            s["frames_per_write"].to_string(),
            s["us_per_frame"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(floor)
}

/// A generator process that holds members until told to go.
struct Holder {
    proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The running processes a step loads and watches.
struct Fleet<'a> {
    urls: &'a [String],
    ports: &'a [u16],
    node_pids: &'a [u32],
    masters: &'a [u32],
    /// The nodes' resident memory before any member connected.
    idle_rss: u64,
}

/// One step: the members connect through the generator processes, their idle cost is taken,
/// then one more process publishes at `rate`; the reports of all are merged with the nodes' and
/// masters' CPU over the step's window.
fn run_step(me: &Path, plan: &Plan, rate: f64, fleet: &Fleet) -> anyhow::Result<Step> {
    let (node_pids, masters) = (fleet.node_pids, fleet.masters);
    let secs = plan.duration.as_secs_f64();
    let url_args: Vec<String> = fleet
        .urls
        .iter()
        .flat_map(|u| ["--url".to_string(), u.clone()])
        .collect();
    let before = node_counters(fleet.ports, [SHED, TIMEOUTS, REFUSED]);
    let closed_before = node_counter_by_label(fleet.ports, CLOSED);
    let started = Instant::now();
    let mut holders = start_holders(me, plan, &url_args)?;
    // Each says `ready N` once its members are connected (or its connect deadline passed).
    for h in &mut holders {
        let mut line = String::new();
        h.stdout.read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("{} ended before its members were connected", h.proc.what);
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let after = node_counters(fleet.ports, [SHED, TIMEOUTS, REFUSED]);
    let [shed, timeouts, refused] = [0, 1, 2].map(|i| (after[i] - before[i]) as u64);
    let idle = idle_cores(node_pids)?;
    let rss_connected = rss(node_pids)?;
    let latency_start = node_latency(fleet.ports);
    let sampler = Sampler::start(node_pids, masters);
    for h in &mut holders {
        writeln!(h.stdin, "go")?;
    }
    let published = publish(me, plan, &url_args, rate)?;
    std::fs::write(
        plan.out.join("run").join(format!("publisher-{rate}.json")),
        serde_json::to_string_pretty(&published)?,
    )?;
    let reports = holders_reports(holders, &plan.out.join("run"))?;
    let mut node_closed = gained(&closed_before, &node_counter_by_label(fleet.ports, CLOSED));
    node_closed.remove("normal");
    // The work of the step spans its publishing and the last delivery after it (at most the time
    // the members were held for it): CPU over that window, not over the hold and the disconnects.
    let longest = reports
        .iter()
        .filter_map(|r| r["latency_ms"]["max"].as_f64())
        .fold(0.0, f64::max);
    let took = published["duration_s"].as_f64().unwrap_or(secs) + (longest / 1e3).min(HOLD.as_secs_f64());
    let (node_cpu, master_cpu) = sampler.over(Duration::from_secs_f64(took))?;
    merge(
        rate,
        &published,
        &reports,
        Usage {
            connect_s,
            took,
            node: node_cpu,
            masters: master_cpu.iter().map(|c| c / took).collect(),
            rss_growth: rss_connected as f64 - fleet.idle_rss as f64,
            shed,
            timeouts,
            refused,
            node_idle_cores: idle,
            node_p99_ms: node_p99_ms(&latency_start, &node_latency(fleet.ports)),
            node_closed,
        },
    )
}

/// Starts the generator processes, each holding its share of the members (this program's own
/// `stadium` with `--publishers 0`) until told to go.
fn start_holders(me: &Path, plan: &Plan, url_args: &[String]) -> anyhow::Result<Vec<Holder>> {
    let secs = plan.duration.as_secs_f64();
    let mut holders = Vec::new();
    for k in 0..plan.procs {
        let share = plan.members / plan.procs + usize::from(k < plan.members % plan.procs);
        let mut proc = Proc::spawn(
            Command::new(me)
                .arg("stadium")
                .args(url_args)
                .args(["--clients", &share.to_string(), "--publishers", "0"])
                .args(["--expect-publishers", &plan.publishers.to_string()])
                .args([
                    "--prefix",
                    &format!("m{k}"),
                    "--source-addrs",
                    &plan.source_addrs.to_string(),
                ])
                .args(["--ramp-per-sec", &(plan.ramp_per_sec / plan.procs as f64).to_string()])
                .args(["--duration", &(secs + HOLD.as_secs_f64()).to_string(), "--drain", "0"])
                // Members refused in the connect storm (503) come back after its Retry-After.
                .args(["--connect-timeout", "30", "--connect-attempts", "10"])
                .args(["--json", "--wait-for-go", "--export-latency"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(
                    plan.out.join("run").join(format!("generator-{k}.log")),
                )?),
            format!("generator {k}"),
        )?;
        let stdin = proc.child.stdin.take().context("generator stdin")?;
        let stdout = BufReader::new(proc.child.stdout.take().context("generator stdout")?);
        holders.push(Holder { proc, stdin, stdout });
    }
    Ok(holders)
}

/// What the members cost the nodes with nothing published (pings, timers, presence), cores.
fn idle_cores(node_pids: &[u32]) -> anyhow::Result<f64> {
    let idle_start = cpu(node_pids)?;
    std::thread::sleep(IDLE);
    Ok((cpu(node_pids)?.iter().sum::<f64>() - idle_start.iter().sum::<f64>()) / IDLE.as_secs_f64())
}

/// Runs the publishing process of a step at `rate` to its end; its report.
fn publish(me: &Path, plan: &Plan, url_args: &[String], rate: f64) -> anyhow::Result<Value> {
    let publisher = Command::new(me)
        .arg("stadium")
        .args(url_args)
        .args(["--clients", "0", "--publishers", &plan.publishers.to_string()])
        .args([
            "--rate",
            &rate.to_string(),
            "--duration",
            &plan.duration.as_secs_f64().to_string(),
            // Its count of what was sent is read once its publishers have stopped (a publish in
            // flight at the end counts); with no members of its own it waits for nothing else.
            "--drain",
            "5",
        ])
        .args(["--payload-bytes", &plan.payload_bytes.to_string(), "--json"])
        .stderr(Stdio::null())
        .output()?;
    serde_json::from_slice(&publisher.stdout).context("the publisher's report")
}

/// The generator processes' reports, once each has ended (a minute at most, together).
fn holders_reports(holders: Vec<Holder>, scratch: &Path) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reports = Vec::new();
    for (k, h) in holders.into_iter().enumerate() {
        let Holder {
            proc,
            stdin,
            mut stdout,
        } = h;
        drop(stdin);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text)?;
        proc.finish(deadline)?;
        // Kept beside the nodes' logs: which process's members fared how.
        std::fs::write(scratch.join(format!("generator-{k}.json")), &text)?;
        reports.push(serde_json::from_str::<Value>(&text).context("a generator's report")?);
    }
    Ok(reports)
}

/// The capacity model's prediction for a step, beside what was measured.
#[derive(Debug, Serialize)]
pub struct Model {
    pub node_cores: f64,
    /// Measured node cores over predicted, less 1 (0.1: 10% more than predicted). Understated
    /// when members were closed (fewer deliveries) or deliveries lagged (a longer window).
    pub node_cores_off: f64,
    /// Node CPU per delivery, the connections' idle cost included: the predicted cores over the
    /// deliveries a second of every member.
    pub node_cpu_us_per_delivery: f64,
    /// Measured CPU per delivery over predicted, less 1: the check that holds whatever the
    /// window and however many members were closed.
    pub node_cpu_per_delivery_off: Option<f64>,
    pub node_rss_bytes_per_conn: f64,
    pub node_rss_off: Option<f64>,
}

/// What a step measured, for its check against the model.
struct Measured {
    node_cores: f64,
    cpu_us_per_delivery: Option<f64>,
    rss_per_conn: Option<f64>,
}

impl Model {
    fn of(members: usize, rate: f64, m: Measured) -> Model {
        let c = capacity::Constants::default();
        let predicted = capacity::predict_cores_one_frame_per_write(members as f64, rate, &c);
        let per_delivery = predicted * 1e6 / (members as f64 * rate);
        Model {
            node_cores: predicted,
            node_cores_off: m.node_cores / predicted - 1.0,
            node_cpu_us_per_delivery: per_delivery,
            node_cpu_per_delivery_off: m.cpu_us_per_delivery.map(|u| u / per_delivery - 1.0),
            node_rss_bytes_per_conn: c.bytes_per_conn,
            node_rss_off: m.rss_per_conn.map(|b| b / c.bytes_per_conn - 1.0),
        }
    }
}

/// What `/proc` showed over a step.
#[derive(Clone)]
struct Usage {
    connect_s: f64,
    /// Seconds the step's work took: its publishing and its last delivery.
    took: f64,
    /// Node CPU seconds over the step.
    node: f64,
    masters: Vec<f64>,
    rss_growth: f64,
    /// Cores the nodes used with the members connected and nothing published.
    node_idle_cores: f64,
    /// Connections the nodes shed at their HTTP connection cap while the members connected.
    shed: u64,
    /// Connections the nodes closed for a request not read in time, meanwhile.
    timeouts: u64,
    /// Handshakes the nodes refused at `--max-handshakes`, meanwhile.
    refused: u64,
    /// Publish to a node's worker taking the message, p99 over the nodes (bucket bound).
    node_p99_ms: Option<f64>,
    /// Connections the nodes ended, by their reason (their members' own closes left out).
    node_closed: BTreeMap<String, u64>,
}

fn merge(rate: f64, published: &Value, reports: &[Value], usage: Usage) -> anyhow::Result<Step> {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let sent = n(&published["publish"]["sent"]);
    let secs = published["duration_s"].as_f64().unwrap_or(0.0).max(1e-3);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut connected, mut received, mut duplicates, mut reordered) = (0, 0, 0, 0);
    let (mut gaps, mut silent, mut retried) = (0, 0, 0);
    let (mut errors, mut closed) = (BTreeMap::new(), BTreeMap::new());
    let mut generator_s = 0.0;
    for r in reports {
        connected += n(&r["connections"]["connected"]) as usize;
        received += n(&r["delivery"]["received"]);
        duplicates += n(&r["delivery"]["duplicates"]);
        reordered += n(&r["delivery"]["reordered"]);
        gaps += n(&r["delivery"]["gap_missing"]);
        silent += n(&r["delivery"]["silent_members"]);
        retried += n(&r["connections"]["retried"]);
        generator_s += r["loadtest_cpu_s"].as_f64().unwrap_or(0.0);
        for (into, what) in [(&mut errors, "failed"), (&mut closed, "closed_by_node")] {
            for (why, count) in r["connections"][what].as_object().into_iter().flatten() {
                *into.entry(why.clone()).or_insert(0) += n(count);
            }
        }
        for pair in r["latency_us"].as_array().into_iter().flatten() {
            hist.saturating_record_n(n(&pair[0]).max(1), n(&pair[1]));
        }
    }
    // A publish the node answered with an error went to nobody: no member was to receive it.
    let refused = n(&published["delivery"]["error_frames"]);
    let expected = sent.saturating_sub(refused) * connected as u64;
    let delivered = received - duplicates;
    let node_cores = usage.node / usage.took;
    let generator_cores = generator_s / usage.took;
    let redis_cores: f64 = usage.masters.iter().sum();
    let rss_per_conn = (connected > 0).then(|| usage.rss_growth / connected as f64);
    let cpu_per_delivery = (delivered > 0).then(|| usage.node * 1e6 / delivered as f64);
    Ok(Step {
        rate,
        members_connected: connected,
        connect_errors: errors,
        node_shed_handshakes: usage.shed,
        node_http_timeouts: usage.timeouts,
        node_refused_handshakes: usage.refused,
        retried,
        connect_s: usage.connect_s,
        sent,
        publish_refused: refused,
        expected,
        delivered,
        deliveries_per_sec: delivered as f64 / secs,
        lost: expected.saturating_sub(delivered),
        closed_by_node: closed,
        node_closed: usage.node_closed,
        lost_in_gaps: gaps,
        silent_members: silent,
        duplicates,
        reordered,
        latency_ms: Latency::of(&hist),
        node_cores,
        node_cpu_us_per_delivery: cpu_per_delivery,
        node_idle_cores: usage.node_idle_cores,
        node_cpu_us_per_delivery_net: (delivered > 0)
            .then(|| (usage.node - usage.node_idle_cores * usage.took).max(0.0) * 1e6 / delivered as f64),
        node_rss_bytes_per_conn: rss_per_conn,
        model: Model::of(
            connected,
            rate,
            Measured {
                node_cores,
                cpu_us_per_delivery: cpu_per_delivery,
                rss_per_conn,
            },
        ),
        bound_by: bound_by(
            Cores {
                node: node_cores,
                generator: generator_cores,
                redis: redis_cores,
                machine: cores() as f64,
            },
            hist.value_at_quantile(0.99) as f64 / 1e3,
            usage.node_p99_ms,
        ),
        master_cores: usage.masters,
        generator_cores,
        node_queue_p99_ms: usage.node_p99_ms,
    })
}

/// Cores used over a step, and the machine's.
struct Cores {
    node: f64,
    generator: f64,
    redis: f64,
    machine: f64,
}

/// Which of this machine's limits the step ran into: the cores, when the processes together used
/// nearly all of them; and who was behind, when deliveries lagged: the nodes, if their workers
/// took messages late (`node_p99_ms`, before any write), else what came after them (the writes,
/// the kernel, the generator reading).
fn bound_by(c: Cores, p99_ms: f64, node_p99_ms: Option<f64>) -> String {
    let shares = format!(
        "nodes {:.2}, generator {:.2}, Redis {:.2} of {} cores",
        c.node, c.generator, c.redis, c.machine
    );
    let full = c.node + c.generator + c.redis >= 0.85 * c.machine;
    let behind = match node_p99_ms {
        _ if p99_ms < 250.0 => None,
        Some(node) if node >= p99_ms / 2.0 => Some(format!("the nodes' workers took messages late (p99 {node} ms)")),
        Some(node) => Some(format!(
            "after the nodes' workers (they took messages within {node} ms at p99): writes, the kernel, the generator's reads"
        )),
        None => Some("unknown".to_string()),
    };
    match (full, behind) {
        (true, Some(who)) => format!("CPU: the machine's cores are full ({shares}); behind: {who}"),
        (true, None) => format!("CPU: the machine's cores are full ({shares})"),
        (false, Some(who)) => format!("lagging without full cores ({shares}); behind: {who}"),
        (false, None) => format!("no machine limit reached ({shares})"),
    }
}

/// Deliveries/s and p99 against the rate: an SVG line chart, two axes.
fn chart(r: &FleetReport) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 70.0, 70.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_rate = r.steps.iter().map(|s| s.rate).fold(0.0, f64::max).max(1e-9);
    let max_d = r
        .steps
        .iter()
        .map(|s| s.deliveries_per_sec)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let max_p = r.steps.iter().map(|s| s.latency_ms.p99).fold(0.0, f64::max).max(1.0) * 1.1;
    let x = |rate: f64| left + pw * rate / max_rate;
    let line = |f: &dyn Fn(&Step) -> f64, max: f64| {
        r.steps
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.rate), top + ph * (1.0 - f(s) / max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">One room of {} members over {} nodes: deliveries/s and p99 against the rate</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#1f77b4\"/>\n\
         <line x1=\"{}\" y1=\"{top}\" x2=\"{}\" y2=\"{}\" stroke=\"#d62728\"/>\n",
        w / 2.0,
        r.members,
        r.nodes,
        top + ph,
        left + pw,
        top + ph,
        top + ph,
        left + pw,
        left + pw,
        top + ph,
    );
    for s in &r.steps {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(s.rate),
            top + ph + 18.0,
            s.rate
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">messages/s published</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">{:.0}</text>\n<text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">deliveries/s</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#d62728\">{:.0} ms</text>\n<text x=\"{}\" y=\"{}\" fill=\"#d62728\">p99</text>\n\
         <polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n\
         <polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"{}\"/>\n",
        left + pw / 2.0,
        h - 10.0,
        4.0,
        top - 4.0,
        max_d,
        4.0,
        top + ph / 2.0,
        left + pw + 4.0,
        top - 4.0,
        max_p,
        left + pw + 4.0,
        top + ph / 2.0,
        line(&|s| s.deliveries_per_sec, max_d),
        line(&|s| s.latency_ms.p99, max_p),
    );
    svg + "</svg>\n"
}

impl FleetReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "stadium-100k: {} members, {} nodes, {} generator processes, {} shards, {} masters, {} cores\n",
            self.members, self.nodes, self.generator_procs, self.shards, self.masters, self.cores
        );
        t += &format!(
            "floor µs per frame by frames per write: {:?}\n",
            self.floor_us_per_frame
        );
        for s in &self.steps {
            t += &format!(
                "rate {}/s: {} connected in {:.1} s ({:?} errors, {} refused with 503, {} shed and {} timed out by the nodes, {} tries again), {:.0} deliveries/s ({} publishes refused), lost {} (in gaps {}, {} members silent, closed by the nodes: {:?}, by the nodes' count: {:?}), duplicates {}, \
                 latency {}, node {:.2} cores ({} µs/delivery, {} net of idle {:.2} cores, {} B RSS/conn), masters {:?} cores, generator {:.2} cores; \
                 the model: node {:.2} cores ({:+.0}%), {:.2} µs/delivery ({}), {:.0} B RSS/conn ({}); {}\n",
                s.rate,
                s.members_connected,
                s.connect_s,
                s.connect_errors,
                s.node_refused_handshakes,
                s.node_shed_handshakes,
                s.node_http_timeouts,
                s.retried,
                s.deliveries_per_sec,
                s.publish_refused,
                s.lost,
                s.lost_in_gaps,
                s.silent_members,
                s.closed_by_node,
                s.node_closed,
                s.duplicates,
                s.latency_ms.full(),
                s.node_cores,
                s.node_cpu_us_per_delivery.map_or("-".into(), |v| format!("{v:.2}")),
                s.node_cpu_us_per_delivery_net.map_or("-".into(), |v| format!("{v:.2}")),
                s.node_idle_cores,
                s.node_rss_bytes_per_conn.map_or("-".into(), |v| format!("{v:.0}")),
                s.master_cores.iter().map(|c| (c * 100.0).round() / 100.0).collect::<Vec<_>>(),
                s.generator_cores,
                s.model.node_cores,
                s.model.node_cores_off * 100.0,
                s.model.node_cpu_us_per_delivery,
                s.model.node_cpu_per_delivery_off.map_or("-".into(), |v| format!("{:+.0}%", v * 100.0)),
                s.model.node_rss_bytes_per_conn,
                s.model.node_rss_off.map_or("-".into(), |v| format!("{:+.0}%", v * 100.0)),
                s.bound_by
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::of(line)
    }

    #[test]
    fn fleet_plan_sizes_processes_and_addresses_for_the_members() {
        let p = Plan::from_args(&args("lt stadium-100k --node-bin /x/shardcast")).unwrap();
        assert_eq!((p.members, p.nodes, p.procs, p.shards), (100_000, 6, 7, 16));
        assert_eq!((p.rates.clone(), p.source_addrs), (vec![1.0, 2.0, 5.0], 51));
        let small = Plan::from_args(&args("lt stadium-100k --clients 5000 --nodes 5 --rates 5")).unwrap();
        assert_eq!((small.procs, small.source_addrs), (1, 4));
        assert!(small.node_bin.ends_with("shardcast"));
    }

    #[test]
    fn reports_of_several_processes_merge_into_one_step() {
        let published = serde_json::json!({"publish": {"sent": 40}, "duration_s": 20.0});
        let holder = |connected: u64, received: u64, latencies: Value| {
            serde_json::json!({
                "connections": {"connected": connected, "failed": {"timeout": 1}, "closed_by_node": {"4008": 1}, "retried": 3},
                "delivery": {"received": received, "duplicates": 1, "reordered": 0, "gap_missing": 2, "silent_members": 1},
                "loadtest_cpu_s": 2.0,
                "latency_us": latencies,
            })
        };
        let reports = [
            holder(10, 400, serde_json::json!([[1000, 399], [9000, 1]])),
            holder(5, 198, serde_json::json!([[2000, 197]])),
        ];
        let usage = Usage {
            connect_s: 3.0,
            took: 20.0,
            node: 10.0,
            masters: vec![0.1, 0.2, 0.3],
            rss_growth: 15_000.0,
            node_idle_cores: 0.1,
            shed: 7,
            timeouts: 3,
            refused: 5,
            node_p99_ms: Some(5.0),
            node_closed: BTreeMap::from([("idle".to_string(), 4)]),
        };
        let s = merge(2.0, &published, &reports, usage.clone()).unwrap();
        assert_eq!((s.members_connected, s.sent, s.expected), (15, 40, 600));
        // A publish the node refused reached nobody: it is expected of no member.
        let one_refused =
            serde_json::json!({"publish": {"sent": 40}, "delivery": {"error_frames": 1}, "duration_s": 20.0});
        let r = merge(2.0, &one_refused, &reports, usage).unwrap();
        assert_eq!((r.publish_refused, r.expected, r.lost), (1, 585, 0));
        assert_eq!((s.delivered, s.duplicates), (596, 2), "duplicates are not deliveries");
        assert_eq!(s.lost, 4);
        assert_eq!(s.connect_errors.get("timeout"), Some(&2));
        assert_eq!(s.closed_by_node.get("4008"), Some(&2));
        assert_eq!((s.lost_in_gaps, s.silent_members), (4, 2));
        assert_eq!(
            (s.node_shed_handshakes, s.node_http_timeouts, s.node_refused_handshakes),
            (7, 3, 5)
        );
        assert_eq!(s.retried, 6, "the members' tries again, summed");
        assert_eq!(s.node_closed.get("idle"), Some(&4));
        assert_eq!(s.latency_ms.count, 597);
        assert!((s.latency_ms.p50 - 1.0).abs() < 0.01);
        assert_eq!(s.node_rss_bytes_per_conn, Some(1000.0));
        // The model's prediction for 15 members at 2 msg/s, and how far the measure is from it.
        let c = capacity::Constants::default();
        let predicted = capacity::predict_cores_one_frame_per_write(15.0, 2.0, &c);
        assert_eq!(s.model.node_cores, predicted);
        assert!((s.model.node_cores_off - (0.5 / predicted - 1.0)).abs() < 1e-9);
        // Per delivery: 10 node-seconds over 596 deliveries, against the prediction for 15 × 2/s.
        let per_delivery = predicted * 1e6 / 30.0;
        assert!((s.model.node_cpu_us_per_delivery - per_delivery).abs() < 1e-9);
        let off = (10e6 / 596.0) / per_delivery - 1.0;
        assert!((s.model.node_cpu_per_delivery_off.unwrap() - off).abs() < 1e-9);
        assert!((s.model.node_rss_off.unwrap() - (1000.0 / c.bytes_per_conn - 1.0)).abs() < 1e-9);
        assert!((s.node_cores - 0.5).abs() < 1e-9 && (s.generator_cores - 0.2).abs() < 1e-9);
        // 10 node-seconds, 2 of them idle cost (0.1 cores × 20 s), for 596 deliveries.
        let net = s.node_cpu_us_per_delivery_net.unwrap();
        assert!((net - 8e6 / 596.0).abs() < 1e-6, "{net}");
        let svg = chart(&FleetReport {
            members: 15,
            nodes: 6,
            generator_procs: 2,
            shards: 16,
            masters: 3,
            payload_bytes: 128,
            duration_s: 20.0,
            cores: 2,
            node_pids: Vec::new(),
            master_pids: Vec::new(),
            floor_us_per_frame: BTreeMap::new(),
            steps: vec![s],
        });
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn the_nodes_closes_are_summed_by_reason_and_what_they_gained_kept() {
        let mut before = BTreeMap::new();
        add_by_label(
            "# TYPE shardcast_connections_closed_total counter\n\
             shardcast_connections_closed_total{reason=\"idle\"} 2\n\
             shardcast_connections_closed_total{reason=\"normal\"} 5\n\
             shardcast_connections_closed_total_other{reason=\"idle\"} 9\n",
            CLOSED,
            &mut before,
        );
        let mut after = before.clone();
        for node in ["idle\"} 7", "error\"} 3"] {
            add_by_label(&format!("{CLOSED}{{reason=\"{node}\n"), CLOSED, &mut after);
        }
        assert_eq!(before, BTreeMap::from([("idle".into(), 2.0), ("normal".into(), 5.0)]));
        let g = gained(&before, &after);
        assert_eq!(g, BTreeMap::from([("idle".into(), 7), ("error".into(), 3)]));
    }

    #[test]
    fn a_steps_cpu_is_taken_over_its_own_window() {
        let at = |ms, node, master| (Duration::from_millis(ms), node, vec![master]);
        // Work until 2 s, then the hold and the disconnects cost more than the work did.
        let samples = [
            at(0, 10.0, 1.0),
            at(1000, 11.0, 1.5),
            at(2000, 12.0, 2.0),
            at(3000, 20.0, 2.1),
        ];
        assert_eq!(window(&samples, Duration::from_millis(1500)), Some((2.0, vec![1.0])));
        assert_eq!(window(&samples, Duration::from_secs(2)), Some((2.0, vec![1.0])));
        // A window longer than the samples takes them all.
        let all = window(&samples, Duration::from_secs(9)).unwrap();
        assert!((all.0 - 10.0).abs() < 1e-9 && (all.1[0] - 1.1).abs() < 1e-9);
        assert_eq!(window(&[], Duration::from_secs(1)), None);
    }

    #[test]
    fn the_nodes_p99_comes_from_what_their_buckets_gained() {
        let scrape = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let before = scrape(&[("0.001", 10.0), ("0.01", 10.0), ("0.1", 10.0), ("+Inf", 10.0)]);
        let after = scrape(&[("0.001", 500.0), ("0.01", 1000.0), ("0.1", 1010.0), ("+Inf", 1010.0)]);
        assert_eq!(
            node_p99_ms(&before, &after),
            Some(10.0),
            "990 of 1,000 new within 10 ms"
        );
        let late = scrape(&[("0.001", 10.0), ("0.01", 10.0), ("0.1", 10.0), ("+Inf", 110.0)]);
        assert_eq!(node_p99_ms(&before, &late), Some(f64::INFINITY));
        assert_eq!(node_p99_ms(&before, &before), None, "no message, no percentile");
    }

    #[test]
    fn the_bound_names_full_cores_and_who_was_behind() {
        let cores = |node, generator| Cores {
            node,
            generator,
            redis: 0.1,
            machine: 2.0,
        };
        assert!(bound_by(cores(0.9, 0.8), 20.0, Some(5.0)).starts_with("CPU"));
        assert!(bound_by(cores(0.2, 0.2), 20.0, Some(5.0)).starts_with("no machine limit"));
        let late = bound_by(cores(0.9, 0.8), 4000.0, Some(2500.0));
        assert!(
            late.starts_with("CPU") && late.contains("nodes' workers took"),
            "{late}"
        );
        let after = bound_by(cores(0.5, 0.6), 4000.0, Some(10.0));
        assert!(
            after.starts_with("lagging") && after.contains("generator's reads"),
            "{after}"
        );
    }
}
