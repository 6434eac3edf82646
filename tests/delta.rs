//! Shared deltas per key, over real sockets: a socket that joined with `delta` rebuilds every keyed
//! value from whole values and fossil deltas, in JSON and MessagePack; a whole value comes at
//! least every `--delta-full-every` messages of a key and to a socket that lacks the base (it just
//! joined); `latest` and recovered messages are whole values; a conflated socket rebuilds every
//! value it is sent; sockets that did not ask for deltas see none.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{config, eventually, fleet, Client, Cluster, Node};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A match's state: a few hundred bytes of which each update changes a little.
fn state(i: u64) -> Value {
    json!({
        "home": "Arsenal", "away": "Chelsea", "venue": "Emirates Stadium",
        "score": [i / 7, i / 11], "minute": i, "possession": [50 + i % 9, 50 - i % 9],
        "events": (0..i.min(6)).map(|e| format!("event {e} of the match so far")).collect::<Vec<_>>(),
    })
}

/// What a socket that joined with `delta` keeps to rebuild values: each key's last value bytes.
#[derive(Default)]
struct Rebuilt {
    last: HashMap<String, Vec<u8>>,
    deltas: u32,
    wholes: u32,
}

impl Rebuilt {
    /// The value a keyed frame carries: whole (`delta:false`) or rebuilt from the key's last value.
    fn value(&mut self, key: &str, delta: bool, data: &[u8]) -> Vec<u8> {
        let value = if delta {
            self.deltas += 1;
            let base = self.last.get(key).expect("a delta comes only after a value of its key");
            fossil_delta::apply(base, data).expect("the delta applies")
        } else {
            self.wholes += 1;
            data.to_vec()
        };
        self.last.insert(key.to_string(), value.clone());
        value
    }

    /// The data of a JSON `msg` frame as the app would see it.
    fn json(&mut self, m: &Value) -> Value {
        match (m["key"].as_str(), m["delta"].as_bool()) {
            (Some(key), Some(delta)) => {
                let data = m["data"].as_str().expect("data of a delta-mode frame is a string");
                serde_json::from_slice(&self.value(key, delta, data.as_bytes())).expect("a JSON value")
            }
            _ => m["data"].clone(),
        }
    }

    /// The data of a MessagePack `msg` frame, and the frame's key.
    fn msgpack(&mut self, frame: &[u8]) -> (Option<String>, Value) {
        let m = rmpv::decode::read_value(&mut &frame[..]).expect("a MessagePack frame");
        let field = |name: &str| {
            m.as_map()
                .unwrap()
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v)
        };
        let key = field("key").and_then(|k| k.as_str()).map(str::to_string);
        let data = field("data").expect("data");
        let value = match (&key, field("delta").and_then(rmpv::Value::as_bool)) {
            (Some(key), Some(delta)) => {
                let bytes = data.as_slice().expect("data of a delta-mode frame is bin");
                let value = self.value(key, delta, bytes);
                rmpv::decode::read_value(&mut &value[..]).expect("a MessagePack value")
            }
            _ => data.clone(),
        };
        (key, rmpv::ext::from_value::<Value>(value).unwrap())
    }
}

/// The next `msg` frame of a JSON client.
async fn next_msg(c: &mut Client) -> Value {
    loop {
        let m = c.recv().await.expect("a message");
        if m["op"] == "msg" {
            return m;
        }
    }
}

