//! One viewer of the match: one socket through the balancer, joined to the score room (with
//! history) and the chat room (without), held for the whole match the way the JS client holds
//! it. After a loss it connects again ([`super::client::Line`]: at the node's `reconnect` time,
//! else with full jitter, a 503's `Retry-After` waited out) and joins both rooms again, the score
//! room with `since`, its last position on each shard, so the node replays what it missed. A
//! join answered `unavailable` (or not answered in time) is asked again on the same connection
//! after a random pause under a second, as the JS client does.
//!
//! Everything it receives goes into its [`Received`]; how its connections went into its line's
//! [`super::client::Counts`]; the time from a loss to both rooms joined again into the phase's
//! histogram.

use std::sync::{atomic::Ordering, Arc};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::watch,
    time::{sleep_until, Duration, Instant},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    churn::Positions,
    conn::{self, Ws},
    wire::{self, At, Inbound, Stamp},
};

use super::{
    backoff::Hint,
    client::{come_back, ended, Counts, Ctx, End, Line, ANSWER_TIMEOUT, ON_TIME},
    ledger::Received,
    live::Room,
};

/// What one viewer saw over the match.
pub struct ViewerLog {
    pub received: Received,
    pub counts: Vec<Counts>,
}

/// Where one room's join stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joining {
    /// Sent with this id at this time; not answered yet.
    Asked(i64, Instant),
    /// Refused (`unavailable`) or not answered in time: asked again at this time.
    AgainAt(Instant),
    Joined,
    /// Refused for good (any other code): the room stays unjoined on this connection.
    Failed,
}

impl Joining {
    /// Whether this is the join asked with `id`, waiting for its answer.
    fn asks(self, id: i64) -> bool {
        matches!(self, Joining::Asked(i, _) if i == id)
    }

    /// When something is due: the answer's deadline or the next try.
    fn due(self) -> Option<Instant> {
        match self {
            Joining::Asked(_, at) => Some(at + ANSWER_TIMEOUT),
            Joining::AgainAt(at) => Some(at),
            Joining::Joined | Joining::Failed => None,
        }
    }
}

/// One connection's state.
struct Session {
    score: Joining,
    chat: Joining,
    /// Whether this connection's score join carries `since` (its messages before the `ok` are
    /// a replay).
    resuming: bool,
    /// When the chat join was answered, seconds into the run.
    chat_from: Option<f64>,
    /// The node's `reconnect` frame: when it arrived and its `after_ms`.
    reconnect: Option<(Instant, Option<u64>)>,
    /// In both rooms, and counted in [`super::live::Live::connected`].
    counted: bool,
}

struct Viewer {
    line: Line,
    pos: Positions,
    received: Received,
    next_id: i64,
    /// When the viewer started, or lost its last connection: its time to connect runs from here.
    away_since: Instant,
    /// Whether it was ever in both rooms (a later time in both is a rejoin).
    ever_joined: bool,
}

enum Event {
    Stop,
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    OnTime,
    Due,
}

/// Runs viewer `idx` until `stop`; what it saw.
pub async fn viewer(ctx: Arc<Ctx>, idx: usize, mut stop: watch::Receiver<bool>) -> ViewerLog {
    let publishers = ctx.publishers;
    let mut v = Viewer {
        line: Line::new(ctx, idx, format!("fan-{idx}")),
        pos: Positions::default(),
        received: Received::new(publishers),
        next_id: 0,
        away_since: Instant::now(),
        ever_joined: false,
    };
    while let Some(mut ws) = v.line.open(&mut stop).await {
        match v.session(&mut ws, &mut stop).await {
            End::Stop => {
                conn::close(ws).await;
                break;
            }
            End::Lost(how, hint) => {
                v.line.lost(&how);
                if how == ON_TIME {
                    // As the JS client: close and go, without waiting for the node's answer.
                    tokio::spawn(conn::close(ws));
                } else {
                    v.line.ctx.live.closed.fetch_add(1, Ordering::Relaxed);
                }
                // The JS client gives up on these: the app must be fixed first.
                if how == "1008" || how == "1009" {
                    break;
                }
                if !v.line.pause(hint, &mut stop).await {
                    break;
                }
            }
        }
    }
    ViewerLog {
        received: v.received,
        counts: v.line.counts,
    }
}

