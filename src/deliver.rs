//! The route in from the bus: what the bus receives is handed here ([`Dispatch`], the bus's
//! [`Sink`]), spread over delivery workers by channel so one channel's messages keep their order,
//! decoded once per node, and handed to the hub: at once ([`Hub::deliver`], then one flush per
//! socket per batch) or, with paced writes, recorded for the lanes' turns ([`Hub::record`], then
//! [`Hub::write_lane`] on each turn; the schedule is [`crate::paced`]'s).
//!
//! The bus knows nothing of this module: it hands payloads to whatever [`Sink`] it was given.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Sink,
    envelope::{self, Envelope},
    hub::Hub,
    metrics::{self as m, Delivery},
    paced::{Lanes, Pace, Scratch},
};

/// Messages a worker takes from its queue at once.
const BATCH: usize = 64;

/// Where bus readers hand received payloads: bounded per-worker queues chosen by channel, so one
/// channel's messages keep their order and a slow fan-out never stalls the reader.
#[derive(Clone)]
pub struct Dispatch {
    workers: Arc<[mpsc::Sender<Bytes>]>,
}

impl Dispatch {
    /// Starts `workers` delivery tasks feeding `hub`; paced when `coalesce` is not zero.
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
            let pace = Pace::new(Instant::now(), coalesce, workers);
            let lanes = Arc::new(Lanes::new(pace.lanes()));
            hub.pace(lanes.clone());
            (pace, lanes)
        });
        let senders: Vec<_> = (0..workers)
            .map(|index| {
                let (tx, rx) = mpsc::channel(capacity.max(1));
                match &pace {
                    Some((pace, lanes)) => {
                        tracker.spawn(paced(hub.clone(), rx, cancel.clone(), *pace, lanes.clone(), index))
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
}

impl Sink for Dispatch {
    /// Hands one payload to its channel's worker; never waits. A full queue drops and counts.
    fn receive(&self, channel: &[u8], payload: Bytes) {
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
/// with load). With `--write-coalesce`, [`paced`] instead.
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
        m::delivered(&Delivery {
            writes: flush.len(),
            ..Delivery::default()
        });
        for gate in flush.drain(..) {
            gate.flush();
        }
    }
}

/// Worker `index` of a paced node: records what the bus hands over, and writes its lanes on
/// their turns. A turn missed while the worker was busy is caught up on the next tick, lanes in
/// order; when cancelled, it writes its lanes once more.
async fn paced(
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
                let mut k = due.max((now + 1).saturating_sub(pace.lanes() as u64));
                k += (index + step - k % step) % step;
                while k <= now {
                    write_lane(&hub, &lanes, (k % pace.lanes() as u64) as usize, &mut scratch);
                    k += step;
                }
                next = Some(k);
                turn.as_mut().reset(pace.at(k));
            }
            _ = cancel.cancelled() => break,
        }
    }
    for lane in (index as usize..pace.lanes()).step_by(step as usize) {
        write_lane(&hub, &lanes, lane, &mut scratch);
    }
}

/// Lane `lane`'s turn: every topic with news for it.
fn write_lane(hub: &Hub, lanes: &Lanes, lane: usize, scratch: &mut Scratch) {
    for topic in lanes.take_dirty(lane) {
        let d = hub.write_lane(&topic, lane, lanes.count(), scratch);
        m::delivered(&d);
    }
}

/// Empties a worker's batch, handing each envelope that decodes to `each` (after recording its
/// latency from publish) and counting the rest as dropped.
fn decode_each(batch: &mut Vec<Bytes>, mut each: impl FnMut(&Envelope)) {
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
    use std::{
        io::{self, IoSlice},
        sync::Mutex,
        task::{Context, Poll},
    };

    use super::*;
    use crate::{
        encoding::Encoding,
        envelope::Kind,
        gate::{Gate, Outlet},
        hub::{Interest, Member, SessionId},
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
            self.dispatch.receive(channel.as_bytes(), env.encode());
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
}
