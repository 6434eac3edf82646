//! The delivery workers: the route out from the bus. What the bus receives is handed here
//! ([`Dispatch`], the bus's [`Sink`]), spread over the workers by channel so one channel's
//! messages keep their order, decoded once per node, put in order against history where the room
//! keeps it ([`Gaps::in_order`]), and recorded in the hub for the lanes ([`Hub::record`]). Each
//! worker writes its own lanes ([`Hub::write_lane`]) when its [`Schedule`] says: adaptive by
//! default, on a fixed grid with `--write-coalesce`. One loop serves both.
//!
//! The bus knows nothing of this module: it hands payloads to whatever [`Sink`] it was given.
//! The queues are made first, for the bus; the workers start once the bus exists, with what the
//! gap fill needs to read it ([`Gaps`]).

use std::sync::Arc;

use bytes::Bytes;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    schedule::{Gather, Grid, Pace, Schedule, Turn, Written},
    writer::Scratch,
};
use crate::{
    bus::{Naming, Sink},
    config::Config,
    envelope::{self, Envelope},
    frame::data_depth_ok,
    history::gaps::{Decoded, Gaps},
    hub::Hub,
    metrics as m,
};

/// Messages a worker takes from its queue at once.
const BATCH: usize = 64;

/// What a worker's queue holds: the channel a payload came on, and the payload.
type Item = (Bytes, Bytes);

/// Where bus readers hand received payloads: bounded per-worker queues chosen by channel, so one
/// channel's messages keep their order and a slow fan-out never stalls the reader.
#[derive(Clone)]
pub struct Dispatch {
    workers: Arc<[mpsc::Sender<Item>]>,
}

/// The receiving ends of the workers' queues, until the workers start ([`start`]).
pub struct Queues(Vec<mpsc::Receiver<Item>>);

impl Dispatch {
    /// `--workers` queues of `--worker-queue` each: the sink to hand the bus, and their other ends.
    pub fn new(config: &Config) -> (Dispatch, Queues) {
        let (senders, receivers) = (0..config.workers.max(1))
            .map(|_| mpsc::channel(config.worker_queue.max(1)))
            .unzip::<_, _, Vec<_>, Vec<_>>();
        (
            Dispatch {
                workers: senders.into(),
            },
            Queues(receivers),
        )
    }
}

