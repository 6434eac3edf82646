//! Nodes fanned out over a real Redis Cluster (started by the tests through `redis-cluster/up`).

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::{config, eventually, Client, Cluster, Node};
use serde_json::{json, Value};
use shardcast::bus::shard_for;

/// Collects `n` `msg` frames and checks each sender's sequence numbers arrive in order, once.
async fn collect(client: &mut Client, room: &str, n: usize) -> HashMap<String, Vec<u64>> {
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    for _ in 0..n {
        let v = client.recv().await.expect("socket open");
        assert_eq!(v["op"], "msg", "{v}");
        assert_eq!(v["room"], room);
        let from = v["from"].as_str().unwrap().to_string();
        seen.entry(from).or_default().push(v["data"]["seq"].as_u64().unwrap());
    }
    for (from, seqs) in &seen {
        let expected: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, &expected, "messages of {from} out of order, lost or repeated");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_order() {
    let cluster = Cluster::shared();
    let base = config(Some(cluster), "three");
    let nodes = [
        Node::start(base.clone()).await,
        Node::start(base.clone()).await,
        Node::start(base.clone()).await,
    ];
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            let mut c = Client::connect(&node.ws(&format!("?user=member-{i}-{j}"))).await;
            c.join("match").await;
            members.push(c);
        }
    }
    const PER_SENDER: u64 = 100;
    let mut senders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        senders.push(Client::connect(&node.ws(&format!("?user=sender-{i}"))).await);
    }
    // Publish without waiting for each ok, interleaving the three senders.
    for seq in 0..PER_SENDER {
        for s in senders.iter_mut() {
            s.send(json!({"op":"pub","room":"match","data":{"seq":seq}})).await;
        }
    }
    for m in members.iter_mut() {
        let seen = collect(m, "match", 3 * PER_SENDER as usize).await;
        assert_eq!(seen.len(), 3);
    }
    // Exactly once: nothing more arrives after a marker published last.
    senders[0].publish("match", json!({"marker":true})).await;
    for m in members.iter_mut() {
        let v = m.recv().await.unwrap();
        assert_eq!(v["data"], json!({"marker":true}), "an extra frame arrived: {v}");
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_room_spreads_over_eight_shard_channels_and_unsubscribes_after() {
    let cluster = Cluster::shared();
    let mut base = config(Some(cluster), "hot");
    base.hot_rooms.insert("stadium".into(), 8);
    let prefix = base.channel_prefix.clone();
    let nodes = [Node::start(base.clone()).await, Node::start(base.clone()).await];
    let mut viewers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            let mut c = Client::connect(&node.ws(&format!("?user=viewer-{i}-{j}"))).await;
            c.join("stadium").await;
            viewers.push(c);
        }
    }
    let expected: Vec<String> = (0..8).map(|n| format!("{prefix}stadium:shard{n}")).collect();
    assert_eq!(cluster.shard_channels(&format!("{prefix}*")), expected);

    const SENDERS: usize = 16;
    const EACH: u64 = 20;
    let names: Vec<String> = (0..SENDERS).map(|i| format!("fan-{i}")).collect();
    let shards: std::collections::HashSet<u32> = names.iter().map(|n| shard_for(n, 8)).collect();
    assert!(shards.len() >= 5, "senders cover only shards {shards:?}");
    let mut senders = Vec::new();
    for (i, name) in names.iter().enumerate() {
        senders.push(Client::connect(&nodes[i % 2].ws(&format!("?user={name}"))).await);
    }
    for seq in 0..EACH {
        for s in senders.iter_mut() {
            s.send(json!({"op":"pub","room":"stadium","data":{"seq":seq}})).await;
        }
    }
    for v in viewers.iter_mut() {
        let seen = collect(v, "stadium", SENDERS * EACH as usize).await;
        assert_eq!(seen.len(), SENDERS);
    }
    drop(viewers);
    eventually("shard channels unsubscribed", || async {
        cluster.shard_channels(&format!("{prefix}*")).is_empty()
    })
    .await;
    for n in nodes {
        n.stop().await;
    }
}

