//! The findings of an outside probe, one test each, against real nodes over real sockets (and a
//! real Redis Cluster where a finding is about the bus): slow request bodies, a far-future `exp`,
//! deep `data`, protocol violations, ping and publish floods, braces in names, envelopes whose
//! target does not match their channel, `nbf` and invisible characters in names.

mod common;

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use common::{config, hs256, now, raw, Client, Cluster, Node, Process, SECRET};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use shardcast::{
    auth::MAX_CLAIM_SECS,
    config::JwtKey,
    envelope::{Envelope, Kind},
    frame::Encoding,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::{self, Message};

/// An HTTP client whose every request gives up after a second: a node that stopped answering must
/// fail the test, not hang it.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// The HTTP status an upgrade was refused with (0 if it was accepted).
async fn refused(url: &str) -> u16 {
    match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url))
        .await
        .expect("an answer in time")
    {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => 0,
    }
}

/// The node binary with `args`, its open-files limit lowered to `open_files` (soft and hard).
fn spawn_limited(args: &[&str], open_files: u64) -> Process {
    let port = common::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardcast"));
    command
        .args(["--listen", &addr.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: open_files,
                rlim_max: open_files,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn shardcast");
    Process { child, addr }
}

/// Waits for a node process to answer `/healthz`.
async fn answering(node: &Process) {
    let http = http();
    common::eventually("node answers", || async {
        http.get(node.url("/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// A metric of a node (`url` its `/metrics`), 0 when absent or unreadable.
async fn value(url: &str, name: &str) -> f64 {
    let Ok(resp) = http().get(url).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

// Finding 1: slow request bodies used to hold a descriptor each, without limit, until accept failed
// with EMFILE and /healthz and new WebSockets timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_cannot_take_the_node_down() {
    const SLOW: usize = 1_100;
    const BODY_TIMEOUT: Duration = Duration::from_secs(6);
    // This process holds the slow connections' client ends.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // 1,024 descriptors: the node's default cap on HTTP connections is then 128.
    let node = spawn_limited(&["--http-body-timeout", "6s", "--http-header-timeout", "6s"], 1024);
    answering(&node).await;

    let attack = Instant::now();
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        assert!(
            attack.elapsed() < Duration::from_secs(30),
            "opening the slow connections took too long"
        );
        let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(node.addr)).await else {
            continue;
        };
        // Headers, and the first byte of a body that never finishes.
        let head =
            b"POST /publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{";
        let _ = tcp.write_all(head).await;
        slow.push((Instant::now(), tcp));
    }
    assert!(slow.len() >= SLOW - 10, "only {} slow connections opened", slow.len());

    // Well before any slow body times out, the node answers health checks and takes WebSockets.
    let http = http();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let answered = http.get(node.url("/healthz")).send().await;
        if answered.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz unanswered under 1,100 slow bodies");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = None;
    while ws.is_none() {
        assert!(Instant::now() < deadline, "no WebSocket under 1,100 slow bodies");
        let connecting = tokio::time::timeout(
            Duration::from_secs(1),
            tokio_tungstenite::connect_async(node.ws("?user=fan")),
        );
        ws = connecting.await.ok().and_then(Result::ok).map(|(ws, _)| ws);
    }
    let mut fan = Client::from_ws(ws.unwrap());
    assert_eq!(fan.request(json!({"op":"ping"})).await["op"], "pong");
    assert!(
        attack.elapsed() < BODY_TIMEOUT,
        "the checks above must not have waited for the body timeout"
    );

    // Every slow connection is closed: at once (refused at the cap), to make room (evicted), or at
    // the body timeout with 408.
    let endings: Vec<_> = slow
        .into_iter()
        .map(|(opened, mut tcp)| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let read = tokio::time::timeout_at(opened + BODY_TIMEOUT + Duration::from_secs(5), async {
                    let mut chunk = [0u8; 512];
                    loop {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&chunk[..n]),
                        }
                    }
                })
                .await;
                (
                    read.is_ok(),
                    opened.elapsed(),
                    String::from_utf8_lossy(&got).into_owned(),
                )
            })
        })
        .collect();
    let mut timed_out = 0;
    for ending in endings {
        let (closed, after, answer) = ending.await.unwrap();
        assert!(
            closed,
            "a slow connection still open {after:?} after it was opened: {answer:?}"
        );
        if answer.starts_with("HTTP/1.1 408") {
            assert!(
                after >= BODY_TIMEOUT - Duration::from_millis(500),
                "408 after {after:?}"
            );
            timed_out += 1;
        }
    }
    assert!(timed_out >= 1, "no slow body was cut by the body timeout");
    let metrics = node.url("/metrics");
    let shed = value(&metrics, r#"shardcast_http_connections_shed_total{how="refused"}"#).await
        + value(&metrics, r#"shardcast_http_connections_shed_total{how="evicted"}"#).await;
    assert!(shed >= (SLOW - 200) as f64, "only {shed} connections shed");
    assert!(value(&metrics, r#"shardcast_http_timeouts_total{phase="body"}"#).await >= timed_out as f64);
    // The WebSocket opened under the attack is still served.
    assert_eq!(fan.request(json!({"op":"ping"})).await["op"], "pong");
}

// Finding 2: an `exp` of u64::MAX overflowed the session's timer and panicked it, leaving
// `shardcast_connections_open` one too high.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_exp_is_refused_and_connections_are_counted_back_to_zero() {
    let node = Process::spawn(&["--jwt-secret", SECRET]);
    answering(&node).await;
    let far = hs256(json!({"sub":"far","exp":u64::MAX}));
    assert_eq!(refused(&node.ws(&format!("?token={far}"))).await, 401, "exp = u64::MAX");
    let past_max = hs256(json!({"sub":"far","exp":MAX_CLAIM_SECS + 1}));
    assert_eq!(
        refused(&node.ws(&format!("?token={past_max}"))).await,
        401,
        "exp past the maximum"
    );

    // The latest expiry accepted gives a working session that closes cleanly.
    let latest = hs256(json!({"sub":"late","exp":MAX_CLAIM_SECS}));
    let mut c = Client::connect(&node.ws(&format!("?token={latest}"))).await;
    assert_eq!(c.request(json!({"op":"ping"})).await["op"], "pong");
    let metrics = node.url("/metrics");
    assert_eq!(value(&metrics, "shardcast_connections_open").await, 1.0);
    c.ws.close(None).await.unwrap();
    while c.ws.next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&metrics, "shardcast_connections_open").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "shardcast_connections_open did not return to 0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        value(&metrics, r#"shardcast_connections_closed_total{reason="normal"}"#).await,
        1.0
    );
}

/// `depth` arrays one inside the other around a 1, as JSON text.
fn nested_json(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// A `pub` of `depth` nested arrays to room `room` as a MessagePack frame, its id after its data.
fn nested_msgpack_pub(room: &str, depth: usize, id: u64) -> Vec<u8> {
    let mut b = Vec::new();
    rmp::encode::write_map_len(&mut b, 4).unwrap();
    for (k, v) in [("op", "pub"), ("room", room)] {
        rmp::encode::write_str(&mut b, k).unwrap();
        rmp::encode::write_str(&mut b, v).unwrap();
    }
    rmp::encode::write_str(&mut b, "data").unwrap();
    b.extend(std::iter::repeat_n(0x91, depth));
    b.push(0x01);
    rmp::encode::write_str(&mut b, "id").unwrap();
    rmp::encode::write_uint(&mut b, id).unwrap();
    b
}

// Finding 3: `data` nesting was never limited in JSON (32,000 levels acked and forwarded), and
// MessagePack data was refused past 1,022 levels only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_data_is_refused_at_every_ingress() {
    let node = Node::start(config(None, "deep")).await;
    let mut json_client = Client::connect(&node.ws("?user=j")).await;
    let mut mp_client = Client::connect_with(&node.ws("?user=m"), Some("shardcast.v1.msgpack")).await;
    mp_client.join("deep").await;
    // Room messages the MessagePack member got while waiting for its replies.
    let mut msgs = Vec::new();
    let mut id = 0;
    for (depth, refused) in [(32_000, true), (65, true), (64, false)] {
        id += 1;
        let text = format!(
            r#"{{"op":"pub","room":"deep","id":{id},"data":{}}}"#,
            nested_json(depth)
        );
        json_client.send_raw(Message::Text(text.into())).await;
        let r = json_client.recv().await.unwrap();
        assert_eq!(r["id"], id, "{r}");
        if refused {
            assert_eq!(r["code"], "bad_data", "JSON, {depth} levels: {r}");
        } else {
            assert_eq!(r["op"], "ok", "JSON, {depth} levels: {r}");
        }
        id += 1;
        mp_client
            .send_raw(Message::Binary(nested_msgpack_pub("elsewhere", depth, id).into()))
            .await;
        let r = loop {
            let r = mp_client.recv().await.unwrap();
            if r["op"] != "msg" {
                break r;
            }
            msgs.push(r);
        };
        assert_eq!(r["id"], id, "{r}");
        if refused {
            assert_eq!(r["code"], "bad_data", "MessagePack, {depth} levels: {r}");
        } else {
            assert_eq!(r["op"], "ok", "MessagePack, {depth} levels: {r}");
        }
    }
    let http = http();
    for (depth, status) in [(32_000, 400), (65, 400), (64, 202)] {
        let body = format!(r#"{{"room":"deep","data":{}}}"#, nested_json(depth));
        let r = http.post(node.url("/publish")).body(body).send().await.unwrap();
        assert_eq!(r.status(), status, "/publish, {depth} levels");
        if status == 400 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["code"], "bad_data", "{v}");
        }
    }
    // What was accepted reached the MessagePack member, transcoded, 64 levels deep.
    while msgs.len() < 2 {
        msgs.push(mp_client.recv().await.expect("the 64-level messages"));
    }
    assert_eq!(msgs.len(), 2, "a refused message was delivered");
    for m in &msgs {
        assert_eq!(m["op"], "msg", "{m}");
        let mut d = &m["data"];
        let mut depth = 0;
        while let Some(inner) = d.get(0) {
            d = inner;
            depth += 1;
        }
        assert_eq!((depth, d), (64, &json!(1)));
    }
    node.stop().await;
}

