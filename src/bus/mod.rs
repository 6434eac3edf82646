//! The seam between this node and the others. Everything above it is the same whether messages
//! travel through Redis Cluster ([`redis::RedisBus`]) or stay in this process
//! ([`memory::MemoryBus`], the embedded default).
//!
//! This module also owns the two naming decisions other nodes and backend jobs must agree on,
//! each in one function: [`Naming::room_channel`] and [`shard_for`].

pub mod memory;
pub mod redis;
mod tracked;

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    envelope::{self, Envelope},
    gate::Gate,
    hub::{Hub, Topic},
    metrics as m,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Which shard of a room a sender's messages go to: CRC-32 (IEEE) of the sender id, modulo the
/// room's shard count. Stable across nodes, restarts and versions, and easy to compute in any
/// language, so a backend job picks the same shard and one sender's messages keep their order.
pub fn shard_for(sender: &str, shards: u32) -> u32 {
    crc32fast::hash(sender.as_bytes()) % shards.max(1)
}

/// Channel names: the single source of truth for what is subscribed and published.
#[derive(Debug, Clone)]
pub struct Naming {
    room_prefix: String,
    user_prefix: String,
    default_shards: u32,
    hot_rooms: HashMap<String, u32>,
}

impl Naming {
    pub fn new(room_prefix: &str, user_prefix: &str, default_shards: u32, hot_rooms: HashMap<String, u32>) -> Naming {
        Naming {
            room_prefix: room_prefix.into(),
            user_prefix: user_prefix.into(),
            default_shards,
            hot_rooms,
        }
    }

    pub fn shards(&self, room: &str) -> u32 {
        self.hot_rooms.get(room).copied().unwrap_or(self.default_shards)
    }

    /// `<prefix><room>:shard<N>`
    pub fn room_channel(&self, room: &str, shard: u32) -> String {
        format!("{}{room}:shard{shard}", self.room_prefix)
    }

    /// `<user prefix><user>`: one channel per user carries direct messages to all of its sockets.
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}{user}", self.user_prefix)
    }

    /// Every channel a topic's members need.
    pub fn channels(&self, topic: &Topic) -> Vec<String> {
        match topic {
            Topic::Room(room) => (0..self.shards(room)).map(|n| self.room_channel(room, n)).collect(),
            Topic::User(user) => vec![self.user_channel(user)],
        }
    }

    /// The channel a message from `sender` to `topic` is published on.
    pub fn publish_channel(&self, topic: &Topic, sender: &str) -> String {
        match topic {
            Topic::Room(room) => self.room_channel(room, shard_for(sender, self.shards(room))),
            Topic::User(user) => self.user_channel(user),
        }
    }
}

/// The bus this node runs on.
pub enum Bus {
    Memory(memory::MemoryBus),
    Redis(redis::RedisBus),
}

impl Bus {
    pub async fn publish(&self, channel: String, payload: Bytes) -> Result<(), BusError> {
        let result = match self {
            Bus::Memory(b) => b.publish(&channel, payload),
            Bus::Redis(b) => b.publish(channel, payload).await,
        };
        if result.is_err() {
            m::publish_error();
        }
        result
    }

    /// Subscribes the channels of several topics at once; one result per topic.
    pub async fn subscribe(&self, topics: &[Vec<String>]) -> Vec<Result<(), BusError>> {
        match self {
            Bus::Memory(b) => b.subscribe(topics),
            Bus::Redis(b) => b.subscribe(topics).await,
        }
    }

    pub async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), BusError> {
        match self {
            Bus::Memory(b) => b.unsubscribe(channels),
            Bus::Redis(b) => b.unsubscribe(channels).await,
        }
    }

    /// Whether publishing and receiving work now (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Memory(_) => true,
            Bus::Redis(b) => b.is_ready(),
        }
    }

    /// Leaves the bus: unsubscribes and closes connections.
    pub async fn close(&self) {
        if let Bus::Redis(b) = self {
            b.close().await;
        }
    }
}

/// Where bus readers hand received payloads: bounded per-worker queues chosen by channel, so one
/// channel's messages keep their order and a slow fan-out never stalls the reader.
/// Messages a worker takes from its queue at once.
const BATCH: usize = 64;

#[derive(Clone)]
pub struct Dispatch {
    workers: Arc<[mpsc::Sender<Bytes>]>,
}

