//! Test harness: a real Redis Cluster started by `redis-cluster/up`, real nodes on 127.0.0.1:0,
//! real WebSocket clients over real sockets. Every wait has a deadline.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod raw;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use shardcast::config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Redis Cluster of redis-server processes on loopback, stopped on drop and, should the test
/// process die first, by the watcher `redis-cluster/up --owner-pid` leaves behind.
pub struct Cluster {
    dir: PathBuf,
    pub url: String,
    pub ports: Vec<u16>,
}

impl Cluster {
    pub fn start(masters: u32, replicas: u32) -> Cluster {
        let mut last_err = String::new();
        for _ in 0..3 {
            match Cluster::up(&["--port", "auto"], masters, replicas, 2000) {
                Ok(cluster) => return cluster,
                // A port picked as free may have been taken meanwhile: try again with others.
                Err(e) => {
                    eprintln!("{e}");
                    last_err = e;
                }
            }
        }
        panic!("redis-cluster/up failed: {last_err}");
    }

    /// A cluster on the given ports (the first `masters` become masters).
    pub fn start_on(ports: &[u16], masters: u32, replicas: u32, node_timeout_ms: u32) -> Cluster {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        Cluster::up(&["--ports", &list.join(",")], masters, replicas, node_timeout_ms).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `redis-cluster/up` in a fresh directory, stopped with this process at the latest.
    fn up(ports: &[&str], masters: u32, replicas: u32, node_timeout_ms: u32) -> Result<Cluster, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("shardcast-test-{}-{n}", std::process::id()));
        let out = Command::new(repo().join("redis-cluster/up"))
            .args(ports)
            .args(["--node-timeout", &node_timeout_ms.to_string()])
            .args(["--masters", &masters.to_string(), "--replicas", &replicas.to_string()])
            .arg("--dir")
            .arg(&dir)
            .args(["--owner-pid", &std::process::id().to_string()])
            .output()
            .expect("run redis-cluster/up");
        if !out.status.success() {
            return Err(format!("redis-cluster/up: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let url = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        let ports = std::fs::read_to_string(dir.join("ports"))
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        Ok(Cluster { dir, url, ports })
    }

    /// One cluster shared by the tests of a binary; each test uses its own channel prefix.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| Cluster::start(3, 0))
    }

    pub fn redis_cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `PUBSUB SHARDCHANNELS pattern` over every node, sorted.
    pub fn shard_channels(&self, pattern: &str) -> Vec<String> {
        let mut all: Vec<String> = self
            .ports
            .iter()
            .flat_map(|p| {
                self.redis_cli(*p, &["pubsub", "shardchannels", pattern])
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|l| !l.is_empty())
            .collect();
        all.sort();
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("redis-cluster/down"))
            .arg("--dir")
            .arg(&self.dir)
            .output();
    }
}

/// A unique channel prefix per test, so tests sharing a cluster never see each other.
pub fn prefix(test: &str) -> (String, String) {
    let tag = format!("{test}-{:06x}", rand::random::<u32>() & 0xffffff);
    (format!("t:{tag}:room:"), format!("t:{tag}:user:"))
}

pub fn config(redis: Option<&Cluster>, test: &str) -> Config {
    let (room, user) = prefix(test);
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis: redis.map(|c| vec![c.url.clone()]).unwrap_or_default(),
        channel_prefix: room,
        user_channel_prefix: user,
        unsubscribe_delay: Duration::from_millis(200),
        workers: 2,
        // Stopping a node in a test need not spread reconnects (the drain has its own test).
        drain_jitter: Duration::ZERO,
        close_grace: Duration::from_secs(1),
        // Tests publish in bursts; the rate limit has its own test.
        command_rate: 1_000_000,
        command_burst: 1_000_000,
        // Tests connect hundreds of sockets at once with clients that do not retry a refused
        // upgrade, as real ones do; the bound has its own test.
        max_handshakes: 100_000,
        ..Config::default()
    }
}

/// History for the rooms `glob` names: their newest 100 messages, for 10 minutes.
pub fn kept(glob: &str) -> Vec<(glob::Pattern, shardcast::history::pos::Keep)> {
    let keep = shardcast::history::pos::Keep {
        size: 100,
        ttl: Duration::from_secs(600),
    };
    vec![(glob::Pattern::new(glob).unwrap(), keep)]
}

