//! `max_rate`: at most N values per second of each key to one socket, the latest winning
//! (Lightstreamer's maximum frequency). A phone that only shows the score needs one a second, not
//! twenty.
//!
//! A keyed frame that comes sooner than `1/N` after the key's last one waits as the key's pending
//! value; a newer one replaces it (the one replaced is counted in the `"skipped"` of the one that
//! goes). A task of the socket's own sends each pending value when its time comes, so the last
//! value of a burst is never lost. Unkeyed frames are not paced. What is kept is one pending frame
//! per key of the room: bounded by `--max-keys-per-room`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::Notify, time::Instant};

use super::keyed::Tag;
use crate::{metrics as m, wire};

/// One socket's pace in one room.
/// Sends one frame to the socket now: false once the socket is going.
pub type Send = Box<dyn Fn(Bytes) -> bool + std::marker::Send + Sync>;

pub struct Rate {
    every: Duration,
    send: Send,
    keys: Mutex<HashMap<Box<str>, Key, ahash::RandomState>>,
    /// Wakes the pacing task: a value is pending, or the socket left the room.
    wake: Arc<Notify>,
}

#[derive(Debug)]
struct Key {
    /// When the key's last value went.
    last: Instant,
    /// The newest value waiting for its time, and the values it replaced.
    pending: Option<(Bytes, u32)>,
}

impl std::fmt::Debug for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rate").field("every", &self.every).finish()
    }
}

impl Drop for Rate {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl Rate {
    /// A pace of `per_second` values per key for the socket `send` writes to, and its task
    /// started.
    pub fn start(per_second: u32, send: Send) -> Arc<Rate> {
        let wake = Arc::new(Notify::new());
        let rate = Arc::new(Rate {
            every: Duration::from_secs(1) / per_second.max(1),
            send,
            keys: Mutex::new(HashMap::default()),
            wake: wake.clone(),
        });
        tokio::spawn(pace(Arc::downgrade(&rate), wake));
        rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Key, ahash::RandomState>> {
        // Each change under this lock is one step.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frame to write now (marked with what it replaced), or `None` when it waits for its time.
    pub fn admit(&self, frame: &Bytes, tag: &Tag) -> Option<Bytes> {
        let Some(keyed) = tag else {
            return Some(frame.clone());
        };
        let now = Instant::now();
        let mut keys = self.lock();
        let Some(key) = keys.get_mut(&keyed.key) else {
            keys.insert(
                keyed.key.clone(),
                Key {
                    last: now,
                    pending: None,
                },
            );
            return Some(frame.clone());
        };
        let replaced = key.pending.take().map(|(_, skipped)| skipped + 1);
        if replaced.is_some() {
            m::skipped("max_rate", 1);
        }
        let skipped = replaced.unwrap_or(0);
        if now < key.last + self.every {
            key.pending = Some((frame.clone(), skipped));
            drop(keys);
            self.wake.notify_one();
            return None;
        }
        key.last = now;
        Some(marked(frame, skipped))
    }

    /// Takes the pending values whose time has come (marking them sent now), and when the next
    /// one is due.
    fn due(&self) -> (Vec<Bytes>, Option<Instant>) {
        let now = Instant::now();
        let mut keys = self.lock();
        let (mut out, mut next) = (Vec::new(), None::<Instant>);
        for key in keys.values_mut() {
            if key.pending.is_none() {
                continue;
            }
            let at = key.last + self.every;
            if at <= now {
                let (frame, skipped) = key.pending.take().expect("checked above");
                key.last = now;
                out.push(marked(&frame, skipped));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (out, next)
    }
}

/// A frame with `"skipped":N` where it replaced values.
fn marked(frame: &Bytes, skipped: u32) -> Bytes {
    if skipped == 0 {
        return frame.clone();
    }
    wire::with_skipped(frame, skipped).unwrap_or_else(|| frame.clone())
}

/// Sends each pending value when its time comes, until the socket leaves the room.
async fn pace(rate: Weak<Rate>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(rate) = rate.upgrade() else { return };
            let (frames, next) = rate.due();
            for frame in frames {
                if !(rate.send)(frame) {
                    return;
                }
            }
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
