//! The match's publishers: the score feed (publisher 0, a few messages a second into the score
//! room) and the chat (publishers 1 and on, together a steady rate into the chat room, ten times
//! it while the goal is celebrated). Each is one socket through the balancer that publishes with
//! ids, counts the node's answers (`ok`, with the message's position in the score room, or
//! `error` by code), and reconnects as a viewer does. While it is away its turns pass unsent, as
//! a feed that cannot reach the node: they are counted, not published late. It publishes from
//! the steady feed on, until told to stop, then waits a little for its last answers.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::watch,
    time::{sleep_until, Duration, Instant},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    conn::{self, Ws},
    wire::{self, Inbound, Stamp, Target},
};

use super::{
    backoff::Hint,
    client::{come_back, ended, Counts, Ctx, End, Line, ON_TIME},
    ledger::Sent,
    live::{Phase, Room, PHASES},
};

/// One publisher's part in the match.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Its publisher number (0: the score).
    pub id: u32,
    pub room: Room,
    /// Messages a second outside the goal.
    pub rate: f64,
    /// How many times faster during the goal.
    pub goal_factor: f64,
}

impl Part {
    /// The time between two of its messages in `phase`.
    fn period(&self, phase: Phase) -> Duration {
        let rate = if phase == Phase::Goal {
            self.rate * self.goal_factor
        } else {
            self.rate
        };
        Duration::from_secs_f64(1.0 / rate.max(1e-3))
    }
}

/// What one publisher did over the match.
pub struct PubLog {
    pub sent: Sent,
    /// Per phase the message was sent in: publishes refused, by code.
    pub refused: Vec<BTreeMap<String, u64>>,
    /// Per phase: turns that passed while it was away.
    pub not_sent: Vec<u64>,
    /// `ok` answers carrying the message's position (a room with history).
    pub acked_with_pos: u64,
    pub counts: Vec<Counts>,
}

/// How long a stopped publisher waits for the answers to what it sent.
const LAST_ANSWERS: Duration = Duration::from_secs(3);

struct Publisher {
    part: Part,
    line: Line,
    log: PubLog,
    /// When its next message is due.
    next: Instant,
}

enum Event {
    Stop,
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    OnTime,
    Turn,
}

/// Runs one publisher until `stop`; what it did.
pub async fn publisher(ctx: Arc<Ctx>, part: Part, mut stop: watch::Receiver<bool>) -> PubLog {
    let user = match part.room {
        Room::Score => "score-feed".to_string(),
        Room::Chat => format!("chatter-{}", part.id),
    };
    let mut p = Publisher {
        part,
        line: Line::new(ctx, part.id as usize, user),
        log: PubLog {
            sent: Sent::new(part.room),
            refused: vec![BTreeMap::new(); PHASES.len()],
            not_sent: vec![0; PHASES.len()],
            acked_with_pos: 0,
            counts: Vec::new(),
        },
        next: Instant::now(),
    };
    while let Some(mut ws) = p.line.open(&mut stop).await {
        p.skip_missed_turns();
        match p.session(&mut ws, &mut stop).await {
            End::Stop => {
                p.last_answers(&mut ws).await;
                conn::close(ws).await;
                break;
            }
            End::Lost(how, hint) => {
                p.line.lost(&how);
                if how == ON_TIME {
                    tokio::spawn(conn::close(ws));
                }
                if !p.line.pause(hint, &mut stop).await {
                    break;
                }
            }
        }
    }
    p.log.counts = std::mem::take(&mut p.line.counts);
    p.log
}

impl Publisher {
    fn phase(&self) -> Phase {
        self.line.ctx.live.phase()
    }

    /// Turns that passed while away are counted, not sent late.
    fn skip_missed_turns(&mut self) {
        let now = Instant::now();
        while self.next < now {
            let phase = self.phase();
            if phase != Phase::Kickoff {
                self.log.not_sent[phase.index()] += 1;
            }
            self.next += self.part.period(phase);
        }
    }

