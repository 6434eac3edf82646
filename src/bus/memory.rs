//! The embedded bus: one node, no Redis. A publish goes straight to this node's delivery workers
//! when the channel is subscribed, exactly as a Redis message would arrive. History lives in a
//! bounded ring per channel, with the same positions and the same splice as the Redis script's,
//! and the latest values of keyed messages with the same limits (see [`crate::latest`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use bytes::Bytes;
use dashmap::DashSet;

use super::{BusError, Sink, Store};
use crate::{
    envelope::Envelope,
    history::pos::{with_pos, Entry, Keep, Pos, Slice},
    latest::Latest,
    metrics as m,
};

pub struct MemoryBus {
    channels: DashSet<String, ahash::RandomState>,
    /// Boxed: the bus is an enum whose variants stay near in size.
    rings: Mutex<Box<Rings>>,
    presence: Box<super::presence::Memory>,
    sink: Arc<dyn Sink>,
}

#[derive(Default)]
struct Rings {
    map: HashMap<String, Ring, ahash::RandomState>,
    looks: u32,
    latest: HashMap<String, Values, ahash::RandomState>,
}

/// One channel's latest values, as the Redis hash beside it keeps them: per key the envelope as
/// published and when it was, and the channel's count of keyed updates.
#[derive(Default)]
struct Values {
    map: HashMap<String, (Bytes, Instant), ahash::RandomState>,
    seq: u64,
    /// The last update, and how long the values outlive it.
    touched: Option<(Instant, std::time::Duration)>,
}

/// One channel's history: its newest messages and where it stands. Like the Redis stream, it
/// expires `ttl` after it was made or last appended to.
struct Ring {
    head: Pos,
    entries: VecDeque<Entry>,
    ttl: std::time::Duration,
    touched: Instant,
}

impl Ring {
    fn new(keep: Keep, now: Instant) -> Ring {
        Ring {
            head: Pos {
                epoch: new_epoch(),
                n: 0,
                id: None,
            },
            entries: VecDeque::new(),
            ttl: keep.ttl,
            touched: now,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.touched) >= self.ttl
    }
}

