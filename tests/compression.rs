//! permessage-deflate (RFC 7692) with real clients: Node's `ws` and Python's `websockets`, which
//! compress what they send and keep their context across messages, read thousands of the node's
//! compressed frames and have their own read; a client that offers nothing, or a node with
//! `--compress false`, gets plain frames; bad offers are declined; and bad compressed frames (a
//! deflate bomb, a corrupt or cut stream, RSV1 where it cannot be) are closed with the RFC's codes
//! at once, in bounded memory, while another socket keeps receiving.
//!
//! `clients/js/install` installs `ws`, `tests/clients/install` Python's `websockets` (the README's
//! test command runs both first).

mod common;

use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{config, metric, raw, repo, Client, Node, WAIT};
use serde_json::{json, Value};
use shardcast::{
    compress,
    config::Config,
    metrics::{INFLATED_BYTES, LINKED_FRAMES},
};

/// What a browser offers.
const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
/// The node's answer to it: its own frames without context, the client's window 1 KiB.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_max_window_bits=10";

/// Runs a client script to its end (killed at the deadline) and returns its last line as JSON.
async fn run_client(program: &str, args: &[&str], env: Option<(&str, String)>) -> Value {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("run {program}: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not end in time"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

async fn inflated(node: &Node) -> f64 {
    metric(&node.url("/metrics"), INFLATED_BYTES).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_with_deflate_reads_thousands_of_mixed_frames_and_is_read() {
    let node = Node::start(config(None, "ws-deflate")).await;
    let before = inflated(&node).await;
    let script = repo().join("tests/clients/ws-deflate.cjs");
    let modules = repo().join("clients/js/node_modules");
    assert!(modules.join("ws").exists(), "run clients/js/install first");
    let url = node.ws("?user=node-ws");
    let summary = run_client(
        "node",
        &[script.to_str().unwrap(), &url, "feed", "3000"],
        Some(("NODE_PATH", modules.display().to_string())),
    )
    .await;
    assert_eq!(summary["extensions"], "permessage-deflate", "{summary}");
    assert_eq!(
        (summary["received"].as_u64(), summary["bad"].as_u64()),
        (Some(3000), Some(0)),
        "{summary}"
    );
    // Everything `ws` sent was compressed (threshold 0): 3,000 payloads of ~20 B to ~8 KB.
    let grew = inflated(&node).await - before;
    assert!(grew > 3_000_000.0, "inflated {grew} bytes");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_with_its_default_deflate_reads_and_is_read() {
    let node = Node::start(config(None, "py-deflate")).await;
    let before = inflated(&node).await;
    let script = repo().join("tests/clients/websockets-deflate.py");
    let url = node.ws("?user=py");
    let summary = run_client("python3", &[script.to_str().unwrap(), &url, "feed", "600"], None).await;
    let extensions = summary["extensions"].as_str().unwrap_or_default().to_string();
    assert!(extensions.starts_with(ANSWER), "{summary}");
    assert_eq!(
        (summary["received"].as_u64(), summary["bad"].as_u64()),
        (Some(600), Some(0)),
        "{summary}"
    );
    assert!(inflated(&node).await - before > 500_000.0);
    node.stop().await;
}

/// A node on the embedded bus that keeps its compression context (`--compress-context 8KiB`).
async fn context_node(test: &str) -> Node {
    Node::start(Config {
        compress_context: 8 << 10,
        ..config(None, test)
    })
    .await
}

/// Frames compressed after their room's last messages, as the node counts them.
async fn linked(node: &Node) -> f64 {
    metric(&node.url("/metrics"), LINKED_FRAMES).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_compression_context_real_clients_read_every_frame_and_most_go_linked() {
    let node = context_node("ws-context").await;
    // Node's `ws` in two rooms: each room's frames refer back to that room's last messages, with
    // the other room's frames, small plain ones and replies between them on the one connection.
    let script = repo().join("tests/clients/ws-deflate.cjs");
    let modules = repo().join("clients/js/node_modules");
    let url = node.ws("?user=node-ws");
    let summary = run_client(
        "node",
        &[script.to_str().unwrap(), &url, "feed", "3000", "side"],
        Some(("NODE_PATH", modules.display().to_string())),
    )
    .await;
    assert_eq!(
        (summary["received"].as_u64(), summary["bad"].as_u64()),
        (Some(3000), Some(0)),
        "{summary}"
    );
    // Two thirds of the 3,000 are large enough to compress; most follow their room's last
    // message on the connection (four of five are in the first room).
    let by_ws = linked(&node).await;
    assert!(by_ws > 1000.0, "{by_ws} frames went linked");
    // Python's `websockets`, told the node keeps its context.
    let script = repo().join("tests/clients/websockets-deflate.py");
    let url = node.ws("?user=py");
    let summary = run_client("python3", &[script.to_str().unwrap(), &url, "feed2", "600"], None).await;
    assert_eq!(
        summary["extensions"], "permessage-deflate; client_max_window_bits=10",
        "{summary}"
    );
    assert_eq!(
        (summary["received"].as_u64(), summary["bad"].as_u64()),
        (Some(600), Some(0)),
        "{summary}"
    );
    assert!(linked(&node).await - by_ws > 200.0);
    // A client that asks for frames compressed alone gets them, and no linked frame.
    let before = linked(&node).await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n";
    let (mut alone, head) = raw::connect_answered(node.addr, "?user=alone", offer).await;
    assert_eq!(
        raw::answer_header(&head, "Sec-WebSocket-Extensions"),
        Some("permessage-deflate; server_no_context_takeover")
    );
    raw_join(&mut alone, "lines").await;
    for i in 0..20 {
        publish(
            &node,
            "lines",
            json!({"line": i, "text": "what a pass from midfield ".repeat(12)}),
        )
        .await;
        let (rsv1, payload) = next_msg(&mut alone).await;
        assert!(rsv1, "compressed");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["data"]["line"], i, "each inflates on its own");
    }
    assert_eq!(linked(&node).await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_keeping_the_context_reads_every_line_between_values_its_pace_sends_later() {
    let node = context_node("ctx-paced").await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let (mut ws, head) = raw::connect_answered(node.addr, "?user=paced", offer).await;
    assert_eq!(
        raw::answer_header(&head, "Sec-WebSocket-Extensions"),
        Some("permessage-deflate")
    );
    // Two values of the score a second at most: the others wait, and go from the socket's own
    // pacing task, between the lines the room's turns write.
    let join = json!({"op":"join","room":"match","id":1,"max_rate":2}).to_string();
    ws.send(&raw::masked(0x81, join.as_bytes())).await.unwrap();
    let mut inflater = flate2::Decompress::new(false);
    let mut read = |frame: raw::Frame| -> Value {
        let payload = if frame.head & 0x40 != 0 {
            let mut out = Vec::with_capacity(1 << 16);
            let input = [&frame.payload[..], &[0, 0, 0xff, 0xff]].concat();
            inflater
                .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                .expect("inflates with the window kept");
            out
        } else {
            frame.payload
        };
        serde_json::from_slice(&payload).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&payload)))
    };
    assert_eq!(read(ws.next_frame(WAIT).await.unwrap())["op"], "ok");
    let before = linked(&node).await;
    let line = |i: usize| json!({"line": i, "text": format!("{i}: what a pass from midfield, the keeper never reached it; ").repeat(4)});
    let score = |i: usize| json!({"minute": i, "lineup": "Lions: one two three four five six seven eight nine ten eleven ".repeat(4)});
    // Ten lines 5 ms apart, then the score; the held scores go out at the pace's times, mostly
    // between two lines.
    let (rounds, per_round) = (30, 10);
    let publisher = {
        let url = node.url("/publish");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..rounds {
                for l in per_round * i..per_round * (i + 1) {
                    let body = json!({"room":"match","data":line(l)});
                    assert_eq!(http.post(&url).json(&body).send().await.unwrap().status(), 202);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let body = json!({"room":"match","key":"score","data":score(i)});
                assert_eq!(http.post(&url).json(&body).send().await.unwrap().status(), 202);
            }
        })
    };
    let (mut lines, mut last_score) = (0, None);
    while lines < per_round * rounds || last_score != Some(score(rounds - 1)) {
        let v = read(
            ws.next_frame(WAIT)
                .await
                .expect("every line and the last score in time"),
        );
        if v["op"] != "msg" {
            continue;
        }
        match v["key"].as_str() {
            Some("score") => last_score = Some(v["data"].clone()),
            _ => {
                assert_eq!(v["data"], line(lines), "line {lines}, in order");
                lines += 1;
            }
        }
    }
    publisher.await.unwrap();
    let went = linked(&node).await - before;
    // The first line after a score follows a gap (a value held back) or a value sent alone.
    assert!(went >= 200.0, "{went} of {} lines went linked", per_round * rounds);
    node.stop().await;
}

/// Joins `room` over a raw socket and waits for the `ok`.
async fn raw_join(ws: &mut raw::RawWs, room: &str) {
    let join = json!({"op":"join","room":room,"id":1}).to_string();
    ws.send(&raw::masked(0x81, join.as_bytes())).await.unwrap();
    loop {
        let frame = ws.next_frame(WAIT).await.expect("the join's answer");
        if frame.payload.starts_with(br#"{"op":"ok""#) {
            return;
        }
    }
}

async fn publish(node: &Node, room: &str, data: Value) {
    let status = reqwest::Client::new()
        .post(node.url("/publish"))
        .json(&json!({"room":room,"data":data}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

/// The payload of the next `msg` frame, and whether it came compressed (RSV1), inflated.
async fn next_msg(ws: &mut raw::RawWs) -> (bool, Vec<u8>) {
    loop {
        let frame = ws.next_frame(WAIT).await.expect("a frame in time");
        let rsv1 = frame.head & 0x40 != 0;
        let payload = if rsv1 {
            compress::inflate(&frame.payload, 1 << 20).expect("a frame the node compressed inflates")
        } else {
            frame.payload
        };
        if payload.starts_with(br#"{"op":"msg""#) {
            return (rsv1, payload);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_compressed_only_for_sockets_that_negotiated_and_only_when_on() {
    let node = Node::start(config(None, "deflate-or-not")).await;
    let (mut plain, head) = raw::connect_answered(node.addr, "?user=plain", "").await;
    assert_eq!(raw::answer_header(&head, "sec-websocket-extensions"), None, "{head}");
    let (mut deflating, head) = raw::connect_answered(node.addr, "?user=deflating", OFFER).await;
    assert_eq!(
        raw::answer_header(&head, "sec-websocket-extensions"),
        Some(ANSWER),
        "{head}"
    );
    raw_join(&mut plain, "r").await;
    raw_join(&mut deflating, "r").await;
    let large = json!({"text": "the same words again and again ".repeat(100)});
    publish(&node, "r", json!({"small": 1})).await;
    publish(&node, "r", large.clone()).await;
    let (rsv1, small) = next_msg(&mut plain).await;
    assert!(!rsv1);
    let (rsv1, big) = next_msg(&mut plain).await;
    assert!(!rsv1, "a client that offers nothing gets plain frames");
    assert_eq!(
        next_msg(&mut deflating).await,
        (false, small),
        "under --compress-min-bytes: plain"
    );
    assert_eq!(
        next_msg(&mut deflating).await,
        (true, big),
        "compressed, and inflates to the same"
    );
    node.stop().await;

    let mut cfg = config(None, "compress-off");
    cfg.compress = false;
    let node = Node::start(cfg).await;
    let (mut ws, head) = raw::connect_answered(node.addr, "?user=off", OFFER).await;
    assert_eq!(
        raw::answer_header(&head, "sec-websocket-extensions"),
        None,
        "--compress false: {head}"
    );
    raw_join(&mut ws, "r").await;
    publish(&node, "r", large).await;
    assert!(!next_msg(&mut ws).await.0);
    // Not negotiated: a compressed frame breaks the protocol.
    ws.send(&raw::masked(0xc1, &compress::deflate(b"{}"))).await.unwrap();
    assert_eq!(ws.close_frame(WAIT).await.map(|c| c.0), Some(1002));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_offers_are_declined_and_the_upgrade_still_succeeds() {
    let node = Node::start(config(None, "bad-offers")).await;
    for offer in [
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=",
        "permessage-deflate; what=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_max_window_bits=\"1",
    ] {
        let extra = format!("Sec-WebSocket-Extensions: {offer}\r\n");
        let (mut ws, head) = raw::connect_answered(node.addr, "?user=bad", &extra).await;
        assert_eq!(
            raw::answer_header(&head, "sec-websocket-extensions"),
            None,
            "{offer}: {head}"
        );
        // Declined: RSV1 is then a protocol error.
        ws.send(&raw::masked(0xc1, &compress::deflate(b"{}"))).await.unwrap();
        assert_eq!(ws.close_frame(WAIT).await.map(|c| c.0), Some(1002), "{offer}");
    }
    // A bad offer, then a good one: the good one is answered.
    let extra = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8, permessage-deflate\r\n";
    let (_, head) = raw::connect_answered(node.addr, "?user=good", extra).await;
    assert_eq!(
        raw::answer_header(&head, "sec-websocket-extensions"),
        Some("permessage-deflate; server_no_context_takeover"),
        "{head}"
    );
    node.stop().await;
}

/// The process's resident memory now (`VmRSS`) or at its peak (`VmHWM`), in bytes.
fn memory(which: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Starts measuring the peak resident memory from now; false where the kernel does not allow it.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_compressed_frames_are_closed_at_once_while_another_socket_keeps_receiving() {
    let mut cfg = config(None, "bad-deflate");
    cfg.max_frame_bytes = 64 << 10;
    cfg.close_grace = Duration::from_millis(300);
    let node = Arc::new(Node::start(cfg).await);

    // A bystander, fed throughout.
    let mut bystander = Client::connect(&node.ws("?user=bystander")).await;
    bystander.join("watch").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let feeder = tokio::spawn({
        let (node, stop, sent) = (node.clone(), stop.clone(), sent.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                let n = sent.load(Ordering::SeqCst);
                publish(&node, "watch", json!({"n": n})).await;
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    // Deflate bombs: about 1 KB that inflates to 1 MiB, and 32 KB that inflates to 32 MiB (with
    // `--max-frame-bytes` 64 KiB). Made before memory is measured.
    let small_bomb = compress::deflate(&vec![0u8; 1 << 20]);
    let big_bomb = compress::deflate(&vec![0u8; 32 << 20]);
    assert!(small_bomb.len() < 1_200 && big_bomb.len() < 40_000);
    let text: String = (0..3000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let whole = compress::deflate(text.as_bytes());
    let cases: Vec<(&str, bool, Vec<u8>, u16)> = vec![
        ("1 KB bomb", true, raw::masked(0xc2, &small_bomb), 1009),
        ("32 KB bomb", true, raw::masked(0xc2, &big_bomb), 1009),
        (
            "bomb in fragments",
            true,
            [
                raw::masked(0x42, &small_bomb[..600]),
                raw::masked(0x80, &small_bomb[600..]),
            ]
            .concat(),
            1009,
        ),
        ("corrupt stream", true, raw::masked(0xc1, &[0x07, 0x00, 0x12]), 1007),
        ("cut stream", true, raw::masked(0xc1, &whole[..whole.len() / 2]), 1007),
        ("RSV1 on a ping", true, raw::masked(0xc9, b""), 1002),
        (
            "RSV1 on a continuation",
            true,
            [raw::masked(0x41, &whole[..10]), raw::masked(0xc0, &whole[10..])].concat(),
            1002,
        ),
        ("RSV1 not negotiated", false, raw::masked(0xc1, &whole), 1002),
    ];
    // The peak, not the end: a buffer freed once its socket closed still counts.
    let peak = reset_peak();
    let rss_before = memory("VmRSS");
    for (what, negotiate, bytes, code) in cases {
        let offer = if negotiate { OFFER } else { "" };
        let (mut ws, head) = raw::connect_answered(node.addr, "?user=bad", offer).await;
        assert_eq!(
            raw::answer_header(&head, "sec-websocket-extensions").is_some(),
            negotiate
        );
        let started = Instant::now();
        let _ = ws.send(&bytes).await;
        let close = ws.close_frame(WAIT).await;
        assert_eq!(close.as_ref().map(|c| c.0), Some(code), "{what}: {close:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: closed after {:?}",
            started.elapsed()
        );
    }
    let grew = memory(if peak { "VmHWM" } else { "VmRSS" }).saturating_sub(rss_before);
    assert!(grew < 24 << 20, "memory grew by {grew} bytes at its peak");

    // The bystander got every message, in order, while the others were closed.
    let published_during = sent.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    feeder.await.unwrap();
    let total = sent.load(Ordering::SeqCst);
    assert!(published_during > 10, "only {published_during} published meanwhile");
    for n in 0..total {
        let v = bystander.recv().await.expect("the bystander stays open");
        assert_eq!(v["data"]["n"], n, "{v}");
    }
    drop(bystander);
    Arc::try_unwrap(node).ok().expect("the feeder is done").stop().await;
}
