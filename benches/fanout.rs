//! The per-message costs of the delivery path, one piece at a time:
//!
//! - `envelope/encode`, `envelope/decode`: the bus envelope of a 128-byte payload.
//! - `frame/<client>_from_<data>`: building the broadcast frame of one message for one encoding,
//!   spliced (same encoding) or transcoded (the other).
//! - `frame/depth_<data>`, `frame/depth_<data>_4k`: `data_depth_ok`, the nesting check every
//!   message's data goes through, on the 128-byte payload and on 4 KiB of nested objects.
//! - `turn/<mix>/<frames>/10000`: the delivery path: `frames` messages recorded for a room of
//!   10,000 sockets (`Hub::record`), then one lane's turn writing each socket its frames with one
//!   `write_through` into an outlet that takes every byte at once (the user-space half of a write:
//!   lock, gather, hand over; no system call); throughput in frames, so criterion's "elem/s"
//!   inverted is the user-space nanoseconds per delivered frame, all of it timed. One frame a turn
//!   is a quiet room (each message written as it comes), 9 a busy one.
//! - `bytes/<form>/10000`: the same turn, one frame a turn, for a 1 KB scoreboard state published
//!   keyed (`state`), each update changing a few bytes: to sockets reading it `plain`, compressed
//!   (`deflate`: permessage-deflate negotiated, the frame compressed once per message), and as
//!   `delta+deflate` (joined with `delta` too). Compression and deltas are computed once per
//!   message, so their cost spread over 10,000 sockets is what the per-frame time shows; the
//!   bytes written per delivered frame are printed once per form.
//! - `chat/<form>/10000`: the same turn for unkeyed chat lines of 100 to 400 B, to sockets that
//!   negotiated permessage-deflate: each line compressed `alone` (`server_no_context_takeover`), or
//!   with the node keeping its `context` (`--compress-context 8KiB`): each line compressed a second
//!   time after the room's last lines, once per message, and sent so to every socket that read
//!   those last. Bytes written per delivered frame are printed once per form.
//! - `gate/push`: queueing one frame into a gate (timed 64 pushes at a time, flushed untimed);
//!   `gate/push_flush`: one frame's whole trip through a gate, push and flush.
//!
//! `cargo bench --bench fanout` (add `-- --warm-up-time 1 --measurement-time 3` for a quick run)

mod support;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use shardcast::{
    encoding::json_to_msgpack,
    envelope::{Envelope, Kind},
    fanout::{
        lanes::{Lanes, Shaping},
        writer::{Outbound, Scratch},
    },
    frame::{data_depth_ok, Encoding, DEFAULT_DATA_DEPTH},
    hub::{Hub, Interest, Joining},
    topic::Topic,
    wire::broadcast_frame,
};

const SOCKETS: usize = 10_000;
const BUDGET: usize = 1 << 20;

/// A 128-byte JSON payload, like the loadtest's.
fn json_payload() -> Bytes {
    let mut s = String::from("[3,123456,1790000000123456,\"");
    while s.len() < 126 {
        s.push('x');
    }
    s.push_str("\"]");
    Bytes::from(s)
}

fn envelope(format: Encoding) -> Envelope {
    let json = json_payload();
    let data = match format {
        Encoding::Json => json,
        Encoding::MsgPack => Bytes::from(json_to_msgpack(&json).expect("valid JSON")),
    };
    Envelope {
        kind: Kind::Room,
        origin: "a1b2c3d4".into(),
        target: "stadium".into(),
        from: "lt-p3".into(),
        ts_us: 1_790_000_000_123_456,
        format,
        data,
        pos: None,
        key: None,
        key_seq: None,
    }
}

fn bench_envelope(c: &mut Criterion) {
    let env = envelope(Encoding::Json);
    let wire = env.encode();
    let mut g = c.benchmark_group("envelope");
    g.bench_function("encode", |b| b.iter(|| black_box(&env).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| Envelope::decode(black_box(&wire)).expect("decodes"))
    });
    g.finish();
}

