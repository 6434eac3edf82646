//! Observability end to end: two real node processes on a real Redis Cluster, scraped by a real
//! Prometheus (started from `grafana/prometheus.yml`). After a short load, every query of every
//! Grafana dashboard must succeed and return data, every metric a dashboard names must be exported,
//! and every exported metric must be on a dashboard.

mod common;

use std::{
    collections::BTreeSet,
    fs::{self, File},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{repo, Client, Cluster, Reaped, Scratch, WAIT};
use serde_json::{json, Value};
use shardcast::metrics as m;
use tokio_tungstenite::tungstenite::Message;

const DATASOURCE_UID: &str = "shardcast-prometheus";
const DASHBOARDS: [&str; 2] = ["shardcast-overview.json", "shardcast-hot-room.json"];
/// What Grafana's `$__rate_interval` stands for in the queries run here.
const RATE_INTERVAL: &str = "30s";
const ROOM: &str = "stadium";
/// Messages each WebSocket publisher sends, and messages sent over HTTP.
const WS_PUBLISHES: usize = 150;
const HTTP_PUBLISHES: usize = 20;
/// Every message of `ROOM` reaches every receiver.
const TOTAL: usize = 2 * WS_PUBLISHES + HTTP_PUBLISHES;
const RECEIVERS_PER_NODE: usize = 2;
/// The budget of node B: well above a burst of small messages, below one big message.
const SMALL_BUDGET: usize = 32 << 10;
const BIG_MESSAGE: usize = 40 << 10;

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().unwrap().port()
}

/// Starts the command `make` builds for a free port until it answers `ready_path` with 200. A port
/// taken between picking it and the child binding it makes the child exit: then try another.
async fn spawn_serving(name: &str, dir: &Path, make: impl Fn(u16) -> Command, ready_path: &str) -> (Reaped, u16) {
    let http = reqwest::Client::new();
    for attempt in 0..5 {
        let port = free_port();
        let log = dir.join(format!("{name}-{attempt}.log"));
        let mut cmd = make(port);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut proc = Reaped(cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}")));
        let start = Instant::now();
        loop {
            if let Some(status) = proc.0.try_wait().unwrap() {
                let out = fs::read_to_string(&log).unwrap_or_default();
                eprintln!("{name} exited ({status}) on port {port}; trying another port. Its log:\n{out}");
                break;
            }
            let url = format!("http://127.0.0.1:{port}{ready_path}");
            let ready = http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return (proc, port);
            }
            assert!(
                start.elapsed() < WAIT,
                "{name} not ready on port {port} within {WAIT:?}; log in {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("{name} did not start on any of 5 ports");
}

/// A node process on the shared cluster, using channels named by `prefixes` (room, user).
async fn start_node(
    name: &str,
    dir: &Path,
    cluster: &Cluster,
    prefixes: &(String, String),
    extra: &[&str],
) -> (Reaped, u16) {
    let (room_prefix, user_prefix) = prefixes;
    let make = |port: u16| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardcast"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", &cluster.url])
            .args(["--channel-prefix", room_prefix])
            .args(["--user-channel-prefix", user_prefix])
            .args(["--hot-room", &format!("{ROOM}=4")])
            .args(["--workers", "2", "--unsubscribe-delay", "200ms"])
            .args(extra)
            .env("RUST_LOG", "warn");
        cmd
    };
    spawn_serving(name, dir, make, "/readyz").await
}

