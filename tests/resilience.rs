//! Resilience: Redis Cluster faults, Redis down and back, drain on deploy, dead sockets.
//! Each fault test starts its own cluster, since it breaks it.

mod common;

use std::time::{Duration, Instant};

use common::{config, eventually, free_port, status, Client, Cluster, Node, Process};
use serde_json::json;
use shardcast::bus::shard_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_reconnect_then_4001_and_exits_zero() {
    let mut node = Process::spawn(&["--drain-jitter", "1500ms", "--drain-timeout", "10s"]);
    let health = node.url("/healthz");
    eventually("node up", || async { status(&health).await == 200 }).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut c = Client::connect(&node.ws(&format!("?user=fan{i}"))).await;
        c.join("final").await;
        clients.push(c);
    }
    node.signal("-TERM");
    let ready = node.url("/readyz");
    eventually("readyz 503 while draining", || async { status(&ready).await == 503 }).await;
    match tokio_tungstenite::connect_async(node.ws("?user=late")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("upgrade during drain: {:?}", other.map(|_| ())),
    }
    for c in clients.iter_mut() {
        let notice = c.recv().await.expect("reconnect frame first");
        assert_eq!(notice["op"], "reconnect", "{notice}");
        assert!(notice["after_ms"].as_u64().unwrap() <= 1500);
        // Then a clean close, never an abnormal one (1006 would show as no close frame).
        assert_eq!(c.close_code().await, Some(4001));
    }
    let start = Instant::now();
    let code = loop {
        if let Some(s) = node.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(start.elapsed() < common::WAIT, "node did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_answering_pings_is_closed_as_idle() {
    let mut cfg = config(None, "idle");
    cfg.ping_interval = Duration::from_millis(200);
    cfg.idle_timeout = Duration::from_millis(1000);
    let node = Node::start(cfg).await;
    let mut alive = Client::connect(&node.ws("?user=alive")).await;
    let mut dead = Client::connect(&node.ws("?user=dead")).await;
    // The live client answers pings (tungstenite does while we read) and stays past the timeout.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(alive.request(json!({"op":"ping"})).await["op"], "pong");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other never read, so never answered a ping: it was closed with 4002.
    assert_eq!(dead.close_code().await, Some(4002));
    assert_eq!(alive.request(json!({"op":"ping"})).await["op"], "pong");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_and_mid_run_then_back() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut cfg = config(None, "down");
    cfg.redis = vec![format!("redis://127.0.0.1:{}", ports[0])];
    cfg.join_timeout = Duration::from_secs(1);
    let node = Node::start_unready(cfg).await;
    assert_eq!(status(&node.url("/readyz")).await, 503);
    // Still serving: sockets connect; joins and publishes fail visibly.
    let mut a = Client::connect(&node.ws("?user=a")).await;
    let r = a.request(json!({"op":"join","room":"r"})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let r = a.request(json!({"op":"pub","room":"r","data":1})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let http = reqwest::Client::new();
    let r = http
        .post(node.url("/publish"))
        .json(&json!({"room":"r","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    let cluster = Cluster::start_on(&ports, 3, 0, 2000);
    let ready = node.url("/readyz");
    eventually("ready once Redis is up", || async { status(&ready).await == 200 }).await;
    a.join("r").await;
    let mut b = Client::connect(&node.ws("?user=b")).await;
    // a's inbox, wanted since it connected, was subscribed by the retry: DMs reach it.
    assert_eq!(b.request(json!({"op":"dm","to":"a","data":"hi"})).await["op"], "ok");
    assert_eq!(a.recv().await.unwrap(), json!({"op":"dm","from":"b","data":"hi"}));
    b.publish("r", json!(1)).await;
    assert_eq!(a.recv().await.unwrap()["data"], 1);

    // Mid-run outage: the whole cluster goes away, then comes back on the same ports.
    drop(cluster);
    eventually("not ready while Redis is down", || async {
        status(&ready).await == 503
    })
    .await;
    let r = b.request(json!({"op":"pub","room":"r","data":2})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let _cluster = Cluster::start_on(&ports, 3, 0, 2000);
    eventually("ready again", || async { status(&ready).await == 200 }).await;
    // a never rejoined: its room and inbox were subscribed again by the node.
    let mut n = 0;
    let delivered = loop {
        n += 1;
        b.publish("r", json!({"n": n})).await;
        match tokio::time::timeout(Duration::from_millis(500), a.recv()).await {
            Ok(Some(v)) => break v,
            _ => assert!(n < 40, "room never resubscribed after Redis came back"),
        }
    };
    assert_eq!(delivered["op"], "msg");
    node.stop().await;
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, u64, Instant)>>>;

/// One round: every sender publishes `seq` and waits for its answer; returns who got an `ok`.
async fn round(senders: &mut [(String, Client)], seq: u64) -> Vec<(String, u64)> {
    let mut acked = Vec::new();
    for (name, s) in senders.iter_mut() {
        let r = s.request(json!({"op":"pub","room":"stadium","data":{"seq":seq}})).await;
        if r["op"] == "ok" {
            acked.push((name.clone(), seq));
        } else {
            // Publishing while the shard has no master fails visibly, never silently.
            assert_eq!(r["code"], "unavailable", "{r}");
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_dies_and_its_shards_resume_on_the_promoted_replica() {
    const NODE_TIMEOUT_MS: u64 = 1000;
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let cluster = Cluster::start_on(&ports, 3, 1, NODE_TIMEOUT_MS as u32);
    let mut cfg = config(Some(&cluster), "failover");
    cfg.hot_rooms.insert("stadium".into(), 16);
    let prefix = cfg.channel_prefix.clone();
    let a = Node::start(cfg.clone()).await;
    let b = Node::start(cfg).await;
    let mut viewer = Client::connect(&b.ws("?user=viewer")).await;
    viewer.join("stadium").await;
    let seen: Seen = Default::default();
    let reader = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(v) = viewer.recv().await {
                if v["op"] != "msg" {
                    continue;
                }
                let from = v["from"].as_str().unwrap().to_string();
                seen.lock()
                    .unwrap()
                    .push((from, v["data"]["seq"].as_u64().unwrap(), Instant::now()));
            }
        }
    });
    let mut senders = Vec::new();
    for i in 0..16 {
        let name = format!("s{i}");
        let c = Client::connect(&a.ws(&format!("?user={name}"))).await;
        senders.push((name, c));
    }
    // The master owning sender 0's shard dies.
    let shard_of = |name: &str| format!("{prefix}stadium:shard{}", shard_for(name, 16));
    let victim = cluster.owner_of(redis_slot(&cluster, &shard_of("s0")));
    let healthy: Vec<String> = senders
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| cluster.owner_of(redis_slot(&cluster, &shard_of(n))) != victim)
        .collect();
    let mut acked = Vec::new();
    for seq in 0..5 {
        acked.extend(round(&mut senders, seq).await);
    }
    assert_eq!(acked.len(), 16 * 5, "all publishes succeed before the fault");
    let pid = cluster.redis_cli(victim, &["info", "server"]);
    let pid = pid
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_string();
    let killed = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    // Keep streaming through the failover until sender 0's messages flow again.
    let mut seq = 5;
    let resumed = loop {
        acked.extend(round(&mut senders, seq).await);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first_after = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(f, q, _)| f == "s0" && *q >= 5)
            .map(|(_, _, t)| *t);
        if let Some(t) = first_after {
            break t.duration_since(killed);
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "sender 0's shard never resumed"
        );
    };
    // After resumption nothing more is lost: a last batch reaches the viewer whole.
    let last = seq;
    let mut tail = Vec::new();
    for seq in last..last + 5 {
        tail.extend(round(&mut senders, seq).await);
    }
    assert_eq!(tail.len(), 16 * 5, "publishing works again");
    acked.extend(tail);
    eventually("every message after resumption delivered", || async {
        seen.lock().unwrap().iter().filter(|(_, q, _)| *q >= last).count() == 16 * 5
    })
    .await;
    // What was acknowledged but never delivered is the silent loss of the failover window.
    let got: std::collections::HashSet<(String, u64)> =
        seen.lock().unwrap().iter().map(|(f, q, _)| (f.clone(), *q)).collect();
    let silent = acked.iter().filter(|k| !got.contains(*k)).count();
    let refused = 16 * (last + 5) as usize - acked.len();
    // How long rooms on healthy masters stalled: the longest pause in their deliveries.
    let mut times: Vec<Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(f, _, _)| healthy.contains(f))
        .map(|(_, _, t)| *t)
        .collect();
    times.sort();
    let stall = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    eprintln!(
        "failover: shard resumed {resumed:?} after the kill (node timeout {NODE_TIMEOUT_MS} ms); {refused} publishes refused \
         with `unavailable`, {silent} acknowledged but lost; healthy masters' shards paused at most {stall:?}"
    );
    assert!(
        resumed < Duration::from_millis(NODE_TIMEOUT_MS + 2000 + 2000),
        "resumed only after {resumed:?}"
    );
    a.stop().await;
    b.stop().await;
    reader.abort();
}

fn redis_slot(cluster: &Cluster, key: &str) -> u16 {
    cluster
        .redis_cli(cluster.ports[0], &["cluster", "keyslot", key])
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_slot_is_subscribed_again_on_its_new_owner() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let cluster = Cluster::start_on(&ports, 3, 0, 2000);
    let cfg = config(Some(&cluster), "migrate");
    let channel = format!("{}lobby:shard0", cfg.channel_prefix);
    let node = Node::start(cfg).await;
    let mut viewer = Client::connect(&node.ws("?user=v")).await;
    viewer.join("lobby").await;
    let mut sender = Client::connect(&node.ws("?user=s")).await;
    let slot = redis_slot(&cluster, &channel);
    let from = cluster.owner_of(slot);
    let to = *ports.iter().find(|p| **p != from).unwrap();
    let id = |port: u16| cluster.redis_cli(port, &["cluster", "myid"]).trim().to_string();
    let (from_id, to_id) = (id(from), id(to));
    let s = slot.to_string();
    cluster.redis_cli(to, &["cluster", "setslot", &s, "importing", &from_id]);
    cluster.redis_cli(from, &["cluster", "setslot", &s, "migrating", &to_id]);
    for p in &ports {
        cluster.redis_cli(*p, &["cluster", "setslot", &s, "node", &to_id]);
    }
    // Redis dropped the old subscription; the node subscribes again on the new owner.
    eventually("channel subscribed on the new owner", || async {
        cluster.redis_cli(to, &["pubsub", "shardchannels", &channel]).trim() == channel
    })
    .await;
    for i in 0..20 {
        sender.publish("lobby", json!({"i": i})).await;
    }
    for i in 0..20 {
        assert_eq!(viewer.recv().await.unwrap()["data"], json!({"i": i}));
    }
    node.stop().await;
}
