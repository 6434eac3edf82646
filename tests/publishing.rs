//! Publishes in flight on one connection, against a real Redis Cluster: answers in the order sent,
//! every node delivering one sender's messages in that order (with history and without), other
//! commands answered as soon as they are done, and the reader stopping at the window.

mod common;

use std::time::Duration;

use common::{config, fleet, Client, Cluster, Node};
use serde_json::{json, Value};
use shardcast::{config::Config, history::pos::Keep};

fn configs(cluster: &Cluster, test: &str, nodes: usize) -> Vec<Config> {
    let mut base = config(Some(cluster), test);
    base.history = vec![(
        glob::Pattern::new("kept*").unwrap(),
        Keep {
            size: 10_000,
            ttl: Duration::from_secs(600),
        },
    )];
    fleet(base, test, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_with_many_in_flight_gets_answers_in_order_and_every_node_its_order() {
    const N: i64 = 2000;
    let cluster = Cluster::shared();
    let mut nodes = Vec::new();
    for c in configs(cluster, "inflight", 3) {
        nodes.push(Node::start(c).await);
    }
    let mut fans = Vec::new();
    for n in &nodes {
        let mut fan = Client::connect(&n.ws("?user=fan")).await;
        fan.join("plain").await;
        fan.join("kept").await;
        fans.push(fan);
    }
    let mut feed = Client::connect(&nodes[0].ws("?user=feed")).await;
    // Everything sent before any answer is read: the node has up to its window in flight.
    for i in 1..=N {
        let room = if i % 2 == 0 { "kept" } else { "plain" };
        feed.send(json!({"op":"pub","room":room,"data":i,"id":i})).await;
    }
    let mut answers = Vec::new();
    while answers.len() < N as usize {
        let v = feed.recv().await.expect("an answer");
        if v["op"] == "ok" || v["op"] == "error" {
            answers.push(v);
        }
    }
    let ids: Vec<i64> = answers.iter().map(|a| a["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>(), "answers out of order");
    assert!(
        answers.iter().all(|a| a["op"] == "ok"),
        "refused: {:?}",
        answers.iter().find(|a| a["op"] != "ok")
    );
    // The room with history numbers them in the order sent.
    let numbers: Vec<u64> = answers
        .iter()
        .filter_map(|a| a["pos"].as_str())
        .map(|p| p.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), N as usize / 2);
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "positions out of order");
    for fan in &mut fans {
        let mut got: [Vec<i64>; 2] = [Vec::new(), Vec::new()];
        while got[0].len() + got[1].len() < N as usize {
            let m = fan.recv().await.expect("a message");
            if m["op"] == "msg" {
                got[usize::from(m["room"] == "kept")].push(m["data"].as_i64().unwrap());
            }
        }
        assert_eq!(got[0], (1..=N).filter(|i| i % 2 == 1).collect::<Vec<_>>(), "plain");
        assert_eq!(got[1], (1..=N).filter(|i| i % 2 == 0).collect::<Vec<_>>(), "kept");
    }
}

/// Sends ten publishes and a ping while every master holds writes back, and returns what came
/// back in order once they let go.
async fn while_redis_holds_writes(window: usize) -> Vec<Value> {
    // A cluster of its own: pausing it would stall other tests.
    let cluster = Cluster::start(3, 0);
    let node = Node::start(Config {
        max_inflight_publishes: window,
        ..config(Some(&cluster), "window")
    })
    .await;
    let mut c = Client::connect(&node.ws("?user=feed")).await;
    c.join("r").await;
    for port in &cluster.ports {
        cluster.redis_cli(*port, &["client", "pause", "1500", "write"]);
    }
    for i in 1..=10 {
        c.send(json!({"op":"pub","room":"r","data":i,"id":i})).await;
    }
    c.send(json!({"op":"ping","id":11})).await;
    let (mut answers, mut got) = (Vec::new(), Vec::new());
    while answers.len() < 11 || got.len() < 10 {
        let v = c.recv().await.expect("a frame");
        if v["op"] == "msg" {
            got.push(v["data"].clone());
        } else if v["id"].is_i64() {
            answers.push(v);
        }
    }
    // Nothing was dropped: every message reaches the room, in order.
    assert_eq!(got, (1..=10).map(|i| json!(i)).collect::<Vec<_>>());
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_commands_are_answered_at_once_and_the_reader_stops_at_the_window() {
    let ids = |answers: &[Value]| answers.iter().map(|a| a["id"].as_i64().unwrap()).collect::<Vec<_>>();
    // A window of 64: the ping after ten pending publishes is read and answered before them.
    let answers = while_redis_holds_writes(64).await;
    assert_eq!(answers[0]["op"], "pong", "{answers:?}");
    assert_eq!(ids(&answers), [11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // A window of 4: the reader takes no command past four pending publishes, so it reads the
    // ping only once answers left at most three of the ten pending: seven came before the pong.
    let answers = while_redis_holds_writes(4).await;
    let pong = answers.iter().position(|a| a["op"] == "pong").unwrap();
    assert!(pong >= 7, "the ping was read past a full window: {answers:?}");
    let publishes: Vec<i64> = ids(&answers).into_iter().filter(|i| *i != 11).collect();
    assert_eq!(publishes, (1..=10).collect::<Vec<_>>(), "{answers:?}");
    assert!(
        answers.iter().all(|a| a["op"] == "ok" || a["op"] == "pong"),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_sent_just_before_the_close_still_goes_out() {
    const FEEDS: i64 = 30;
    let cluster = Cluster::shared();
    let node = Node::start(configs(cluster, "lastword", 1).remove(0)).await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("plain").await;
    // Each feed publishes once and closes at once, without waiting for the answer: the node has
    // read the publish, so it goes out.
    for i in 0..FEEDS {
        let mut feed = Client::connect(&node.ws(&format!("?user=feed{i}"))).await;
        feed.send(json!({"op":"pub","room":"plain","data":{"i": i}})).await;
        feed.ws.close(None).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < FEEDS as usize {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), fan.recv()).await else {
            break;
        };
        if m["op"] == "msg" {
            got.push(m["data"]["i"].as_i64().unwrap());
        }
    }
    got.sort();
    assert_eq!(got, (0..FEEDS).collect::<Vec<_>>(), "publishes lost at their close");
    node.stop().await;
}
