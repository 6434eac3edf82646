//! One member of the `hooks` run's chat: joins its room, publishes on its timer with an id on
//! every publish, and reads its room. It keeps what it needs to be checked after the run: every
//! publish with when it went out and how it was answered (`ok`, or an `error` and its code), and
//! every line it received, whether masked, and in which order.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::watch,
    time::{interval_at, timeout, MissedTickBehavior},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    conn::{self, NodeUrl, Phase, Ws},
    stats::{Latencies, Seen, Stream, Tally},
    wire::{self, Encoding, Inbound, Stamp, Target},
};

use super::{
    backend::MASK,
    ledger::{Answer, Sent},
};

/// What every member shares: the node, the chat's shape, and the run's counters.
pub struct Ctx {
    pub node: NodeUrl,
    pub prefix: String,
    pub per_room: usize,
    pub rooms: usize,
    pub source_addrs: u8,
    /// Time between two publishes of one member.
    pub period: Duration,
    pub payload_bytes: usize,
    pub connect_timeout: Duration,
    pub latencies: Latencies,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub joined: AtomicUsize,
    pub failed: AtomicUsize,
}

impl Ctx {
    /// The room of member `idx`.
    pub fn room_of(&self, idx: usize) -> usize {
        idx / self.per_room
    }

    /// When in each period member `idx` publishes: a room's members spread over it, not back to
    /// back.
    fn offset(&self, idx: usize) -> Duration {
        let slot = (idx % self.per_room) * self.rooms + self.room_of(idx);
        self.period.mul_f64(slot as f64 / (self.per_room * self.rooms) as f64)
    }
}

/// What one member saw.
#[derive(Debug, Default)]
pub struct Log {
    pub failure: Option<String>,
    /// How the node ended the connection, when it did.
    pub closed: Option<String>,
    /// Its publishes, by sequence number.
    pub sent: Vec<Sent>,
    /// The lines it received, (publisher, sequence number, whether masked), in order of arrival.
    pub received: Vec<(u32, u64, bool)>,
    pub tally: Tally,
}

/// A publish's id: its sequence number past the join's id (1).
fn publish_id(seq: u64) -> i64 {
    seq as i64 + 2
}

/// Runs member `idx` until [`Phase::Finish`] or until the node ends it.
pub async fn run(ctx: Arc<Ctx>, idx: usize, mut phase: watch::Receiver<Phase>) -> Log {
    let mut log = Log::default();
    let room = format!("{}-r{}", ctx.prefix, ctx.room_of(idx));
    let mut ws = match timeout(ctx.connect_timeout, establish(&ctx, idx, &room)).await {
        Ok(Ok(ws)) if matches!(*phase.borrow(), Phase::Ramp) => ws,
        Ok(Ok(_)) => return failed(&ctx, log, "joined after the run started".into()),
        Ok(Err(e)) => return failed(&ctx, log, conn::class(&e)),
        Err(_) => return failed(&ctx, log, "timeout".into()),
    };
    ctx.joined.fetch_add(1, Ordering::Relaxed);
    let mut streams: Vec<(u32, Stream)> = Vec::new();
    let mut timer: Option<tokio::time::Interval> = None;
    let target = Target::Room(room);
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                match *phase.borrow_and_update() {
                    _ if changed.is_err() => break,
                    Phase::Run(start) => {
                        let mut t = interval_at(start + ctx.offset(idx), ctx.period);
                        t.set_missed_tick_behavior(MissedTickBehavior::Burst);
                        timer = Some(t);
                    }
                    Phase::Quiet => timer = None,
                    Phase::Finish => break,
                    Phase::Ramp => {}
                }
            }
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => {
                        log.closed = Some(f.map_or("close".into(), |f| u16::from(f.code).to_string()));
                        return log;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        log.closed = Some("eof".into());
                        return log;
                    }
                };
                on_frame(&ctx, idx, &mut log, &mut streams, &text);
            }
            _ = async { timer.as_mut().expect("guarded").tick().await }, if timer.is_some() => {
                let seq = log.sent.len() as u64;
                let stamp = Stamp { publisher: idx as u32, seq, ts_us: wire::now_us() };
                let frame = wire::publish_frame(Encoding::Json, &target, stamp, ctx.payload_bytes, Some(publish_id(seq)));
                log.sent.push(Sent { at_us: stamp.ts_us, answer: None });
                if ws.send(frame).await.is_err() {
                    log.closed = Some("error".into());
                    return log;
                }
            }
        }
    }
    conn::close(ws).await;
    log
}