fn bench_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for data in Encoding::ALL {
        let env = envelope(data);
        for client in Encoding::ALL {
            let name = format!("{}_from_{}", label(client), label(data));
            g.bench_function(name, |b| {
                b.iter(|| broadcast_frame(client, black_box(&env), 0).expect("encodes"))
            });
        }
    }
    // About 4 KiB of objects nested a few deep, with strings to skip.
    let mut big = String::from("[");
    while big.len() < 4000 {
        big.push_str(r#"{"id":12345,"name":"a \"quoted\" [name]","tags":["x","y"],"pos":{"x":1.5,"y":-2}},"#);
    }
    big.push_str("null]");
    for data in Encoding::ALL {
        let small = envelope(data).data;
        let large = match data {
            Encoding::Json => Bytes::from(big.clone()),
            Encoding::MsgPack => Bytes::from(json_to_msgpack(big.as_bytes()).expect("valid JSON")),
        };
        for (name, bytes) in [
            (format!("depth_{}", label(data))),
            (format!("depth_{}_4k", label(data))),
        ]
        .into_iter()
        .zip([small, large])
        {
            g.bench_function(name, |b| {
                b.iter(|| assert!(data_depth_ok(data, black_box(&bytes), DEFAULT_DATA_DEPTH)))
            });
        }
    }
    g.finish();
}

fn label(e: Encoding) -> &'static str {
    match e {
        Encoding::Json => "json",
        Encoding::MsgPack => "msgpack",
    }
}

/// A hub whose topics are subscribed as soon as asked, with `SOCKETS` members in "stadium", the
/// `i`-th of them as `member(i)` says. Its topics are written on one lane: a turn writes every
/// socket.
fn stadium(rt: &tokio::runtime::Runtime, member: impl Fn(usize) -> (Outbound, Joining)) -> Hub {
    stadium_shaped(rt, Shaping::default(), member)
}

/// [`stadium`], its frames shaped as `shaping` says.
fn stadium_shaped(
    rt: &tokio::runtime::Runtime,
    shaping: Shaping,
    member: impl Fn(usize) -> (Outbound, Joining),
) -> Hub {
    let (hub, mut interest) = Hub::shaping(Lanes::new(1, 1), Vec::new(), shaping);
    let subscriber = hub.clone();
    rt.spawn(async move {
        while let Some(i) = interest.recv().await {
            if let Interest::Want(t) = i {
                subscriber.subscribed(&t, Ok(()));
            }
        }
    });
    rt.block_on(async {
        for i in 0..SOCKETS {
            let (out, joining) = member(i);
            let id = hub.register(out);
            hub.join_with(Topic::Room("stadium".into()), id, Duration::from_secs(5), joining)
                .await
                .expect("joins");
        }
    });
    hub
}

