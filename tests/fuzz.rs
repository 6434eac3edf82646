//! Property-based fuzzing of everything that decodes bytes from outside: client frames in both
//! encodings, the bus envelope, building client frames from an envelope's data, and compressed
//! client frames read through the inflater. Nothing may panic; what decodes must re-encode
//! consistently; the inflater hands on no more than its limit allows. Cases per property: `PROPTEST_CASES` (default
//! 2000 here), so CI runs each for a bounded time.
//!
//! Then the same over the network, against one live embedded node: random HTTP requests, and
//! random bytes after a valid WebSocket handshake (with and without permessage-deflate negotiated).
//! The node must answer or close every connection,
//! send only close codes of the contract, never panic, and keep serving others. Cases per property:
//! `FUZZ_NET_CASES` (default 64).

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;
use common::raw;
use proptest::prelude::*;
use shardcast::{
    encoding::json_to_msgpack,
    envelope::{Envelope, Kind},
    frame::{data_depth_ok, decode_binary, decode_text, Command, Encoding, DEFAULT_DATA_DEPTH},
    inflate::{Inflating, CHUNK},
    wire::broadcast_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{protocol::Role, Message, WebSocket};

/// A wire frame read as a client reads it: exactly one message.
fn read(frame: &Bytes) -> Message {
    let mut ws = WebSocket::from_raw_socket(std::io::Cursor::new(frame.to_vec()), Role::Client, None);
    let msg = ws.read().expect("a whole frame");
    assert!(ws.read().is_err(), "one frame only");
    msg
}

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON-ish text: fragments of the contract glued at random, which reach deeper than pure noise.
fn jsonish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"op\"",
        "\"join\"",
        "\"pub\"",
        "\"dm\"",
        "\"ping\"",
        "\"leave\"",
        "\"room\"",
        "\"to\"",
        "\"data\"",
        "\"id\"",
        "1",
        "-7",
        "1e999",
        "null",
        "true",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"x\"",
    ]);
    prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
}

fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::hash_map(".{0,6}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn text_frames_never_panic(s in any::<String>()) {
        let _ = decode_text(&s, DEFAULT_DATA_DEPTH);
    }

    #[test]
    fn contract_shaped_text_never_panics(s in jsonish()) {
        let _ = decode_text(&s, DEFAULT_DATA_DEPTH);
    }

    #[test]
    fn binary_frames_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_binary(&b, DEFAULT_DATA_DEPTH);
    }

    #[test]
    fn envelopes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&Bytes::from(b));
    }

    #[test]
    fn envelope_prefixes_and_mutations_never_panic(data in any_json(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
        let env = Envelope {
            kind: Kind::Room,
            origin: "n".into(),
            target: "r".into(),
            from: "u".into(),
            ts_us: 1,
            format: Encoding::Json,
            data: Bytes::from(data.to_string()),
            pos: None,
            // Keyed: the longest layout, with every optional field.
            key: Some("odds:4711".into()),
            key_seq: None,
        };
        let wire = env.encode();
        prop_assert_eq!(Envelope::decode(&wire).unwrap(), env.clone());
        let _ = Envelope::decode(&wire.slice(..cut % (wire.len() + 1)));
        let mut bytes = wire.to_vec();
        let i = flip.0 % bytes.len();
        bytes[i] ^= flip.1;
        if let Ok(mutated) = Envelope::decode(&Bytes::from(bytes)) {
            // Whatever decodes must build frames or refuse, never panic.
            for enc in Encoding::ALL {
                let _ = broadcast_frame(enc, &mutated, 0);
            }
        }
    }

    #[test]
    fn published_data_reaches_both_encodings_intact(data in any_json()) {
        let text = serde_json::json!({"op":"pub","room":"r","data":data}).to_string();
        let Command::Pub { data: d, .. } = decode_text(&text, DEFAULT_DATA_DEPTH).unwrap().command else { panic!("not a pub") };
        let env = Envelope { kind: Kind::Room, origin: "n".into(), target: "r".into(), from: "u".into(), ts_us: 1, format: d.format, data: d.bytes, pos: None, key: None, key_seq: None };
        let json_frame = broadcast_frame(Encoding::Json, &env, 0).unwrap();
        let v: serde_json::Value = serde_json::from_str(read(&json_frame).to_text().unwrap()).unwrap();
        prop_assert_eq!(&v["data"], &data);
        let mp_frame = broadcast_frame(Encoding::MsgPack, &env, 0).unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&read(&mp_frame).into_data()).unwrap();
        prop_assert_eq!(&v["data"], &data);
    }

    #[test]
    fn msgpack_commands_round_trip(data in any_json(), id in any::<i64>()) {
        let frame = rmp_serde::to_vec_named(&serde_json::json!({"op":"pub","room":"r","data":data,"id":id})).unwrap();
        let req = decode_binary(&frame, DEFAULT_DATA_DEPTH).unwrap();
        prop_assert_eq!(req.id, Some(id));
        let Command::Pub { data: d, .. } = req.command else { panic!("not a pub") };
        let back: serde_json::Value = rmp_serde::from_slice(&d.bytes).unwrap();
        prop_assert_eq!(back, data);
    }
}