impl Viewer {
    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends the join of `room` (the score room's with `since` once it has positions).
    async fn join(&mut self, ws: &mut Ws, room: Room) -> Result<Joining, ()> {
        let id = self.id();
        let ctx = &self.line.ctx;
        let frame = match room {
            Room::Score => wire::join_frame(self.line.encoding(), &ctx.score_room, id, self.pos.since()),
            Room::Chat => wire::join_frame(self.line.encoding(), &ctx.chat_room, id, None),
        };
        ws.send(frame).await.map_err(|_| ())?;
        Ok(Joining::Asked(id, Instant::now()))
    }

    /// One connection, from its joins to its end.
    async fn session(&mut self, ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> End {
        let mut s = Session {
            score: Joining::Failed,
            chat: Joining::Failed,
            resuming: self.pos.since().is_some(),
            chat_from: None,
            reconnect: None,
            counted: false,
        };
        match (self.join(ws, Room::Score).await, self.join(ws, Room::Chat).await) {
            (Ok(score), Ok(chat)) => (s.score, s.chat) = (score, chat),
            _ => return self.leave(&s, End::Lost("error".into(), Hint::None)),
        }
        loop {
            let due = [s.score.due(), s.chat.due()].into_iter().flatten().min();
            let on_time = s.reconnect.map(|(at, ms)| at + Duration::from_millis(ms.unwrap_or(0)));
            let event = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => Event::Stop,
                msg = ws.next() => Event::Frame(msg),
                _ = sleep_until(on_time.unwrap_or_else(Instant::now)), if on_time.is_some() => Event::OnTime,
                _ = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => Event::Due,
            };
            let now = Instant::now();
            match event {
                Event::Stop => return self.leave(&s, End::Stop),
                Event::OnTime => return self.leave(&s, End::Lost(ON_TIME.into(), Hint::ComeBackIn(Duration::ZERO))),
                Event::Due => {
                    for room in [Room::Score, Room::Chat] {
                        let state = match room {
                            Room::Score => s.score,
                            Room::Chat => s.chat,
                        };
                        let next = match state {
                            Joining::Asked(..) if state.due().is_some_and(|d| d <= now) => {
                                self.refused("timeout");
                                again()
                            }
                            Joining::AgainAt(at) if at <= now => match self.join(ws, room).await {
                                Ok(asked) => asked,
                                Err(()) => return self.leave(&s, End::Lost("error".into(), Hint::None)),
                            },
                            other => other,
                        };
                        match room {
                            Room::Score => s.score = next,
                            Room::Chat => s.chat = next,
                        }
                    }
                }
                Event::Frame(msg) => {
                    if let Some(how) = ended(&msg) {
                        let hint = s.reconnect.map_or(Hint::None, |(at, ms)| come_back(at, ms, now));
                        return self.leave(&s, End::Lost(how, hint));
                    }
                    if let Some(Ok(frame)) = &msg {
                        self.on_frame(frame, &mut s, now);
                    }
                }
            }
        }
    }

    fn on_frame(&mut self, frame: &Message, s: &mut Session, now: Instant) {
        let inbound = match frame {
            Message::Text(t) => wire::scan_json(t),
            Message::Binary(b) => wire::scan_msgpack(b),
            _ => return,
        };
        match inbound {
            Inbound::Msg(stamp, at) => {
                let replay = s.resuming && matches!(s.score, Joining::Asked(..) | Joining::AgainAt(_));
                self.on_msg(stamp, at, replay);
            }
            Inbound::Ok(id) if s.score.asks(id) => {
                let ok = match frame {
                    Message::Text(t) => wire::join_ok_json(t),
                    Message::Binary(b) => wire::join_ok_msgpack(b),
                    _ => None,
                }
                .unwrap_or_default();
                let phase = self.line.ctx.live.phase().index();
                if s.resuming {
                    let counts = &mut self.line.counts[phase];
                    match ok.recovered {
                        Some(true) => counts.recovered += 1,
                        _ => counts.not_recovered += 1,
                    }
                }
                // A replay that fell short needs no count of its own: what it missed shows as lost.
                let _ = self.pos.joined(ok.pos.unwrap_or_default(), ok.recovered == Some(true));
                if self.received.score_since.is_none() {
                    self.received.score_since = Some(self.line.ctx.live.secs_at(now));
                }
                s.score = Joining::Joined;
                self.both_joined(s, now);
            }
            Inbound::Ok(id) if s.chat.asks(id) => {
                s.chat = Joining::Joined;
                s.chat_from = Some(self.line.ctx.live.secs_at(now));
                self.both_joined(s, now);
            }
            Inbound::Error(Some(id)) if s.score.asks(id) || s.chat.asks(id) => {
                let code = wire::error_code(frame).unwrap_or_else(|| "error".into());
                self.refused(&code);
                // The JS client asks again on the same connection when the bus was not ready.
                let next = if code == "unavailable" {
                    again()
                } else {
                    Joining::Failed
                };
                if s.score.asks(id) {
                    s.score = next;
                } else {
                    s.chat = next;
                }
            }
            Inbound::Reconnect(after_ms) => s.reconnect = Some((now, after_ms)),
            _ => {}
        }
    }

    fn on_msg(&mut self, stamp: Stamp, at: Option<At<'_>>, replay: bool) {
        let room = if stamp.publisher == 0 { Room::Score } else { Room::Chat };
        if let (Room::Score, Some(at)) = (room, at) {
            self.pos.seen(at.shard, at.pos);
        }
        let live = &self.line.ctx.live;
        let phase = live.phase().index();
        live.received.fetch_add(1, Ordering::Relaxed);
        self.received.message(phase, room, stamp);
        if !replay {
            let us = wire::now_us().saturating_sub(stamp.ts_us);
            live.latency[phase][room.index()].record(self.line.idx, us);
            live.latency_now.record(self.line.idx, us);
        }
    }

    fn refused(&mut self, code: &str) {
        let phase = self.line.ctx.live.phase().index();
        *self.line.counts[phase].refused.entry(code.to_string()).or_insert(0) += 1;
    }

    /// Counts the viewer in once both rooms are joined on this connection.
    fn both_joined(&mut self, s: &mut Session, now: Instant) {
        if s.counted || s.score != Joining::Joined || s.chat != Joining::Joined {
            return;
        }
        s.counted = true;
        let live = &self.line.ctx.live;
        live.connected.fetch_add(1, Ordering::Relaxed);
        let phase = live.phase().index();
        let took = now.saturating_duration_since(self.away_since);
        live.to_connect[phase].record(self.line.idx, took.as_micros() as u64);
        if self.ever_joined {
            self.line.counts[phase].rejoined += 1;
        }
        self.ever_joined = true;
    }

    /// The connection ends as `end` says: its time in the chat room is over, and it no longer
    /// counts as connected (at the run's end, whether it was in both rooms is noted).
    fn leave(&mut self, s: &Session, end: End) -> End {
        let live = &self.line.ctx.live;
        let now = Instant::now();
        if let Some(from) = s.chat_from {
            self.received.chat_spans.push((from, live.secs_at(now)));
        }
        if s.counted {
            live.connected.fetch_sub(1, Ordering::Relaxed);
        }
        match end {
            End::Stop => self.received.joined_at_end = s.counted,
            End::Lost(..) => self.away_since = now,
        }
        end
    }
}

/// A join asked again after a random pause under a second, as the JS client does.
fn again() -> Joining {
    Joining::AgainAt(Instant::now() + Duration::from_secs_f64(rand::random::<f64>()))
}