impl Sink for Dispatch {
    /// Hands one payload to its channel's worker; never waits. A full queue drops and counts.
    fn receive(&self, channel: Bytes, payload: Bytes) {
        let i = (crc32fast::hash(&channel) as usize) % self.workers.len();
        match self.workers[i].try_send((channel, payload)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => m::bus_dropped("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// What every worker works on.
#[derive(Clone)]
struct On {
    hub: Hub,
    naming: Naming,
    gaps: Arc<Gaps>,
    max_depth: usize,
}

/// Starts a worker per queue feeding `hub`, each writing its own lanes on its schedule: adaptive
/// (bounded by `--max-write-delay`), or paced when `--write-coalesce` is not zero (every paced
/// worker counts its turns from the same instant). `naming` tells which channel an envelope
/// belongs on.
pub fn start(
    queues: Queues,
    hub: Hub,
    naming: Naming,
    gaps: Gaps,
    config: &Config,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let on = On {
        hub,
        naming,
        gaps: Arc::new(gaps),
        max_depth: config.max_data_depth,
    };
    let pace = pace(config);
    let started = Instant::now();
    for (me, rx) in queues.0.into_iter().enumerate() {
        let schedule = match pace {
            Some(pace) => Schedule::Grid(Grid::new(pace, me, started)),
            None => Schedule::Adaptive(Gather::new(on.hub.lanes().of_worker(me), config.max_write_delay)),
        };
        tracker.spawn(work(on.clone(), rx, cancel.clone(), schedule, me));
    }
}

/// The grid of paced writes, when `--write-coalesce` is set.
fn pace(config: &Config) -> Option<Pace> {
    let coalesce = config.write_coalesce;
    (!coalesce.is_zero()).then(|| Pace::new(Instant::now(), coalesce, config.workers))
}

/// How many lanes a node with `config` writes: the grid's, or adaptive writes'.
pub fn lanes(config: &Config) -> usize {
    let workers = config.workers.max(1);
    pace(config).map_or_else(|| super::lanes::Lanes::adaptive(workers), |p| p.lanes())
}

/// Worker `me`: records what the bus hands over for the lanes, and writes its own lanes when its
/// schedule says. When cancelled, it writes its lanes once more.
async fn work(on: On, mut rx: mpsc::Receiver<Item>, cancel: CancellationToken, mut schedule: Schedule, me: usize) {
    let On {
        hub,
        naming,
        gaps,
        max_depth,
    } = on;
    let lanes = hub.lanes().clone();
    let mine = lanes.of_worker(me);
    let mut batch = Vec::with_capacity(BATCH);
    let mut decoded = Vec::with_capacity(BATCH);
    let mut scratch = Scratch::default();
    let timer = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(timer);
    // A paced worker's grid runs from the start; an adaptive one waits for news.
    let mut armed = false;
    if let Turn::At(at) = schedule.turn(Instant::now(), false) {
        timer.as_mut().reset(at);
        armed = true;
    }
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                decode(&mut batch, &naming, max_depth, &mut decoded);
                gaps.in_order(&hub, &mut decoded, |env, shard| hub.record(env, shard)).await;
            }
            () = lanes.news(me), if schedule.wakes_on_news() => {}
            () = &mut timer, if armed => armed = false,
            _ = cancel.cancelled() => break,
        }
        if !armed {
            if let Some(at) = take_turns(&hub, &mut schedule, &mine, &mut scratch) {
                timer.as_mut().reset(at);
                armed = true;
            }
        }
    }
    for lane in &mine {
        hub.write_lane(*lane, &mut scratch);
    }
}

/// Takes the turns the schedule says are due, lane by lane; returns when the next one comes, or
/// `None` when it waits for news.
fn take_turns(hub: &Hub, schedule: &mut Schedule, mine: &[usize], scratch: &mut Scratch) -> Option<Instant> {
    let lanes = hub.lanes();
    let mut turns = Vec::new();
    loop {
        let started = Instant::now();
        let one;
        let (all, write) = match schedule.turn(started, lanes.news_for(mine)) {
            Turn::Idle => return None,
            Turn::At(at) => return Some(at),
            Turn::All => (true, mine),
            Turn::Lane(lane) => {
                one = [lane];
                (false, &one[..])
            }
        };
        turns.clear();
        for lane in write {
            let clock = std::time::Instant::now();
            let d = hub.write_lane(*lane, scratch);
            turns.push(Written {
                lane: *lane,
                took: clock.elapsed(),
                frames: d.delivered,
                writes: d.writes,
            });
        }
        if let Some(wait) = schedule.wrote(started, all, &turns) {
            m::write_gathered(wait);
        }
    }
}

/// Empties a worker's batch into `out`: each envelope that decodes, belongs on its channel and
/// whose data nests no deeper than `--max-data-depth`, with its shard (after recording its latency
/// from publish). The rest are counted as dropped: a backend job can publish anything on a
/// channel, and only the channel is trusted; the depth rule is the one clients' publishes meet, so
/// every member of either encoding sees the same stream.
fn decode(batch: &mut Vec<Item>, naming: &Naming, max_depth: usize, out: &mut Vec<Decoded>) {
    for (channel, payload) in batch.drain(..) {
        let env = match Envelope::decode(&payload) {
            Ok(env) => env,
            Err(e) => {
                tracing::debug!(error = %e, "dropping undecodable envelope");
                m::bus_dropped("undecodable", 1);
                continue;
            }
        };
        let Some(shard) = naming.locate(&channel, env.kind, &env.target) else {
            tracing::debug!(channel = %String::from_utf8_lossy(&channel), "dropping an envelope whose target is not its channel's");
            m::bus_dropped("mismatch", 1);
            continue;
        };
        if !data_depth_ok(env.format, &env.data, max_depth) {
            m::bus_dropped("too_deep", 1);
            continue;
        }
        let latency = envelope::now_us().saturating_sub(env.ts_us) as f64 / 1e6;
        m::bus_received(latency);
        out.push((channel, env, shard));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, IoSlice},
        sync::Mutex,
        task::{Context, Poll},
        time::Duration,
    };

