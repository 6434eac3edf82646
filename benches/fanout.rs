//! The per-message costs of the delivery path, one piece at a time:
//!
//! - `envelope/encode`, `envelope/decode`: the bus envelope of a 128-byte payload.
//! - `frame/<client>_from_<data>`: building the broadcast frame of one message for one encoding,
//!   spliced (same encoding) or transcoded (the other).
//! - `deliver/<mix>/10000`: `Hub::deliver` of one room message to 10,000 local sockets' gates,
//!   throughput in sockets, so criterion's "elem/s" inverted is nanoseconds per socket. Only the
//!   `deliver` call is timed. Every 16 deliveries the bench drains every gate the way a socket's
//!   writer does (`Gate::next` then `Gate::release`), untimed, so queues stay a few frames deep,
//!   never near the budget, and keep the capacity a writer leaves them with: steady state.
//! - `gate/push`: queueing one frame into a gate (timed 64 pushes at a time, then drained untimed);
//!   `gate/push_next_release`: one frame's whole trip through a gate, push, hand-over to the
//!   writer, release.
//!
//! `cargo bench --bench fanout` (add `-- --warm-up-time 1 --measurement-time 3` for a quick run)

use std::{
    collections::VecDeque,
    future::Future,
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use axum::extract::ws::Message;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardcast::{
    envelope::{Envelope, Kind},
    frame::{broadcast_frame, json_to_msgpack, Encoding},
    gate::{Gate, Next},
    hub::{Hub, Interest, Member, Topic},
};

const SOCKETS: usize = 10_000;
const BUDGET: usize = 1 << 20;
/// Deliveries between two drains of every gate.
const DRAIN_EVERY: u64 = 16;

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
                b.iter(|| broadcast_frame(client, black_box(&env)).expect("encodes"))
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

/// Polls a future that is known to be ready (a gate's `next` with frames queued, or the end).
fn ready<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("expected a ready future"),
    }
}

/// Empties a gate as the socket's writer would, keeping `buf`'s capacity for the next time.
fn drain(gate: &Gate, buf: &mut VecDeque<Message>) {
    if gate.queued() == 0 {
        return;
    }
    match ready(gate.next(buf)) {
        Next::Frames(bytes) => {
            buf.clear();
            gate.release(bytes);
        }
        other => panic!("gate not open: {other:?}"),
    }
}

/// A hub whose topics are subscribed as soon as asked, with `SOCKETS` members in "stadium",
/// every `msgpack_every`-th of them (if any) speaking MessagePack.
fn stadium(rt: &tokio::runtime::Runtime, msgpack_every: Option<usize>) -> (Hub, Vec<Arc<Gate>>) {
    let (hub, mut interest) = Hub::new();
    let subscriber = hub.clone();
    rt.spawn(async move {
        while let Some(i) = interest.recv().await {
            if let Interest::Want(t) = i {
                subscriber.subscribed(&t, Ok(()));
            }
        }
    });
    let topic = Topic::Room("stadium".into());
    let gates: Vec<_> = (0..SOCKETS).map(|_| Arc::new(Gate::new(BUDGET))).collect();
    rt.block_on(async {
        for (i, gate) in gates.iter().enumerate() {
            let encoding = match msgpack_every {
                Some(n) if i % n == 0 => Encoding::MsgPack,
                _ => Encoding::Json,
            };
            let id = hub.register(Member {
                gate: gate.clone(),
                encoding,
            });
            hub.join(topic.clone(), id, Duration::from_secs(5))
                .await
                .expect("joins");
        }
    });
    (hub, gates)
}

fn bench_deliver(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let env = envelope(Encoding::Json);
    let mut g = c.benchmark_group("deliver");
    g.throughput(Throughput::Elements(SOCKETS as u64));
    for (name, msgpack_every) in [("json", None), ("mixed", Some(2))] {
        let (hub, gates) = stadium(&rt, msgpack_every);
        let mut buf = VecDeque::new();
        g.bench_function(BenchmarkId::new(name, SOCKETS), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for i in 0..iters {
                    let start = Instant::now();
                    let d = hub.deliver(black_box(&env));
                    timed += start.elapsed();
                    assert_eq!(d.delivered, SOCKETS);
                    if i % DRAIN_EVERY == DRAIN_EVERY - 1 || i == iters - 1 {
                        for gate in &gates {
                            drain(gate, &mut buf);
                        }
                    }
                }
                timed
            })
        });
    }
    g.finish();
}

fn bench_gate(c: &mut Criterion) {
    let Message::Text(text) = broadcast_frame(Encoding::Json, &envelope(Encoding::Json)).expect("encodes") else {
        unreachable!("JSON frames are text")
    };
    let frame = Message::Text(text);
    let gate = Gate::new(BUDGET);
    let mut buf = VecDeque::new();
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
                drain(&gate, &mut buf);
                left -= n;
            }
            timed
        })
    });
    g.bench_function("push_next_release", |b| {
        b.iter(|| {
            gate.push(frame.clone());
            drain(&gate, &mut buf);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_envelope, bench_frame, bench_deliver, bench_gate);
criterion_main!(benches);
