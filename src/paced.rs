//! Paced writes (`--write-coalesce P`): each socket is written once per period, with everything
//! its topics got meanwhile, in one `writev` straight from the frames every socket shares.
//!
//! A delivery worker does not touch the sockets when a message arrives: the message's frames (one
//! per encoding in use) go to the topic's [`Recent`] list, numbered from one node-wide sequence.
//! Sockets are spread over lanes by their gate's address; lane `k % lanes` is written on the
//! `k`-th tick of a grid (a tick every `P / lanes`) counted from one instant, and each lane belongs
//! to one worker. On a lane's turn its worker takes the topics with frames that lane has not had
//! yet and hands each member in the lane its share with [`Gate::write_through`]: one lock and one
//! write per socket per period, whatever the rate, and no per-frame, per-socket queueing in the
//! common case. A topic's frames are dropped once every lane had them, so a list holds at most a
//! period of its messages. A socket that joins sees only frames numbered after its join.
//!
//! A socket in several topics gets one write per topic with news on its lane's turn.
//!
//! [`Gate::write_through`]: crate::gate::Gate::write_through

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{decode_each, BATCH},
    frame::Encoding,
    gate::Gate,
    hub::{Hub, Topic},
    metrics as m,
};

/// Lanes when workers are few: ticks `P / 8` apart spread a node's writes over the period.
const LANES: usize = 8;