    use super::*;
    use crate::{
        bus::{memory::MemoryBus, Bus},
        encoding::Encoding,
        fanout::{
            gate::{Gate, Outlet},
            lanes::Lanes,
            writer::Outbound,
        },
        hub::SessionId,
        topic::Topic,
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

    /// A socket whose every write costs `.1` of real time (a busy kernel), recording into `.0`.
    #[derive(Clone)]
    struct Slow(Recorder, Duration);

    impl Outlet for Slow {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            std::thread::sleep(self.1);
            self.0.try_write_vectored(bufs)
        }

        fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.poll_write_ready(cx)
        }
    }

    /// A hub with workers behind a real [`Dispatch`], and sockets that record their writes.
    struct Paced {
        hub: Hub,
        dispatch: Dispatch,
        tracker: tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    }

    impl Paced {
        fn start(every: Duration, workers: usize) -> Paced {
            Paced::with(Config {
                workers,
                worker_queue: 1024,
                write_coalesce: every,
                ..Config::default()
            })
        }

        /// Workers with adaptive writes, frames waiting at most `max`.
        fn adaptive(max: Duration, workers: usize) -> Paced {
            Paced::with(Config {
                workers,
                worker_queue: 1024,
                max_write_delay: max,
                ..Config::default()
            })
        }

        fn with(config: Config) -> Paced {
            let hub = Hub::granting(Lanes::new(lanes(&config), config.workers));
            let tracker = tokio_util::task::TaskTracker::new();
            let cancel = CancellationToken::new();
            let naming = Naming::new("ws:room:", "ws:user:", 8, std::collections::HashMap::new());
            let (dispatch, queues) = Dispatch::new(&config);
            let bus = Arc::new(Bus::Memory(MemoryBus::new(Arc::new(dispatch.clone()))));
            let gaps = Gaps::new(bus, config.clone());
            start(queues, hub.clone(), naming, gaps, &config, &tracker, cancel.clone());
            Paced {
                hub,
                dispatch,
                tracker,
                cancel,
            }
        }

        async fn join(&self, room: &str, budget: usize) -> (Recorder, SessionId) {
            self.join_costing(room, budget, Duration::ZERO).await
        }

        /// A member whose socket's writes each cost `cost` of real time.
        async fn join_costing(&self, room: &str, budget: usize, cost: Duration) -> (Recorder, SessionId) {
            let gate = Arc::new(Gate::new(budget));
            let socket = Recorder::default();
            gate.attach(Box::new(Slow(socket.clone(), cost)));
            let id = self.hub.register(Outbound::new(gate, Encoding::Json));
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
            let env = Envelope::to_room(room, data);
            self.dispatch
                .receive(Bytes::copy_from_slice(channel.as_bytes()), env.encode());
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

    /// For each frame `k` sent at `sent[k]` (all of `frame` bytes), how long it waited for its write.
    fn waits(socket: &Recorder, sent: &[Instant], frame: usize) -> Vec<Duration> {
        let writes = socket.0.lock().unwrap().clone();
        assert_eq!(writes.last().unwrap().1, frame * sent.len(), "every frame, whole");
        sent.iter()
            .enumerate()
            .map(|(k, at)| writes.iter().find(|w| w.1 >= (k + 1) * frame).unwrap().0 - *at)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_writes_go_out_at_once_while_the_worker_is_quiet() {
        const MESSAGES: usize = 20;
        let node = Paced::adaptive(Duration::from_millis(250), 2);
        let mut sockets = Vec::new();
        for _ in 0..3 {
            sockets.push(node.join("r", 1 << 20).await.0);
        }
        let mut sent = Vec::new();
        for _ in 0..MESSAGES {
            sent.push(Instant::now());
            node.publish(["ws:room:r:shard0", "ws:room:r:shard4"][sent.len() % 2], "r");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node.stop().await;
        for socket in &sockets {
            let frame = socket.0.lock().unwrap().last().unwrap().1 / MESSAGES;
            let waits = waits(socket, &sent, frame);
            // Two spared for a turn the machine stalled for milliseconds.
            let at_once = waits.iter().filter(|w| w.is_zero()).count();
            assert!(at_once >= MESSAGES - 2, "quiet, yet frames waited: {waits:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_writes_gather_under_load_and_no_frame_waits_past_the_bound() {
        const SOCKETS: usize = 50;
        const MESSAGES: usize = 200;
        let max = Duration::from_millis(25);
        let node = Paced::adaptive(max, 2);
        let mut sockets = Vec::new();
        for _ in 0..SOCKETS {
            // 50 writes of 200 µs over 8 lanes: a worker's round of turns takes 5 ms or more, and
            // six of it pass the 25 ms bound.
            let cost = Duration::from_micros(200);
            sockets.push(node.join_costing("r", 1 << 20, cost).await.0);
        }
        let mut sent = Vec::new();
        for _ in 0..MESSAGES {
            sent.push(Instant::now());
            // Two channels of the room, one on each worker: each socket still has one writer.
            node.publish(["ws:room:r:shard0", "ws:room:r:shard4"][sent.len() % 2], "r");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let span = sent[MESSAGES - 1] - sent[0];
        tokio::time::sleep(max * 2).await;
        node.stop().await;
        // The lanes take turns: writes go out at many instants a period, not in one burst per
        // worker (2 workers, 4 lanes each).
        let instants: std::collections::BTreeSet<Instant> = sockets
            .iter()
            .flat_map(|s| s.0.lock().unwrap().iter().map(|w| w.0).collect::<Vec<_>>())
            .collect();
        let periods = (span.as_millis() / max.as_millis()) as usize;
        assert!(
            instants.len() >= 4 * periods,
            "{} instants with writes over {periods} periods",
            instants.len()
        );
        for socket in &sockets {
            let frame = socket.0.lock().unwrap().last().unwrap().1 / MESSAGES;
            let writes = socket.0.lock().unwrap().len();
            // About a write per bound (less the timer's grain): one writer, gathering for as long
            // as it may, after a few turns to learn the load.
            let most = (span.as_millis() / (max.as_millis() - 1)) as usize + 5;
            assert!(writes <= most, "{writes} writes for {MESSAGES} frames over {span:?}");
            let waits = waits(socket, &sent, frame);
            let longest = waits.iter().max().unwrap();
            assert!(*longest <= max, "a frame waited {longest:?}, past {max:?}");
        }
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
}