/// Microseconds on the clock, each epoch above the last: what the Redis script takes from the
/// master's clock.
fn new_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::envelope::now_us();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Sink>) -> MemoryBus {
        MemoryBus {
            channels: DashSet::with_hasher(ahash::RandomState::new()),
            rings: Mutex::new(Box::default()),
            presence: Box::default(),
            sink,
        }
    }

    /// Presence contributions, kept here as Redis would keep them.
    pub fn presence(&self) -> &super::presence::Memory {
        &self.presence
    }

    /// Publishes, appending to the channel's history first when it keeps one, and keeping a keyed
    /// message as its key's latest value.
    pub fn send(&self, channel: &str, payload: Bytes, store: &Store) -> Result<Option<Pos>, BusError> {
        match store {
            Store {
                keep: None,
                latest: None,
            } => self.publish(channel, payload).map(|()| None),
            Store {
                keep: Some(keep),
                latest: None,
            } => self.append(channel, &payload, *keep).map(Some),
            Store {
                keep,
                latest: Some(latest),
            } => self.keyed(channel, &payload, *keep, latest),
        }
    }

    /// A keyed message: refused past the most keys, else appended (with history), numbered, kept as
    /// its key's latest value and published, under one lock as the Redis script does it in one step.
    fn keyed(
        &self,
        channel: &str,
        payload: &Bytes,
        keep: Option<Keep>,
        latest: &Latest,
    ) -> Result<Option<Pos>, BusError> {
        let malformed = |_| BusError::Unavailable("the envelope is not a keyed envelope".into());
        let mut env = Envelope::decode(payload).map_err(malformed)?;
        let mut rings = self.lock();
        let now = Instant::now();
        look(&mut rings, now);
        let values = rings.latest.entry(channel.to_owned()).or_default();
        values.map.retain(|_, (_, at)| now.duration_since(*at) < latest.ttl);
        if !values.map.contains_key(&latest.key) && values.map.len() >= latest.max_keys as usize {
            return Err(BusError::TooManyKeys);
        }
        let pos = keep.map(|keep| {
            let ring = ring(&mut rings, channel, keep);
            append_entry(ring, payload, keep)
        });
        let values = rings.latest.entry(channel.to_owned()).or_default();
        values.seq += 1;
        values.touched = Some((now, latest.ttl));
        env.pos = pos;
        env.key_seq = Some(values.seq);
        let stored = env.encode_stored();
        values.map.insert(latest.key.clone(), (stored.clone(), now));
        self.publish(channel, stored)?;
        Ok(pos)
    }

    /// The latest values of a channel's keys, those updated within `ttl`.
    pub fn latest(&self, channel: &str, ttl: std::time::Duration) -> Vec<Bytes> {
        let rings = self.lock();
        let now = Instant::now();
        rings.latest.get(channel).map_or_else(Vec::new, |values| {
            values
                .map
                .values()
                .filter(|(_, at)| now.duration_since(*at) < ttl)
                .map(|(env, _)| env.clone())
                .collect()
        })
    }

    fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BusError> {
        if self.channels.contains(channel) {
            self.sink.receive(Bytes::copy_from_slice(channel.as_bytes()), payload);
        }
        Ok(())
    }

    /// Appends to the channel's ring and publishes with the position, under one lock so that
    /// positions reach the workers in order.
    fn append(&self, channel: &str, envelope: &[u8], keep: Keep) -> Result<Pos, BusError> {
        let mut rings = self.lock();
        let ring = ring(&mut rings, channel, keep);
        let next = Pos {
            n: ring.head.n + 1,
            id: Some((0, ring.head.n + 1)),
            ..ring.head
        };
        let spliced = with_pos(envelope, next)
            .ok_or_else(|| BusError::Unavailable("the envelope is not an array of 8".into()))?;
        let pos = append_entry(ring, envelope, keep);
        self.publish(channel, spliced)?;
        Ok(pos)
    }

    pub fn read(&self, channel: &str, after: u64, cap: usize, keep: Keep) -> Slice {
        let mut rings = self.lock();
        let ring = ring(&mut rings, channel, keep);
        // As the Redis script: at least the newest message, for the head's id.
        let want = (ring.head.n.saturating_sub(after) as usize).min(cap).max(1);
        let skip = ring.entries.len().saturating_sub(want);
        Slice {
            head: ring.head,
            entries: ring.entries.iter().skip(skip).cloned().collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<Rings>> {
        // Each change under this lock is one step: consistent whatever panicked elsewhere.
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self, topics: &[Vec<String>]) -> Vec<Result<(), BusError>> {
        for c in topics.iter().flatten() {
            self.channels.insert(c.clone());
        }
        m::subscriptions(self.channels.len());
        topics.iter().map(|_| Ok(())).collect()
    }

    pub fn unsubscribe(&self, channels: Vec<String>) -> Result<(), BusError> {
        for c in &channels {
            self.channels.remove(c);
        }
        m::subscriptions(self.channels.len());
        Ok(())
    }
}

/// Appends an envelope (as published) to a ring: its position.
fn append_entry(ring: &mut Ring, envelope: &[u8], keep: Keep) -> Pos {
    // One master, no failover: the number is id enough.
    let n = ring.head.n + 1;
    let pos = Pos {
        epoch: ring.head.epoch,
        n,
        id: Some((0, n)),
    };
    ring.head = pos;
    ring.ttl = keep.ttl;
    ring.touched = Instant::now();
    ring.entries.push_back(Entry {
        n,
        id: (0, n),
        envelope: Bytes::copy_from_slice(envelope),
    });
    while ring.entries.len() > keep.size as usize {
        ring.entries.pop_front();
    }
    pos
}

/// Counts a look at the rings and latest values, sweeping the expired ones now and then.
fn look(rings: &mut Rings, now: Instant) {
    rings.looks += 1;
    if rings.looks % SWEEP_EVERY == 0 {
        rings.map.retain(|_, r| !r.expired(now));
        rings
            .latest
            .retain(|_, v| v.touched.is_some_and(|(at, ttl)| now.duration_since(at) < ttl));
    }
}

/// Rings (and channels' latest values) looked at between two sweeps of the expired ones.
const SWEEP_EVERY: u32 = 1024;

/// The channel's ring, made (with a new epoch) when missing or expired. Expired rings are swept
/// now and then, so abandoned rooms leave nothing behind.
fn ring<'a>(rings: &'a mut Rings, channel: &str, keep: Keep) -> &'a mut Ring {
    let now = Instant::now();
    look(rings, now);
    let ring = rings
        .map
        .entry(channel.to_owned())
        .or_insert_with(|| Ring::new(keep, now));
    if ring.expired(now) {
        *ring = Ring::new(keep, now);
    }
    ring
}