/// The lane of a gate among `lanes`, stable for its life: Fibonacci hashing of its address.
pub fn lane_of(gate: &Arc<Gate>, lanes: usize) -> usize {
    ((Arc::as_ptr(gate) as usize as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % lanes
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
    fn at(&self, k: u64) -> Instant {
        self.start + Duration::from_nanos((self.tick.as_nanos() as u64).saturating_mul(k))
    }

    /// The tick `at` falls on.
    fn tick_of(&self, at: Instant) -> u64 {
        ((at - self.start).as_nanos() / self.tick.as_nanos().max(1)) as u64
    }

    /// Ticks between two turns of one worker; worker `w` has turns at ticks `k % step == w`.
    fn step(&self) -> usize {
        self.workers.min(self.lanes)
    }
}

/// Frames of one message, per encoding (`None`: no member used it, or it could not be encoded).
pub type Frames = [Option<Bytes>; 2];

/// A topic's frames that some lane has not had yet.
#[derive(Debug)]
pub struct Recent {
    /// Oldest first, with their sequence numbers.
    frames: VecDeque<(u64, Frames)>,
    /// Per lane: frames numbered below this went to it.
    done: Box<[u64]>,
}

impl Recent {
    /// The frames lane `lane` has not had yet, per encoding ([`Share`]); marks them had, and
    /// forgets those every lane had. True when nothing is left.
    pub fn take_for(&mut self, lane: usize, out: &mut [Share; 2]) -> bool {
        let from = self.done[lane];
        for (seq, frames) in self.frames.iter().filter(|(seq, _)| *seq >= from) {
            for (share, frame) in out.iter_mut().zip(frames) {
                if let Some(frame) = frame {
                    share.seqs.push(*seq);
                    share.frames.push(frame.clone());
                }
            }
        }
        if let Some((last, _)) = self.frames.back() {
            self.done[lane] = last + 1;
        }
        let floor = self.done.iter().copied().min().unwrap_or(0);
        while self.frames.front().is_some_and(|(seq, _)| *seq < floor) {
            self.frames.pop_front();
        }
        self.frames.is_empty()
    }
}

/// One encoding's frames for a lane's turn, oldest first, and their numbers.
#[derive(Debug, Default)]
pub struct Share {
    seqs: Vec<u64>,
    frames: Vec<Bytes>,
}

impl Share {
    /// The frames numbered `since` or later: what a socket that joined at `since` gets.
    pub fn since(&self, since: u64) -> &[Bytes] {
        &self.frames[self.seqs.partition_point(|s| *s < since)..]
    }

    fn clear(&mut self) {
        self.seqs.clear();
        self.frames.clear();
    }
}

/// The node's lanes: the shared sequence, and per lane the topics with frames it has not had.
pub struct Lanes {
    next_seq: AtomicU64,
    dirty: Box<[Mutex<Vec<Topic>>]>,
}

impl Lanes {
    pub fn new(lanes: usize) -> Lanes {
        Lanes {
            next_seq: AtomicU64::new(0),
            dirty: (0..lanes).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    pub fn count(&self) -> usize {
        self.dirty.len()
    }

    /// The number the next recorded frame gets: a joining socket sees frames from it on.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// Adds a message's frames to a topic's list (made when missing) and marks the topic for every
    /// lane that had all its frames so far. The caller holds the topic's entry exclusively.
    pub fn record(&self, topic: &Topic, recent: &mut Option<Box<Recent>>, frames: Frames) {
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        let lanes = self.dirty.len();
        let recent = recent.get_or_insert_with(|| {
            Box::new(Recent {
                frames: VecDeque::new(),
                done: vec![seq; lanes].into(),
            })
        });
        let last = recent.frames.back().map(|(s, _)| *s);
        for (lane, done) in recent.done.iter().enumerate() {
            // Clean (it had every frame so far): this frame makes the topic news for the lane.
            if last.is_none_or(|last| last < *done) {
                self.lock(lane).push(topic.clone());
            }
        }
        recent.frames.push_back((seq, frames));
    }

    fn lock(&self, lane: usize) -> std::sync::MutexGuard<'_, Vec<Topic>> {
        // A list of names: consistent whatever panicked while holding it.
        self.dirty[lane].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topics with news for `lane`, leaving it empty.
    fn take_dirty(&self, lane: usize) -> Vec<Topic> {
        std::mem::take(&mut *self.lock(lane))
    }
}

/// Worker `index` of a paced node: records what the bus hands over, and writes its lanes on
/// their turns. A turn missed while the worker was busy is caught up on the next tick, lanes in
/// order; when cancelled, it writes its lanes once more.
pub async fn run(
    hub: Hub,
    mut rx: mpsc::Receiver<Bytes>,
    cancel: CancellationToken,
    pace: Pace,
    lanes: Arc<Lanes>,
    index: usize,
) {
    let step = pace.step() as u64;
    let index = index as u64;
    let mut batch = Vec::with_capacity(BATCH);
    let mut scratch = Scratch::default();
    // Without lanes of its own, a worker only records.
    let mut next = (index < step).then(|| {
        let now = pace.tick_of(Instant::now()) + 1;
        now + (index + step - now % step) % step
    });
    let turn = tokio::time::sleep_until(pace.at(next.unwrap_or(0)));
    tokio::pin!(turn);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                decode_each(&mut batch, |env| hub.record(env, &lanes));
            }
            () = &mut turn, if next.is_some() => {
                let due = next.unwrap_or(0);
                let now = pace.tick_of(Instant::now()).max(due);
                // Every turn of this worker since the last, each lane once.
                let mut k = due.max((now + 1).saturating_sub(pace.lanes as u64));
                k += (index + step - k % step) % step;
                while k <= now {
                    write_lane(&hub, &lanes, (k % pace.lanes as u64) as usize, &mut scratch);
                    k += step;
                }
                next = Some(k);
                turn.as_mut().reset(pace.at(k));
            }
            _ = cancel.cancelled() => break,
        }
    }
    for lane in (index as usize..pace.lanes).step_by(step as usize) {
        write_lane(&hub, &lanes, lane, &mut scratch);
    }
}

/// Buffers reused from turn to turn.
#[derive(Default)]
pub struct Scratch {
    /// Per encoding, what the lane gets of the topic at hand.
    pub(crate) shares: [Share; 2],
    /// The lane's members: gate, encoding, joined at.
    pub(crate) seats: Vec<(Arc<Gate>, Encoding, u64)>,
}

impl Scratch {
    pub(crate) fn clear(&mut self) {
        self.shares.iter_mut().for_each(Share::clear);
        self.seats.clear();
    }
}

fn write_lane(hub: &Hub, lanes: &Lanes, lane: usize, scratch: &mut Scratch) {
    for topic in lanes.take_dirty(lane) {
        let d = hub.write_lane(&topic, lane, lanes.count(), scratch);
        m::delivered(&d);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, IoSlice},
        task::{Context, Poll},
    };

    use super::*;
    use crate::{
        bus::Dispatch,
        envelope::{Envelope, Kind},
        gate::Outlet,
        hub::{Interest, Member, SessionId},
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

    /// A hub with paced workers behind a real [`Dispatch`], and sockets that record their writes.
    struct Paced {
        hub: Hub,
        dispatch: Dispatch,
        tracker: tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    }

    impl Paced {
        fn start(every: Duration, workers: usize) -> Paced {
            let (hub, mut interest) = Hub::new();
            let answering = hub.clone();
            tokio::spawn(async move {
                while let Some(i) = interest.recv().await {
                    if let Interest::Want(t) = i {
                        answering.subscribed(&t, Ok(()));
                    }
                }
            });
            let tracker = tokio_util::task::TaskTracker::new();
            let cancel = CancellationToken::new();
            let dispatch = Dispatch::start(hub.clone(), workers, 1024, every, &tracker, cancel.clone());
            Paced {
                hub,
                dispatch,
                tracker,
                cancel,
            }
        }

        async fn join(&self, room: &str, budget: usize) -> (Recorder, SessionId) {
            let gate = Arc::new(Gate::new(budget));
            let socket = Recorder::default();
            gate.attach(Box::new(socket.clone()));
            let id = self.hub.register(Member {
                gate,
                encoding: Encoding::Json,
            });
            self.rejoin(room, id).await;
            (socket, id)
        }

        async fn rejoin(&self, room: &str, id: SessionId) {
            self.hub
                .join(Topic::Room(room.into()), id, Duration::from_secs(1))
                .await
                .unwrap();
        }

        fn publish(&self, channel: &str, room: &str) {
            self.publish_data(channel, room, Bytes::from_static(b"1"));
        }

        fn publish_data(&self, channel: &str, room: &str, data: Bytes) {
            let env = Envelope {
                kind: Kind::Room,
                origin: "n1".into(),
                target: room.into(),
                from: "p".into(),
                ts_us: 0,
                format: Encoding::Json,
                data,
            };
            self.dispatch.dispatch(channel.as_bytes(), env.encode());
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.tracker.close();
            self.tracker.wait().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paced_writes_each_socket_once_per_period_and_no_frame_waits_longer() {
        const SOCKETS: usize = 24;
        const MESSAGES: usize = 100;
        let every = Duration::from_millis(40);
        let gap = Duration::from_millis(5);
        let node = Paced::start(every, 2);
        let mut sockets = Vec::new();
        for _ in 0..SOCKETS {
            let (socket, _) = node.join("r", 1 << 20).await;
            sockets.push(socket);
        }
        // Off the ticks' grid, so no message and write share an instant.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut sent = Vec::new();
        for seq in 0..MESSAGES {
            sent.push(Instant::now());
            // Two channels of the room, one on each worker: its messages reach both.
            node.publish(["ws:room:r:shard0", "ws:room:r:shard4"][seq % 2], "r");
            tokio::time::sleep(gap).await;
        }
        tokio::time::sleep(every * 2).await;
        node.stop().await;

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

    #[tokio::test(start_paused = true)]
    async fn a_socket_gets_what_came_after_its_join_and_joining_again_loses_nothing() {
        let every = Duration::from_millis(40);
        let node = Paced::start(every, 1);
        let (early, id) = node.join("r", 1 << 20).await;
        // 1 ms after a tick (ticks every 5 ms from the start), so no turn comes in between.
        tokio::time::sleep(Duration::from_millis(6)).await;
        node.publish_data("ws:room:r:shard0", "r", Bytes::from_static(b"12345"));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (late, _) = node.join("r", 1 << 20).await;
        node.publish_data("ws:room:r:shard0", "r", Bytes::from_static(b"2"));
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Already in: its unwritten frames stay its own.
        node.rejoin("r", id).await;
        tokio::time::sleep(every * 2).await;
        node.stop().await;
        let total = |s: &Recorder| s.0.lock().unwrap().last().map_or(0, |w| w.1);
        let (first, second) = (total(&early), total(&late));
        assert!(second > 0, "the late socket got the second message");
        // The early one got both; the first message's frame is 4 bytes longer than the second's.
        assert_eq!(first, 2 * second + 4, "early {first} B, late {second} B");
    }

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

    #[test]
    fn a_topic_is_news_for_each_lane_once_and_its_frames_go_once_every_lane_had_them() {
        let lanes = Lanes::new(2);
        let topic = Topic::Room("r".into());
        let mut recent = None;
        let frame = |b: &'static [u8]| [Some(Bytes::from_static(b)), None];
        lanes.record(&topic, &mut recent, frame(b"a"));
        lanes.record(&topic, &mut recent, frame(b"b"));
        assert_eq!(lanes.take_dirty(0).len(), 1, "news once, however many frames");
        assert_eq!(lanes.take_dirty(1).len(), 1);
        let r = recent.as_mut().unwrap();
        let mut out: [Share; 2] = Default::default();
        assert!(!r.take_for(0, &mut out));
        assert_eq!(out[0].seqs, [0, 1]);
        assert_eq!(
            out[0].since(1),
            [Bytes::from_static(b"b")],
            "joined at 1: frame 0 is not its"
        );
        assert!(out[1].frames.is_empty());
        // Lane 0 is clean again, lane 1 still has two to take: a third frame is news for lane 0 only.
        lanes.record(&topic, &mut recent, frame(b"c"));
        assert_eq!(lanes.take_dirty(0).len(), 1);
        assert!(lanes.take_dirty(1).is_empty());
        let r = recent.as_mut().unwrap();
        let mut out: [Share; 2] = Default::default();
        assert!(!r.take_for(1, &mut out), "lane 0 has not had frame 2");
        assert_eq!(out[0].frames.len(), 3);
        assert_eq!(r.frames.len(), 1, "frames 0 and 1 went to both lanes: dropped");
        let mut out: [Share; 2] = Default::default();
        assert!(r.take_for(0, &mut out));
        assert_eq!(out[0].seqs, [2]);
        assert_eq!(lanes.next_seq(), 3);
    }
}
