//! The seam between this node and the others. Everything above it is the same whether messages
//! travel through Redis Cluster ([`redis::RedisBus`]) or stay in this process
//! ([`memory::MemoryBus`], the embedded default).
//!
//! The bus is transport only. What it receives it hands, as raw envelope bytes with the channel
//! they came on, to the [`Sink`] it was given; it never decodes an envelope nor knows who is
//! listening (the node plugs in its delivery workers, [`crate::fanout::worker`]).
//!
//! This module also owns the two naming decisions other nodes and backend jobs must agree on,
//! each in one function: [`Naming::room_channel`] and [`shard_for`].

pub mod memory;
pub mod presence;
pub mod redis;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;

use crate::{
    history::pos::{Keep, Pos, Slice},
    latest::Latest,
    metrics as m,
    topic::Topic,
};

/// Where a bus hands every payload it receives, with the channel it came on. Called from the bus's
/// reader tasks: it must not wait.
pub trait Sink: Send + Sync + 'static {
    fn receive(&self, channel: Bytes, payload: Bytes);
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// Published and in history, but fewer replicas than `--publish-replicas` confirmed it in
    /// time: it may be lost if its master dies now. Not to be published again blindly.
    #[error("published at {0} but not confirmed by enough replicas in time")]
    Unconfirmed(Pos),
    /// A keyed message with a new key, where the channel's latest values hold the most keys:
    /// nothing was published.
    #[error("the room holds the most keys it may (--max-keys-per-room)")]
    TooManyKeys,
}

impl BusError {
    /// Whether the message may have been lost (a later one must not go out before it): not for
    /// one refused.
    fn is_loss(&self) -> bool {
        !matches!(self, BusError::TooManyKeys)
    }
}

/// What a channel keeps of a message beside publishing it: the room's history, the key's latest
/// value. Both nothing for a plain publish.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub keep: Option<Keep>,
    pub latest: Option<Latest>,
}

impl Store {
    /// Whether anything is kept: the publish goes through the store (a script, once under its id).
    pub fn keeps(&self) -> bool {
        self.keep.is_some() || self.latest.is_some()
    }
}

/// The most shards one room may have; past this a room is better split by the application.
pub const MAX_SHARDS: u32 = 1024;

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

    /// The key that indexes a room's presence, `{<prefix><room>}:presence`; each node's
    /// contribution is under it with `:<node>` added (see [`presence`]).
    pub fn presence_room(&self, room: &str) -> String {
        format!("{{{}{room}}}:presence", self.room_prefix)
    }

    /// The key that indexes every node's connected users, `{<user prefix>}presence`.
    pub fn presence_users(&self) -> String {
        format!("{{{}}}presence", self.user_prefix)
    }

    /// Every channel a topic's members need.
    pub fn channels(&self, topic: &Topic) -> Vec<String> {
        match topic {
            Topic::Room(room) => (0..self.shards(room)).map(|n| self.room_channel(room, n)).collect(),
            Topic::User(user) => vec![self.user_channel(user)],
        }
    }

    /// The shard a message for `kind` and `target` is on, if `channel` is where such a message
    /// belongs: a shard channel of that room (below its shard count), or that user's inbox. An
    /// envelope whose target does not name its channel is not to be trusted.
    pub fn locate(&self, channel: &[u8], kind: crate::envelope::Kind, target: &str) -> Option<u32> {
        match kind {
            crate::envelope::Kind::Room => {
                let rest = channel.strip_prefix(self.room_prefix.as_bytes())?;
                let shard = rest.strip_prefix(target.as_bytes())?.strip_prefix(b":shard")?;
                if shard.is_empty() || shard.len() > 4 || (shard.len() > 1 && shard[0] == b'0') {
                    return None;
                }
                let n: u32 = std::str::from_utf8(shard).ok()?.parse().ok()?;
                (n < self.shards(target)).then_some(n)
            }
            crate::envelope::Kind::Direct | crate::envelope::Kind::Disconnect => {
                let rest = channel.strip_prefix(self.user_prefix.as_bytes())?;
                (rest == target.as_bytes()).then_some(0)
            }
        }
    }

    /// The channel a message from `sender` to `topic` is published on: a room's shard is chosen by
    /// the message's key where it has one (every update of a key has one order), else by its
    /// sender (a sender's messages keep theirs).
    pub fn publish_channel(&self, topic: &Topic, sender: &str, key: Option<&str>) -> String {
        match topic {
            Topic::Room(room) => self.room_channel(room, shard_for(key.unwrap_or(sender), self.shards(room))),
            Topic::User(user) => self.user_channel(user),
        }
    }
}