/// `nodes` configurations of one deployment: `base`'s prefixes and settings, each its own node id
/// (`<test>-<i>`).
pub fn fleet(base: Config, test: &str, nodes: usize) -> Vec<Config> {
    (0..nodes)
        .map(|i| Config {
            node_id: format!("{test}-{i}"),
            ..base.clone()
        })
        .collect()
}

/// A child process (not a node: HAProxy, Prometheus, a node started from a shipped unit), killed
/// and reaped on drop.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory of a test's own, removed on drop (kept, and named, when the test failed).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "shardcast-{test}-{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xffffff
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A node served in this process on an ephemeral port.
pub struct Node {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub async fn start(config: Config) -> Node {
        let node = Node::start_unready(config).await;
        node.wait_ready().await;
        node
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    /// A node that is not expected to be ready (its Redis is down); waits until it answers.
    pub async fn start_unready(config: Config) -> Node {
        // SHARDCAST_TEST_LOG=debug (any tracing filter) shows the nodes' logs in failing tests.
        static LOGS: OnceLock<()> = OnceLock::new();
        LOGS.get_or_init(|| {
            if let Ok(filter) = std::env::var("SHARDCAST_TEST_LOG") {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_test_writer()
                    .try_init();
            }
        });
        let listener = TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            shardcast::run(listener, config, token).await.expect("node run");
        });
        let node = Node {
            addr,
            shutdown,
            task: Some(task),
        };
        let url = node.url("/healthz");
        eventually("node answers", || async { status(&url).await == 200 }).await;
        node
    }

    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        eventually("node ready", || async {
            http.get(self.url("/readyz"))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await;
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.expect("node stops").unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it holds, failing the test at the deadline.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the contract in JSON or MessagePack.
pub struct Client {
    pub ws: Ws,
    msgpack: bool,
    next_id: i64,
    /// Frames that arrived while waiting for a reply.
    pub inbox: VecDeque<Value>,
    /// The close code `recv` saw, if it saw one.
    pub closed_with: Option<u16>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Client::connect_with(url, None).await
    }

    pub async fn connect_with(url: &str, protocol: Option<&str>) -> Client {
        let mut req = url.into_client_request().unwrap();
        if let Some(p) = protocol {
            req.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("connect");
        Client {
            ws,
            msgpack: protocol == Some("shardcast.v1.msgpack"),
            next_id: 1,
            inbox: VecDeque::new(),
            closed_with: None,
        }
    }

    pub fn from_ws(ws: Ws) -> Client {
        Client {
            ws,
            msgpack: false,
            next_id: 1,
            inbox: VecDeque::new(),
            closed_with: None,
        }
    }

    pub async fn send(&mut self, v: Value) {
        let msg = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&v).unwrap().into())
        } else {
            Message::Text(v.to_string().into())
        };
        self.ws.send(msg).await.unwrap();
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// The next contract frame (skipping pings), decoded; `None` once the socket closed.
    pub async fn recv(&mut self) -> Option<Value> {
        if let Some(v) = self.inbox.pop_front() {
            return Some(v);
        }
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frame in time")?;
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("socket error: {e}");
                    return None;
                }
            };
            match msg {
                Message::Text(t) => return Some(serde_json::from_str(&t).expect("JSON frame")),
                Message::Binary(b) => return Some(rmp_serde::from_slice(&b).expect("MessagePack frame")),
                Message::Close(f) => {
                    self.closed_with = f.map(|f| f.code.into());
                    return None;
                }
                _ => continue,
            }
        }
    }

    /// Sends a command with an id and returns its `ok` or `error`, keeping other frames.
    pub async fn request(&mut self, v: Value) -> Value {
        let id = self.send_request(v).await;
        self.reply(id).await
    }

    /// Sends a command with a fresh id without waiting; [`Client::reply`] waits for its answer.
    pub async fn send_request(&mut self, mut v: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.send(v).await;
        id
    }

    /// Waits for the `ok` or `error` of the command sent with `id`, keeping other frames.
    pub async fn reply(&mut self, id: i64) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("reply in time")
                .expect("open")
                .unwrap();
            let v: Value = match msg {
                Message::Text(t) => serde_json::from_str(&t).unwrap(),
                Message::Binary(b) => rmp_serde::from_slice(&b).unwrap(),
                Message::Close(f) => panic!("closed while waiting for a reply: {f:?}"),
                _ => continue,
            };
            if v["id"] == json!(id) {
                return v;
            }
            self.inbox.push_back(v);
        }
    }

    pub async fn join(&mut self, room: &str) {
        let r = self.request(json!({"op":"join","room":room})).await;
        assert_eq!(r["op"], "ok", "join {room}: {r}");
    }

    pub async fn publish(&mut self, room: &str, data: Value) {
        let r = self.request(json!({"op":"pub","room":room,"data":data})).await;
        assert_eq!(r["op"], "ok", "pub {room}: {r}");
    }

    /// Reads until the close frame and returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => return Some(code.into()),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// What [`stalled_phone`]'s feed publishes: values of two keys, 2 KB each (6 MB, past a 256 KB
