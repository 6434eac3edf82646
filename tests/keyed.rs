//! Keyed messages: the latest value of each key on join (embedded and across two nodes on a real
//! Redis Cluster), no key going backwards across the switch to live, `GET /rooms/<room>/latest`,
//! one order per key, the key limit and the bad input around them, and conflation for a socket
//! that stops reading.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{config, eventually, fleet, Client, Cluster, Node};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Joins with `latest` and returns the frames sent before the `ok`, and the `ok`.
async fn join_latest(c: &mut Client, room: &str, extra: Value) -> (Vec<Value>, Value) {
    let mut cmd = json!({"op":"join","room":room,"latest":true});
    if let Value::Object(extra) = extra {
        cmd.as_object_mut().unwrap().extend(extra);
    }
    let ok = c.request(cmd).await;
    assert_eq!(ok["op"], "ok", "join {room}: {ok}");
    (c.inbox.drain(..).collect(), ok)
}

async fn pub_key(c: &mut Client, room: &str, key: &str, data: Value) -> Value {
    c.request(json!({"op":"pub","room":room,"key":key,"data":data})).await
}

/// The next `msg` frame.
async fn next_msg(c: &mut Client) -> Value {
    loop {
        let m = c.recv().await.expect("a message");
        if m["op"] == "msg" {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_latest_gets_each_keys_current_value_first_then_live_embedded() {
    let mut cfg = config(None, "latest-embedded");
    cfg.hot_rooms = HashMap::from([("hot".to_string(), 4)]);
    let node = Node::start(cfg).await;
    latest_then_live(&node, &node, "match:1").await;
    latest_then_live(&node, &node, "hot").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_latest_gets_each_keys_current_value_first_then_live_across_nodes() {
    let cluster = Cluster::shared();
    let mut cfg = config(Some(cluster), "latest-cluster");
    cfg.history = common::kept("kept*");
    cfg.hot_rooms = HashMap::from([("kept-hot".to_string(), 4), ("hot".to_string(), 4)]);
    let configs = fleet(cfg, "latest-cluster", 2);
    let a = Node::start(configs[0].clone()).await;
    let b = Node::start(configs[1].clone()).await;
    // A room without history, one with, each over four shards.
    latest_then_live(&a, &b, "hot").await;
    latest_then_live(&a, &b, "kept-hot").await;
    a.stop().await;
    b.stop().await;
}

/// Publishes on `a`, joins with `latest` on `b`: one frame per key, its newest value, marked, before
/// the `ok`; unkeyed messages are not among them; then live messages carry their key.
async fn latest_then_live(a: &Node, b: &Node, room: &str) {
    let mut feed = Client::connect(&a.ws("?user=feed")).await;
    for i in 1..=5 {
        let r = pub_key(&mut feed, room, "score", json!({"home": i, "away": 0})).await;
        assert_eq!(r["op"], "ok", "{r}");
    }
    for m in 1..=3 {
        let r = pub_key(&mut feed, room, &format!("odds:{m}"), json!(m * 10)).await;
        assert_eq!(r["op"], "ok", "{r}");
    }
    feed.publish(room, json!("a chat line")).await;
    let r = pub_key(&mut feed, room, "odds:2", json!(21)).await;
    assert_eq!(r["op"], "ok", "{r}");

    let mut fan = Client::connect(&b.ws("?user=fan")).await;
    let (first, _) = join_latest(&mut fan, room, json!({})).await;
    let values: HashMap<String, Value> = first
        .iter()
        .map(|m| {
            assert_eq!(
                (m["op"].as_str(), m["latest"].as_bool()),
                (Some("msg"), Some(true)),
                "{m}"
            );
            assert_eq!(m["from"], "feed");
            (m["key"].as_str().expect("a key").to_string(), m["data"].clone())
        })
        .collect();
    assert_eq!(first.len(), 4, "one value per key, no chat: {first:?}");
    assert_eq!(values["score"], json!({"home": 5, "away": 0}));
    assert_eq!(values["odds:1"], json!(10));
    assert_eq!(values["odds:2"], json!(21));
    assert_eq!(values["odds:3"], json!(30));

    // The same over HTTP, for a backend.
    let body: Value = reqwest::get(b.url(&format!("/rooms/{room}/latest")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["room"], room);
    let mut over_http: Vec<(String, Value)> = body["msgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["key"].as_str().unwrap().to_string(), m["data"].clone()))
        .collect();
    over_http.sort_by(|x, y| x.0.cmp(&y.0));
    let mut expected: Vec<(String, Value)> = values.into_iter().collect();
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(over_http, expected);

    let r = pub_key(&mut feed, room, "score", json!({"home": 6, "away": 0})).await;
    assert_eq!(r["op"], "ok", "{r}");
    let live = next_msg(&mut fan).await;
    assert_eq!(
        (live["key"].as_str(), live.get("latest")),
        (Some("score"), None),
        "{live}"
    );
    assert_eq!(live["data"]["home"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_goes_backwards_across_the_switch_to_live() {
    let cluster = Cluster::shared();
    let mut cfg = config(Some(cluster), "latest-order");
    cfg.hot_rooms = HashMap::from([("tick".to_string(), 2)]);
    let configs = fleet(cfg, "latest-order", 2);
    let a = Node::start(configs[0].clone()).await;
    let b = Node::start(configs[1].clone()).await;
    let addr = a.ws("?user=ticker");
    // One publisher pushes the key's value up, without waiting for each answer, while viewers join.
    let ticker = tokio::spawn(async move {
        let mut feed = Client::connect(&addr).await;
        for i in 0..3000u64 {
            feed.send(json!({"op":"pub","room":"tick","key":"clock","data":i}))
                .await;
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        feed
    });
    let mut joined = 0;
    for v in 0..20 {
        let mut fan = Client::connect(&b.ws(&format!("?user=v{v}"))).await;
        let (first, _) = join_latest(&mut fan, "tick", json!({})).await;
        let mut last = first.iter().map(|m| m["data"].as_u64().unwrap()).max();
        joined += usize::from(last.is_some());
        // The next live values: each newer than the one before, the first newer than the latest.
        for _ in 0..20 {
            let m = match tokio::time::timeout(Duration::from_secs(2), next_msg(&mut fan)).await {
                Ok(m) => m,
                Err(_) => break,
            };
            let n = m["data"].as_u64().unwrap();
            assert!(last.is_none_or(|l| n > l), "viewer {v}: {n} after {last:?}");
            last = Some(n);
        }
    }
    assert!(joined > 10, "most joins found a value to start from ({joined})");
    drop(ticker.await.unwrap());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_update_of_a_key_takes_one_shard_whoever_publishes_it() {
    let mut cfg = config(None, "key-shard");
    cfg.history = common::kept("*");
    cfg.hot_rooms = HashMap::from([("stadium".to_string(), 8)]);
    let node = Node::start(cfg).await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("stadium").await;
    let mut shards: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for sender in 0..6 {
        let mut c = Client::connect(&node.ws(&format!("?user=s{sender}"))).await;
        for key in ["score", "clock", "odds:1"] {
            let r = pub_key(&mut c, "stadium", key, json!(sender)).await;
            assert_eq!(r["op"], "ok", "{r}");
        }
    }
    for _ in 0..18 {
        let m = next_msg(&mut fan).await;
        let n: u64 = m["pos"].as_str().unwrap().split(':').nth(1).unwrap().parse().unwrap();
        shards
            .entry(m["key"].as_str().unwrap().to_string())
            .or_default()
            .push((m["shard"].as_u64().unwrap(), n));
    }
    for (key, seen) in shards {
        assert_eq!(seen.len(), 6, "{key}");
        assert!(
            seen.iter().all(|(s, _)| *s == seen[0].0),
            "{key} on one shard: {seen:?}"
        );
        assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "{key} in order: {seen:?}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_limit_and_bad_keys_publish_nothing_and_values_expire() {
    let cluster = Cluster::shared();
    let mut cfg = config(Some(cluster), "key-limit");
    cfg.max_keys_per_room = 3;
    cfg.latest_ttl = Duration::from_secs(2);
    let node = Node::start(cfg).await;
    let mut feed = Client::connect(&node.ws("?user=feed")).await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("limits").await;
    for key in ["a", "b", "c"] {
        assert_eq!(pub_key(&mut feed, "limits", key, json!(key)).await["op"], "ok");
    }
    let r = pub_key(&mut feed, "limits", "d", json!("d")).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("too_many_keys")),
        "{r}"
    );
    // A key it has is updated; unkeyed messages are not counted.
    assert_eq!(pub_key(&mut feed, "limits", "a", json!("a2")).await["op"], "ok");
    feed.publish("limits", json!("chat")).await;
    for bad in [
        json!("{x}"),
        json!("a\u{7}b"),
        json!("a\u{202e}b"),
        json!(""),
        json!("k".repeat(129)),
        json!(7),
    ] {
        let r = feed
            .request(json!({"op":"pub","room":"limits","key":bad,"data":"x"}))
            .await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("bad_field")),
            "{bad}: {r}"
        );
    }
    // Over HTTP too: a bad key is a 400, the limit a 409, and nothing is published.
    let http = reqwest::Client::new();
    let post = |body: Value| http.post(node.url("/publish")).json(&body).send();
    assert_eq!(
        post(json!({"room":"limits","key":"{x}","data":1}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post(json!({"room":"limits","key":"e","data":1}))
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        post(json!({"room":"limits","key":"b","data":"b2"}))
            .await
            .unwrap()
            .status(),
        202
    );
    let got: Vec<Value> = {
        let mut got = Vec::new();
        while got.len() < 6 {
            got.push(next_msg(&mut fan).await["data"].clone());
        }
        got
    };
    assert_eq!(
        got,
        [
            json!("a"),
            json!("b"),
            json!("c"),
            json!("a2"),
            json!("chat"),
            json!("b2")
        ]
    );
    // The connection is fine after all of it, and the values go once not updated for the ttl.
    let (first, _) = join_latest(&mut feed, "limits", json!({})).await;
    assert_eq!(first.len(), 3, "{first:?}");
    let url = node.url("/rooms/limits/latest");
    eventually("the values to expire", || async {
        let body: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        body["msgs"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert_eq!(
        pub_key(&mut feed, "limits", "d", json!("d")).await["op"],
        "ok",
        "room for new keys"
    );
    node.stop().await;
}

/// A socket joins a room and stops reading while 3000 values go by ([`common::stalled_phone`]);
/// then it reads. With conflation it was never dropped and gets each key's last value; without,
/// it was closed with 4008.
const VALUES: u64 = common::STALLED_VALUES;

async fn stalled_reader(conflate: bool) -> (Vec<Value>, Option<u16>) {
    let mut cfg = config(None, "conflate");
    cfg.max_buffered_bytes = 256 * 1024;
    if conflate {
        cfg.conflate = vec![glob::Pattern::new("match:*").unwrap()];
        cfg.conflate_above = Some(32 * 1024);
    }
    let node = Node::start(cfg).await;
    let mut ws = common::stalled_phone(&node, json!({}), conflate).await;
    let mut got = Vec::new();
    let mut code = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let end = v["data"]["chat"] == "end";
                got.push(v);
                if end {
                    break;
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    node.stop().await;
    (got, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_reading_is_conflated_to_each_keys_latest_value_not_dropped() {
    let (got, code) = stalled_reader(true).await;
    assert_eq!(code, None, "not closed");
    let keyed: Vec<&Value> = got.iter().filter(|m| m["key"].is_string()).collect();
    let chat: Vec<&Value> = got.iter().filter(|m| m["key"].is_null()).collect();
    assert_eq!(chat.len(), 5, "every unkeyed message, none conflated");
    assert!(
        keyed.len() < 1000,
        "values were conflated: {} of {VALUES} sent",
        keyed.len()
    );
    let skipped: u64 = keyed.iter().filter_map(|m| m["skipped"].as_u64()).sum();
    assert_eq!(
        keyed.len() as u64 + skipped,
        VALUES,
        "each value sent or counted as skipped"
    );
    for key in ["score", "clock"] {
        let mine: Vec<u64> = keyed
            .iter()
            .filter(|m| m["key"] == key)
            .map(|m| m["data"]["i"].as_u64().unwrap())
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{key} in order");
        let last = if key == "score" { VALUES - 2 } else { VALUES - 1 };
        assert_eq!(mine.last(), Some(&last), "{key}'s last value");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_conflation_a_socket_that_stops_reading_is_dropped() {
    let (_, code) = stalled_reader(false).await;
    assert_eq!(code, Some(4008));
}

/// A join on a node that has delivered nothing on some shards of a room with history (a node
/// started a moment ago, a quiet shard) goes live at once: it used to be held until every shard
/// had a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_join_on_a_fresh_node_goes_live_though_some_shards_are_quiet() {
    let cluster = Cluster::shared();
    let mut cfg = config(Some(cluster), "fresh-hist");
    cfg.history = common::kept("kept*");
    cfg.hot_rooms = HashMap::from([("kept-hot".to_string(), 4)]);
    let configs = fleet(cfg, "fresh-hist", 2);
    let a = Node::start(configs[0].clone()).await;
    let b = Node::start(configs[1].clone()).await;
    // Senders over every shard, then one live message on one of them.
    for u in 0..8 {
        let mut c = Client::connect(&a.ws(&format!("?user=u{u}"))).await;
        c.publish("kept-hot", json!(u)).await;
    }
    let mut fan = Client::connect(&b.ws("?user=fan")).await;
    fan.join("kept-hot").await;
    let mut feed = Client::connect(&a.ws("?user=feed")).await;
    feed.publish("kept-hot", json!("live")).await;
    let m = tokio::time::timeout(Duration::from_secs(10), next_msg(&mut fan))
        .await
        .expect("the live message in time");
    assert_eq!(m["data"], "live");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_sends_at_most_that_many_values_per_key_a_second_and_the_last_one_always() {
    let node = Node::start(config(None, "max-rate")).await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    let (first, _) = join_latest(&mut fan, "paced", json!({"max_rate": 2})).await;
    assert!(first.is_empty());
    let mut feed = Client::connect(&node.ws("?user=feed")).await;
    let started = std::time::Instant::now();
    for i in 0..60u64 {
        feed.send(json!({"op":"pub","room":"paced","key":"score","data":i}))
            .await;
        if i % 20 == 0 {
            feed.publish("paced", json!({"chat": i})).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut scores, mut chat, mut skipped) = (Vec::new(), 0, 0);
    while scores.last() != Some(&59) {
        let m = next_msg(&mut fan).await;
        if m["key"] == "score" {
            scores.push(m["data"].as_u64().unwrap());
            skipped += m["skipped"].as_u64().unwrap_or(0);
        } else {
            chat += 1;
        }
    }
    let took = started.elapsed().as_secs_f64();
    assert_eq!(chat, 3, "unkeyed messages are not paced");
    assert!(scores.windows(2).all(|w| w[0] < w[1]), "in order: {scores:?}");
    assert!(
        scores.len() as f64 <= took * 2.0 + 2.0,
        "{} values in {took:.1}s at max_rate 2: {scores:?}",
        scores.len()
    );
    assert_eq!(
        scores.len() as u64 + skipped,
        60,
        "each value sent or counted as skipped"
    );
    for bad in [json!(0), json!(1001), json!("2"), json!(1.5)] {
        let r = fan.request(json!({"op":"join","room":"other","max_rate":bad})).await;
        assert_eq!(r["code"], "bad_field", "{bad}: {r}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_since_the_replay_wins_where_it_recovers_and_the_latest_values_where_it_cannot() {
    let mut cfg = config(None, "since-latest");
    cfg.history = common::kept("kept*");
    let node = Node::start(cfg).await;
    let mut feed = Client::connect(&node.ws("?user=feed")).await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    let ok = fan.request(json!({"op":"join","room":"kept","id":1})).await;
    let at = ok["pos"].clone();
    for i in 0..3 {
        assert_eq!(pub_key(&mut feed, "kept", "score", json!(i)).await["op"], "ok");
    }
    feed.publish("kept", json!("chat")).await;
    // Resuming from where it was: the replay, every message missed, none marked latest.
    let mut back = Client::connect(&node.ws("?user=fan")).await;
    let (first, ok) = join_latest(&mut back, "kept", json!({"since": at})).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    let data: Vec<Value> = first.iter().map(|m| m["data"].clone()).collect();
    assert_eq!(data, [json!(0), json!(1), json!(2), json!("chat")]);
    assert!(first.iter().all(|m| m.get("latest").is_none()));
    // From a position of a stream that is gone: not recovered, the keys' latest values instead.
    let mut lost = Client::connect(&node.ws("?user=fan")).await;
    let (first, ok) = join_latest(&mut lost, "kept", json!({"since": ["1:5"]})).await;
    assert_eq!(ok["recovered"], false, "{ok}");
    let data: Vec<(Value, Value)> = first.iter().map(|m| (m["data"].clone(), m["latest"].clone())).collect();
    assert_eq!(data, [(json!(2), json!(true))]);
    node.stop().await;
}