/// A duration as whole milliseconds for Redis (`PX`, `PEXPIRE`, a script's TTL, `WAIT`): at least 1,
/// since 0 means "no expiry" or "wait forever" there.
fn millis(d: Duration) -> i64 {
    d.as_millis().clamp(1, i64::MAX as u128) as i64
}

/// Publishes messages one at a time with `one`, each once the one before succeeded; from the first
/// that fails on, every one fails with its error and is not sent, so a later message never goes
/// out while an earlier one of the same channel was lost.
async fn in_turn<T, Fut>(
    items: impl IntoIterator<Item = T>,
    mut one: impl FnMut(T) -> Fut,
) -> Vec<Result<Option<Pos>, BusError>>
where
    Fut: std::future::Future<Output = Result<Option<Pos>, BusError>>,
{
    let mut out = Vec::new();
    let mut failed: Option<BusError> = None;
    for item in items {
        let r = match &failed {
            Some(e) => Err(e.clone()),
            None => one(item).await,
        };
        // A refused message was not lost: the ones after it still go.
        match &r {
            Err(e) if e.is_loss() => {
                failed.get_or_insert_with(|| e.clone());
            }
            _ => {}
        }
        out.push(r);
    }
    out
}

/// The bus this node runs on.
pub enum Bus {
    Memory(memory::MemoryBus),
    Redis(redis::RedisBus),
}

impl Bus {
    /// Publishes an envelope on a channel. What `store` says is kept in the same step: with
    /// history, the message is appended and its position is returned (and travels with it); with
    /// a key, it becomes the key's latest value.
    pub async fn publish(&self, channel: String, payload: Bytes, store: Store) -> Result<Option<Pos>, BusError> {
        let result = match self {
            Bus::Memory(b) => b.send(&channel, payload, &store),
            Bus::Redis(b) => b.send(channel, payload, store).await,
        };
        if result.is_err() {
            m::publish_error();
        }
        result
    }

    /// Publishes messages to one channel in order, in one round trip where the bus allows; one
    /// result per message, in order. A message that fails fails every one after it in the batch,
    /// so none of them goes out while an earlier one was lost.
    pub async fn publish_in_order(
        &self,
        channel: &str,
        items: Vec<(Bytes, Store)>,
    ) -> Vec<Result<Option<Pos>, BusError>> {
        let results = match self {
            Bus::Redis(b) => b.publish_in_order(channel, items).await,
            Bus::Memory(b) => {
                in_turn(items, |(payload, store)| {
                    std::future::ready(b.send(channel, payload, &store))
                })
                .await
            }
        };
        for r in &results {
            if r.is_err() {
                m::publish_error();
            }
        }
        results
    }

    /// Reads a channel's history: its position now and its newest messages after `after`, at
    /// most `cap` of them (none with a `cap` of 0). A channel without history gets one, empty,
    /// kept as `keep` says, so that a reader starting from nothing has an epoch to hold on to.
    pub async fn read(&self, channel: &str, after: u64, cap: usize, keep: Keep) -> Result<Slice, BusError> {
        match self {
            Bus::Memory(b) => Ok(b.read(channel, after, cap, keep)),
            Bus::Redis(b) => b.read(channel, after, cap, keep).await,
        }
    }

    /// The latest values of a channel's keys (envelopes as published), those updated within `ttl`.
    pub async fn latest(&self, channel: &str, ttl: Duration) -> Result<Vec<Bytes>, BusError> {
        match self {
            Bus::Memory(b) => Ok(b.latest(channel, ttl)),
            Bus::Redis(b) => b.latest(channel, ttl).await,
        }
    }

