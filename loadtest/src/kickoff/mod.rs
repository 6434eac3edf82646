//! The `kickoff` run: the crowd arriving at kick-off, each asking for the latest of everything. A
//! room (`--room`, default `kickoff`) holds `--keys` keys (100: `odds:0` … `odds:99`, each a value
//! of `--value-bytes`, 128), published before anyone joins. Then `--joins` joins with `latest`
//! (10,000) arrive evenly over `--join-window` seconds (10) at `--nodes` node processes (2) on a
//! 3-master Redis Cluster it starts (`redis-cluster/up`: run it from the repository).
//!
//! Each join is timed from sending it to its `ok`, which the node sends after every key's latest
//! value; a join counts as complete when all `--keys` distinct keys came before it. The joins are
//! made by `--clients` sockets (1,000), connected first at `--ramp-per-sec`, each making its share
//! of the joins in turn ([`schedule`]) and leaving the room between two: 10,000 sockets on this
//! 2-core machine, beside two nodes, Redis and the generator, would measure the connect storm more
//! than the joins (`--clients 10000` makes it one join per socket). The report says how many joins
//! were sent late because their socket was still busy.
//!
//! Nothing is published during the joins: what a join gets is the values published before, and
//! `GET /rooms/<room>/latest` on every node lists them first, as a check. The JSON report goes to
//! `--out`; everything started is stopped however the run ends.

mod joiner;
mod report;
mod schedule;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::{runtime::Runtime, sync::watch, task::JoinHandle};
use tokio_tungstenite::tungstenite::Message;

pub use report::KickoffReport;

use crate::{
    conn::{self, NodeUrl},
    keyed, procfs,
    procs::{free_port, get, ready, Cluster, Proc},
    scrape, tasks,
    wire::{self, Encoding, Inbound, Stamp},
    Args,
};

use self::{joiner::SocketLog, report::Joins};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub room: String,
    pub keys: usize,
    pub value_bytes: usize,
    pub joins: usize,
    pub window: Duration,
    pub sockets: usize,
    pub nodes: usize,
    pub ramp_per_sec: f64,
    pub connect_timeout: Duration,
    pub source_addrs: u8,
    pub node_bin: PathBuf,
    pub out: PathBuf,
}