impl Dispatch {
    /// Starts `workers` delivery tasks feeding `hub`.
    pub fn start(
        hub: Hub,
        workers: usize,
        capacity: usize,
        coalesce: Duration,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Dispatch {
        // Paced workers count their lanes' turns from the same instant, so they write a lane at
        // the same moments: a socket fed by several workers is still written once per period.
        let start = tokio::time::Instant::now();
        let senders: Vec<_> = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(capacity.max(1));
                let pace = (!coalesce.is_zero()).then(|| Pace::new(start, coalesce));
                tracker.spawn(worker(hub.clone(), rx, cancel.clone(), pace));
                tx
            })
            .collect();
        Dispatch {
            workers: senders.into(),
        }
    }

    /// Hands one payload to its channel's worker; never waits. A full queue drops and counts.
    pub fn dispatch(&self, channel: &[u8], payload: Bytes) {
        let i = (crc32fast::hash(channel) as usize) % self.workers.len();
        match self.workers[i].try_send(payload) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => m::bus_dropped("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Delivers what the bus hands over. Without `coalesce`, every frame a batch of messages queues
/// for a socket goes out in one write at the end of the batch (a batch is whatever waited in the
/// queue, so batches grow with load). With it, see [`paced`].
async fn worker(hub: Hub, mut rx: mpsc::Receiver<Bytes>, cancel: CancellationToken, pace: Option<Pace>) {
    if let Some(pace) = pace {
        return paced(hub, rx, cancel, pace).await;
    }
    let mut batch = Vec::with_capacity(BATCH);
    let mut flush = Vec::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = cancel.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        deliver(&hub, &mut batch, &mut flush);
        for gate in flush.drain(..) {
            gate.flush();
        }
    }
}

/// Sockets a paced worker writes are spread over up to this many lanes by their gate's address,
/// one lane written per tick.
const LANES: usize = 8;

/// The lane of a gate among `lanes`, stable for its life: Fibonacci hashing of its address.
fn lane_of(gate: &Arc<Gate>, lanes: usize) -> usize {
    ((Arc::as_ptr(gate) as usize as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % lanes
}

/// When a paced worker writes which sockets: `lanes` lanes, lane `k % lanes` on the `k`-th tick
/// after `start`, a tick every `every / lanes`.
#[derive(Clone, Copy)]
struct Pace {
    start: tokio::time::Instant,
    tick: Duration,
    lanes: usize,
}

impl Pace {
    fn new(start: tokio::time::Instant, every: Duration) -> Pace {
        // Ticks of at least a millisecond, the timer's resolution.
        let lanes = (every.as_millis() as usize).clamp(1, LANES);
        Pace {
            start,
            tick: every / lanes as u32,
            lanes,
        }
    }

    /// The tick `at` falls on.
    fn tick_of(&self, at: tokio::time::Instant) -> u64 {
        ((at - self.start).as_nanos() / self.tick.as_nanos().max(1)) as u64
    }
}

/// Delivers at once, and writes each socket with something queued once per period (`every`, the
/// `--write-coalesce`): its lane's turn comes every `every`, the lanes in turn every
/// `every / lanes`. So a frame waits at most `every` for its write, one write carries whatever the
/// socket got meanwhile, and the writes go out evenly over the period instead of all sockets at
/// once. A tick missed while the worker was busy is caught up on the next, lanes in order.
async fn paced(hub: Hub, mut rx: mpsc::Receiver<Bytes>, cancel: CancellationToken, pace: Pace) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut fresh = Vec::new();
    let mut waiting: Vec<Vec<Arc<Gate>>> = vec![Vec::new(); pace.lanes];
    let first = pace.tick_of(tokio::time::Instant::now()) + 1;
    let mut tick = tokio::time::interval_at(pace.start + pace.tick * first as u32, pace.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next = first;
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                deliver(&hub, &mut batch, &mut fresh);
                for gate in fresh.drain(..) {
                    waiting[lane_of(&gate, pace.lanes)].push(gate);
                }
            }
            at = tick.tick() => {
                let now = pace.tick_of(at).max(next);
                // Every lane whose turn came since the last tick, each once.
                for k in next.max((now + 1).saturating_sub(pace.lanes as u64))..=now {
                    for gate in waiting[(k % pace.lanes as u64) as usize].drain(..) {
                        gate.flush();
                    }
                }
                next = now + 1;
            }
            _ = cancel.cancelled() => break,
        }
    }
    for gate in waiting.into_iter().flatten() {
        gate.flush();
    }
}

