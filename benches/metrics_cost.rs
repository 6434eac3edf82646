//! What recording metrics costs next to the fan-out it measures.
//!
//! One room message fanned out to N local sockets, as a quiet room's worker does it: recorded
//! (`Hub::record`) and written at once on a lane's turn (`Hub::write_lane`, into sockets that take
//! every byte), preceded by the record the delivery worker makes for each message it receives
//! (`metrics::bus_received`), so one iteration makes every per-message record of the delivery
//! path. Variants:
//!
//! - `fanout/no_recorder/N`: no metrics recorder installed, so the `metrics` macros are no-ops.
//! - `fanout/prometheus/N`: the node's Prometheus recorder (`metrics::handle()`) installed.
//! - `record_only`: the recording calls of one message alone, recorder installed: the numerator of
//!   the cost ratio, free of the fan-out's noise.
//! - `sample/10000`: the once-a-second sampling of 10,000 sockets (gauges and the per-socket queue
//!   depth histogram), to compare with one second.
//!
//! A recorder cannot be uninstalled, so the variants run in one process in the order of
//! `criterion_group!` below: every no-recorder bench runs before the first bench that installs one
//! (and checks that none is). All of it is timed.
//!
//! `cargo bench --bench metrics_cost -- --warm-up-time 1 --measurement-time 3`

mod support;

use std::{
    hint::black_box,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use shardcast::{
    envelope::{Envelope, Kind},
    fanout::{
        lanes::Lanes,
        writer::{Outbound, Scratch},
    },
    frame::Encoding,
    hub::{Hub, Interest},
    metrics,
    metrics::Delivery,
    topic::Topic,
};

const ROOM: &str = "stadium";
const SIZES: [usize; 2] = [100, 10_000];
/// Far above what one iteration writes: the sockets take every byte.
const BUDGET: usize = 1 << 30;

static RECORDER: AtomicBool = AtomicBool::new(false);

fn install_recorder() {
    metrics::handle();
    RECORDER.store(true, Ordering::SeqCst);
}

/// A hub with `n` JSON sockets in `ROOM`, and a typical score update for it.
struct Fanout {
    hub: Hub,
    members: usize,
    scratch: Scratch,
    env: Envelope,
}

impl Fanout {
    fn new(n: usize) -> Fanout {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (hub, mut interest) = Hub::new(Lanes::new(1, 1));
        rt.block_on(async {
            // The interest manager's part: the room's channels are "subscribed" at once.
            let subscriber = hub.clone();
            tokio::spawn(async move {
                while let Some(request) = interest.recv().await {
                    if let Interest::Want(topic) = request {
                        subscriber.subscribed(&topic, Ok(()));
                    }
                }
            });
            for _ in 0..n {
                let gate = support::gate(BUDGET);
                let id = hub.register(Outbound::new(gate.clone(), Encoding::Json));
                let joined = hub.join(Topic::Room(ROOM.into()), id, Duration::from_secs(5)).await;
                joined.expect("joined");
            }
        });
        let env = Envelope {
            kind: Kind::Room,
            origin: "bench".into(),
            target: ROOM.into(),
            from: "scoreboard".into(),
            ts_us: shardcast::envelope::now_us(),
            format: Encoding::Json,
            data: Bytes::from_static(br#"{"home":2,"away":1,"minute":67,"event":"goal","by":"No. 9"}"#),
            pos: None,
            key: None,
            key_seq: None,
        };
        Fanout {
            hub,
            members: n,
            scratch: Scratch::default(),
            env,
        }
    }

    /// What the delivery worker does for one message in a quiet room.
    fn deliver(&mut self) -> Delivery {
        metrics::bus_received(0.0012);
        self.hub.record(&self.env, 0);
        // Records its delivery too, as the worker's turn does.
        self.hub.write_lane(0, &mut self.scratch)
    }

    /// Times `iters` fan-outs.
    fn run(&mut self, iters: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            let d = black_box(self.deliver());
            assert_eq!(d.delivered, self.members);
        }
        start.elapsed()
    }
}

fn fanout(c: &mut Criterion, variant: &str) {
    let mut group = c.benchmark_group("fanout");
    for n in SIZES {
        let mut f = Fanout::new(n);
        group.bench_function(BenchmarkId::new(variant, n), |b| b.iter_custom(|iters| f.run(iters)));
    }
    group.finish();
}

fn no_recorder(c: &mut Criterion) {
    assert!(!RECORDER.load(Ordering::SeqCst), "a recorder is installed already");
    fanout(c, "no_recorder");
}

fn prometheus(c: &mut Criterion) {
    install_recorder();
    fanout(c, "prometheus");
    let d = Delivery {
        delivered: 10_000,
        bytes: 1_000_000,
        overflowed: 0,
        unencodable: 0,
        writes: 10_000,
        full_bytes: 1_000_000,
        deltas: 0,
        wholes: 0,
        linked: 0,
    };
    c.bench_function("record_only", |b| {
        b.iter(|| {
            metrics::bus_received(black_box(0.0012));
            metrics::delivered(black_box(&d));
        })
    });
    let depths: Vec<usize> = (0..10_000).map(|i| (i % 7) * 512).collect();
    c.bench_function("sample/10000", |b| {
        b.iter(|| metrics::sample(black_box(1), black_box(10_001), black_box(&depths)))
    });
}

criterion_group!(benches, no_recorder, prometheus);
criterion_main!(benches);