/// budget and what the kernel's autotuned send buffer holds).
pub const STALLED_VALUES: u64 = 3000;

/// A phone on a weak link (a 4 KiB receive buffer) that joins `match:9` on `node` (the join's
/// extra fields in `join`) and stops reading, while a feed publishes [`STALLED_VALUES`] values of
/// the keys `score` (even `i`) and `clock` (odd `i`), `{"i":i,"pad":…}`, a chat line `{"chat":i}`
/// every 750 of them and a last one `{"chat":"end"}`. With `conflating`, it returns once the node
/// has conflated values. The phone's socket, for the test to read.
pub async fn stalled_phone(node: &Node, join: Value, conflating: bool) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(node.ws("?user=phone"), MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let mut cmd = json!({"op":"join","room":"match:9","id":1});
    cmd.as_object_mut()
        .unwrap()
        .extend(join.as_object().cloned().unwrap_or_default());
    ws.send(Message::Text(cmd.to_string().into())).await.unwrap();
    let ok = ws.next().await.unwrap().unwrap();
    assert!(ok.to_text().unwrap().contains("\"ok\""), "{ok:?}");
    let mut feed = Client::connect(&node.ws("?user=feed")).await;
    let pad = "x".repeat(2000);
    for i in 0..STALLED_VALUES {
        let key = if i % 2 == 0 { "score" } else { "clock" };
        feed.send(json!({"op":"pub","room":"match:9","key":key,"data":{"i":i,"pad":pad}}))
            .await;
        if i % 750 == 0 {
            feed.publish("match:9", json!({"chat": i})).await;
        }
    }
    feed.publish("match:9", json!({"chat": "end"})).await;
    if conflating {
        let metrics = node.url("/metrics");
        eventually("the socket to conflate", || async {
            metric(&metrics, "shardcast_conflated_values_total{reason=\"conflated\"}")
                .await
                .is_some_and(|v| v > 0.0)
        })
        .await;
    }
    ws
}

