//! Soak: steady publishing with churn of joins, leaves and reconnects against a node process on a
//! real Redis Cluster. After warm-up the node's RSS and open files must stay flat, and when every
//! client is gone the node holds no subscriptions and no sockets.
//!
//! Short here (`SHARDCAST_SOAK_SECS`, default 20); the README shows the long run.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, metric, status, Client, Cluster, Process};
use serde_json::json;

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_rss_and_open_files_flat() {
    let secs: u64 = std::env::var("SHARDCAST_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let cluster = Cluster::shared();
    let prefix = format!("t:soak{}:room:", std::process::id());
    let node = Process::spawn(&[
        "--redis",
        &cluster.url,
        "--channel-prefix",
        &prefix,
        "--unsubscribe-delay",
        "100ms",
    ]);
    let pid = node.child.id();
    let ready = node.url("/readyz");
    eventually("node ready", || async { status(&ready).await == 200 }).await;

    // Steady state: 40 clients in 10 rooms, each publishing; every round, 10 of them reconnect and
    // join other rooms.
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = Client::connect(&node.ws(&format!("?user=u{i}"))).await;
        c.join(&format!("r{}", i % 10)).await;
        clients.push(c);
    }
    let started = Instant::now();
    let mut round = 0u64;
    let mut baseline = None;
    while started.elapsed() < Duration::from_secs(secs) {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(json!({"op":"pub","room":format!("r{}", i % 10),"data":{"round":round,"pad":"x".repeat(200)}}))
                .await;
        }
        for k in 0..10 {
            let i = (round as usize * 10 + k) % clients.len();
            let mut c = Client::connect(&node.ws(&format!("?user=u{i}"))).await;
            c.join(&format!("r{}", (i + round as usize) % 13)).await;
            clients[i] = c;
        }
        // Drain what arrived so no client becomes a slow consumer.
        for c in clients.iter_mut() {
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), c.recv()).await {}
        }
        round += 1;
        if baseline.is_none() && started.elapsed() > Duration::from_secs(secs / 4) {
            baseline = Some((proc_status(pid, "VmRSS:"), open_files(pid)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss0, fds0) = baseline.expect("warm-up ended");
    let (rss1, fds1) = (proc_status(pid, "VmRSS:"), open_files(pid));
    eprintln!("soak: {round} rounds in {secs} s; RSS {rss0} -> {rss1} KiB, open files {fds0} -> {fds1}");
    assert!(fds1 <= fds0 + 5, "open files grew from {fds0} to {fds1}");
    assert!(rss1 <= rss0 + rss0 / 4 + 2048, "RSS grew from {rss0} KiB to {rss1} KiB");

    // Everyone leaves: no socket and no subscription is left behind.
    drop(clients);
    eventually("every room unsubscribed", || async {
        cluster.shard_channels(&format!("{prefix}*")).is_empty()
    })
    .await;
    let metrics = node.url("/metrics");
    eventually("no connection left open", || async {
        metric(&metrics, "shardcast_connections_open").await == Some(0.0)
    })
    .await;
    assert!(open_files(pid) <= fds0, "sockets left open");
}
