//! When a delivery worker writes its lanes ([`Schedule`]), and so how many frames each write
//! carries. Frames are recorded and shared ([`super::lanes`]); what this module decides is when
//! each lane's turn comes.
//!
//! # Adaptive writes (`--write-coalesce 0`, the default): [`Gather`]
//! A worker that has been quiet for a period writes every lane of its own at once, so a message
//! in a quiet room goes out the moment it comes. Busy, its lanes take turns, one lane a tick,
//! [`SPREAD`] times the time its turns take apart: a worker spends about a [`SPREAD`]th of its
//! time writing, its writes spread evenly over the period, and each socket is written once a
//! period with every frame that came meanwhile. The period follows the load by itself: more
//! sockets, or a kernel that makes writes slow (a loaded machine, full socket buffers), make the
//! turns longer, so frames gather longer and each write carries more of them, which is what
//! makes it cheaper per frame. It never exceeds `--max-write-delay`. How long a turn takes is a
//! moving average of the last few, so one turn the machine stalled does not hold the next frames
//! back for long, and a load that lasts is followed within a few turns. Nothing polls: a worker
//! with no news sleeps on its queue and its lanes' wake-up, and a timer is armed only while
//! frames are gathering.
//!
//! A turn is timed on the real clock, not the runtime's: it measures work done, which a paused
//! test clock would not see.
//!
//! # Paced writes (`--write-coalesce P`): [`Grid`]
//! The turns follow a fixed grid ([`Pace`]): lane `k % lanes` is written on the `k`-th tick (a
//! tick every `P / lanes`) counted from one instant, so each socket is written once per period. A
//! turn missed while the worker was busy is caught up on the next tick, lanes in order.

use std::time::Duration;

use tokio::time::Instant;

use super::lanes::LANES;

/// A worker's turns may take one part in this many of its time before frames wait for them.
pub const SPREAD: u32 = 6;

/// The timer's resolution: turns closer than this are not spread, the lanes go together.
const GRAIN: Duration = Duration::from_millis(1);

/// Frames a socket must be expected to get in a period for waiting to be worth it: below, each
/// write would carry about as many frames at once as after the wait, so frames go at once.
const WORTH: f64 = 2.0;

/// One lane's turn, as it went.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub lane: usize,
    /// Real time the turn took.
    pub took: Duration,
    /// Frames written, and writes (sockets) they went in.
    pub frames: usize,
    pub writes: usize,
}

/// What a worker with news does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Every lane of its own, now: it has been quiet for a period (or has never written).
    All,
    /// This lane, now: its tick has come.
    Lane(usize),
    /// Nothing before this instant.
    At(Instant),
    /// Nothing until news comes.
    Idle,
}

/// One worker's write schedule over its lanes.
#[derive(Debug)]
pub struct Gather {
    mine: Box<[usize]>,
    max: Duration,
    /// Index in `mine` of the lane whose tick is next.
    next: usize,
    /// When the latest turn started.
    last: Option<Instant>,
    /// How long a lane's turn takes, averaged.
    turn: Duration,
    /// When each lane (as `mine`) last wrote a socket.
    wrote_at: Box<[Option<Instant>]>,
    /// Frames a socket gets per second, averaged over the turns that wrote any.
    rate: f64,
}

impl Gather {
    /// The schedule of a worker that owns lanes `mine`, never making a frame wait more than `max`.
    pub fn new(mine: Vec<usize>, max: Duration) -> Gather {
        assert!(!mine.is_empty(), "a worker with no lanes writes nothing");
        Gather {
            wrote_at: vec![None; mine.len()].into(),
            mine: mine.into(),
            max,
            next: 0,
            last: None,
            turn: Duration::ZERO,
            rate: 0.0,
        }
    }

    /// The lanes this worker writes.
    pub fn lanes(&self) -> &[usize] {
        &self.mine
    }

    /// How long frames now gather: each lane gets a turn once a period.
    pub fn period(&self) -> Duration {
        let n = self.mine.len() as u32;
        // A tick may fire up to a grain late: the bound holds with it.
        self.turn.saturating_mul(SPREAD * n).min(self.max.saturating_sub(GRAIN))
    }

    /// How long frames gather now: the period, or nothing when they go at once.
    pub fn wait(&self) -> Duration {
        let period = self.period();
        if self.rate * period.as_secs_f64() < WORTH {
            Duration::ZERO
        } else {
            period
        }
    }

    /// What to do at `now` with news for some lane of this worker's: everything at once when it
    /// has been quiet for a period, or when its sockets get too few frames for a wait to gather
    /// any; else the next lane on its tick.
    pub fn turn(&self, now: Instant) -> Turn {
        let Some(last) = self.last else {
            return Turn::All;
        };
        let period = self.wait();
        if now >= last + period {
            return Turn::All;
        }
        let tick = period / self.mine.len() as u32;
        if tick < GRAIN {
            return Turn::At(last + period);
        }
        if now >= last + tick {
            Turn::Lane(self.mine[self.next])
        } else {
            Turn::At(last + tick)
        }
    }

