//! One node on the embedded in-process bus: the contract, bad input, and start-up checks.

mod common;

use common::{config, Client, Node, Process};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_and_direct_messages_work_on_one_node() {
    let node = Node::start(config(None, "solo")).await;
    let mut a = Client::connect(&node.ws("?user=ann")).await;
    let mut b = Client::connect(&node.ws("?user=bob")).await;
    let mut b2 = Client::connect_with(&node.ws("?user=bob"), Some("shardcast.v1.msgpack")).await;
    a.join("lobby").await;
    b.join("lobby").await;
    for seq in 0..50 {
        a.send(json!({"op":"pub","room":"lobby","data":{"seq":seq}})).await;
    }
    for c in [&mut a, &mut b] {
        for seq in 0..50 {
            assert_eq!(
                c.recv().await.unwrap(),
                json!({"op":"msg","room":"lobby","from":"ann","data":{"seq":seq}})
            );
        }
    }
    let r = a.request(json!({"op":"dm","to":"bob","data":"psst"})).await;
    assert_eq!(r["op"], "ok");
    assert_eq!(b.recv().await.unwrap(), json!({"op":"dm","from":"ann","data":"psst"}));
    assert_eq!(b2.recv().await.unwrap(), json!({"op":"dm","from":"ann","data":"psst"}));
    // Leaving stops delivery; leaving twice is refused.
    let r = b.request(json!({"op":"leave","room":"lobby"})).await;
    assert_eq!(r["op"], "ok");
    let r = b.request(json!({"op":"leave","room":"lobby"})).await;
    assert_eq!(r["code"], "not_joined");
    a.publish("lobby", json!("after")).await;
    assert_eq!(a.recv().await.unwrap()["data"], "after");
    assert_eq!(b.request(json!({"op":"ping"})).await["op"], "pong");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_frame_and_keeps_the_connection() {
    let mut cfg = config(None, "bad");
    cfg.max_rooms_per_conn = 2;
    cfg.max_frame_bytes = 4096;
    let node = Node::start(cfg).await;
    let mut bystander = Client::connect(&node.ws("?user=calm")).await;
    bystander.join("r").await;
    let mut c = Client::connect(&node.ws("?user=troll")).await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "bad_frame"),
        (Message::Text("[]".into()), "bad_field"),
        (Message::Text("17".into()), "bad_frame"),
        (Message::Text(r#"{"op":"fly"}"#.into()), "unknown_op"),
        (Message::Text(r#"{"room":"r"}"#.into()), "bad_field"),
        (Message::Text(r#"{"op":"join"}"#.into()), "bad_field"),
        (Message::Text(r#"{"op":"join","room":12}"#.into()), "bad_field"),
        (Message::Text(r#"{"op":"pub","room":"r"}"#.into()), "bad_field"),
        (Message::Text(r#"{"op":"join","room":""}"#.into()), "bad_room"),
        (
            Message::Text(format!(r#"{{"op":"join","room":"{}"}}"#, "x".repeat(129)).into()),
            "bad_room",
        ),
        (Message::Text(r#"{"op":"join","room":"tab\there"}"#.into()), "bad_room"),
        (Message::Text(r#"{"op":"dm","to":"","data":1}"#.into()), "bad_user"),
        (
            Message::Text(r#"{"op":"dm","to":"x\u0000","data":1}"#.into()),
            "bad_user",
        ),
        (Message::Binary(vec![0xc1, 0xff, 0x00, 0x13].into()), "bad_frame"),
        (
            Message::Binary(rmp_serde::to_vec_named(&json!({"op":"leave"})).unwrap().into()),
            "bad_field",
        ),
    ];
    for (frame, code) in cases {
        let shown = format!("{frame:?}");
        c.send_raw(frame).await;
        let v = c.recv().await.expect("still connected");
        assert_eq!(v["op"], "error", "{shown}: {v}");
        assert_eq!(v["code"], code, "{shown}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Errors carry the command's id when it had one.
    let v = c.request(json!({"op":"join","room":""})).await;
    assert_eq!((v["code"].clone(), v["id"].is_i64()), (json!("bad_room"), true));
    let v = c.request(json!({"op":"ping","x":1})).await;
    assert_eq!(v["op"], "pong");
    c.join("a").await;
    c.join("b").await;
    assert_eq!(
        c.request(json!({"op":"join","room":"c"})).await["code"],
        "too_many_rooms"
    );
    // The bystander saw none of it and still gets messages.
    c.publish("r", json!({"still":"fine"})).await;
    assert_eq!(bystander.recv().await.unwrap()["data"], json!({"still":"fine"}));

    // A frame over --max-frame-bytes closes with 1009.
    c.ws.send(Message::Text("y".repeat(5000).into())).await.unwrap();
    assert_eq!(c.close_code().await, Some(1009));
    bystander.publish("r", json!(2)).await;
    assert_eq!(bystander.recv().await.unwrap()["data"], json!(2));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_are_refused_before_the_socket_opens() {
    let node = Node::start(config(None, "upgrade")).await;
    for query in ["?user=", "?user=%07bell"] {
        let err = tokio_tungstenite::connect_async(node.ws(query)).await.unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400, "{query}"),
            other => panic!("{query}: {other}"),
        }
    }
    let http = reqwest::Client::new();
    assert_eq!(http.get(node.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(node.url("/readyz")).send().await.unwrap().status(), 200);
    let r = http
        .post(node.url("/publish"))
        .json(&json!({"room":"r","data":null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "open without --api-key");
    let r = http
        .post(node.url("/publish"))
        .body(vec![b'1'; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let metrics = http
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("shardcast_messages_published_total"), "{metrics}");
    node.stop().await;
}

#[test]
fn a_bad_setting_stops_the_node_before_it_binds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args([
            "--listen",
            "127.0.0.1:1",
            "--default-shards",
            "zero",
            "--max-buffered-bytes",
            "1x",
            "--hot-room",
            "a",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["--default-shards", "--max-buffered-bytes", "--hot-room"] {
        assert!(err.contains(name), "{name} not named in: {err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--redis",
        "--hot-room",
        "--max-buffered-bytes",
        "--max-frame-bytes",
        "--api-key",
        "SHARDCAST_REDIS",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_writes_deliver_everything_in_order() {
    let mut cfg = config(None, "coalesce");
    cfg.write_coalesce = std::time::Duration::from_millis(20);
    let node = Node::start(cfg).await;
    let mut a = Client::connect(&node.ws("?user=a")).await;
    let mut b = Client::connect_with(&node.ws("?user=b"), Some("shardcast.v1.msgpack")).await;
    a.join("r").await;
    b.join("r").await;
    for seq in 0..200 {
        a.send(json!({"op":"pub","room":"r","data":seq})).await;
    }
    for c in [&mut a, &mut b] {
        for seq in 0..200 {
            assert_eq!(c.recv().await.unwrap()["data"], seq);
        }
    }
    node.stop().await;
}

/// A client that stops reading fills the kernel's buffers; the node keeps the rest queued (partly
/// written frames included) and finishes the writes when the client reads again: nothing lost,
/// nothing out of order, as long as the queue stays under the budget.
#[tokio::test]
async fn a_reader_that_pauses_gets_everything_once_it_reads_again() {
    reader_pauses(std::time::Duration::ZERO).await;
}

/// The same with paced writes, whose turns write straight to the socket.
#[tokio::test]
async fn a_reader_that_pauses_gets_everything_once_it_reads_again_with_paced_writes() {
    reader_pauses(std::time::Duration::from_millis(20)).await;
}

async fn reader_pauses(coalesce: std::time::Duration) {
    const MESSAGES: usize = 400;
    let mut cfg = config(None, "pause");
    cfg.max_buffered_bytes = 64 << 20;
    cfg.write_coalesce = coalesce;
    let node = Node::start(cfg).await;
    let mut slow = Client::connect(&node.ws("?user=slow")).await;
    slow.join("r").await;
    let mut publisher = Client::connect(&node.ws("?user=pub")).await;
    let filler = "x".repeat(60_000);
    // About 24 MB, more than loopback's socket buffers take, while `slow` reads nothing.
    for seq in 0..MESSAGES {
        publisher
            .send(json!({"op":"pub","room":"r","data":[seq, filler]}))
            .await;
    }
    let metrics = node.url("/metrics");
    let queued = || common::metric(&metrics, "shardcast_outbound_queued_bytes");
    common::eventually("the paused reader's queue to back up", || async {
        queued().await > Some(1e6)
    })
    .await;
    for seq in 0..MESSAGES {
        let msg = slow.recv().await.expect("still open");
        assert_eq!(msg["data"][0], seq);
        assert_eq!(msg["data"][1].as_str().map(str::len), Some(filler.len()));
    }
    common::eventually("the queue to empty", || async { queued().await == Some(0.0) }).await;
    node.stop().await;
}

/// A dead client behind a full socket (it neither reads nor answers pings) is still closed on its
/// idle timeout: the close interrupts the write that waits for the socket, and the close frame gets
/// `--close-grace` to go out. Without that the session would wait on the socket until the kernel
/// gave up on it (many minutes). The node counts it as `idle` (the close frame itself cannot reach
/// a full socket), no earlier than the idle timeout after the client fell silent and no later than
/// the next ping tick after it.
#[tokio::test]
async fn a_dead_client_behind_a_full_socket_is_closed_on_time() {
    use std::time::{Duration, Instant};

    const PING: Duration = Duration::from_millis(250);
    const IDLE: Duration = Duration::from_secs(4);
    const GRACE: Duration = Duration::from_millis(100);
    const IDLE_CLOSES: &str = r#"shardcast_connections_closed_total{reason="idle"}"#;
    // A node of its own: the metrics recorder is process-wide, so an in-process node's counts would
    // mix with those of the tests running beside this one.
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let node = Process::spawn(&[
        "--max-buffered-bytes",
        "64MiB",
        "--ping-interval",
        &ms(PING),
        "--idle-timeout",
        &ms(IDLE),
        "--close-grace",
        &ms(GRACE),
        "--command-rate",
        "1000000",
        "--command-burst",
        "1000000",
    ]);
    let metrics = node.url("/metrics");
    common::eventually("node up", || async { common::status(&metrics).await == 200 }).await;
    let mut dead = Client::connect(&node.ws("?user=dead")).await;
    dead.join("r").await;
    let mut publisher = Client::connect(&node.ws("?user=pub")).await;
    // The dead client keeps talking (never reading) until its queue has backed up, however long
    // the node takes with the flood; from then on it is silent. Returns the client and when its
    // last frame was sent (just before and just after).
    let stop = tokio_util::sync::CancellationToken::new();
    let talking = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut last = (Instant::now(), Instant::now());
            // Bounded: the test stops it within its deadline, 200 frames at the most.
            for _ in 0..(common::WAIT.as_millis() / 100) {
                if stop.is_cancelled() {
                    break;
                }
                let before = Instant::now();
                dead.send(json!({"op":"ping"})).await;
                last = (before, Instant::now());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (dead, last)
        }
    });
    let filler = "x".repeat(60_000);
    for seq in 0..400 {
        publisher
            .send(json!({"op":"pub","room":"r","data":[seq, filler]}))
            .await;
    }
    let deadline = Instant::now() + common::WAIT;
    while common::metric(&metrics, "shardcast_outbound_queued_bytes").await <= Some(1e6) {
        assert!(Instant::now() < deadline, "the dead client's queue never backed up");
        // The publisher keeps talking too, so that it is never closed as idle itself.
        publisher.send(json!({"op":"ping"})).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The publisher leaves (its session ends as `normal` or `error`, not `idle`); the dead client
    // falls silent.
    drop(publisher);
    stop.cancel();
    let (dead, (silent_from, silent_by)) = talking.await.unwrap();
    let before = common::metric(&metrics, IDLE_CLOSES).await.expect("idle close count");
    // The node checks silence on its ping ticks, so the close comes between the idle timeout and
    // one ping interval later; it is counted once the close has had its grace twice (for the close
    // frame, then for the client's answer): 4.2 to 4.45 s. Three seconds more for a loaded
    // machine, where the node may read the last frame, or wake for its tick, that much late (1.5 s
    // was once not enough beside a parallel build); a node that waited twice the idle timeout
    // still fails.
    let earliest = silent_from + IDLE;
    let latest = silent_by + IDLE + PING + 2 * GRACE + Duration::from_secs(3);
    loop {
        let asked = Instant::now();
        let closes = common::metric(&metrics, IDLE_CLOSES).await.expect("idle close count");
        let answered = Instant::now();
        if closes > before {
            assert_eq!(closes, before + 1.0, "more than the dead client closed as idle");
            // `heard` is kept in whole milliseconds, so the node may see 1 ms more silence.
            assert!(
                answered + Duration::from_millis(1) >= earliest,
                "closed as idle {:?} after the client fell silent, before the idle timeout ({IDLE:?})",
                answered - silent_from
            );
            eprintln!(
                "dead client counted as idle {:?} after it fell silent",
                answered - silent_from
            );
            break;
        }
        if asked > latest {
            let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
            let reasons: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("shardcast_connections_closed_total{") && !l.ends_with(" 0"))
                .collect();
            panic!(
                "not closed as idle {:?} after the client fell silent (idle timeout {IDLE:?}, ping \
                 interval {PING:?}); closes so far: {reasons:?}",
                asked - silent_from
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::eventually("both sessions to end", || async {
        common::metric(&metrics, "shardcast_connections_open").await == Some(0.0)
    })
    .await;
    drop(dead);
    drop(node);
}

/// The node answers the WebSocket handshake itself (it keeps the TCP socket for its writes), so
/// the handshake's rules are tested here at the byte level.
#[tokio::test]
async fn the_handshake_is_checked_and_a_frame_sent_right_behind_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::{
        tungstenite::{handshake::derive_accept_key, protocol::Role},
        WebSocketStream,
    };

    let node = Node::start(config(None, "handshake")).await;
    let http = reqwest::Client::new();
    // A plain GET, and a handshake of another WebSocket version: refused, with the reason.
    let r = http.get(node.ws("").replace("ws://", "http://")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("upgrade"));
    let r = http
        .get(node.url("/ws"))
        .header("connection", "keep-alive, Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("13"));

    // A client that does not wait for the 101: its first frame (a masked `ping` command) arrives
    // in the same packet as the handshake, and must be read all the same.
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mut tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut out = format!(
        "GET /ws?user=early HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Protocol: x-unknown, shardcast.v1.json\r\n\r\n"
    )
    .into_bytes();
    let command = br#"{"op":"ping","id":7}"#;
    let mask = [1u8, 2, 3, 4];
    out.extend_from_slice(&[0x81, 0x80 | command.len() as u8]);
    out.extend_from_slice(&mask);
    out.extend(command.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tcp.write_all(&out).await.unwrap();

    let mut got = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let accept = derive_accept_key(key.as_bytes()).to_ascii_lowercase();
    assert!(head.contains(&format!("sec-websocket-accept: {accept}")), "{head}");
    assert!(head.contains("sec-websocket-protocol: shardcast.v1.json"), "{head}");
    let mut ws = WebSocketStream::from_partially_read(tcp, got[head_end..].to_vec(), Role::Client, None).await;
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    .expect("a reply in time")
    .expect("open")
    .unwrap();
    let reply: serde_json::Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
    assert_eq!(reply, json!({"op":"pong","id":7}));
    node.stop().await;
}

/// Paced writes coalesce: messages 5 ms apart reach a socket in a few writes per period, not one
/// write each. Counted on the node's own process (the metrics of in-process nodes are shared by
/// every test of this binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_writes_carry_several_frames_per_write() {
    use common::{eventually, metric, status, Process};
    const MESSAGES: u64 = 60;
    let node = Process::spawn(&["--write-coalesce", "50ms"]);
    let health = node.url("/healthz");
    eventually("node up", || async { status(&health).await == 200 }).await;
    let mut sub = Client::connect(&node.ws("?user=sub")).await;
    sub.join("ticker").await;
    let mut feed = Client::connect(&node.ws("?user=feed")).await;
    for seq in 0..MESSAGES {
        feed.publish("ticker", json!(seq)).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for seq in 0..MESSAGES {
        assert_eq!(sub.recv().await.unwrap()["data"], seq, "every message, in order");
    }
    let metrics = node.url("/metrics");
    let frames = metric(&metrics, "shardcast_deliveries_total").await.unwrap();
    let writes = metric(&metrics, "shardcast_socket_writes_total").await.unwrap();
    assert_eq!(frames, MESSAGES as f64);
    // 300 ms of messages in 50 ms periods: about 6 writes; one per message without pacing.
    assert!(writes <= frames / 3.0, "{frames} frames in {writes} writes");
}