async fn join(c: &mut Client, room: &str, extra: Value) -> Value {
    let mut cmd = json!({"op":"join","room":room});
    cmd.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let ok = c.request(cmd).await;
    assert_eq!(ok["op"], "ok", "join {room}: {ok}");
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_socket_rebuilds_every_value_from_shared_deltas_in_both_encodings() {
    let mut cfg = config(None, "delta-embedded");
    cfg.delta_full_every = 5;
    let node = Node::start(cfg).await;
    let mut a = Client::connect(&node.ws("?user=a")).await;
    let mut b = Client::connect(&node.ws("?user=b")).await;
    let mut plain = Client::connect(&node.ws("?user=plain")).await;
    let mut packed = Client::connect_with(&node.ws("?user=packed"), Some("shardcast.v1.msgpack")).await;
    join(&mut a, "match:1", json!({"delta": true})).await;
    join(&mut b, "match:1", json!({"delta": true})).await;
    join(&mut plain, "match:1", json!({})).await;
    join(&mut packed, "match:1", json!({"delta": true})).await;

    let mut feed = Client::connect(&node.ws("?user=feed")).await;
    const N: u64 = 40;
    let mut late = None;
    for i in 1..=N {
        let r = feed
            .request(json!({"op":"pub","room":"match:1","key":"state","data":state(i)}))
            .await;
        assert_eq!(r["op"], "ok", "{r}");
        if i % 10 == 0 {
            feed.publish("match:1", json!({"chat": i})).await;
        }
        if i == 22 {
            // A socket that joins now lacks the base of the next value, a delta for the others.
            let mut c = Client::connect(&node.ws("?user=late")).await;
            join(&mut c, "match:1", json!({"delta": true})).await;
            late = Some(c);
        }
    }

    let (mut ra, mut rb, mut rp) = (Rebuilt::default(), Rebuilt::default(), Rebuilt::default());
    for i in 1..=N {
        let (ma, mb, mp) = (
            next_msg(&mut a).await,
            next_msg(&mut b).await,
            next_msg(&mut plain).await,
        );
        assert_eq!(ma, mb, "the same frame for both delta sockets");
        assert_eq!(ra.json(&ma), state(i), "value {i} rebuilt");
        rb.json(&mb);
        assert!(
            mp.get("delta").is_none(),
            "a socket that did not ask sees no delta: {mp}"
        );
        assert_eq!(mp["data"], state(i));
        let (key, value) = rp.msgpack(&next_packed(&mut packed).await);
        assert_eq!(
            (key.as_deref(), value),
            (Some("state"), state(i)),
            "MessagePack value {i}"
        );
        if i % 10 == 0 {
            let chat = next_msg(&mut a).await;
            assert!(
                chat.get("delta").is_none() && chat["data"] == json!({"chat": i}),
                "{chat}"
            );
            next_msg(&mut b).await;
            next_msg(&mut plain).await;
            next_packed(&mut packed).await;
        }
        if i == 23 {
            assert_eq!(ma["delta"], true, "value 23 is a delta for a socket that has 22: {ma}");
        }
    }
    // Of every 5 values of a key one is whole; the rest are deltas.
    assert_eq!(ra.wholes, (N / 5) as u32, "wholes");
    assert_eq!(ra.deltas, N as u32 - ra.wholes, "deltas");
    assert_eq!(rp.deltas, ra.deltas, "MessagePack sockets get deltas as often");

    // The late socket's first value is whole, then it rebuilds the rest.
    let mut late = late.unwrap();
    let mut rl = Rebuilt::default();
    for i in 23..=N {
        let m = next_msg(&mut late).await;
        if i == 23 {
            assert_eq!(m["delta"], false, "the late socket's first value is whole: {m}");
        }
        assert_eq!(rl.json(&m), state(i), "value {i} on the late socket");
        if i % 10 == 0 {
            next_msg(&mut late).await;
        }
    }
    assert!(rl.deltas > 0, "the late socket takes deltas once it has a value");

    let metrics = node.url("/metrics");
    eventually("the delta metrics", || async {
        common::metric(&metrics, "shardcast_delta_values_total{form=\"delta\"}")
            .await
            .is_some_and(|v| v > 0.0)
    })
    .await;
    node.stop().await;
}

/// The next `msg` frame of a MessagePack socket, as bytes.
async fn next_packed(c: &mut Client) -> Vec<u8> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), c.ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .unwrap();
        if let Message::Binary(b) = msg {
            let m = rmpv::decode::read_value(&mut &b[..]).unwrap();
            let op = m
                .as_map()
                .unwrap()
                .iter()
                .find(|(k, _)| k.as_str() == Some("op"))
                .map(|(_, v)| v.clone());
            if op.as_ref().and_then(rmpv::Value::as_str) == Some("msg") {
                return b.to_vec();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_and_recovered_messages_are_whole_and_deltas_cross_nodes() {
    let cluster = Cluster::shared();
    let mut cfg = config(Some(cluster), "delta-cluster");
    cfg.history = common::kept("kept*");
    cfg.hot_rooms = HashMap::from([("kept".to_string(), 2)]);
    let configs = fleet(cfg, "delta-cluster", 2);
    let a = Node::start(configs[0].clone()).await;
    let b = Node::start(configs[1].clone()).await;

    let mut feed = Client::connect(&a.ws("?user=feed")).await;
    let mut viewer = Client::connect(&b.ws("?user=viewer")).await;
    let since = join(&mut viewer, "kept", json!({"delta": true})).await["pos"].clone();
    for i in 1..=10 {
        let r = feed
            .request(json!({"op":"pub","room":"kept","key":"state","data":state(i)}))
            .await;
        assert_eq!(r["op"], "ok", "{r}");
    }
    let mut rv = Rebuilt::default();
    for i in 1..=10 {
        let m = next_msg(&mut viewer).await;
        assert_eq!(rv.json(&m), state(i), "value {i} across nodes");
    }
    assert!(rv.deltas >= 8, "deltas across nodes: {}", rv.deltas);

    // Messages recovered since a position are whole, as is the latest value on a join with latest.
    let mut back = Client::connect(&b.ws("?user=back")).await;
    join(&mut back, "kept", json!({"delta": true, "since": since})).await;
    let recovered: Vec<Value> = back.inbox.drain(..).collect();
    for m in &recovered {
        assert!(m.get("delta").is_none(), "recovered whole, as the app reads it: {m}");
    }
    let minutes: Vec<u64> = recovered
        .iter()
        .map(|m| m["data"]["minute"].as_u64().unwrap())
        .collect();
    assert_eq!(minutes, (1..=10).collect::<Vec<_>>(), "every message recovered");
    let mut joiner = Client::connect(&b.ws("?user=joiner")).await;
    let latest: Vec<Value> = {
        join(&mut joiner, "kept", json!({"delta": true, "latest": true})).await;
        joiner.inbox.drain(..).collect()
    };
    assert_eq!(latest.len(), 1, "one latest value: {latest:?}");
    assert_eq!(latest[0]["latest"], true);
    assert!(
        latest[0].get("delta").is_none(),
        "the latest value is whole: {}",
        latest[0]
    );
    assert_eq!(latest[0]["data"], state(10));
    let mut rj = Rebuilt::default();
    feed.request(json!({"op":"pub","room":"kept","key":"state","data":state(11)}))
        .await;
    let m = next_msg(&mut joiner).await;
    assert_eq!(rj.json(&m), state(11));
    a.stop().await;
    b.stop().await;
}

/// A phone on a weak link that joined with `delta` in a conflated room stops reading while 3,000
/// values go by, then reads: every value it is sent rebuilds to one that was published, in order,
/// ending on each key's last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflated_delta_socket_rebuilds_every_value_it_is_sent() {
    const VALUES: u64 = common::STALLED_VALUES;
    let mut cfg = config(None, "delta-conflate");
    cfg.max_buffered_bytes = 256 * 1024;
    cfg.conflate = vec![glob::Pattern::new("match:*").unwrap()];
    cfg.conflate_above = Some(32 * 1024);
    let node = Node::start(cfg).await;
    let mut ws = common::stalled_phone(&node, json!({"delta": true}), true).await;
    let pad = "x".repeat(2000);

    let mut rebuilt = Rebuilt::default();
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .unwrap();
        let Message::Text(t) = msg else {
            assert!(!matches!(msg, Message::Close(_)), "closed: {msg:?}");
            continue;
        };
        let m: Value = serde_json::from_str(&t).unwrap();
        let data = rebuilt.json(&m);
        if data["chat"] == "end" {
            break;
        }
        if m["key"].is_null() {
            continue;
        }
        let key = m["key"].as_str().unwrap().to_string();
        seen.entry(key).or_default().push(data["i"].as_u64().unwrap());
        assert_eq!(data["pad"], pad.as_str());
    }
    for (key, last) in [("score", VALUES - 2), ("clock", VALUES - 1)] {
        let mine = &seen[key];
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{key} in order");
        assert_eq!(mine.last(), Some(&last), "{key}'s last value");
    }
    assert!(rebuilt.deltas > 0, "deltas before it fell behind");
    node.stop().await;
}