/// Polls until `until`, failing as soon as `channel` is no longer subscribed on its master `owner`
/// or any master served a SUNSUBSCRIBE since `unsubscribes` were counted (which would catch a
/// channel unsubscribed and subscribed again between two polls).
async fn stays_subscribed(cluster: &Cluster, owner: u16, channel: &str, unsubscribes: u64, until: Instant, what: &str) {
    loop {
        assert_eq!(
            cluster.shard_numsub(owner, channel),
            1,
            "{what}: {channel} unsubscribed"
        );
        assert_eq!(
            cluster.sunsubscribe_calls(),
            unsubscribes,
            "{what}: a SUNSUBSCRIBE reached Redis"
        );
        if Instant::now() >= until {
            return;
        }
        // The command count misses nothing between polls, so they need not be frequent (each one
        // runs four redis-cli).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A member who leaves a room and rejoins within `--unsubscribe-delay` does not churn the cluster:
/// the room's channel stays subscribed on Redis the whole time, past the delay too (the delayed
/// check finds the member back). A leave with no rejoin unsubscribes it once the delay has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_within_the_unsubscribe_delay_keeps_the_channel_subscribed() {
    const DELAY: Duration = Duration::from_secs(2);
    // A cluster of its own, so that its masters count no SUNSUBSCRIBE but this node's.
    let cluster = Cluster::start(3, 0);
    let mut cfg = config(Some(&cluster), "rejoin");
    cfg.unsubscribe_delay = DELAY;
    let channel = format!("{}lobby:shard0", cfg.channel_prefix);
    let node = Node::start(cfg).await;
    let owner = cluster.owner_of(cluster.slot(&channel));
    let mut member = Client::connect(&node.ws("?user=m")).await;
    let mut sender = Client::connect(&node.ws("?user=s")).await;
    member.join("lobby").await;
    assert_eq!(cluster.shard_numsub(owner, &channel), 1);
    let unsubscribes = cluster.sunsubscribe_calls();

    let left = Instant::now();
    assert_eq!(member.request(json!({"op":"leave","room":"lobby"})).await["op"], "ok");
    // Long enough for an unsubscribe sent at once to have reached Redis, well within the delay.
    let gap = Duration::from_millis(500);
    stays_subscribed(&cluster, owner, &channel, unsubscribes, left + gap, "after the leave").await;
    member.join("lobby").await;
    let rejoined = left.elapsed();
    assert!(
        rejoined < DELAY - gap,
        "the rejoin took {rejoined:?}, too slow to test the delay"
    );
    // Past the moment the leave's delayed check runs, with half a second to spare for late timers.
    stays_subscribed(
        &cluster,
        owner,
        &channel,
        unsubscribes,
        left + DELAY + Duration::from_millis(500),
        "after the rejoin",
    )
    .await;
    sender.publish("lobby", json!({"after":"rejoin"})).await;
    assert_eq!(
        member.recv().await.unwrap(),
        json!({"op":"msg","room":"lobby","from":"s","data":{"after":"rejoin"}})
    );

    // A leave for good: unsubscribed, but only once the delay has passed.
    let left = Instant::now();
    assert_eq!(member.request(json!({"op":"leave","room":"lobby"})).await["op"], "ok");
    let gone = loop {
        let subscribers = cluster.shard_numsub(owner, &channel);
        let polled = Instant::now();
        if subscribers == 0 {
            break polled - left;
        }
        assert!(
            left.elapsed() < DELAY + common::WAIT,
            "{channel} still subscribed after the delay"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // The poll that saw it ended `gone` after the leave: had the unsubscribe come before the delay,
    // that could be less than the delay.
    assert!(
        gone >= DELAY,
        "unsubscribed {gone:?} after the leave, within the delay ({DELAY:?})"
    );
    // One SUNSUBSCRIBE, the one just seen: the count above would have caught an earlier one.
    assert_eq!(cluster.sunsubscribe_calls(), unsubscribes + 1);
    eprintln!("rejoin: rejoined {rejoined:?} after the leave; a leave for good unsubscribed after {gone:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_message_reaches_both_tabs_on_two_nodes() {
    let cluster = Cluster::shared();
    let base = config(Some(cluster), "dm");
    let user_prefix = base.user_channel_prefix.clone();
    let a = Node::start(base.clone()).await;
    let b = Node::start(base.clone()).await;
    let mut tab1 = Client::connect(&a.ws("?user=carol")).await;
    let mut tab2 = Client::connect(&b.ws("?user=carol")).await;
    let mut dave = Client::connect(&a.ws("?user=dave")).await;
    // Both nodes hold carol's channel, once each in the cluster.
    assert_eq!(
        cluster.shard_channels(&format!("{user_prefix}carol")),
        vec![format!("{user_prefix}carol")]
    );
    let r = dave.request(json!({"op":"dm","to":"carol","data":{"hi":1}})).await;
    assert_eq!(r["op"], "ok");
    for tab in [&mut tab1, &mut tab2] {
        assert_eq!(
            tab.recv().await.unwrap(),
            json!({"op":"dm","from":"dave","data":{"hi":1}})
        );
    }
    // The sender got nothing but its ok.
    let r = dave.request(json!({"op":"ping"})).await;
    assert_eq!(r["op"], "pong");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_and_json_clients_share_a_room_across_nodes() {
    let cluster = Cluster::shared();
    let base = config(Some(cluster), "enc");
    let a = Node::start(base.clone()).await;
    let b = Node::start(base.clone()).await;
    let mut json_client = Client::connect_with(&a.ws("?user=j"), Some("shardcast.v1.json")).await;
    let mut mp_client = Client::connect_with(&b.ws("?user=m"), Some("shardcast.v1.msgpack")).await;
    json_client.join("mixed").await;
    mp_client.join("mixed").await;
    json_client.publish("mixed", json!({"odds":[1.5, 2.25], "s":"é"})).await;
    mp_client.publish("mixed", json!({"n": -3})).await;
    for c in [&mut json_client, &mut mp_client] {
        let first: Value = c.recv().await.unwrap();
        assert_eq!(
            first,
            json!({"op":"msg","room":"mixed","from":"j","data":{"odds":[1.5, 2.25], "s":"é"}})
        );
        let second: Value = c.recv().await.unwrap();
        assert_eq!(second, json!({"op":"msg","room":"mixed","from":"m","data":{"n":-3}}));
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_with_4008_while_a_fast_one_misses_nothing() {
    let cluster = Cluster::shared();
    let mut base = config(Some(cluster), "slow");
    base.max_buffered_bytes = 256 << 10;
    base.close_grace = std::time::Duration::from_secs(15);
    let node = Node::start(base).await;

    // The slow client keeps a tiny receive window and then stops reading altogether.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(node.ws("?user=slow"), tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut slow = Client::from_ws(ws);
    slow.join("feed").await;
    let mut fast = Client::connect(&node.ws("?user=fast")).await;
    fast.join("feed").await;

    const N: u64 = 2500;
    let reader = tokio::spawn(async move {
        for seq in 0..N {
            let Some(v) = fast.recv().await else {
                panic!("fast client closed at seq {seq}: {:?}", fast.close_code().await)
            };
            assert_eq!(v["data"]["seq"], seq);
        }
    });
    let mut publisher = Client::connect(&node.ws("?user=pub")).await;
    let pad = "x".repeat(4000);
    for seq in 0..N {
        // Each publish waits for its ok, a pace a reading client keeps up with.
        publisher.publish("feed", json!({"seq":seq,"pad":pad})).await;
    }
    // ~10 MB went out: far past the slow socket's budget plus what the kernel buffers hold.
    reader.await.unwrap();
    // The slow client reads what was already in flight, then the 4008 close.
    assert_eq!(slow.close_code().await, Some(4008));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_needs_the_key_when_one_is_set() {
    let cluster = Cluster::shared();
    let mut base = config(Some(cluster), "http");
    base.api_key = Some("s3cret".into());
    let a = Node::start(base.clone()).await;
    let b = Node::start(base.clone()).await;
    let mut viewer = Client::connect(&b.ws("?user=v")).await;
    viewer.join("scores").await;
    let http = reqwest::Client::new();
    let body = json!({"room":"scores","data":{"home":2,"away":1}});
    let r = http.post(a.url("/publish")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unauthorized");
    let r = http
        .post(a.url("/publish"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(a.url("/publish"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        viewer.recv().await.unwrap(),
        json!({"op":"msg","room":"scores","from":"server","data":{"home":2,"away":1}})
    );
    let r = http
        .post(a.url("/publish"))
        .bearer_auth("s3cret")
        .json(&json!({"room":"scores","from":"bot","data":[1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(viewer.recv().await.unwrap()["from"], "bot");
    for (bad, code) in [
        (json!({"data":1}), "bad_frame"),
        (json!({"room":"","data":1}), "bad_room"),
        (json!({"room":"r","data":1,"from":"a\nb"}), "bad_user"),
    ] {
        let r = http
            .post(a.url("/publish"))
            .bearer_auth("s3cret")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["code"], code, "{bad}");
    }
    let r = http
        .post(a.url("/publish"))
        .bearer_auth("s3cret")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_master_cluster_from_the_scripts_carries_rooms() {
    // redis-cli refuses to create fewer than 3 masters; `redis-cluster/up` assembles it by hand.
    let cluster = Cluster::start(2, 0);
    assert!(cluster
        .redis_cli(cluster.ports[0], &["cluster", "info"])
        .contains("cluster_state:ok"));
    let mut cfg = config(Some(&cluster), "two");
    cfg.hot_rooms.insert("stadium".into(), 4);
    let a = Node::start(cfg.clone()).await;
    let b = Node::start(cfg).await;
    let mut viewer = Client::connect(&b.ws("?user=v")).await;
    viewer.join("stadium").await;
    let mut sender = Client::connect(&a.ws("?user=s")).await;
    for seq in 0..20 {
        sender.publish("stadium", json!({"seq": seq})).await;
    }
    let seen = collect(&mut viewer, "stadium", 20).await;
    assert_eq!(seen["s"].len(), 20);
    a.stop().await;
    b.stop().await;
}