    /// Notes a turn of one lane (`all`: false) or of all (true) that started at `started`.
    pub fn wrote(&mut self, started: Instant, all: bool, turns: &[Written]) {
        // A lane's tick keeps to the grid, so the timer's lateness does not add up over a period.
        let tick = self.wait() / self.mine.len() as u32;
        let on_grid = self.last.map(|last| last + tick).filter(|due| !all && *due <= started);
        for w in turns {
            // A quarter of the way to the latest turn, each turn.
            self.turn = (self.turn * 3 + w.took) / 4;
            let Some(i) = self.mine.iter().position(|l| *l == w.lane) else {
                continue;
            };
            if w.writes == 0 {
                continue;
            }
            if let Some(at) = self.wrote_at[i] {
                // Frames per socket since the lane's last write, per second.
                let since = started.saturating_duration_since(at).max(GRAIN / 10);
                let rate = w.frames as f64 / w.writes as f64 / since.as_secs_f64();
                self.rate = (self.rate * 3.0 + rate) / 4.0;
            }
            self.wrote_at[i] = Some(started);
        }
        if !all {
            self.next = (self.next + 1) % self.mine.len();
        }
        self.last = Some(on_grid.unwrap_or(started));
    }
}

/// The schedule: `lanes` lanes, lane `k % lanes` written on the `k`-th tick after `start`, a tick
/// every `every / lanes`; worker `w` of `workers` owns the lanes `k` with `k % workers == w`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    start: Instant,
    tick: Duration,
    lanes: usize,
    workers: usize,
}

impl Pace {
    pub fn new(start: Instant, every: Duration, workers: usize) -> Pace {
        let workers = workers.max(1);
        // Ticks of at least a millisecond (the timer's resolution), and as many lanes per worker.
        let mut lanes = (every.as_millis() as usize).clamp(1, LANES.max(workers));
        if lanes > workers {
            lanes -= lanes % workers;
        }
        Pace {
            start,
            tick: every / lanes as u32,
            lanes,
            workers,
        }
    }

    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// When tick `k` comes (in u64 nanoseconds: a 1 ms tick passes `u32::MAX` in 50 days).
    pub(crate) fn at(&self, k: u64) -> Instant {
        self.start + Duration::from_nanos((self.tick.as_nanos() as u64).saturating_mul(k))
    }

    /// The tick `at` falls on.
    pub(crate) fn tick_of(&self, at: Instant) -> u64 {
        ((at - self.start).as_nanos() / self.tick.as_nanos().max(1)) as u64
    }

    /// Ticks between two turns of one worker; worker `w` has turns at ticks `k % step == w`.
    pub(crate) fn step(&self) -> usize {
        self.workers.min(self.lanes)
    }
}

/// A paced worker's place on the grid: its next tick (none: it owns no lane and only records).
#[derive(Debug)]
pub struct Grid {
    pace: Pace,
    index: u64,
    next: Option<u64>,
}

impl Grid {
    /// Worker `index`'s turns on `pace`, from the tick after `now`.
    pub fn new(pace: Pace, index: usize, now: Instant) -> Grid {
        let step = pace.step() as u64;
        let index = index as u64;
        let next = (index < step).then(|| {
            let now = pace.tick_of(now) + 1;
            now + (index + step - now % step) % step
        });
        Grid { pace, index, next }
    }

    /// The lane whose tick has come at `now` (the oldest due, never one more than a round behind),
    /// or when the next tick comes.
    fn turn(&mut self, now: Instant) -> Turn {
        let Some(due) = self.next else {
            return Turn::Idle;
        };
        if self.pace.at(due) > now {
            return Turn::At(self.pace.at(due));
        }
        let step = self.pace.step() as u64;
        let lanes = self.pace.lanes() as u64;
        let now = self.pace.tick_of(now).max(due);
        // Every turn of this worker since the last, each lane once.
        let mut k = due.max((now + 1).saturating_sub(lanes));
        k += (self.index + step - k % step) % step;
        self.next = Some(k);
        if k > now {
            return Turn::At(self.pace.at(k));
        }
        Turn::Lane((k % lanes) as usize)
    }

    fn wrote(&mut self) {
        if let Some(k) = &mut self.next {
            *k += self.pace.step() as u64;
        }
    }
}

/// One worker's schedule: adaptive, or paced on a fixed grid.
#[derive(Debug)]
pub enum Schedule {
    Adaptive(Gather),
    Grid(Grid),
}

impl Schedule {
    /// What to do at `now`, `news` telling whether a lane of this worker's has frames waiting.
    pub fn turn(&mut self, now: Instant, news: bool) -> Turn {
        match self {
            Schedule::Adaptive(_) if !news => Turn::Idle,
            Schedule::Adaptive(gather) => gather.turn(now),
            Schedule::Grid(grid) => grid.turn(now),
        }
    }

    /// Whether news of a lane wakes the worker: only adaptive turns come on news.
    pub fn wakes_on_news(&self) -> bool {
        matches!(self, Schedule::Adaptive(_))
    }

