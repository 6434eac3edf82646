//! The embedded bus: one node, no Redis. A publish goes straight to this node's delivery workers
//! when the channel is subscribed, exactly as a Redis message would arrive. History lives in a
//! bounded ring per channel, with the same positions and the same splice as the Redis script's.

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

use super::{BusError, Sink};
use crate::{
    history::pos::{with_pos, Entry, Keep, Pos, Slice},
    metrics as m,
};

pub struct MemoryBus {
    channels: DashSet<String, ahash::RandomState>,
    rings: Mutex<Rings>,
    presence: Box<super::presence::Memory>,
    sink: Arc<dyn Sink>,
}

#[derive(Default)]
struct Rings {
    map: HashMap<String, Ring, ahash::RandomState>,
    looks: u32,
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
            rings: Mutex::new(Rings::default()),
            presence: Box::default(),
            sink,
        }
    }

    /// Presence contributions, kept here as Redis would keep them.
    pub fn presence(&self) -> &super::presence::Memory {
        &self.presence
    }

    /// Publishes, appending to the channel's history first when it keeps one.
    pub fn send(&self, channel: &str, payload: Bytes, keep: Option<Keep>) -> Result<Option<Pos>, BusError> {
        match keep {
            None => self.publish(channel, payload).map(|()| None),
            Some(keep) => self.append(channel, &payload, keep).map(Some),
        }
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
        // One master, no failover: the number is id enough.
        let n = ring.head.n + 1;
        let pos = Pos {
            epoch: ring.head.epoch,
            n,
            id: Some((0, n)),
        };
        let spliced =
            with_pos(envelope, pos).ok_or_else(|| BusError::Unavailable("the envelope is not an array of 8".into()))?;
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Rings> {
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

/// Rings looked at between two sweeps of the expired ones.
const SWEEP_EVERY: u32 = 1024;

/// The channel's ring, made (with a new epoch) when missing or expired. Expired rings are swept
/// now and then, so abandoned rooms leave nothing behind.
fn ring<'a>(rings: &'a mut Rings, channel: &str, keep: Keep) -> &'a mut Ring {
    let now = Instant::now();
    rings.looks += 1;
    if rings.looks % SWEEP_EVERY == 0 {
        rings.map.retain(|_, r| !r.expired(now));
    }
    let ring = rings
        .map
        .entry(channel.to_owned())
        .or_insert_with(|| Ring::new(keep, now));
    if ring.expired(now) {
        *ring = Ring::new(keep, now);
    }
    ring
}