/// A loopback port that was free a moment ago (and whose cluster-bus port, +10000, too).
pub fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    /// The process id of the redis-server on `port`.
    pub fn pid(&self, port: u16) -> String {
        let info = self.redis_cli(port, &["info", "server"]);
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .expect("process_id")
            .trim()
            .to_string()
    }

    /// The hash slot of `key`.
    pub fn slot(&self, key: &str) -> u16 {
        self.redis_cli(self.ports[0], &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot")
    }

    /// `PUBSUB SHARDNUMSUB channel` on `port` (the channel's master).
    pub fn shard_numsub(&self, port: u16, channel: &str) -> u64 {
        let out = self.redis_cli(port, &["pubsub", "shardnumsub", channel]);
        out.lines().nth(1).and_then(|n| n.trim().parse().ok()).expect("a count")
    }

    /// How many SUNSUBSCRIBE commands the nodes served since they started, all together.
    pub fn sunsubscribe_calls(&self) -> u64 {
        self.calls("sunsubscribe")
    }

    /// Calls of `command` (lower case) over every server, from `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.ports
            .iter()
            .map(|p| {
                // `cmdstat_<command>:calls=N,usec=...`, absent until the first call.
                self.redis_cli(*p, &["info", "commandstats"])
                    .lines()
                    .find_map(|l| l.strip_prefix(prefix.as_str()))
                    .map_or(0, |rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
            })
            .sum()
    }

    /// The port of the master serving `slot`.
    pub fn owner_of(&self, slot: u16) -> u16 {
        self.owner_as_seen_by(self.ports[0], slot)
    }

    /// The port of the master serving `slot`, as the server on `port` sees it (for when the first
    /// server is down).
    pub fn owner_as_seen_by(&self, port: u16, slot: u16) -> u16 {
        // redis-cli prints `CLUSTER SLOTS` one field per line: start, end, ip, port, id, ...
        let slots = self.redis_cli(port, &["cluster", "slots"]);
        let lines: Vec<&str> = slots.lines().collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                if (start..=end).contains(&slot) {
                    return lines[i + 3].parse().unwrap();
                }
            }
            i += 1;
        }
        panic!("no owner for slot {slot} in {slots}");
    }
}

/// A node running as its own process (for signals and exit codes); killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

impl Process {
    pub fn spawn(args: &[&str]) -> Process {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
            .args(["--listen", &addr.to_string()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn shardcast");
        Process { child, addr }
    }

    pub fn ws(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET a URL's status, 0 when nothing answers.
pub async fn status(url: &str) -> u16 {
    reqwest::Client::new()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A metric's value from a node's `/metrics` page (`metrics_url`), `None` when it is not there.
pub async fn metric(metrics_url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(metrics_url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The HS256 secret the auth tests' nodes check tokens with (never a real one).
pub const SECRET: &str = "test-secret-not-for-production";

/// Seconds since the Unix epoch, for token claims.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with [`SECRET`].
pub fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

impl Cluster {
    /// The port of the master of every slot, from one `CLUSTER SLOTS`.
    pub fn slot_map(&self) -> Vec<u16> {
        let slots = self.redis_cli(self.ports[0], &["cluster", "slots"]);
        let lines: Vec<&str> = slots.lines().collect();
        let mut map = vec![0; 16384];
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end), Ok(port)) = (
                lines[i].parse::<usize>(),
                lines[i + 1].parse::<usize>(),
                lines[i + 3].parse::<u16>(),
            ) {
                if start <= end && end < map.len() && lines[i + 2].contains('.') {
                    map[start..=end].fill(port);
                    i += 4;
                    continue;
                }
            }
            i += 1;
        }
        assert!(map.iter().all(|p| *p != 0), "a slot without a master: {slots}");
        map
    }
}

impl Cluster {
    /// Moves `slot` to another master, as `redis-cli --cluster reshard` does, while traffic goes
    /// on: marks it importing and migrating, lets a moment pass in that state, migrates every key
    /// in it, lets another moment pass, then gives it to the new master on every node. Returns
    /// the new master's port.
    pub async fn migrate_slot(&self, slot: u16) -> u16 {
        let from = self.owner_of(slot);
        let to = self
            .slot_map()
            .into_iter()
            .find(|p| *p != from)
            .expect("another master");
        let id = |port: u16| self.redis_cli(port, &["cluster", "myid"]).trim().to_string();
        let (from_id, to_id, s) = (id(from), id(to), slot.to_string());
        self.redis_cli(to, &["cluster", "setslot", &s, "importing", &from_id]);
        self.redis_cli(from, &["cluster", "setslot", &s, "migrating", &to_id]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let keys: Vec<String> = self
            .redis_cli(from, &["cluster", "getkeysinslot", &s, "1000"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if !keys.is_empty() {
            let port = to.to_string();
            let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
            args.extend(keys.iter().map(String::as_str));
            let moved = self.redis_cli(from, &args);
            assert_eq!(moved.trim(), "OK", "MIGRATE: {moved}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for p in &self.ports {
            self.redis_cli(*p, &["cluster", "setslot", &s, "node", &to_id]);
        }
        to
    }
}
