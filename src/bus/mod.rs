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
    hub::{Hub, Topic},
    metrics as m,
    paced::{self, Lanes, Pace},
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
pub(crate) const BATCH: usize = 64;

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
        let workers = workers.max(1);
        // Paced workers count their lanes' turns from the same instant; each lane is one worker's.
        let pace = (!coalesce.is_zero()).then(|| {
            let pace = Pace::new(tokio::time::Instant::now(), coalesce, workers);
            let lanes = Arc::new(Lanes::new(pace.lanes()));
            hub.pace(lanes.clone());
            (pace, lanes)
        });
        let senders: Vec<_> = (0..workers)
            .map(|index| {
                let (tx, rx) = mpsc::channel(capacity.max(1));
                match &pace {
                    Some((pace, lanes)) => {
                        tracker.spawn(paced::run(hub.clone(), rx, cancel.clone(), *pace, lanes.clone(), index))
                    }
                    None => tracker.spawn(worker(hub.clone(), rx, cancel.clone())),
                };
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

/// Delivers what the bus hands over: every frame a batch of messages queues for a socket goes out
/// in one write at the end of the batch (a batch is whatever waited in the queue, so batches grow
/// with load). With `--write-coalesce`, [`paced::run`] instead.
async fn worker(hub: Hub, mut rx: mpsc::Receiver<Bytes>, cancel: CancellationToken) {
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
        decode_each(&mut batch, |env| {
            hub.deliver(env, &mut flush);
        });
        for gate in flush.drain(..) {
            gate.flush();
        }
    }
}

/// Empties a worker's batch, handing each envelope that decodes to `each` (after recording its
/// latency from publish) and counting the rest as dropped.
pub(crate) fn decode_each(batch: &mut Vec<Bytes>, mut each: impl FnMut(&Envelope)) {
    for payload in batch.drain(..) {
        match Envelope::decode(&payload) {
            Ok(env) => {
                let latency = envelope::now_us().saturating_sub(env.ts_us) as f64 / 1e6;
                m::bus_received(latency);
                each(&env);
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
    use super::*;

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