    async fn session(&mut self, ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> End {
        let mut reconnect: Option<(Instant, Option<u64>)> = None;
        loop {
            let on_time = reconnect.map(|(at, ms)| at + Duration::from_millis(ms.unwrap_or(0)));
            let event = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => Event::Stop,
                msg = ws.next() => Event::Frame(msg),
                _ = sleep_until(on_time.unwrap_or_else(Instant::now)), if on_time.is_some() => Event::OnTime,
                _ = sleep_until(self.next) => Event::Turn,
            };
            match event {
                Event::Stop => return End::Stop,
                Event::OnTime => return End::Lost(ON_TIME.into(), Hint::ComeBackIn(Duration::ZERO)),
                Event::Frame(msg) => {
                    if let Some(how) = ended(&msg) {
                        let hint = reconnect.map_or(Hint::None, |(at, ms)| come_back(at, ms, Instant::now()));
                        return End::Lost(how, hint);
                    }
                    if let Some(Ok(frame)) = &msg {
                        if let Some(after) = self.on_frame(frame) {
                            reconnect = Some((Instant::now(), after));
                        }
                    }
                }
                Event::Turn => {
                    let phase = self.phase();
                    self.next += self.part.period(phase);
                    // The feed starts with the steady phase: at kick-off the viewers connect.
                    if phase != Phase::Kickoff && self.publish(ws, phase).await.is_err() {
                        return End::Lost("error".into(), Hint::None);
                    }
                }
            }
        }
    }

    /// Sends the next message; its sequence number is its id less one.
    async fn publish(&mut self, ws: &mut Ws, phase: Phase) -> Result<(), ()> {
        let seq = self.log.sent.send(phase.index(), self.line.ctx.live.secs());
        let stamp = Stamp {
            publisher: self.part.id,
            seq,
            ts_us: wire::now_us(),
        };
        let ctx = &self.line.ctx;
        let room = match self.part.room {
            Room::Score => &ctx.score_room,
            Room::Chat => &ctx.chat_room,
        };
        let frame = wire::publish_frame(
            self.line.encoding(),
            &Target::Room(room.clone()),
            stamp,
            ctx.payload_bytes,
            Some(seq as i64 + 1),
        );
        ws.send(frame).await.map_err(|_| ())
    }

    /// Counts an answer; the `after_ms` of a `reconnect` frame.
    fn on_frame(&mut self, frame: &Message) -> Option<Option<u64>> {
        let (inbound, raw): (Inbound<'_>, &[u8]) = match frame {
            Message::Text(t) => (wire::scan_json(t), t.as_bytes()),
            Message::Binary(b) => (wire::scan_msgpack(b), b),
            _ => return None,
        };
        match inbound {
            Inbound::Ok(id) => self.acked(id, raw),
            Inbound::Error(Some(id)) if id > 0 => {
                let phase = self.log.sent.phase.get(id as usize - 1).copied().unwrap_or(0);
                let code = wire::error_code(frame).unwrap_or_else(|| "error".into());
                *self.log.refused[phase as usize].entry(code).or_insert(0) += 1;
            }
            Inbound::Reconnect(after_ms) => return Some(after_ms),
            _ => {}
        }
        None
    }

    /// The `ok` to the publish with `id` (its sequence number plus one), the frame `raw`.
    fn acked(&mut self, id: i64, raw: &[u8]) {
        if id < 1 || !self.log.sent.ack(id as u64 - 1) {
            return;
        }
        self.line.ctx.live.acked.fetch_add(1, Ordering::Relaxed);
        if memchr::memmem::find(raw, b"pos").is_some() {
            self.log.acked_with_pos += 1;
        }
    }

    /// Reads answers until every message sent was answered, or [`LAST_ANSWERS`] passed.
    async fn last_answers(&mut self, ws: &mut Ws) {
        let deadline = Instant::now() + LAST_ANSWERS;
        while self.unanswered() > 0 {
            let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
                return;
            };
            if ended(&msg).is_some() {
                return;
            }
            if let Some(Ok(frame)) = &msg {
                self.on_frame(frame);
            }
        }
    }

    fn unanswered(&self) -> u64 {
        let acked = self.log.sent.acked.iter().filter(|a| **a).count() as u64;
        let refused: u64 = self.log.refused.iter().flat_map(|m| m.values()).sum();
        self.log.sent.sent().saturating_sub(acked + refused)
    }
}