/// The nesting of a JSON value, measured the slow way.
fn depth_of(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

/// Bytes that nest deep in both encodings, often past the deepest limit: mostly MessagePack arrays
/// of thousands of items (0xdc and a 16-bit count) and JSON `[`, which stay open, some that close
/// at once, and noise.
fn deep_noise() -> impl Strategy<Value = Vec<u8>> {
    let bytes = vec![
        0xdc, 0xdc, 0xdc, 0xdc, 0xdc, 0xdc, 0xff, b'[', b'[', 0x91, b'"', b'\\', 0x01, b']',
    ];
    prop_oneof![
        3 => prop::collection::vec(prop::sample::select(bytes), 0..1000),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn data_depth_agrees_with_the_value_in_both_encodings(data in any_json(), max in 0usize..8) {
        let text = data.to_string();
        let want = depth_of(&data) <= max;
        prop_assert_eq!(data_depth_ok(Encoding::Json, text.as_bytes(), max), want);
        let mp = json_to_msgpack(text.as_bytes()).unwrap();
        prop_assert_eq!(data_depth_ok(Encoding::MsgPack, &mp, max), want);
    }

    #[test]
    fn data_depth_never_panics_on_noise(b in deep_noise(), max in 0usize..200) {
        let _ = data_depth_ok(Encoding::Json, &b, max);
        let _ = data_depth_ok(Encoding::MsgPack, &b, max);
    }
}

/// Panics on the live node's threads, counted by a hook installed with it.
static NODE_PANICS: AtomicUsize = AtomicUsize::new(0);
const NODE_THREAD: &str = "fuzzed-node";

/// One embedded node for every network case, on its own runtime (named threads, so a panic in
/// one of its tasks is seen, not swallowed by the runtime).
struct Live {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    _node: common::Node,
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(NODE_THREAD) {
                NODE_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(NODE_THREAD)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = common::config(None, "fuzz");
        cfg.max_frame_bytes = 4096;
        cfg.http_body_timeout = Duration::from_secs(2);
        cfg.close_grace = Duration::from_millis(200);
        let node = runtime.block_on(common::Node::start(cfg));
        Live {
            addr: node.addr,
            _node: node,
            runtime,
        }
    })
}

fn net_cases() -> ProptestConfig {
    let n = std::env::var("FUZZ_NET_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// How long the node may take to answer or close a fuzzed connection.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Whether the node still answers `/healthz` and a WebSocket ping.
async fn still_serving(addr: SocketAddr) -> bool {
    let healthy = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.ok()?;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    };
    if tokio::time::timeout(ANSWER_WITHIN, healthy).await != Ok(Some(true)) {
        return false;
    }
    let mut ws = raw::connect(addr, "?user=bystander", "").await;
    ws.send(&raw::masked(0x81, br#"{"op":"ping","id":1}"#)).await.is_ok()
        && ws.send(&raw::masked(0x88, &1000u16.to_be_bytes())).await.is_ok()
        && ws
            .read_to_end(ANSWER_WITHIN)
            .await
            .frames
            .iter()
            .any(|f| f.payload.as_slice() == br#"{"op":"pong","id":1}"#)
}

/// Requests of two kinds: well formed (a valid request line, headers and a `content-length` that
/// matches the body, so most reach a handler), and pieces of real requests glued at random.
fn http_request() -> impl Strategy<Value = Vec<u8>> {
    let path = || {
        prop_oneof![
            3 => Just("/publish"),
            2 => prop::sample::select(vec!["/ws", "/ws?user=f", "/ws?user=%7B", "/ws?token=a.b.c"]),
            1 => prop::sample::select(vec!["/healthz", "/readyz", "/metrics", "/", "*", "/%zz", "/publish?x=\u{7f}"]),
        ]
    };
    let body = || {
        prop_oneof![
            3 => jsonish(),
            1 => Just(r#"{"room":"r","data":[[[[1]]]]}"#.to_string()),
            1 => Just(r#"{"room":"{r}","data":1,"from":"\u202e"}"#.to_string()),
            1 => Just("5\r\nhello\r\n0\r\n\r\n".to_string()),
            1 => ".{0,64}",
        ]
    };
    let header = prop::sample::select(vec![
        "Host: x",
        "Content-Length: 0",
        "Content-Length: 12",
        "Content-Length: 99999999",
        "Content-Length: -1",
        "Content-Length: 5, 6",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Connection: upgrade",
        "Connection: close",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol: shardcast.v1.msgpack",
        "Authorization: Bearer \u{0}",
        "Origin: https://evil.example",
        "Expect: 100-continue",
        "X: \r",
        ": empty",
        "Content-Type: application/json",
    ]);
    let well_formed = (
        prop_oneof![3 => Just("POST"), 1 => Just("GET")],
        path(),
        prop::collection::vec(
            prop::sample::select(vec![
                "Content-Type: application/json",
                "Authorization: Bearer x",
                "Connection: close",
                "Origin: https://evil.example",
            ]),
            0..3,
        ),
        body(),
    )
        .prop_map(|(method, path, headers, body)| {
            let mut out = format!("{method} {path} HTTP/1.1\r\nhost: x\r\n");
            for h in headers {
                out.push_str(h);
                out.push_str("\r\n");
            }
            out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
            out.into_bytes()
        });
    let glued = (
        prop_oneof![
            3 => Just("POST"),
            3 => Just("GET"),
            1 => prop::sample::select(vec!["PUT", "HEAD", "OPTIONS", "G\u{0}T", ""]),
        ],
        path(),
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""]),
        prop::collection::vec(header, 0..8),
        body(),
        any::<bool>(),
    )
        .prop_map(|(method, path, version, headers, body, crlf)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut out = format!("{method} {path} {version}{eol}");
            for h in headers {
                out.push_str(h);
                out.push_str(eol);
            }
            out.push_str(eol);
            out.push_str(&body);
            out.into_bytes()
        });
    prop_oneof![well_formed, glued]
}

/// Client frames: some well formed, some broken in one way or another, some noise.
fn ws_bytes() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        any::<u8>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..200),
        jsonish(),
    )
        .prop_map(|(head, mask, noise, text)| {
            let payload = if head & 1 == 0 { noise } else { text.into_bytes() };
            if mask {
                raw::masked(head, &payload)
            } else {
                raw::unmasked(head, &payload)
            }
        });
    prop_oneof![
        prop::collection::vec(frame, 1..6).prop_map(|f| f.concat()),
        prop::collection::vec(any::<u8>(), 1..300),
    ]
}

/// Close codes the node may send.
const CONTRACT_CODES: [u16; 9] = [1000, 1002, 1007, 1008, 1009, 4001, 4002, 4003, 4008];

/// Sends `bytes` on a socket upgraded with `query` and the extra `headers`, then shuts the write
/// side: the node closes the socket, in whole frames, with a contract code if any, without
/// panicking, and goes on serving.
fn served_or_closed(query: &str, headers: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let live = live();
    let panics = NODE_PANICS.load(Ordering::SeqCst);
    let ending = live.runtime.block_on(async {
        let mut ws = raw::connect(live.addr, query, headers).await;
        let _ = ws.send(bytes).await;
        let _ = ws.tcp.shutdown().await;
        ws.read_to_end(ANSWER_WITHIN).await
    });
    prop_assert!(ending.closed, "the connection stayed open: {:?}", ending);
    prop_assert!(ending.rest.is_empty(), "not whole frames: {:?}", ending);
    if let Some((code, _)) = ending.close() {
        prop_assert!(CONTRACT_CODES.contains(&code), "close code {}", code);
    }
    prop_assert_eq!(NODE_PANICS.load(Ordering::SeqCst), panics, "the node panicked");
    prop_assert!(
        live.runtime.block_on(still_serving(live.addr)),
        "the node stopped serving"
    );
    Ok(())
}

proptest! {
    #![proptest_config(net_cases())]

    #[test]
    fn http_requests_are_answered_or_closed(request in http_request()) {
        let live = live();
        let panics = NODE_PANICS.load(Ordering::SeqCst);
        let (ended, answer) = live.runtime.block_on(async {
            let mut tcp = tokio::net::TcpStream::connect(live.addr).await.unwrap();
            let _ = tcp.write_all(&request).await;
            let _ = tcp.shutdown().await;
            let mut answer = Vec::new();
            let ended = tokio::time::timeout(ANSWER_WITHIN, async {
                let mut chunk = [0u8; 4096];
                loop {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await
            .is_ok();
            (ended, answer)
        });
        prop_assert!(ended, "the connection was neither answered nor closed: {:?}", String::from_utf8_lossy(&answer));
        prop_assert!(answer.is_empty() || answer.starts_with(b"HTTP/1."), "not HTTP: {:?}", String::from_utf8_lossy(&answer));
        prop_assert_eq!(NODE_PANICS.load(Ordering::SeqCst), panics, "the node panicked");
        prop_assert!(live.runtime.block_on(still_serving(live.addr)), "the node stopped serving");
    }

    #[test]
    fn websocket_bytes_are_served_or_closed_with_a_contract_code(bytes in ws_bytes()) {
        served_or_closed("?user=fuzz", "", &bytes)?;
    }
}

/// The inflater's limit in the properties below, as `--max-frame-bytes`.
const INFLATE_LIMIT: usize = 4096;

/// A client's compressor with its context kept across messages, as browsers keep it: each message
/// deflated with a sync flush, its `00 00 ff ff` dropped (RFC 7692 §7.2.1).
struct Deflater(flate2::Compress);

impl Deflater {
    fn new() -> Deflater {
        Deflater(flate2::Compress::new(flate2::Compression::fast(), false))
    }

    fn message(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        let start = self.0.total_in();
        loop {
            let at = (self.0.total_in() - start) as usize;
            out.reserve(1024);
            self.0
                .compress_vec(&data[at..], &mut out, flate2::FlushCompress::Sync)
                .unwrap();
            if (self.0.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
                break;
            }
        }
        out.truncate(out.len().saturating_sub(4));
        out
    }
}

/// What one message of a client that compresses is: its data, and how it is sent.
#[derive(Debug, Clone)]
struct Sent {
    data: Vec<u8>,
    compressed: bool,
    /// Split into this many frames (1: one frame), with a ping after the first.
    fragments: usize,
}

fn sent() -> impl Strategy<Value = Sent> {
    let data = prop_oneof![
        jsonish().prop_map(String::into_bytes),
        (any::<u8>(), 0usize..3000).prop_map(|(b, n)| vec![b; n]),
        prop::collection::vec(any::<u8>(), 0..600),
    ];
    (data, prop::bool::weighted(0.8), 1usize..4).prop_map(|(data, compressed, fragments)| Sent {
        data,
        compressed,
        fragments,
    })
}

/// The wire bytes of `messages` sent by one client, binary frames, with one compressor.
fn wire_of(messages: &[Sent]) -> Vec<u8> {
    let mut deflater = Deflater::new();
    let mut wire = Vec::new();
    for m in messages {
        let payload = if m.compressed {
            deflater.message(&m.data)
        } else {
            m.data.clone()
        };
        let rsv1 = if m.compressed { 0x40 } else { 0 };
        let step = payload.len().div_ceil(m.fragments).max(1);
        let parts: Vec<&[u8]> = if payload.is_empty() {
            vec![&[][..]]
        } else {
            payload.chunks(step).collect()
        };
        for (i, part) in parts.iter().enumerate() {
            let fin = if i + 1 == parts.len() { 0x80 } else { 0 };
            let head = if i == 0 { fin | rsv1 | 0x2 } else { fin };
            wire.extend(raw::masked(head, part));
            if i == 0 {
                wire.extend(raw::masked(0x89, b"p"));
            }
        }
    }
    wire
}

/// Reads `wire` through an [`Inflating`] (the first `early` bytes handed over as read before the
/// socket), `read` bytes at a time: what it hands on, and whether it stopped on an error.
fn inflate_all(wire: &[u8], early: usize, read: usize) -> (Vec<u8>, bool) {
    let early = early.min(wire.len());
    let mut inflating = Inflating::new(INFLATE_LIMIT, wire[..early].to_vec());
    let mut socket = &wire[early..];
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut out = Vec::new();
    let mut buf = vec![0u8; read.max(1)];
    loop {
        let mut rb = tokio::io::ReadBuf::new(&mut buf);
        match inflating.poll_read(&mut socket, &mut cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) if rb.filled().is_empty() => return (out, false),
            std::task::Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            std::task::Poll::Ready(Err(_)) => return (out, true),
            // A slice never waits.
            std::task::Poll::Pending => unreachable!("a slice is always ready"),
        }
    }
}

/// Frames a client may send once it negotiated the extension, good and bad: real compressed
/// messages (whole, cut, with a byte flipped), noise with RSV1, control and continuation frames
/// with RSV1, bombs, and any header at all.
fn compressed_frames() -> impl Strategy<Value = Vec<u8>> {
    let frame = prop_oneof![
        3 => (prop::collection::vec(sent(), 1..4), any::<usize>(), any::<(usize, u8)>()).prop_map(|(msgs, cut, flip)| {
            let mut wire = wire_of(&msgs);
            match cut % 3 {
                0 => {}
                1 => wire.truncate(cut % (wire.len() + 1)),
                _ => {
                    let i = flip.0 % wire.len().max(1);
                    if let Some(b) = wire.get_mut(i) {
                        *b ^= flip.1;
                    }
                }
            }
            wire
        }),
        1 => (0usize..(1 << 20)).prop_map(|n| raw::masked(0xc2, &Deflater::new().message(&vec![0; n]))),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300), any::<bool>()).prop_map(|(head, payload, mask)| {
            let head = head | 0x40;
            if mask { raw::masked(head, &payload) } else { raw::unmasked(head, &payload) }
        }),
        1 => prop::collection::vec(any::<u8>(), 1..200),
    ];
    prop::collection::vec(frame, 1..4).prop_map(|f| f.concat())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn compressed_messages_read_back_whole(msgs in prop::collection::vec(sent(), 1..6), early in any::<usize>(), read in 1usize..5000) {
        let wire = wire_of(&msgs);
        let (out, failed) = inflate_all(&wire, early % (wire.len() + 1), read);
        let fits = msgs.iter().all(|m| m.data.len() <= INFLATE_LIMIT);
        prop_assert_eq!(failed, !fits, "refused a message that fits, or let one through that does not");
        if fits {
            // Tungstenite reads the messages back as they were sent, between the pings.
            let mut ws = WebSocket::from_raw_socket(std::io::Cursor::new(out), Role::Server, None);
            let mut got = Vec::new();
            while let Ok(msg) = ws.read() {
                if let Message::Binary(b) = msg {
                    got.push(b.to_vec());
                }
            }
            let want: Vec<Vec<u8>> = msgs.iter().map(|m| m.data.clone()).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn the_inflater_never_panics_and_hands_on_no_more_than_its_limit(wire in compressed_frames(), early in any::<usize>(), read in 1usize..5000) {
        let (out, _) = inflate_all(&wire, early % (wire.len() + 1), read);
        // What is handed on as it came, plus at most the limit (and frame headers) per message.
        let messages = wire.len() / 2 + 1;
        let bound = wire.len() + messages * (INFLATE_LIMIT + 14 * (INFLATE_LIMIT / CHUNK + 2));
        prop_assert!(out.len() <= bound, "{} bytes out of {} in", out.len(), wire.len());
        // Tungstenite, without a message limit of its own, reads it without panicking, and no
        // message it reads is over the limit (every uncompressed frame here is under it). Its frame
        // limit stays: the inflater hands on frames of at most `CHUNK`, and noise may declare any
        // length.
        let unlimited = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(Some(CHUNK));
        let mut ws = WebSocket::from_raw_socket(std::io::Cursor::new(out), Role::Server, Some(unlimited));
        while let Ok(msg) = ws.read() {
            prop_assert!(msg.len() <= INFLATE_LIMIT, "a message of {} bytes handed on", msg.len());
        }
    }
}

proptest! {
    #![proptest_config(net_cases())]

    #[test]
    fn compressed_websocket_bytes_are_served_or_closed_with_a_contract_code(bytes in compressed_frames()) {
        let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
        served_or_closed("?user=fuzz-deflate", offer, &bytes)?;
    }
}