fn deliver(hub: &Hub, batch: &mut Vec<Bytes>, flush: &mut Vec<Arc<Gate>>) {
    for payload in batch.drain(..) {
        match Envelope::decode(&payload) {
            Ok(env) => {
                let latency = envelope::now_us().saturating_sub(env.ts_us) as f64 / 1e6;
                m::bus_received(latency);
                hub.deliver(&env, flush);
            }
            Err(e) => {
                tracing::debug!(error = %e, "dropping undecodable envelope");
                m::bus_dropped("undecodable", 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, IoSlice},
        sync::Mutex,
        task::{Context, Poll},
    };

    use tokio::time::Instant;

    use super::*;
    use crate::{
        envelope::Kind,
        frame::Encoding,
        gate::Outlet,
        hub::{Interest, Member},
    };

    /// A socket that takes everything and notes when each write came and the bytes written so far.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(Instant, usize)>>>);

    impl Outlet for Recorder {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let n = bufs.iter().map(|b| b.len()).sum();
            let mut writes = self.0.lock().unwrap();
            let before = writes.last().map_or(0, |w| w.1);
            writes.push((Instant::now(), before + n));
            Ok(n)
        }

        fn poll_write_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paced_writes_each_socket_once_per_period_and_no_frame_waits_longer() {
        const SOCKETS: usize = 24;
        const MESSAGES: usize = 100;
        let every = Duration::from_millis(40);
        let gap = Duration::from_millis(5);
        let (hub, mut interest) = Hub::new();
        let answering = hub.clone();
        tokio::spawn(async move {
            while let Some(i) = interest.recv().await {
                if let Interest::Want(t) = i {
                    answering.subscribed(&t, Ok(()));
                }
            }
        });
        let mut sockets = Vec::new();
        for _ in 0..SOCKETS {
            let gate = Arc::new(Gate::new(1 << 20));
            let socket = Recorder::default();
            gate.attach(Box::new(socket.clone()));
            let id = hub.register(Member {
                gate,
                encoding: Encoding::Json,
            });
            hub.join(Topic::Room("r".into()), id, Duration::from_secs(1))
                .await
                .unwrap();
            sockets.push(socket);
        }
        // Two workers feed the same sockets (a room's shards on both), taking turns.
        let cancel = CancellationToken::new();
        let pace = Pace::new(Instant::now(), every);
        let mut workers = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = mpsc::channel(MESSAGES);
            workers.push(tokio::spawn(paced(hub.clone(), rx, cancel.clone(), pace)));
            inboxes.push(tx);
            // The second starts later, yet writes on the same grid.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        // Off the ticks' grid, so no push and write share an instant.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut sent = Vec::new();
        for seq in 0..MESSAGES {
            let env = Envelope {
                kind: Kind::Room,
                origin: "n1".into(),
                target: "r".into(),
                from: "p".into(),
                ts_us: 0,
                format: Encoding::Json,
                data: Bytes::from_static(b"1"),
            };
            sent.push(Instant::now());
            inboxes[seq % 2].send(env.encode()).await.unwrap();
            tokio::time::sleep(gap).await;
        }
        tokio::time::sleep(every * 2).await;
        cancel.cancel();
        for w in workers {
            w.await.unwrap();
        }

        let mut phases = std::collections::BTreeSet::new();
        for socket in &sockets {
            let writes = socket.0.lock().unwrap().clone();
            let frame = writes.last().unwrap().1 / MESSAGES;
            assert_eq!(writes.last().unwrap().1, frame * MESSAGES, "every frame, whole");
            for pair in writes.windows(2) {
                assert!(pair[1].0 - pair[0].0 >= every, "two writes within one period");
            }
            for (k, at) in sent.iter().enumerate() {
                let (written, _) = writes.iter().find(|w| w.1 >= (k + 1) * frame).unwrap();
                assert!(*written - *at <= every, "frame {k} waited {:?}", *written - *at);
            }
            phases.insert((writes[0].0 - sent[0]).as_millis() % every.as_millis());
            // 500 ms of messages 5 ms apart: about 8 frames per write.
            assert!(writes.len() <= MESSAGES * gap.as_millis() as usize / every.as_millis() as usize + 2);
        }
        assert!(
            phases.len() > 1,
            "the sockets' writes are spread over the period: {phases:?}"
        );
    }

    #[test]
    fn shard_choice_is_stable_crc32() {
        // Values any CRC-32 (IEEE) implementation agrees on; they must never change.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
        assert_eq!(shard_for("123456789", 16), 0xcbf4_3926 % 16);
        assert_eq!(shard_for("anyone", 1), 0);
        assert_eq!(shard_for("anyone", 0), 0);
        for s in ["a", "b", "c", "user-42"] {
            assert!(shard_for(s, 8) < 8);
            assert_eq!(shard_for(s, 8), shard_for(s, 8));
        }
    }

    #[test]
    fn channel_names() {
        let n = Naming::new("ws:room:", "ws:user:", 1, HashMap::from([("stadium".to_string(), 4)]));
        assert_eq!(n.room_channel("lobby", 0), "ws:room:lobby:shard0");
        assert_eq!(n.channels(&Topic::Room("lobby".into())), vec!["ws:room:lobby:shard0"]);
        assert_eq!(
            n.channels(&Topic::Room("stadium".into())),
            vec![
                "ws:room:stadium:shard0",
                "ws:room:stadium:shard1",
                "ws:room:stadium:shard2",
                "ws:room:stadium:shard3"
            ]
        );
        assert_eq!(n.channels(&Topic::User("bob".into())), vec!["ws:user:bob"]);
        let ch = n.publish_channel(&Topic::Room("stadium".into()), "123456789");
        assert_eq!(ch, format!("ws:room:stadium:shard{}", 0xcbf4_3926u32 % 4));
    }
}