    /// Notes a turn of one lane (`all`: false) or of all (true) that started at `started`. Returns
    /// how long frames now gather, for adaptive writes.
    pub fn wrote(&mut self, started: Instant, all: bool, turns: &[Written]) -> Option<Duration> {
        match self {
            Schedule::Adaptive(gather) => {
                gather.wrote(started, all, turns);
                Some(gather.wait())
            }
            Schedule::Grid(grid) => {
                grid.wrote();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_shared_out_evenly_between_workers() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        for (every, workers, lanes, step) in [
            (ms(45), 1, 8, 1),
            (ms(45), 2, 8, 2),
            (ms(45), 3, 6, 3),
            (ms(45), 16, 16, 16),
            (ms(2), 4, 2, 2),
            (ms(0), 2, 1, 1),
        ] {
            let p = Pace::new(start, every, workers);
            assert_eq!((p.lanes, p.step()), (lanes, step), "{every:?} with {workers} workers");
            assert!(p.tick >= ms(1) || every < ms(1));
        }
        let p = Pace::new(start, ms(1), 1);
        let k = u64::from(u32::MAX);
        assert_eq!(p.at(k + 1) - p.at(k), ms(1), "turns keep coming after 2^32 ticks");
        assert_eq!(p.tick_of(p.at(k + 1)), k + 1);
    }

    const MINE: [usize; 4] = [1, 3, 5, 7];

    /// Turns of `lanes`, each `took` long, writing 10 sockets `frames` frames each.
    fn turns(lanes: &[usize], took: Duration, frames: usize) -> Vec<Written> {
        lanes
            .iter()
            .map(|&lane| Written {
                lane,
                took,
                frames: frames * 10,
                writes: 10,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn idle_writes_at_once_busy_spreads_its_lanes_and_never_waits_past_the_bound() {
        let max = Duration::from_millis(250);
        let ms = Duration::from_millis;
        let mut gather = Gather::new(MINE.to_vec(), max);
        let start = Instant::now();
        assert_eq!(gather.turn(start), Turn::All, "a fresh worker writes at once");

        // Turns of 1 ms, 4 frames a socket every 5 ms: the period follows, a quarter of the way
        // each turn, to SPREAD × 4 ms, and frames gather.
        let mut at = start;
        for _ in 0..40 {
            gather.wrote(at, true, &turns(&MINE, ms(1), 4));
            at += ms(5);
        }
        let period = gather.period();
        assert!(
            period > ms(4) * SPREAD * 99 / 100 && period <= ms(4) * SPREAD,
            "{period:?}"
        );
        assert_eq!(gather.wait(), period);
        let last = at - ms(5);
        let tick = period / 4;
        assert_eq!(gather.turn(last + ms(1)), Turn::At(last + tick));
        // Each tick the next lane, in turn; a timer that fires late does not push the next.
        let late = Duration::from_micros(300);
        let mut at = last + tick;
        for lane in [1, 3, 5, 7, 1] {
            assert_eq!(gather.turn(at + late), Turn::Lane(lane));
            gather.wrote(at + late, false, &turns(&[lane], ms(1), 4));
            assert_eq!(gather.turn(at + late), Turn::At(at + gather.period() / 4));
            at += gather.period() / 4;
        }
        assert_eq!(
            gather.turn(at + gather.period()),
            Turn::All,
            "quiet for a period: at once"
        );

        // The same turns, but a frame a socket every 50 ms: a wait of a period would still carry
        // one frame a write, so frames go at once.
        let mut at = at + ms(50);
        for _ in 0..40 {
            gather.wrote(at, true, &turns(&MINE, ms(1), 1));
            at += ms(50);
        }
        assert!(gather.period() > ms(19), "{:?}", gather.period());
        assert_eq!(gather.wait(), Duration::ZERO);
        assert_eq!(gather.turn(at - ms(49)), Turn::All);

        // Quiet turns of 20 µs: the load is soon forgotten.
        let now = Instant::now();
        gather.wrote(now, true, &turns(&MINE[..1], Duration::from_micros(20), 9));
        assert!(
            gather.period() > ms(4) * SPREAD / 2,
            "one quiet turn does not forget the load"
        );
        for _ in 0..40 {
            gather.wrote(now, true, &turns(&MINE[..1], Duration::from_micros(20), 9));
        }
        assert_eq!(gather.turn(now + ms(1)), Turn::All);
        // A little busier, its ticks finer than the timer: the lanes go together once a period.
        for _ in 0..40 {
            gather.wrote(now, true, &turns(&MINE[..1], Duration::from_micros(25), 9));
        }
        let period = gather.period();
        let expect = Duration::from_micros(25 * 4) * SPREAD;
        assert!(period > expect * 99 / 100 && period <= expect, "{period:?}");
        assert_eq!(gather.turn(now), Turn::At(now + period));

        // Turns that take longer than the bound allows (a huge room on a loaded box): capped.
        let now = Instant::now();
        for _ in 0..20 {
            gather.wrote(now, true, &turns(&MINE[..1], ms(400), 9));
        }
        assert_eq!(gather.period(), max - GRAIN, "a grain left for the timer");
        assert_eq!(gather.turn(now + max - GRAIN), Turn::All, "never past the bound");
    }
}