/// Longest join window: the machine is shared.
const MAX_WINDOW: f64 = 60.0;
/// How long one join (or leave) may wait for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Plan {
    /// The plan the command line asks for; refused for what cannot be run.
    pub fn from_args(args: &Args) -> anyhow::Result<Plan> {
        if !(args.join_window > 0.0 && args.join_window <= MAX_WINDOW) {
            bail!("--join-window must be above 0 and at most {MAX_WINDOW} s");
        }
        if args.keys == 0 || args.joins == 0 {
            bail!("--keys and --joins must be at least 1");
        }
        let sockets = args.clients().clamp(1, args.joins);
        let nodes = args.nodes.unwrap_or(2).max(1);
        if !(args.ramp_per_sec > 0.0 && args.ramp_per_sec.is_finite()) {
            bail!("--ramp-per-sec must be positive");
        }
        Ok(Plan {
            room: args.room(),
            keys: args.keys,
            value_bytes: args.value_bytes(),
            joins: args.joins,
            window: Duration::from_secs_f64(args.join_window),
            sockets,
            nodes,
            ramp_per_sec: args.ramp_per_sec,
            connect_timeout: Duration::try_from_secs_f64(args.connect_timeout).context("--connect-timeout")?,
            // About 28,000 ports per source address.
            source_addrs: args.source_addrs.max((sockets.div_ceil(20_000)).min(250) as u8),
            node_bin: args.node_bin()?,
            out: args.out(),
        })
    }

    /// The nodes' flags beside their address, Redis and id: the defaults (`--max-keys-per-room`
    /// 1,000 holds the run's keys).
    fn node_args(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Runs the plan: the cluster and the nodes, the keys, the sockets, the joins; writes
/// `kickoff.json` to `plan.out`. Everything started is stopped however it ends.
pub fn run(plan: &Plan, runtime: &Runtime) -> anyhow::Result<KickoffReport> {
    std::fs::create_dir_all(&plan.out)?;
    let scratch = plan.out.join("run");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let cluster = Cluster::up(&scratch.join("cluster"), 0, 2000)?;
    let (mut nodes, ports) = start_nodes(plan, &scratch, &cluster.seed)?;
    let report = play(plan, runtime, &cluster, &nodes, &ports);
    for node in &mut nodes {
        node.stop(Duration::from_secs(10));
    }
    drop(cluster);
    let report = report?;
    std::fs::write(plan.out.join("kickoff.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

/// Starts the plan's nodes on free loopback ports against the cluster at `seed`, each logging to
/// `scratch`; waits (30 s at most) until every one is ready.
fn start_nodes(plan: &Plan, scratch: &Path, seed: &str) -> anyhow::Result<(Vec<Proc>, Vec<u16>)> {
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for i in 0..plan.nodes {
        let port = free_port()?;
        let log = std::fs::File::create(scratch.join(format!("node-{}.log", i + 1)))?;
        nodes.push(Proc::spawn(
            Command::new(&plan.node_bin)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--redis", seed])
                .args(["--node-id", &format!("kickoff-{}", i + 1)])
                .args(plan.node_args())
                .stdout(Stdio::null())
                .stderr(log),
            format!("node {}", i + 1),
        )?);
        ports.push(port);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in &ports {
        ready(*port, deadline)?;
    }
    Ok((nodes, ports))
}

/// The run on the started processes.
fn play(
    plan: &Plan,
    runtime: &Runtime,
    cluster: &Cluster,
    nodes: &[Proc],
    ports: &[u16],
) -> anyhow::Result<KickoffReport> {
    let urls = runtime.block_on(async {
        let mut urls = Vec::new();
        for p in ports {
            urls.push(NodeUrl::resolve(&format!("ws://127.0.0.1:{p}/ws")).await?);
        }
        anyhow::Ok(urls)
    })?;
    let (keys_acked, keys_refused) = runtime.block_on(publish_keys(plan, &urls[0]))?;
    let latest_listed = ports.iter().map(|p| listed(*p, &plan.room)).collect();

    let ctx = Arc::new(joiner::Ctx {
        nodes: urls,
        room: plan.room.clone(),
        keys: plan.keys,
        sockets: plan.sockets,
        joins: plan.joins,
        window: plan.window,
        source_addrs: plan.source_addrs,
        connect_timeout: plan.connect_timeout,
        answer_timeout: ANSWER_TIMEOUT,
    });
    let (go, wait) = watch::channel(None);
    let ramp_start = tokio::time::Instant::now();
    let handles: Vec<JoinHandle<SocketLog>> = (0..plan.sockets)
        .map(|i| {
            let at = ramp_start + schedule::connect_at(i, plan.ramp_per_sec);
            runtime.spawn(joiner::socket(ctx.clone(), i, at, wait.clone()))
        })
        .collect();
    let connect_s = wait_connected(plan, ports);

    let node_pids: Vec<u32> = nodes.iter().map(Proc::pid).collect();
    let master_pids = cluster.master_pids().to_vec();
    let before = procfs::Readings::take(&node_pids, &master_pids)?;
    let [sent_before] = scrape::sums(ports, [scrape::LATEST_SENT]);
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let _ = go.send(Some(start));
    // Every join is due within the window, and each waits its answer and its leave's at most.
    let deadline = start + plan.window + 2 * ANSWER_TIMEOUT + Duration::from_secs(5);
    let logs: Vec<SocketLog> = runtime
        .block_on(tasks::join_by(handles, deadline))
        .into_iter()
        .map(|log| {
            log.unwrap_or_else(|| SocketLog {
                failure: Some("did not end in time".into()),
                ..SocketLog::default()
            })
        })
        .collect();
    let joins_took_s = start.elapsed().as_secs_f64();
    let after = procfs::Readings::take(&node_pids, &master_pids)?;
    let [sent_after] = scrape::sums(ports, [scrape::LATEST_SENT]);
    let cpu = |a: &[procfs::Sample], b: &[procfs::Sample]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(a, b)| b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / 1e9)
            .collect()
    };
    let mut connect_failed = BTreeMap::new();
    for l in &logs {
        if let Some(f) = &l.failure {
            *connect_failed.entry(f.clone()).or_insert(0) += 1;
        }
    }
    Ok(KickoffReport {
        scenario: "kickoff",
        room: plan.room.clone(),
        keys: plan.keys,
        value_bytes: plan.value_bytes,
        nodes: plan.nodes,
        redis_masters: cluster.masters,
        node_args: plan.node_args(),
        keys_acked,
        keys_refused,
        latest_listed,
        sockets: plan.sockets,
        sockets_connected: logs.iter().filter(|l| l.connected).count(),
        connect_failed,
        connect_s,
        joins_planned: plan.joins,
        join_window_s: plan.window.as_secs_f64(),
        joins_took_s,
        joins: Joins::of(&logs, plan.keys, plan.nodes),
        node_latest_values_sent: sent_after - sent_before,
        node_cpu_s: cpu(&before.nodes, &after.nodes),
        master_cpu_s: cpu(&before.aux, &after.aux),
        generator_cpu_s: after.own.cpu_ns.saturating_sub(before.own.cpu_ns) as f64 / 1e9,
        node_pids,
        master_pids,
    })
}

/// Waits until the nodes hold every socket (their `shardcast_connections_open`), at most the
/// ramp's time and `--connect-timeout` more; the seconds it took.
fn wait_connected(plan: &Plan, ports: &[u16]) -> f64 {
    let started = Instant::now();
    let deadline = started + schedule::connect_at(plan.sockets, plan.ramp_per_sec) + plan.connect_timeout;
    while Instant::now() < deadline {
        let [open] = scrape::sums(ports, ["shardcast_connections_open"]);
        if open as usize >= plan.sockets {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed().as_secs_f64()
}

/// Publishes the keys' values from one connection to `node`, each with an id; the `ok`s and the
/// refusals by code, once all are answered (10 s at most).
async fn publish_keys(plan: &Plan, node: &NodeUrl) -> anyhow::Result<(u64, BTreeMap<String, u64>)> {
    let ws = tokio::time::timeout(
        Duration::from_secs(10),
        conn::open(node, IpAddr::V4(Ipv4Addr::LOCALHOST), "lt-odds", Encoding::Json),
    )
    .await
    .context("the odds publisher's connect timed out")??;
    let (mut sink, mut stream) = ws.split();
    for k in 0..plan.keys {
        let stamp = Stamp {
            publisher: 0,
            seq: k as u64,
            ts_us: wire::now_us(),
        };
        let frame = keyed::stamped_pub(&plan.room, &format!("odds:{k}"), k as i64 + 2, stamp, plan.value_bytes);
        sink.send(frame).await.context("publishing the odds")?;
        // Within the node's command rate (100/s, bursts of 200).
        if k % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let (mut acked, mut refused) = (0u64, BTreeMap::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while acked + refused.values().sum::<u64>() < plan.keys as u64 {
        let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, stream.next()).await else {
            break;
        };
        let Message::Text(text) = msg else { continue };
        match wire::scan_json(&text) {
            Inbound::Ok(_) => acked += 1,
            Inbound::Error(_) => {
                *refused
                    .entry(keyed::error_code(&text).unwrap_or_else(|| "?".into()))
                    .or_insert(0) += 1
            }
            _ => {}
        }
    }
    let ws = sink.reunite(stream).context("the publisher's halves")?;
    conn::close(ws).await;
    if acked == 0 {
        bail!("no key was published: refused {refused:?}");
    }
    Ok((acked, refused))
}

/// How many values `GET /rooms/<room>/latest` on the node at `port` lists.
fn listed(port: u16, room: &str) -> usize {
    let answer = get(port, &format!("/rooms/{room}/latest"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked body would need unchunking: take the JSON object wherever it starts.
    let json = body
        .find('{')
        .map_or("", |i| &body[i..body.rfind('}').map_or(body.len(), |j| j + 1)]);
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["msgs"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kickoff_plan_takes_its_defaults_and_refuses_what_cannot_run() {
        let p = Plan::from_args(&Args::of("lt kickoff --node-bin /bin/true")).unwrap();
        assert_eq!(
            (p.room.as_str(), p.keys, p.value_bytes, p.joins, p.sockets, p.nodes),
            ("kickoff", 100, 128, 10_000, 1_000, 2)
        );
        assert_eq!(p.window, Duration::from_secs(10));
        // More sockets than joins would leave sockets with nothing to do.
        let one_each = Plan::from_args(&Args::of("lt kickoff --clients 20000 --node-bin /bin/true")).unwrap();
        assert_eq!(one_each.sockets, 10_000);
        for bad in ["--join-window 0", "--join-window 61", "--keys 0", "--joins 0"] {
            assert!(
                Plan::from_args(&Args::of(&format!("lt kickoff {bad}"))).is_err(),
                "{bad}"
            );
        }
    }
}
