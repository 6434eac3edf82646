//! Presence over a real Redis Cluster and real sockets: exact counts after churn across three
//! nodes, a node killed with `kill -9` dropping out within the TTL, a user's two tabs on two nodes
//! joining and leaving once, a user who arrives before a watcher's first event listed or announced
//! once, one write per node per tick under a storm of joins, and bad input.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{config, eventually, fleet, hs256, now, Client, Cluster, Node, Process, SECRET};
use futures_util::{stream, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use shardcast::config::{Config, JwtKey};
use tokio::sync::Mutex;

/// The defaults: a tick of 1 s, contributions living 3 s.
const TICK: Duration = Duration::from_secs(1);
const TTL: Duration = Duration::from_secs(3);
/// What a loaded two-core machine may add to a deadline counted in ticks (the node's tick task
/// and the test's own polling share the two cores with thousands of sockets).
const GRACE: Duration = Duration::from_secs(1);

/// Connects `n` clients, the `i`th to `urls[i % len]` as user `name(i)`, a few hundred at a time.
async fn connect_many(urls: &[String], n: usize, name: impl Fn(usize) -> String) -> Vec<Client> {
    let urls = urls.to_vec();
    stream::iter(0..n)
        .map(|i| {
            let url = format!("{}?user={}", urls[i % urls.len()], name(i));
            async move { Client::connect(&url).await }
        })
        .buffered(200)
        .collect()
        .await
}

async fn presence_of(client: &mut Client, room: &str) -> Value {
    let r = client.request(json!({"op":"presence","room":room})).await;
    assert_eq!(r["op"], "ok", "presence {room}: {r}");
    r
}

/// Asks until the room's count is `want`, failing the test at the deadline.
async fn until_count(asker: &mut Client, room: &str, want: u64) {
    let start = Instant::now();
    loop {
        let r = presence_of(asker, room).await;
        if r["count"] == want {
            return;
        }
        assert!(
            start.elapsed() < common::WAIT,
            "count stuck at {} (want {want})",
            r["count"]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn http_json(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_churn_of_5000_clients_over_three_nodes_every_node_counts_exactly_within_two_ticks() {
    let cluster = Cluster::shared();
    let mut nodes = Vec::new();
    for c in fleet(config(Some(cluster), "churn"), "churn", 3) {
        nodes.push(Node::start(c).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.ws("")).collect();
    const CLIENTS: usize = 5000;
    let room = "arena";
    let clients = connect_many(&urls, CLIENTS, |i| format!("fan{i}")).await;
    // Each client with whether it is in the room now.
    let clients: Vec<Arc<Mutex<(Client, bool)>>> = stream::iter(clients)
        .map(|mut c| async move {
            c.join(room).await;
            Arc::new(Mutex::new((c, true)))
        })
        .buffered(200)
        .collect()
        .await;

    // Churn: leaves, joins, and reconnects to another node, on random clients for 3 s at most
    // and 6,000 operations at most, eight at a time.
    let started = Instant::now();
    let ops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (clients, urls, ops) = (clients.clone(), urls.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_secs(3)
                && ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 6000
            {
                let (i, what, node) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..CLIENTS),
                        rng.random_range(0..3),
                        rng.random_range(0..3),
                    )
                };
                let mut slot = clients[i].lock().await;
                let (client, joined) = &mut *slot;
                match (what, *joined) {
                    (0, true) => {
                        let r = client.request(json!({"op":"leave","room":room})).await;
                        assert_eq!(r["op"], "ok", "{r}");
                        *joined = false;
                    }
                    (0, false) | (1, false) => {
                        client.join(room).await;
                        *joined = true;
                    }
                    (1, true) => {}
                    _ => {
                        // Closed and opened again on any node, back in the room or not.
                        let _ = client.ws.close(None).await;
                        *client = Client::connect(&format!("{}?user=fan{i}", urls[node])).await;
                        *joined = node != 0;
                        if *joined {
                            client.join(room).await;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut expected = 0;
    for c in &clients {
        expected += u64::from(c.lock().await.1);
    }
    let churned = Instant::now();
    eprintln!(
        "churn: {} operations in {:?}, {expected} of {CLIENTS} in the room",
        ops.load(std::sync::atomic::Ordering::Relaxed).min(6000),
        churned - started
    );
    assert!(expected > 1000 && expected < CLIENTS as u64, "{expected}");

    let mut askers = Vec::new();
    for n in &nodes {
        askers.push(Client::connect(&n.ws("?user=asker")).await);
    }
    // When each node first answered the exact count (and kept to it).
    let mut settled = vec![None; nodes.len()];
    while settled.iter().any(Option::is_none) {
        assert!(churned.elapsed() < common::WAIT, "counts never settled: {settled:?}");
        for (i, a) in askers.iter_mut().enumerate() {
            let r = presence_of(a, room).await;
            // Past --presence-list-max: counted, not listed.
            assert!(r.get("users").is_none(), "{r}");
            if r["count"] == json!(expected) {
                settled[i].get_or_insert(churned.elapsed());
            } else {
                settled[i] = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let took = settled.iter().flatten().max().copied().unwrap();
    eprintln!("exact on every node {took:?} after the churn stopped (tick {TICK:?})");
    assert!(took <= TICK * 2 + GRACE, "exact only after {took:?}");
    // The HTTP view agrees.
    for n in &nodes {
        let (status, body) = http_json(&n.url(&format!("/rooms/{room}/presence"))).await;
        assert_eq!((status, &body["count"]), (200, &json!(expected)), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_9_drops_out_of_presence_within_the_ttl_and_a_tick() {
    let cluster = Cluster::shared();
    let base = config(Some(cluster), "kill");
    // Its clients connect 200 at a time and do not retry a refused upgrade, as real ones do: no
    // bound on handshakes.
    let doomed = Process::spawn(&[
        "--redis",
        &cluster.url,
        "--channel-prefix",
        &base.channel_prefix,
        "--user-channel-prefix",
        &base.user_channel_prefix,
        "--command-rate",
        "100000",
        "--command-burst",
        "100000",
        "--max-handshakes",
        "100000",
    ]);
    eventually("the process is ready", || async {
        common::status(&doomed.url("/readyz")).await == 200
    })
    .await;
    let survivor = Node::start(base).await;
    let room = "crowd";
    let mut on_doomed = connect_many(&[doomed.ws("")], 1000, |i| format!("p{i}")).await;
    for c in &mut on_doomed {
        c.join(room).await;
    }
    let mut on_survivor = connect_many(&[survivor.ws("")], 10, |i| format!("s{i}")).await;
    for c in &mut on_survivor {
        c.join(room).await;
    }
    // A user with a connection on each node, in the room on the survivor only.
    let _dual_doomed = Client::connect(&doomed.ws("?user=dual")).await;
    let mut dual = Client::connect(&survivor.ws("?user=dual")).await;
    dual.join(room).await;

    let mut asker = Client::connect(&survivor.ws("?user=asker")).await;
    until_count(&mut asker, room, 1011).await;
    let users = |u: &str| survivor.url(&format!("/users/{u}"));
    // Users' state is written on the tick, which may come after the room's count.
    eventually("both of dual's connections and p7's counted", || async {
        http_json(&users("dual")).await.1 == json!({"online":true,"connections":2})
            && http_json(&users("p7")).await.1 == json!({"online":true,"connections":1})
    })
    .await;

    doomed.signal("-9");
    let killed = Instant::now();
    until_count(&mut asker, room, 11).await;
    let took = killed.elapsed();
    eprintln!("count dropped by 1,000 {took:?} after kill -9 (TTL {TTL:?}, tick {TICK:?})");
    assert!(took <= TTL + TICK + GRACE, "dropped only after {took:?}");
    eventually("its users offline, the one with another connection online", || async {
        http_json(&users("p7")).await.1 == json!({"online":false,"connections":0})
            && http_json(&users("dual")).await.1 == json!({"online":true,"connections":1})
    })
    .await;
    drop(on_doomed);
}

/// Reads a watcher's frames until `until` holds for one, returning all it read.
async fn frames_until(watcher: &mut Client, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = watcher.recv().await.expect("watcher open");
        let done = until(&v);
        seen.push(v);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_tabs_on_two_nodes_joins_once_and_leaves_with_the_last_tab() {
    let cluster = Cluster::shared();
    let configs = fleet(config(Some(cluster), "tabs"), "tabs", 3);
    let contribution = |c: &Config| format!("{{{}lounge}}:presence:{}", c.channel_prefix, c.node_id);
    let b_key = contribution(&configs[1]);
    let mut nodes = Vec::new();
    for c in configs {
        nodes.push(Node::start(c).await);
    }
    let room = "lounge";
    let mut watcher = Client::connect(&nodes[2].ws("?user=watcher")).await;
    let r = watcher.request(json!({"op":"join","room":room,"presence":true})).await;
    assert_eq!(r["op"], "ok", "{r}");
    let first = frames_until(&mut watcher, |v| v["op"] == "presence").await;
    assert_eq!(first.last().unwrap()["count"], 1, "{first:?}");

    let mut tab1 = Client::connect(&nodes[0].ws("?user=ann")).await;
    tab1.join(room).await;
    let mut seen = frames_until(&mut watcher, |v| v["op"] == "joined").await;
    // The second tab is written into node B's contribution before the first one leaves.
    let mut tab2 = Client::connect(&nodes[1].ws("?user=ann")).await;
    tab2.join(room).await;
    let slot = cluster.slot(&b_key);
    eventually("node B's contribution lists ann", || async {
        cluster
            .redis_cli(cluster.owner_of(slot), &["get", &b_key])
            .contains("ann")
    })
    .await;
    let r = tab1.request(json!({"op":"leave","room":room})).await;
    assert_eq!(r["op"], "ok");
    drop(tab2);
    seen.extend(frames_until(&mut watcher, |v| v["op"] == "left").await);
    // A marker: once bob's join is heard, everything about ann before it has been heard too.
    let mut bob = Client::connect(&nodes[0].ws("?user=bob")).await;
    bob.join(room).await;
    seen.extend(frames_until(&mut watcher, |v| v["op"] == "joined" && v["user"] == "bob").await);
    let about_ann: Vec<&str> = seen
        .iter()
        .filter(|v| v["user"] == "ann")
        .map(|v| v["op"].as_str().unwrap())
        .collect();
    assert_eq!(about_ann, ["joined", "left"], "{seen:?}");
    for v in &seen {
        assert_eq!(v["room"], room, "{v}");
    }
    let counts: Vec<&Value> = seen
        .iter()
        .filter(|v| v["op"] == "presence")
        .map(|v| &v["count"])
        .collect();
    assert_eq!(counts, [&json!(2), &json!(1), &json!(2)], "{seen:?}");
}

/// The match-day report's deadline: counts settle within two ticks, and a loaded machine adds more.
const LEARN_WITHIN: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_arrives_before_the_watchers_first_event_is_listed_or_announced_once() {
    let cluster = Cluster::shared();
    let mut nodes = Vec::new();
    for c in fleet(config(Some(cluster), "early"), "early", 2) {
        nodes.push(Node::start(c).await);
    }
    let room = "final";
    let mut watcher = Client::connect(&nodes[0].ws("?user=watcher")).await;
    let r = watcher.request(json!({"op":"join","room":room,"presence":true})).await;
    assert_eq!(r["op"], "ok", "{r}");
    // Right after the ok, before the watcher's first tick: kim, with a tab on each node.
    let mut tab_a = Client::connect(&nodes[0].ws("?user=kim")).await;
    let mut tab_b = Client::connect(&nodes[1].ws("?user=kim")).await;
    tab_a.join(room).await;
    tab_b.join(room).await;

    // Kim is learned from the first event's list or from a `joined`, whichever tick she landed in.
    let learned = |seen: &[Value]| {
        seen.iter().any(|v| {
            (v["op"] == "presence" && v["users"].as_array().is_some_and(|u| u.contains(&json!("kim"))))
                || (v["op"] == "joined" && v["user"] == "kim")
        })
    };
    let mut seen = Vec::new();
    let waited = tokio::time::timeout(LEARN_WITHIN, async {
        while !learned(&seen) {
            seen.push(watcher.recv().await.expect("watcher open"));
        }
    })
    .await;
    assert!(waited.is_ok(), "kim not learned within {LEARN_WITHIN:?}: {seen:?}");

    // A marker: once bob's join is heard, anything more about kim would have been heard too.
    let mut bob = Client::connect(&nodes[1].ws("?user=bob")).await;
    bob.join(room).await;
    seen.extend(frames_until(&mut watcher, |v| v["op"] == "joined" && v["user"] == "bob").await);
    let told_of_kim = seen
        .iter()
        .filter(|v| {
            v["users"].as_array().is_some_and(|u| u.contains(&json!("kim")))
                || (v["op"] == "joined" && v["user"] == "kim")
        })
        .count();
    assert_eq!(told_of_kim, 1, "kim listed or announced once: {seen:?}");
    let first = seen.iter().find(|v| v["op"] == "presence").unwrap();
    assert!(
        first["users"].is_array(),
        "a listed room's first event lists it: {first}"
    );
    assert!(seen.iter().all(|v| v["op"] != "left"), "nobody left: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_joins_cost_at_most_a_presence_write_per_node_per_tick() {
    // A cluster of its own: its command counts are this test's alone.
    let cluster = Cluster::start(3, 0);
    let mut nodes = Vec::new();
    for c in fleet(config(Some(&cluster), "storm"), "storm", 2) {
        nodes.push(Node::start(c).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.ws("")).collect();
    let room = "storm";
    let clients = connect_many(&urls, 400, |i| format!("s{i}")).await;
    let before = cluster.calls("set");
    let started = Instant::now();
    // 400 sockets, each joining 50 times (and leaving in between): 20,000 joins.
    let joins: usize = stream::iter(clients)
        .map(|mut c| async move {
            for i in 0..50 {
                if i > 0 {
                    let r = c.request(json!({"op":"leave","room":room})).await;
                    assert_eq!(r["op"], "ok");
                }
                c.join(room).await;
            }
            50
        })
        .buffer_unordered(400)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .sum();
    let took = started.elapsed();
    // Writes of the last tick land up to a tick later.
    tokio::time::sleep(TICK * 2).await;
    let writes = cluster.calls("set") - before;
    let ticks = (took + TICK * 2).as_secs_f64() / TICK.as_secs_f64();
    let bound = (nodes.len() as f64 * (ticks.ceil() + 1.0)) as u64;
    eprintln!("{joins} joins in {took:?}: {writes} presence writes (bound {bound}: 2 nodes x {ticks:.1} ticks + 1)");
    assert_eq!(joins, 20_000);
    assert!(writes >= 2, "every node wrote its contribution: {writes}");
    assert!(writes <= bound, "{writes} writes for {joins} joins");
}

fn embedded(test: &str) -> Config {
    Config {
        jwt: Some(JwtKey::Secret(SECRET.into())),
        api_key: Some("k3y".into()),
        ..config(None, test)
    }
}

#[tokio::test]
async fn embedded_presence_answers_from_memory_and_refuses_bad_input() {
    let node = Node::start(embedded("embedded")).await;
    let token = hs256(json!({"sub":"ann","rooms":["open*"],"exp":now() + 600}));
    let mut ann = Client::connect(&node.ws(&format!("?token={token}"))).await;

    // Forbidden, missing id, bad types, and unknown fields.
    let r = ann.request(json!({"op":"presence","room":"secret"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    ann.send(json!({"op":"presence","room":"open1"})).await;
    let r = ann.recv().await.unwrap();
    assert_eq!((&r["op"], &r["code"]), (&json!("error"), &json!("bad_field")), "{r}");
    let r = ann.request(json!({"op":"join","room":"open1","presence":"yes"})).await;
    assert_eq!(r["code"], "bad_field", "{r}");
    let r = ann.request(json!({"op":"presence","room":"open{1}"})).await;
    assert_eq!(r["code"], "bad_room", "{r}");
    let r = ann
        .request(json!({"op":"presence","room":"open1","colour":"red"}))
        .await;
    assert_eq!((&r["count"], &r["users"]), (&json!(0), &json!([])), "{r}");

    let r = ann
        .request(json!({"op":"join","room":"open1","presence":true,"colour":"red"}))
        .await;
    assert_eq!(r["op"], "ok", "{r}");
    let event = ann.recv().await.unwrap();
    assert_eq!(event, json!({"op":"presence","room":"open1","count":1,"users":["ann"]}));
    let r = presence_of(&mut ann, "open1").await;
    assert_eq!((&r["count"], &r["users"]), (&json!(1), &json!(["ann"])), "{r}");

    // HTTP, behind the API key; names percent-encoded as one segment.
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(node.url(path)).header("Authorization", "Bearer k3y").send();
    let r = get("/rooms/open1/presence").await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"count":1,"users":["ann"]}));
    let r = get("/users/ann").await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"online":true,"connections":1}));
    let r = get("/users/nobody%20here").await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"online":false,"connections":0})
    );
    let r = get("/rooms/open%7B1%7D/presence").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_room");
    let r = http.get(node.url("/users/ann")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // In the room already, then asking for its events: they start.
    ann.join("open2").await;
    let r = ann.request(json!({"op":"join","room":"open2","presence":true})).await;
    assert_eq!(r["op"], "ok", "{r}");
    let event = ann.recv().await.unwrap();
    assert_eq!(event, json!({"op":"presence","room":"open2","count":1,"users":["ann"]}));

    drop(ann);
    eventually("ann offline once her socket closed", || async {
        get("/users/ann").await.unwrap().json::<Value>().await.unwrap() == json!({"online":false,"connections":0})
    })
    .await;
}

#[tokio::test]
async fn with_presence_off_the_command_is_unavailable_and_the_endpoints_absent() {
    let node = Node::start(Config {
        presence: false,
        ..config(None, "off")
    })
    .await;
    let mut c = Client::connect(&node.ws("?user=ann")).await;
    let r = c.request(json!({"op":"presence","room":"r"})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    assert_eq!(common::status(&node.url("/users/ann")).await, 404);
}