/// A Prometheus scraping `targets` every second, configured from `grafana/prometheus.yml`.
async fn start_prometheus(dir: &Path, targets: &[u16]) -> (Reaped, u16) {
    let shipped = fs::read_to_string(repo().join("grafana/prometheus.yml")).unwrap();
    let (interval, local) = ("scrape_interval: 5s", "['127.0.0.1:8081', '127.0.0.1:8082']");
    assert!(
        shipped.contains(interval) && shipped.contains(local),
        "grafana/prometheus.yml changed shape: update this test"
    );
    let ours = targets
        .iter()
        .map(|p| format!("'127.0.0.1:{p}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        shipped
            .replace(interval, "scrape_interval: 1s")
            .replace(local, &format!("[{ours}]")),
    )
    .unwrap();
    let tsdb = dir.join("tsdb");
    let make = |port: u16| {
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        cmd
    };
    spawn_serving("prometheus", dir, make, "/-/ready").await
}

struct Prometheus {
    http: reqwest::Client,
    port: u16,
}

impl Prometheus {
    /// `/api/v1/query`, asserting the query was accepted; returns `data.result`.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let resp = self
            .http
            .get(url)
            .query(&[("query", expr)])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("query Prometheus");
        let body: Value = resp.json().await.expect("Prometheus answers JSON");
        assert_eq!(body["status"], "success", "query {expr}: {body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query with one sample (for example a `sum`), if any.
    async fn scalar(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).await;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

async fn exposition(http: &reqwest::Client, port: u16) -> String {
    let resp = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await;
    resp.expect("GET /metrics").text().await.expect("metrics text")
}

/// Metric families of a Prometheus text exposition (`# TYPE name kind`), with their kind.
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// The metric family a name in a query refers to (`x_bucket` of histogram `x` is `x`).
fn family_of(name: &str, histograms: &BTreeSet<String>) -> String {
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .find(|base| histograms.contains(*base))
        .unwrap_or(name)
        .to_owned()
}

/// Every `shardcast_…` name in a query.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("shardcast_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(&tail[..end]);
        rest = &tail[end..];
    }
    names
}

/// What Grafana needs to import a dashboard, and our conventions: the fixed datasource everywhere
/// and the `node` variable in every query. Returns the panels' queries.
fn check_importable(file: &str, d: &Value) -> Vec<String> {
    for key in ["uid", "title"] {
        assert!(d[key].as_str().is_some_and(|s| !s.is_empty()), "{file}: no {key}");
    }
    assert!(d["schemaVersion"].as_u64().is_some(), "{file}: no schemaVersion");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let node = vars
        .iter()
        .find(|v| v["name"] == "node")
        .unwrap_or_else(|| panic!("{file}: no `node` variable"));
    assert_eq!(node["datasource"]["uid"], DATASOURCE_UID, "{file}: `node` datasource");
    assert_eq!(
        node["definition"], "label_values(shardcast_connections_open, instance)",
        "{file}: `node` query"
    );
    let panels = d["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "{file}: no panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"].as_str().filter(|t| !t.is_empty());
        let title = title.unwrap_or_else(|| panic!("{file}: a panel without title: {p}"));
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{file} `{title}`: no id"));
        assert!(ids.insert(id), "{file} `{title}`: id {id} used twice");
        assert!(p["type"].as_str().is_some(), "{file} `{title}`: no type");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64());
        let (Some(x), Some(_), Some(w), Some(h)) = (x, y, w, h) else {
            panic!("{file} `{title}`: bad gridPos {g}");
        };
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "{file} `{title}`: gridPos {g} outside the 24 columns"
        );
        assert_eq!(p["datasource"]["uid"], DATASOURCE_UID, "{file} `{title}`: datasource");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("{file} `{title}`: no targets"));
        let mut refs = BTreeSet::new();
        for t in targets {
            let r = t["refId"]
                .as_str()
                .unwrap_or_else(|| panic!("{file} `{title}`: target without refId"));
            assert!(refs.insert(r.to_owned()), "{file} `{title}`: refId {r} used twice");
            assert_eq!(
                t["datasource"]["uid"], DATASOURCE_UID,
                "{file} `{title}` {r}: datasource"
            );
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{file} `{title}` {r}: no expr"));
            assert!(
                expr.contains(r#"instance=~"$node""#),
                "{file} `{title}` {r}: every query filters on $node: {expr}"
            );
            exprs.push(expr.to_owned());
        }
    }
    exprs
}

/// The dashboards' queries as Prometheus runs them once Grafana has filled in its variables.
fn as_run(expr: &str) -> String {
    let run = expr.replace("$node", ".*").replace("$__rate_interval", RATE_INTERVAL);
    assert!(!run.contains('$'), "a variable this test does not know: {expr}");
    run
}