/// A plain member: every `msgpack_every`-th (if any) speaking MessagePack.
fn plain_member(i: usize, msgpack_every: Option<usize>) -> (Outbound, Joining) {
    let encoding = match msgpack_every {
        Some(n) if i % n == 0 => Encoding::MsgPack,
        _ => Encoding::Json,
    };
    let joining = Joining {
        hold: false,
        delta: false,
    };
    (Outbound::new(support::gate(BUDGET), encoding), joining)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_turn(c: &mut Criterion) {
    let rt = runtime();
    let env = envelope(Encoding::Json);
    let mut g = c.benchmark_group("turn");
    for (name, msgpack_every) in [("json", None), ("mixed", Some(2))] {
        let hub = stadium(&rt, |i| plain_member(i, msgpack_every));
        let mut scratch = Scratch::default();
        for frames in [1, 9] {
            g.throughput(Throughput::Elements((SOCKETS * frames) as u64));
            g.bench_function(BenchmarkId::new(format!("{name}/{frames}"), SOCKETS), |b| {
                b.iter(|| {
                    for _ in 0..frames {
                        hub.record(black_box(&env), 0);
                    }
                    let d = hub.write_lane(0, &mut scratch);
                    assert_eq!(d.delivered, SOCKETS * frames);
                })
            });
        }
    }
    g.finish();
}

/// A match's state, about 1 KB, of which update `i` changes a few bytes.
fn scoreboard(i: u64) -> Envelope {
    let players: Vec<String> = (0..22)
        .map(|p| format!("{{\"n\":{p},\"name\":\"Player {p}\",\"touches\":{}}}", (i + p) / 5))
        .collect();
    let data = format!(
        "{{\"home\":\"Arsenal\",\"away\":\"Chelsea\",\"score\":[{},{}],\"minute\":{},\"players\":[{}]}}",
        i / 40,
        i / 55,
        i / 10,
        players.join(",")
    );
    Envelope {
        key: Some("state".into()),
        key_seq: Some(i),
        data: Bytes::from(data),
        ..envelope(Encoding::Json)
    }
}

fn bench_bytes(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("bytes");
    g.throughput(Throughput::Elements(SOCKETS as u64));
    for (name, deflate, delta) in [
        ("plain", false, false),
        ("deflate", true, false),
        ("delta+deflate", true, true),
    ] {
        let hub = stadium(&rt, |_| {
            let out = Outbound::new(support::gate(BUDGET), Encoding::Json).deflating(deflate);
            (out, Joining { hold: false, delta })
        });
        bench_messages(&mut g, &format!("bytes/{name}"), name, &hub, scoreboard);
    }
    g.finish();
}

/// Records 200 of `message`'s messages in `hub`, a lane's turn after each, and prints the bytes
/// written per delivered frame (as `label`); then times one message and its turn (as `name`).
fn bench_messages(
    g: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    name: &str,
    hub: &Hub,
    message: impl Fn(u64) -> Envelope,
) {
    let mut scratch = Scratch::default();
    let mut i = 0;
    let (mut bytes, mut full) = (0, 0);
    for _ in 0..200 {
        i += 1;
        hub.record(&message(i), 0);
        let d = hub.write_lane(0, &mut scratch);
        (bytes, full) = (bytes + d.bytes, full + d.full_bytes);
    }
    println!(
        "{label}: {:.0} B written per delivered frame of {:.0} B ({:.1} %)",
        bytes as f64 / (200 * SOCKETS) as f64,
        full as f64 / (200 * SOCKETS) as f64,
        100.0 * bytes as f64 / full as f64
    );
    g.bench_function(BenchmarkId::new(name, SOCKETS), |b| {
        b.iter(|| {
            i += 1;
            hub.record(black_box(&message(i)), 0);
            let d = hub.write_lane(0, &mut scratch);
            assert_eq!(d.delivered, SOCKETS);
        })
    });
}

/// Chat line `i`: 100 to 400 B of text from a few dozen words, unkeyed.
fn chat_line(i: u64) -> Envelope {
    const WORDS: [&str; 24] = [
        "what", "a", "pass", "from", "midfield", "the", "keeper", "was", "never", "going", "to", "reach", "that",
        "one", "referee", "needs", "glasses", "come", "on", "lads", "we", "are", "so", "back",
    ];
    let size = 100 + (i * 37 % 300) as usize;
    let mut text = String::new();
    let mut k = i;
    while text.len() < size {
        k = k
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        text.push_str(WORDS[(k >> 33) as usize % WORDS.len()]);
        text.push(' ');
    }
    Envelope {
        data: Bytes::from(format!(
            "{{\"user\":\"fan{}\",\"text\":\"{}\"}}",
            i % 50,
            text.trim_end()
        )),
        ..envelope(Encoding::Json)
    }
}

fn bench_chat(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("chat");
    g.throughput(Throughput::Elements(SOCKETS as u64));
    for (name, context) in [("alone", 0), ("context", 8 << 10)] {
        let shaping = Shaping {
            compress_context: context,
            ..Shaping::default()
        };
        let hub = stadium_shaped(&rt, shaping, |_| {
            let out = Outbound::new(support::gate(BUDGET), Encoding::Json)
                .deflating(true)
                .keeping_context(context > 0);
            (
                out,
                Joining {
                    hold: false,
                    delta: false,
                },
            )
        });
        bench_messages(&mut g, &format!("chat/{name}"), name, &hub, chat_line);
    }
    g.finish();
}

fn bench_gate(c: &mut Criterion) {
    let frame = broadcast_frame(Encoding::Json, &envelope(Encoding::Json), 0).expect("encodes");
    let gate = support::gate(BUDGET);
    let mut g = c.benchmark_group("gate");
    g.bench_function("push", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(64);
                let start = Instant::now();
                for _ in 0..n {
                    black_box(gate.push(frame.clone()));
                }
                timed += start.elapsed();
                gate.flush();
                left -= n;
            }
            timed
        })
    });
    g.bench_function("push_flush", |b| {
        b.iter(|| {
            gate.push(frame.clone());
            gate.flush();
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_envelope,
    bench_frame,
    bench_turn,
    bench_bytes,
    bench_chat,
    bench_gate
);
criterion_main!(benches);
