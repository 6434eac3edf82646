//! Adaptive writes (`--write-coalesce 0`, the default): which delivery worker writes a socket
//! ([`Writers`]), when ([`Gather`]), and so how many frames each write carries.
//!
//! Any worker may queue frames on a socket (a room's shards are spread over the workers), but
//! each socket is written by one worker, chosen by its gate's address like a paced lane: the
//! worker that queued a socket's first frame hands the socket to its writer, so one write carries
//! the frames of every worker. A worker writes in passes: every socket of its own with frames
//! queued gets one `writev` with all of them.
//! After a pass the next may start no sooner than [`SPREAD`] times as long as a pass takes,
//! counted from its start, and never more than `--max-write-delay` after it. So a worker spends
//! about a [`SPREAD`]th of its time in write passes before frames start to gather, and the wait
//! follows the load by itself: a pass over many sockets, or one the kernel makes slow (a loaded
//! machine, full socket buffers), takes longer, so frames gather longer and the next pass carries
//! more of them per write, which is what makes it cheaper per frame. Quiet, a pass takes
//! microseconds and each message goes out the moment it comes. How long a pass takes is a moving
//! average of the last few, so one pass the machine stalled does not hold the next frames back
//! for long, and a load that lasts is followed within a few passes. Nothing polls: an idle worker
//! sleeps on its queue, and a wait is one timer armed only while frames are gathering.
//!
//! The pass is timed on the real clock, not the runtime's: it measures work done, which a paused
//! test clock would not see.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::{gate::Gate, paced::lane_of};

/// A pass may take one part in this many of a worker's time before frames wait for the next.
pub const SPREAD: u32 = 5;

/// One worker's write schedule.
#[derive(Debug)]
pub struct Gather {
    max: Duration,
    /// The earliest the next pass may start.
    next: Option<Instant>,
    /// How long a pass takes, averaged.
    pass: Duration,
}

impl Gather {
    /// A schedule that never makes a frame wait more than `max` for its pass.
    pub fn new(max: Duration) -> Gather {
        Gather {
            max,
            next: None,
            pass: Duration::ZERO,
        }
    }

    /// When the next pass is due, or `None` when it may start now.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        self.next.filter(|at| *at > now)
    }

    /// Notes a pass that started at `started` and took `took` (real time); returns how long
    /// frames now gather before the next.
    pub fn wrote(&mut self, started: Instant, took: Duration) -> Duration {
        // A quarter of the way to the latest pass, each pass.
        self.pass = (self.pass * 3 + took) / 4;
        let wait = self.pass.saturating_mul(SPREAD).min(self.max);
        self.next = Some(started + wait);
        wait
    }
}

/// Per worker, the sockets it writes that have frames queued, and a wake-up for when another
/// worker queued them.
pub struct Writers {
    owed: Box<[(Owed, Notify)]>,
}

/// A worker's sockets to write.
type Owed = Mutex<Vec<Arc<Gate>>>;

impl Writers {
    pub fn new(workers: usize) -> Writers {
        Writers {
            owed: (0..workers.max(1)).map(|_| Default::default()).collect(),
        }
    }

    /// Hands each socket in `queued` (whose first frame since its last write was just queued) to
    /// its writer, waking the writers other than `me` that got any; leaves `queued` empty.
    pub fn hand_over(&self, me: usize, queued: &mut Vec<Arc<Gate>>) {
        let n = self.owed.len();
        queued.sort_unstable_by_key(|gate| lane_of(gate, n));
        for group in queued.chunk_by(|a, b| lane_of(a, n) == lane_of(b, n)) {
            let writer = lane_of(&group[0], n);
            let (gates, news) = &self.owed[writer];
            lock(gates).extend_from_slice(group);
            if writer != me {
                news.notify_one();
            }
        }
        queued.clear();
    }

    /// Whether worker `me` has sockets to write.
    pub fn owes(&self, me: usize) -> bool {
        !lock(&self.owed[me].0).is_empty()
    }

    /// Takes worker `me`'s sockets to write into `into` (empty), leaving its list empty.
    pub fn take(&self, me: usize, into: &mut Vec<Arc<Gate>>) {
        std::mem::swap(&mut *lock(&self.owed[me].0), into);
    }

    /// Ready when another worker handed `me` sockets to write.
    pub async fn news(&self, me: usize) {
        self.owed[me].1.notified().await;
    }
}

fn lock(gates: &Owed) -> std::sync::MutexGuard<'_, Vec<Arc<Gate>>> {
    // A list of handles: consistent whatever panicked while holding it.
    gates.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_writes_at_once_busy_waits_for_its_share_and_never_past_the_bound() {
        let max = Duration::from_millis(250);
        let ms = Duration::from_millis;
        let mut gather = Gather::new(max);
        let start = Instant::now();
        assert_eq!(gather.due(start), None, "a fresh worker writes at once");

        // Passes of 4 ms: the wait follows, a quarter of the way each pass.
        assert_eq!(gather.wrote(start, ms(4)), ms(1) * SPREAD);
        assert_eq!(gather.due(start + ms(1)), Some(start + ms(1) * SPREAD));
        assert_eq!(gather.due(start + ms(1) * SPREAD), None, "due once its wait is over");
        for _ in 0..40 {
            gather.wrote(start, ms(4));
        }
        let wait = gather.wrote(start, ms(4));
        assert!(wait > ms(4) * SPREAD * 99 / 100 && wait <= ms(4) * SPREAD, "{wait:?}");
        tokio::time::advance(ms(100)).await;
        assert_eq!(gather.due(Instant::now()), None, "idle since: at once");

        // Quiet passes of 20 µs: the load is soon forgotten, and messages a millisecond apart go
        // out as they come.
        let now = Instant::now();
        let first = gather.wrote(now, Duration::from_micros(20));
        assert!(
            first > ms(2) * SPREAD,
            "one quiet pass does not forget the load: {first:?}"
        );
        for _ in 0..40 {
            gather.wrote(now, Duration::from_micros(20));
        }
        assert_eq!(gather.due(now + ms(1)), None);

        // Passes that take longer than the bound (a huge room on a loaded box): capped.
        let now = Instant::now();
        for _ in 0..4 {
            gather.wrote(now, ms(400));
        }
        assert_eq!(gather.wrote(now, ms(400)), max);
        assert_eq!(gather.due(now + ms(1)), Some(now + max));
    }
}
