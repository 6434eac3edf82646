//! Soak: steady publishing with churn of joins, leaves and reconnects against a node process on a
//! real Redis Cluster. Clients that stay through the churn get every message published to their
//! room, once and in order; after warm-up the node's RSS and open files must stay flat; and when
//! every client is gone the node holds no subscriptions and no sockets.
//!
//! Short here (`SHARDCAST_SOAK_SECS`, default 20); the README shows the long run.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, metric, status, Client, Cluster, Process};
use serde_json::{json, Value};

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
    // join other rooms. Beside them, one client in each of the 13 rooms the others use stays for the
    // whole run, and is held to account for every message published to its room.
    const ROOMS: usize = 13;
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = Client::connect(&node.ws(&format!("?user=u{i}"))).await;
        c.join(&format!("r{}", i % 10)).await;
        clients.push(c);
    }
    let mut stayers = Vec::new();
    for r in 0..ROOMS {
        let mut c = Client::connect(&node.ws(&format!("?user=stay{r}"))).await;
        c.join(&format!("r{r}")).await;
        stayers.push(c);
    }
    // What each room was sent, in order: (sender, its sequence number). Every publish waits for its
    // `ok`, so each one counted here went out after the stayers joined.
    let mut published: Vec<Vec<(String, u64)>> = vec![Vec::new(); ROOMS];
    let mut received: Vec<Vec<Value>> = vec![Vec::new(); ROOMS];
    let mut next_seq = [0u64; 40];
    let started = Instant::now();
    let mut round = 0u64;
    let mut baseline = None;
    while started.elapsed() < Duration::from_secs(secs) {
        // All 40 publish at once, then each waits for its `ok`: a client is replaced only after
        // its message was taken.
        let mut asked = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            let data = json!({"round":round,"seq":next_seq[i],"pad":"x".repeat(200)});
            asked.push(
                c.send_request(json!({"op":"pub","room":format!("r{}", i % 10),"data":data}))
                    .await,
            );
        }
        for (i, (c, id)) in clients.iter_mut().zip(asked).enumerate() {
            let r = c.reply(id).await;
            assert_eq!(r["op"], "ok", "u{i}'s publish: {r}");
            published[i % 10].push((format!("u{i}"), next_seq[i]));
            next_seq[i] += 1;
        }
        for k in 0..10 {
            let i = (round as usize * 10 + k) % clients.len();
            let mut c = Client::connect(&node.ws(&format!("?user=u{i}"))).await;
            c.join(&format!("r{}", (i + round as usize) % ROOMS)).await;
            clients[i] = c;
        }
        // Drain what arrived so no client becomes a slow consumer.
        for c in clients.iter_mut() {
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), c.recv()).await {}
        }
        for (c, got) in stayers.iter_mut().zip(received.iter_mut()) {
            while let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(1), c.recv()).await {
                got.push(v);
            }
        }
        round += 1;
        if baseline.is_none() && started.elapsed() > Duration::from_secs(secs / 4) {
            baseline = Some((proc_status(pid, "VmRSS:"), open_files(pid)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss0, fds0) = baseline.expect("warm-up ended");
    let (rss1, fds1) = (proc_status(pid, "VmRSS:"), open_files(pid));
    // Each stayer publishes an end mark to its room and reads up to it. A room has one shard
    // channel (the default), and the node keeps a channel's messages in the order Redis took
    // them: everything acknowledged before the mark arrives before it. A mark that never comes
    // leaves the account below to say what else was lost.
    let mut unmarked = Vec::new();
    for (r, (c, got)) in stayers.iter_mut().zip(received.iter_mut()).enumerate() {
        c.publish(&format!("r{r}"), json!("end")).await;
        let marked = tokio::time::timeout(common::WAIT, async {
            loop {
                let v = c.recv().await.expect("a stayer's socket stays open");
                if v["from"] == format!("stay{r}") && v["data"] == "end" {
                    break;
                }
                got.push(v);
            }
        })
        .await;
        if marked.is_err() {
            unmarked.push(format!("r{r}"));
        }
    }
    // Every message published to a stayer's room reached it once, each sender's in order.
    for (r, (sent, got)) in published.iter().zip(&received).enumerate() {
        let got: Vec<(String, u64)> = got
            .iter()
            .map(|v| {
                assert_eq!((&v["op"], &v["room"]), (&json!("msg"), &json!(format!("r{r}"))), "{v}");
                (
                    v["from"].as_str().unwrap().to_owned(),
                    v["data"]["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        let by_sender = |list: &[(String, u64)]| {
            let mut map: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
            for (from, seq) in list {
                map.entry(from.clone()).or_default().push(*seq);
            }
            map
        };
        let (sent, got) = (by_sender(sent), by_sender(&got));
        for (from, seqs) in &sent {
            let arrived = got.get(from).map_or(&[][..], Vec::as_slice);
            let same = seqs.iter().zip(arrived).take_while(|(a, b)| a == b).count();
            let around = |v: &[u64]| v[same..].iter().take(5).copied().collect::<Vec<_>>();
            assert!(
                arrived == seqs.as_slice(),
                "stay{r} got {} of {from}'s {} messages to r{r} (lost, repeated or out of order): after \
                 seq {} it expected {:?}… and got {:?}…",
                arrived.len(),
                seqs.len(),
                same.checked_sub(1).map_or("(none)".into(), |i| seqs[i].to_string()),
                around(seqs),
                around(arrived)
            );
        }
        assert!(
            got.keys().all(|from| sent.contains_key(from)),
            "stay{r} got messages from senders that never sent to r{r}"
        );
    }
    assert!(unmarked.is_empty(), "the end mark never came back in {unmarked:?}");
    let delivered: usize = published.iter().map(Vec::len).sum();
    eprintln!(
        "soak: {round} rounds in {secs} s, {delivered} messages each delivered to its room's stayer; RSS {rss0} -> \
         {rss1} KiB, open files {fds0} -> {fds1}"
    );
    assert!(fds1 <= fds0 + 5, "open files grew from {fds0} to {fds1}");
    assert!(rss1 <= rss0 + rss0 / 4 + 2048, "RSS grew from {rss0} KiB to {rss1} KiB");

    // Everyone leaves: no socket and no subscription is left behind.
    drop(clients);
    drop(stayers);
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