fn failed(ctx: &Ctx, mut log: Log, why: String) -> Log {
    ctx.failed.fetch_add(1, Ordering::Relaxed);
    log.failure = Some(why);
    log
}

/// Connects from its source address and joins its room.
async fn establish(ctx: &Ctx, idx: usize, room: &str) -> anyhow::Result<Ws> {
    let source = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (idx % usize::from(ctx.source_addrs)) as u8,
    ));
    let user = format!("{}-u{idx}", ctx.prefix);
    let mut ws = conn::open(&ctx.node, source, &user, Encoding::Json).await?;
    ws.send(wire::join_frame(Encoding::Json, room, 1, None)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match wire::scan_json(&t) {
                Inbound::Ok(1) => return Ok(ws),
                Inbound::Error(_) => anyhow::bail!("join refused"),
                _ => {}
            },
            Some(Ok(_)) => {}
            _ => anyhow::bail!("closed during join"),
        }
    }
}

/// Whether a received line's text is [`MASK`].
pub fn is_masked(frame: &str) -> bool {
    let quoted = format!("\"{MASK}\"]");
    frame.contains(&quoted)
}

fn on_frame(ctx: &Ctx, idx: usize, log: &mut Log, streams: &mut Vec<(u32, Stream)>, text: &str) {
    match wire::scan_json(text) {
        Inbound::Msg(stamp, _) => {
            let now = wire::now_us();
            ctx.latencies.record(idx, now.saturating_sub(stamp.ts_us));
            let i = match streams.iter().position(|(p, _)| *p == stamp.publisher) {
                Some(i) => i,
                None => {
                    streams.push((stamp.publisher, Stream::default()));
                    streams.len() - 1
                }
            };
            let seen = streams[i].1.observe(stamp.seq);
            log.tally.count(seen);
            if seen != Seen::Duplicate {
                log.received.push((stamp.publisher, stamp.seq, is_masked(text)));
            }
            ctx.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Inbound::Ok(id) if id >= 2 && answered(log, id, Answer::Ok) => {
            ctx.acked.fetch_add(1, Ordering::Relaxed);
        }
        Inbound::Error(Some(id)) if id >= 2 => {
            let code = if text.contains(r#""unavailable""#) {
                Answer::Unavailable
            } else {
                Answer::Refused
            };
            answered(log, id, code);
        }
        _ => {}
    }
}

/// Records the answer to the publish of id `id`; whether it was one of this member's, unanswered.
fn answered(log: &mut Log, id: i64, answer: Answer) -> bool {
    let Some(sent) = usize::try_from(id - 2).ok().and_then(|seq| log.sent.get_mut(seq)) else {
        return false;
    };
    if sent.answer.is_some() {
        return false;
    }
    sent.answer = Some((wire::now_us(), answer));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_masked_only_when_its_text_is_the_mask() {
        let line = |data: &str| format!(r#"{{"op":"msg","room":"lt-r1","from":"lt-u3","data":{data}}}"#);
        assert!(is_masked(&line(r#"[3,9,17,"***"]"#)));
        assert!(!is_masked(&line(r#"[3,8,17,"xxxx"]"#)));
        assert!(
            !is_masked(&line(r#"[3,8,17,"***x"]"#)),
            "a text that starts like the mask"
        );
    }
}