// Finding 4: protocol violations were closed with 1000 and an empty reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002_and_bad_utf8_with_1007() {
    let node = Node::start(config(None, "protocol")).await;
    let metrics = node.url("/metrics");
    let protocol = r#"shardcast_connections_closed_total{reason="protocol_error"}"#;
    let invalid = r#"shardcast_connections_closed_total{reason="invalid_payload"}"#;
    let (protocol_before, invalid_before) = (value(&metrics, protocol).await, value(&metrics, invalid).await);

    // A connection reset is an error, not a protocol violation.
    let reset = raw::connect(node.addr, "?user=reset", "").await;
    reset.tcp.set_zero_linger().unwrap();
    drop(reset);

    let cases: [(&str, Vec<u8>, u16); 8] = [
        ("unmasked frame", raw::unmasked(0x81, b"hi"), 1002),
        ("RSV1 set", raw::masked(0xc1, b"hi"), 1002),
        ("unknown data opcode", raw::masked(0x83, b""), 1002),
        ("unknown control opcode", raw::masked(0x8b, b""), 1002),
        ("stray continuation", raw::masked(0x80, b"x"), 1002),
        ("fragmented ping", raw::masked(0x09, b""), 1002),
        ("ping over 125 bytes", raw::masked(0x89, &[7; 126]), 1002),
        ("invalid UTF-8", raw::masked(0x81, &[b'{', 0xff, 0xfe, b'}']), 1007),
    ];
    for (what, frame, want) in &cases {
        let mut ws = raw::connect(node.addr, "?user=raw", "").await;
        ws.send(frame).await.unwrap();
        let (code, reason) = ws
            .close_frame(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{what}: no close frame"));
        assert_eq!(code, *want, "{what} ({reason:?})");
        assert!(!reason.is_empty(), "{what}: a close without a reason");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let protocol_now = value(&metrics, protocol).await - protocol_before;
        let invalid_now = value(&metrics, invalid).await - invalid_before;
        if (protocol_now, invalid_now) == (7.0, 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closes counted: protocol_error {protocol_now}, invalid_payload {invalid_now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}

// Finding 5: WebSocket pings counted against no limit, and POST /publish had no rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_are_closed_and_publish_floods_get_429() {
    let mut cfg = config(None, "floods");
    cfg.command_rate = 5;
    cfg.command_burst = 5;
    cfg.publish_rate = 1;
    cfg.publish_burst = 3;
    let node = Node::start(cfg).await;

    let mut c = Client::connect(&node.ws("?user=pinger")).await;
    for _ in 0..100 {
        // The node may have closed the socket already: stop flooding then.
        if c.ws.send(Message::Ping(b"flood".to_vec().into())).await.is_err() {
            break;
        }
    }
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the ping flood is closed");
    assert_eq!(code, Some(1008));

    let http = http();
    let publish = || {
        http.post(node.url("/publish"))
            .json(&json!({"room":"r","data":1}))
            .send()
    };
    for i in 0..3 {
        assert_eq!(publish().await.unwrap().status(), 202, "request {i} of the burst");
    }
    let r = publish().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "rate_limited", "{v}");
    // Another address has its own budget.
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let r = other
        .post(node.url("/publish"))
        .json(&json!({"room":"r","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    node.stop().await;
}

/// Runs the node binary with `args` and returns its exit code and standard error once it exits.
async fn exits(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node started with {args:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

// Finding 6: a brace in a room name defeated hot-room sharding (Redis Cluster hashes only what is
// between the braces, so every `{hot}` shard hashed to one slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braces_are_refused_in_names_and_prefixes() {
    for args in [
        &["--hot-room", "{hot}=4"][..],
        &["--channel-prefix", "{ws}:room:"],
        &["--user-channel-prefix", "ws:{user}:"],
    ] {
        let (code, stderr) = exits(args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(args[0]) && stderr.contains("brace"),
            "{args:?}: {stderr}"
        );
    }

    let node = Node::start(config(None, "braces")).await;
    assert_eq!(refused(&node.ws("?user=%7Bu%7D")).await, 400, "user {{u}}");
    let mut c = Client::connect(&node.ws("?user=b")).await;
    for frame in [
        json!({"op":"join","room":"{hot}"}),
        json!({"op":"pub","room":"hot}","data":1}),
        json!({"op":"leave","room":"{"}),
    ] {
        let r = c.request(frame.clone()).await;
        assert_eq!(r["code"], "bad_room", "{frame}: {r}");
    }
    let r = c.request(json!({"op":"dm","to":"{u}","data":1})).await;
    assert_eq!(r["code"], "bad_user", "{r}");
    let r = http()
        .post(node.url("/publish"))
        .json(&json!({"room":"{hot}","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_room");
    node.stop().await;
}

/// Publishes `payload` on `channel` straight to the master that owns it; the number of subscribers
/// that got it.
async fn spublish(cluster: &Cluster, channel: &str, payload: &[u8]) -> i64 {
    let slot: u16 = cluster
        .redis_cli(cluster.ports[0], &["cluster", "keyslot", channel])
        .trim()
        .parse()
        .unwrap();
    let port = cluster.owner_of(slot);
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut command = format!(
        "*3\r\n$8\r\nSPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n",
        channel.len(),
        payload.len()
    )
    .into_bytes();
    command.extend_from_slice(payload);
    command.extend_from_slice(b"\r\n");
    tcp.write_all(&command).await.unwrap();
    let mut reply = Vec::new();
    while !reply.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte))
            .await
            .expect("SPUBLISH reply in time")
            .unwrap();
        assert_eq!(n, 1, "Redis closed the connection");
        reply.push(byte[0]);
    }
    let reply = String::from_utf8_lossy(&reply);
    reply
        .trim()
        .strip_prefix(':')
        .unwrap_or_else(|| panic!("SPUBLISH: {reply}"))
        .parse()
        .unwrap()
}

fn envelope(kind: Kind, target: &str, data: &str) -> Vec<u8> {
    envelope_of(kind, target, Encoding::Json, data.as_bytes())
}

fn envelope_of(kind: Kind, target: &str, format: Encoding, data: &[u8]) -> Vec<u8> {
    Envelope {
        kind,
        origin: "probe".into(),
        target: target.into(),
        from: "mallory".into(),
        ts_us: shardcast::envelope::now_us(),
        format,
        data: data.to_vec().into(),
        pos: None,
        key: None,
        key_seq: None,
    }
    .encode()
    .to_vec()
}

// Finding 7: an envelope's target was trusted over its channel: an envelope on `plain`'s channel
// naming room `other` was delivered to `other`. (Dropping it is done in the delivery path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_whose_target_does_not_match_their_channel_are_dropped() {
    let cluster = Cluster::shared();
    let cfg = config(Some(cluster), "mismatch");
    let (rooms, users) = (cfg.channel_prefix.clone(), cfg.user_channel_prefix.clone());
    let node = Node::start(cfg).await;
    let mut plain = Client::connect(&node.ws("?user=ann")).await;
    plain.join("plain").await;
    let mut other = Client::connect(&node.ws("?user=bob")).await;
    other.join("other").await;
    let dropped = r#"shardcast_bus_messages_dropped_total{reason="mismatch"}"#;
    let before = value(&node.url("/metrics"), dropped).await;

    // On plain's channel: a room message naming `other`, and a direct message to bob.
    let plain_channel = format!("{rooms}plain:shard0");
    let forged = envelope(Kind::Room, "other", r#""forged""#);
    assert_eq!(
        spublish(cluster, &plain_channel, &forged).await,
        1,
        "the node is subscribed"
    );
    let forged_dm = envelope(Kind::Direct, "bob", r#""forged dm""#);
    assert_eq!(spublish(cluster, &plain_channel, &forged_dm).await, 1);
    // Then genuine ones, on their own channels: each member's next message must be its genuine one.
    let genuine = envelope(Kind::Room, "other", r#""genuine""#);
    assert_eq!(spublish(cluster, &format!("{rooms}other:shard0"), &genuine).await, 1);
    let genuine_dm = envelope(Kind::Direct, "bob", r#""genuine dm""#);
    assert_eq!(spublish(cluster, &format!("{users}bob"), &genuine_dm).await, 1);
    let genuine_plain = envelope(Kind::Room, "plain", r#""plain""#);
    assert_eq!(spublish(cluster, &plain_channel, &genuine_plain).await, 1);

    // The forged ones went through the node's delivery before plain's genuine one (same channel,
    // same worker), so once ann has that, anything forged for bob is queued before a pong to bob.
    assert_eq!(
        plain.recv().await.unwrap(),
        json!({"op":"msg","room":"plain","from":"mallory","data":"plain"})
    );
    let mut bob_got = Vec::new();
    for _ in 0..10 {
        if bob_got
            .iter()
            .filter(|m: &&Value| m["data"].as_str().is_some_and(|d| d.starts_with("genuine")))
            .count()
            == 2
        {
            break;
        }
        bob_got.push(other.recv().await.unwrap());
    }
    other.send(json!({"op":"ping","id":999})).await;
    loop {
        let m = other.recv().await.unwrap();
        if m["op"] == "pong" {
            break;
        }
        bob_got.push(m);
    }
    let mut want = vec![
        json!({"op":"msg","room":"other","from":"mallory","data":"genuine"}),
        json!({"op":"dm","from":"mallory","data":"genuine dm"}),
    ];
    want.sort_by_key(|m| m["data"].to_string());
    bob_got.sort_by_key(|m| m["data"].to_string());
    assert_eq!(bob_got, want, "bob got a forged envelope");
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&node.url("/metrics"), dropped).await - before < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the forged envelopes were not counted as {dropped}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}

// Finding 3, on the bus side: data deeper than --max-data-depth published straight to Redis (by a
// backend, or a node of another version) is dropped by the same rule as at ingress. (Dropping it
// is done in the delivery path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_envelopes_with_data_deeper_than_the_limit_are_dropped() {
    let cluster = Cluster::shared();
    let cfg = config(Some(cluster), "too-deep");
    let channel = format!("{}deep:shard0", cfg.channel_prefix);
    let node = Node::start(cfg).await;
    let mut json_member = Client::connect(&node.ws("?user=j")).await;
    json_member.join("deep").await;
    let mut mp_member = Client::connect_with(&node.ws("?user=m"), Some("shardcast.v1.msgpack")).await;
    mp_member.join("deep").await;
    let dropped = r#"shardcast_bus_messages_dropped_total{reason="too_deep"}"#;
    let before = value(&node.url("/metrics"), dropped).await;

    let mut deep_mp = vec![0x91; 65];
    deep_mp.push(0x01);
    for (format, data) in [
        (Encoding::Json, nested_json(65).into_bytes()),
        (Encoding::Json, nested_json(32_000).into_bytes()),
        (Encoding::MsgPack, deep_mp),
    ] {
        let env = envelope_of(Kind::Room, "deep", format, &data);
        assert_eq!(spublish(cluster, &channel, &env).await, 1, "the node is subscribed");
    }
    // Then one at the limit on the same channel: it is each member's next message.
    let at_limit = envelope_of(Kind::Room, "deep", Encoding::Json, nested_json(64).as_bytes());
    assert_eq!(spublish(cluster, &channel, &at_limit).await, 1);
    for member in [&mut json_member, &mut mp_member] {
        let m = member.recv().await.unwrap();
        let mut d = &m["data"];
        let mut depth = 0;
        while let Some(inner) = d.get(0) {
            d = inner;
            depth += 1;
        }
        assert_eq!(depth, 64, "a member got data {depth} levels deep");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&node.url("/metrics"), dropped).await - before < 3.0 {
        assert!(
            Instant::now() < deadline,
            "the deep envelopes were not counted as {dropped}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}

// Finding 6, on a real cluster: why braces are refused, and that a hot room without them spreads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_room_shards_spread_over_masters_unless_braced() {
    let cluster = Cluster::shared();
    let slot = |channel: String| -> u16 {
        cluster
            .redis_cli(cluster.ports[0], &["cluster", "keyslot", &channel])
            .trim()
            .parse()
            .unwrap()
    };
    let naming = shardcast::bus::Naming::new("ws:room:", "ws:user:", 1, [("hot".to_string(), 4)].into());
    let masters: std::collections::BTreeSet<u16> = (0..4)
        .map(|n| cluster.owner_of(slot(naming.room_channel("hot", n))))
        .collect();
    assert!(masters.len() >= 2, "4 shards of `hot` on masters {masters:?}");
    let braced: std::collections::BTreeSet<u16> = (0..4).map(|n| slot(naming.room_channel("{hot}", n))).collect();
    assert_eq!(braced.len(), 1, "a braced room's shards share one slot");
}

// Finding 8: `nbf` was not enforced, and names took invisible and bidirectional control characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbf_is_enforced_and_invisible_characters_are_refused_in_names() {
    let mut cfg = config(None, "nbf");
    cfg.jwt = Some(JwtKey::Secret(SECRET.into()));
    let node = Node::start(cfg).await;
    let early = hs256(json!({"sub":"early","exp":now() + 7200,"nbf":now() + 3600}));
    assert_eq!(
        refused(&node.ws(&format!("?token={early}"))).await,
        401,
        "nbf an hour ahead"
    );
    let due = hs256(json!({"sub":"due","exp":now() + 7200,"nbf":now() - 10}));
    assert_eq!(refused(&node.ws(&format!("?token={due}"))).await, 0, "nbf passed");
    // Without --require-exp a token need not expire.
    let open_ended = hs256(json!({"sub":"forever"}));
    assert_eq!(refused(&node.ws(&format!("?token={open_ended}"))).await, 0);
    let bidi_sub = hs256(json!({"sub":"evil\u{202e}gnp.exe","exp":now() + 600}));
    assert_eq!(
        refused(&node.ws(&format!("?token={bidi_sub}"))).await,
        401,
        "bidi control in sub"
    );
    node.stop().await;

    let mut cfg = config(None, "require-exp");
    cfg.jwt = Some(JwtKey::Secret(SECRET.into()));
    cfg.require_exp = true;
    let node = Node::start(cfg).await;
    assert_eq!(
        refused(&node.ws(&format!("?token={open_ended}"))).await,
        401,
        "--require-exp"
    );
    let expiring = hs256(json!({"sub":"brief","exp":now() + 600}));
    assert_eq!(refused(&node.ws(&format!("?token={expiring}"))).await, 0);
    node.stop().await;

    let node = Node::start(config(None, "invisible")).await;
    for user in ["a%E2%80%8Bb", "a%E2%80%AEb", "a%E2%80%A8b", "%E2%81%A6x"] {
        assert_eq!(refused(&node.ws(&format!("?user={user}"))).await, 400, "user {user}");
    }
    let mut c = Client::connect(&node.ws("?user=a%E2%80%8Db")).await;
    for room in ["a\u{200b}b", "a\u{202e}b", "a\u{2028}b", "a\u{2029}b", "a\u{2066}b"] {
        let r = c.request(json!({"op":"join","room":room})).await;
        assert_eq!(r["code"], "bad_room", "{room:?}: {r}");
    }
    let r = c.request(json!({"op":"dm","to":"x\u{202e}y","data":1})).await;
    assert_eq!(r["code"], "bad_user", "{r}");
    // Joiners stay allowed: emoji sequences and several scripts need them.
    c.join("\u{1f468}\u{200d}\u{1f469}").await;
    c.join("\u{645}\u{200c}\u{6cc}").await;
    let r = http()
        .post(node.url("/publish"))
        .json(&json!({"room":"a\u{200b}b","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_room");
    // Names are compared byte for byte: é precomposed and decomposed are two rooms.
    let mut other = Client::connect(&node.ws("?user=o")).await;
    other.join("caf\u{e9}").await;
    c.publish("cafe\u{301}", json!("decomposed")).await;
    c.publish("caf\u{e9}", json!("precomposed")).await;
    assert_eq!(other.recv().await.unwrap()["data"], "precomposed");
    node.stop().await;
}