    /// Writes this node's contribution to the presence under `index` (`None` withdraws it); it
    /// expires after `ttl` unless written again.
    pub async fn presence_put(
        &self,
        index: &str,
        node: &str,
        ttl: Duration,
        value: Option<Bytes>,
    ) -> Result<(), BusError> {
        match self {
            Bus::Memory(b) => {
                b.presence().put(index, node, ttl, value);
                Ok(())
            }
            Bus::Redis(b) => b.presence_put(index, node, ttl, value).await,
        }
    }

    /// Every live contribution to the presence under `index`.
    pub async fn presence_get(&self, index: &str) -> Result<Vec<Bytes>, BusError> {
        match self {
            Bus::Memory(b) => Ok(b.presence().get(index)),
            Bus::Redis(b) => b.presence_get(index).await,
        }
    }

    /// Writes what changed in this node's connected users (0 connections removes one; `full`
    /// starts over) and keeps them alive for `ttl`. True when they were still there before.
    pub async fn presence_beat(
        &self,
        index: &str,
        node: &str,
        ttl: Duration,
        full: bool,
        changes: &[(std::sync::Arc<str>, u32)],
    ) -> Result<bool, BusError> {
        match self {
            Bus::Memory(b) => Ok(b.presence().beat(index, node, ttl, full, changes)),
            Bus::Redis(b) => b.presence_beat(index, node, ttl, full, changes).await,
        }
    }

    /// A user's connections over every live node.
    pub async fn presence_connections(&self, index: &str, user: &str) -> Result<u64, BusError> {
        match self {
            Bus::Memory(b) => Ok(b.presence().connections(index, user)),
            Bus::Redis(b) => b.presence_connections(index, user).await,
        }
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

    /// Whether the node has been linked to its bus since it started: at once embedded; with Redis,
    /// once every master has had a connected link. Until then a node takes no clients (`/acceptz`);
    /// after it, Redis blips show in [`Bus::is_ready`] only.
    pub fn has_linked(&self) -> bool {
        match self {
            Bus::Memory(_) => true,
            Bus::Redis(b) => b.has_linked(),
        }
    }

    /// Leaves the bus: unsubscribes and closes connections.
    pub async fn close(&self) {
        if let Bus::Redis(b) = self {
            b.close().await;
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
        let ch = n.publish_channel(&Topic::Room("stadium".into()), "123456789", None);
        assert_eq!(ch, format!("ws:room:stadium:shard{}", 0xcbf4_3926u32 % 4));
    }

    #[test]
    fn an_envelope_is_located_only_on_its_own_channel() {
        use crate::envelope::Kind::{Direct, Room};
        let n = Naming::new("ws:room:", "ws:user:", 1, HashMap::from([("stadium".to_string(), 4)]));
        assert_eq!(n.locate(b"ws:room:stadium:shard3", Room, "stadium"), Some(3));
        assert_eq!(n.locate(b"ws:room:lobby:shard0", Room, "lobby"), Some(0));
        assert_eq!(n.locate(b"ws:user:bob", Direct, "bob"), Some(0));
        for (channel, kind, target) in [
            (&b"ws:room:plain:shard0"[..], Room, "other"),
            (b"ws:room:stadium:shard4", Room, "stadium"),
            (b"ws:room:stadium:shard03", Room, "stadium"),
            (b"ws:room:stadium:shard", Room, "stadium"),
            (b"ws:room:lobby:shard1", Room, "lobby"),
            (b"ws:room:lobby:shard0", Direct, "lobby"),
            (b"ws:user:bob", Direct, "alice"),
            (b"ws:user:bob", Room, "bob"),
            (b"ws:room:a:b:shard0", Room, "a"),
        ] {
            assert_eq!(
                n.locate(channel, kind, target),
                None,
                "{}",
                String::from_utf8_lossy(channel)
            );
        }
    }
}