/// Reads the receiver's frames until it has `TOTAL` messages of `ROOM`, it closes, or `deadline`
/// passes; returns how many it got.
async fn receive_all(mut c: Client, deadline: tokio::time::Instant) -> usize {
    let mut got = 0;
    while got < TOTAL {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(Some(frame)) if frame["op"] == "msg" && frame["room"] == ROOM => got += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    got
}

async fn publish_many(c: &mut Client) {
    for seq in 0..WS_PUBLISHES {
        c.publish(ROOM, json!({"seq": seq, "pad": "x".repeat(64)})).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_query_what_nodes_export() {
    let scratch = Scratch::new("observability");
    let dir = scratch.0.as_path();

    // The dashboards first: a malformed one fails before anything starts.
    let mut exprs = Vec::new();
    for file in DASHBOARDS {
        let text = fs::read_to_string(repo().join("grafana/dashboards").join(file)).unwrap();
        let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        exprs.extend(check_importable(file, &d).into_iter().map(|e| (file, e)));
    }
    let datasource = fs::read_to_string(repo().join("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(
        datasource.contains(&format!("uid: {DATASOURCE_UID}")),
        "provisioned datasource uid"
    );

    let cluster = Cluster::shared();
    let budget = SMALL_BUDGET.to_string();
    // Both nodes share this test's channels, apart from other tests on the shared cluster.
    let prefixes = common::prefix("observability");
    let (_node_a, port_a) = start_node("node-a", dir, cluster, &prefixes, &[]).await;
    let small = ["--max-buffered-bytes", &budget];
    let (_node_b, port_b) = start_node("node-b", dir, cluster, &prefixes, &small).await;
    let http = reqwest::Client::new();

    // Every series exists before any traffic.
    for port in [port_a, port_b] {
        let text = exposition(&http, port).await;
        // Not `shardcast_bus_up`: the bus sets it, once connected (checked through Prometheus below).
        let mut want: Vec<String> = [
            m::CONNECTIONS_OPEN,
            m::CONNECTIONS_ACCEPTED,
            m::ROOMS_LOCAL,
            m::TOPICS_LOCAL,
            m::SUBSCRIPTIONS,
            m::BUS_RECEIVED,
            m::DELIVERIES,
            m::DELIVERED_BYTES,
            m::UNENCODABLE,
            m::SLOW_CONSUMER_DROPS,
            m::QUEUED_BYTES,
            m::BUS_PUBLISH_ERRORS,
            m::BUS_RECONNECTS,
            m::BUS_RESUBSCRIPTIONS,
            m::AUTH_FAILURES,
            m::RATE_LIMITED,
        ]
        .iter()
        .map(|n| format!("\n{n} "))
        .collect();
        want.extend([m::LATENCY, m::QUEUE_DEPTH, m::JOIN_WAIT].map(|h| format!("\n{h}_count ")));
        let labeled = [
            (
                m::CONNECTIONS_CLOSED,
                "reason",
                m::CLOSE_REASONS.map(|r| r.as_str()).to_vec(),
            ),
            (m::BAD_FRAMES, "code", m::BAD_FRAME_CODES.map(|c| c.as_str()).to_vec()),
            (m::PUBLISHED, "source", m::PUBLISH_SOURCES.to_vec()),
            (m::BUS_DROPPED, "reason", m::DROP_REASONS.to_vec()),
            (m::UPGRADES_REFUSED, "reason", m::UPGRADE_REFUSED_REASONS.to_vec()),
        ];
        for (name, label, values) in labeled {
            want.extend(values.iter().map(|v| format!("\n{name}{{{label}=\"{v}\"}} ")));
        }
        for w in &want {
            assert!(
                text.contains(w.as_str()),
                "node on {port}: no `{}` at start-up",
                w.trim()
            );
        }
    }

    let (_prometheus, prom_port) = start_prometheus(dir, &[port_a, port_b]).await;
    let prom = Prometheus {
        http: http.clone(),
        port: prom_port,
    };
    assert!(
        prom.query("shardcast_no_such_metric").await.is_empty(),
        "an unknown metric must come back empty, or the checks below prove nothing"
    );

    // Load: receivers on both nodes, publishers on both nodes and over HTTP.
    let node_ws = |port: u16, user: &str| format!("ws://127.0.0.1:{port}/ws?user={user}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut receivers = Vec::new();
    for (i, port) in [port_a, port_b].into_iter().enumerate() {
        for j in 0..RECEIVERS_PER_NODE {
            let mut c = Client::connect(&node_ws(port, &format!("r{i}{j}"))).await;
            c.join(ROOM).await;
            receivers.push(tokio::spawn(receive_all(c, deadline)));
        }
    }
    let mut pub_a = Client::connect(&node_ws(port_a, "pub-a")).await;
    let mut pub_b = Client::connect(&node_ws(port_b, "pub-b")).await;
    tokio::join!(publish_many(&mut pub_a), publish_many(&mut pub_b));
    let publish_url = format!("http://127.0.0.1:{port_a}/publish");
    for seq in 0..HTTP_PUBLISHES {
        let body = json!({"room": ROOM, "data": {"seq": seq}, "from": "scoreboard"});
        let resp = http.post(&publish_url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 202, "HTTP publish");
    }
    let mut counts = Vec::new();
    for r in receivers {
        counts.push(r.await.unwrap());
    }
    assert_eq!(counts, [TOTAL; 2 * RECEIVERS_PER_NODE], "messages each receiver got");

    // A slow consumer on node B: one message bigger than its budget closes it with 4008.
    let mut slow = Client::connect(&node_ws(port_b, "slow")).await;
    slow.join("big").await;
    let body = json!({"room": "big", "data": "y".repeat(BIG_MESSAGE)});
    assert_eq!(http.post(&publish_url).json(&body).send().await.unwrap().status(), 202);
    assert_eq!(slow.close_code().await, Some(4008));

    // Bad frames: not JSON, an unknown op, leaving a room never joined.
    let mut bad = Client::connect(&node_ws(port_a, "bad")).await;
    bad.send_raw(Message::Text("not json".into())).await;
    assert_eq!(bad.recv().await.expect("error frame")["code"], "bad_frame");
    assert_eq!(bad.request(json!({"op": "nope"})).await["code"], "unknown_op");
    let r = bad.request(json!({"op": "leave", "room": "nowhere"})).await;
    assert_eq!(r["code"], "not_joined");

    // Wait until Prometheus has scraped all of it, from both nodes, several times.
    let receivers = (2 * RECEIVERS_PER_NODE) as f64;
    let expected = [
        (r#"count(up{job="shardcast"} == 1)"#, 2.0),
        ("sum(shardcast_deliveries_total)", receivers * TOTAL as f64),
        ("sum(shardcast_bus_messages_received_total)", 2.0 * TOTAL as f64),
        (
            r#"sum(shardcast_messages_published_total{source="http"})"#,
            HTTP_PUBLISHES as f64 + 1.0,
        ),
        (
            r#"sum(shardcast_messages_published_total{source="ws"})"#,
            2.0 * WS_PUBLISHES as f64,
        ),
        ("sum(shardcast_slow_consumer_drops_total)", 1.0),
        (
            r#"sum(shardcast_connections_closed_total{reason="slow_consumer"})"#,
            1.0,
        ),
        ("sum(shardcast_bad_frames_total)", 3.0),
        ("sum(shardcast_bus_up)", 2.0),
        ("min(count_over_time(shardcast_connections_open[1m]))", 5.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut behind = Vec::new();
        for (expr, want) in &expected {
            let got = prom.scalar(expr).await;
            if got.is_none_or(|v| v < *want) {
                behind.push(format!("{expr} = {got:?}, want >= {want}"));
            }
        }
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not see the load: {behind:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every metric a dashboard names is exported, and every exported metric is on a dashboard.
    let mut histograms = BTreeSet::new();
    let mut exported = BTreeSet::new();
    for port in [port_a, port_b] {
        let text = exposition(&http, port).await;
        for (name, kind) in families(&text) {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help text");
            if kind == "histogram" {
                histograms.insert(name.clone());
            }
            exported.insert(name);
        }
    }
    let mut used = BTreeSet::new();
    for (file, expr) in &exprs {
        for name in metric_names(expr) {
            let family = family_of(name, &histograms);
            assert!(
                exported.contains(&family),
                "{file} queries {name}, which no node exports: {expr}"
            );
            used.insert(family);
        }
    }
    let unseen: Vec<_> = exported.difference(&used).collect();
    assert!(unseen.is_empty(), "exported but on no dashboard: {unseen:?}");

    // The `node` variable lists both nodes, asked as Grafana does for `label_values(…, instance)`.
    let url = format!("http://127.0.0.1:{prom_port}/api/v1/label/instance/values");
    let match_ = [("match[]", "shardcast_connections_open")];
    let body: Value = http.get(url).query(&match_).send().await.unwrap().json().await.unwrap();
    let instances: BTreeSet<&str> = body["data"]
        .as_array()
        .expect("label values")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let nodes = [port_a, port_b].map(|p| format!("127.0.0.1:{p}"));
    assert_eq!(instances, nodes.iter().map(String::as_str).collect(), "`node` values");

    // Every panel query returns data.
    for (file, expr) in &exprs {
        let result = prom.query(&as_run(expr)).await;
        assert!(!result.is_empty(), "{file}: no data for {expr}");
    }
}
