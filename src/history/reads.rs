//! The store's reads: what joins and the `history` command read of rooms' history. Many joins of one
//! room at once (a drained node's clients all resuming) share their reads: per channel at most one
//! read is in flight, and every join that asked while it was being sent waits for the next one,
//! which covers them all (from the oldest position asked, as many messages as the most asked);
//! its messages are framed once per encoding and shared like live frames.
//!
//! A read started before a join held its live frames back cannot serve that join: what was
//! published between the read and the hold would be in neither. So a join only rides on a read
//! that had not been sent when it asked.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::pos::{Keep, Pos, Slice};
use futures_util::future::join_all;

use crate::{
    bus::{Bus, BusError, Naming},
    encoding::Encoding,
    envelope::Envelope,
    metrics as m,
    wire::broadcast_frame,
};

/// One read of a channel's history, shared by every join that waited for it.
#[derive(Debug)]
pub struct Shared {
    pub slice: Slice,
    shard: u32,
    /// Per encoding: each message's number and frame, built on first need.
    frames: [OnceLock<Vec<(u64, Bytes)>>; 2],
}

impl Shared {
    fn new(slice: Slice, shard: u32) -> Shared {
        Shared {
            slice,
            shard,
            frames: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// The messages after `after` as frames in `encoding`, if the read has every one of them.
    /// Messages that cannot be framed in the encoding (or decoded at all) are left out, as fan-out
    /// leaves them out.
    pub fn frames_after(&self, after: Pos, encoding: Encoding) -> Option<Vec<Bytes>> {
        let wanted = self.slice.after(after)?;
        let first = wanted.first().map_or(u64::MAX, |e| e.n);
        let all = self.frames[encoding.index()].get_or_init(|| {
            self.envelopes()
                .filter_map(|env| {
                    let n = env.pos?.n;
                    Some((n, broadcast_frame(encoding, &env, self.shard).ok()?))
                })
                .collect()
        });
        Some(
            all.iter()
                .filter(|(n, _)| *n >= first)
                .map(|(_, f)| f.clone())
                .collect(),
        )
    }

    /// The messages as envelopes with their positions, oldest first.
    pub fn envelopes(&self) -> impl Iterator<Item = Envelope> + '_ {
        self.slice.entries.iter().filter_map(move |entry| {
            let mut env = Envelope::decode(&entry.envelope).ok()?;
            env.pos = Some(self.slice.pos(entry));
            Some(env)
        })
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }
}

type Answer = Result<Arc<Shared>, BusError>;

/// The joins waiting on one channel's next read, and what that read must cover.
struct Queue {
    waiters: Vec<oneshot::Sender<Answer>>,
    after: u64,
    cap: usize,
    keep: Keep,
    /// A read of this channel is in flight (its task sends the next one when it returns).
    running: bool,
}

/// Shared reads of channels' history.
pub struct Reads {
    bus: Arc<Bus>,
    queues: Mutex<HashMap<String, Queue>>,
}

impl Reads {
    pub fn new(bus: Arc<Bus>) -> Arc<Reads> {
        Arc::new(Reads {
            bus,
            queues: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Queue>> {
        // Each change under this lock is one step.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `channel` (shard `shard` of its room): where it stands, and its newest messages after
    /// `after`, at most `cap` of them; shared with every join of the channel waiting meanwhile.
    pub async fn read(self: &Arc<Self>, channel: &str, shard: u32, after: u64, cap: usize, keep: Keep) -> Answer {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut queues = self.lock();
            let q = queues.entry(channel.to_owned()).or_insert_with(|| Queue {
                waiters: Vec::new(),
                after: u64::MAX,
                cap: 0,
                keep,
                running: false,
            });
            q.waiters.push(tx);
            q.after = q.after.min(after);
            q.cap = q.cap.max(cap);
            q.keep = keep;
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            tokio::spawn(self.clone().serve(channel.to_owned(), shard));
        }
        rx.await
            .unwrap_or_else(|_| Err(BusError::Unavailable("history read abandoned".into())))
    }

    /// The newest `limit` messages of a room over all its shards, oldest first by publish time.
    pub async fn newest(
        self: &Arc<Self>,
        naming: &Naming,
        room: &str,
        limit: usize,
        keep: Keep,
    ) -> Result<Vec<(Envelope, u32)>, BusError> {
        let shards = naming.shards(room);
        let reads = join_all((0..shards).map(|i| {
            let channel = naming.room_channel(room, i);
            async move { self.read(&channel, i, 0, limit, keep).await }
        }))
        .await;
        let mut msgs = Vec::new();
        for read in reads {
            let read = read?;
            msgs.extend(read.envelopes().map(|env| (env, read.shard())));
        }
        msgs.sort_by_key(|(env, _)| env.ts_us);
        let skip = msgs.len().saturating_sub(limit);
        msgs.drain(..skip);
        Ok(msgs)
    }

    /// Sends a channel's reads one after another until nobody waits.
    async fn serve(self: Arc<Self>, channel: String, shard: u32) {
        loop {
            let (waiters, after, cap, keep) = {
                let mut queues = self.lock();
                let Some(q) = queues.get_mut(&channel) else { return };
                if q.waiters.is_empty() {
                    queues.remove(&channel);
                    return;
                }
                let taken = (std::mem::take(&mut q.waiters), q.after, q.cap, q.keep);
                q.after = u64::MAX;
                q.cap = 0;
                taken
            };
            let answer = self
                .bus
                .read(&channel, after, cap, keep)
                .await
                .map(|slice| Arc::new(Shared::new(slice, shard)));
            m::history_read(waiters.len());
            for waiter in waiters {
                let _ = waiter.send(answer.clone());
            }
        }
    }
}
