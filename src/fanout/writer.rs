//! The one way a frame reaches a socket. Broadcasts are written on their lane's turn
//! ([`write_turn`]) or, for a join that replayed history, when its held frames are let go
//! ([`release`]); everything else the node sends (replies, presence events, pings, replays, drain
//! notices, closes) enters through one handle, [`Outbound`]. The session's writer task, which
//! finishes what a congested socket did not take and writes the close, is here too
//! ([`serve`]). Nothing else calls a [`Gate`]'s writing methods.
//!
//! A frame that replaces another one still queued for the same socket, or a compressed or delta
//! form of a frame, changes what is handed to the gate here, and nowhere else.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{
    context::Linked,
    delta::Bases,
    form::{Form, FORMS},
    gate::{Gate, Next, Push},
    keyed::Tag,
    lanes::{lane_of, Share},
    rate::Rate,
};
use crate::{
    close::{code, CloseReason},
    encoding::Encoding,
    history::pos::Pos,
    metrics::Delivery,
    wire,
};

/// One socket as the node writes to it: its gate, the encoding it reads, whether it negotiated
/// permessage-deflate and whether it keeps the node's compression context. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    gate: Arc<Gate>,
    encoding: Encoding,
    deflate: bool,
    context: bool,
}

impl Outbound {
    pub fn new(gate: Arc<Gate>, encoding: Encoding) -> Outbound {
        Outbound {
            gate,
            encoding,
            deflate: false,
            context: false,
        }
    }

    /// The same socket, reading compressed frames (it negotiated permessage-deflate) or not.
    pub fn deflating(self, deflate: bool) -> Outbound {
        Outbound { deflate, ..self }
    }

    /// The same socket, keeping the node's compression context (it negotiated permessage-deflate
    /// without `server_no_context_takeover`): it may be sent frames compressed after a room's
    /// last messages ([`super::context`]). Before its first frame.
    pub fn keeping_context(self, context: bool) -> Outbound {
        if context {
            self.gate.keep_context();
        }
        Outbound { context, ..self }
    }

    /// Whether the socket negotiated permessage-deflate: it takes the shared compressed frames.
    pub fn deflates(&self) -> bool {
        self.deflate
    }

    /// Connects the socket's write half once the upgrade completed; what waited goes out.
    pub fn attach(&self, half: tokio::net::tcp::OwnedWriteHalf) {
        self.gate.attach_socket(half);
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Its lane among `lanes`, stable for its life.
    pub fn lane(&self, lanes: usize) -> usize {
        lane_of(&self.gate, lanes)
    }

    /// Sends one frame now, within the socket's budget: false when the socket is going (closing,
    /// overflowed by this frame, or broken).
    pub fn send(&self, frame: Bytes) -> bool {
        matches!(self.gate.send(frame), Push::Queued)
    }

    /// Sends a frame of a long answer (a replay) once the socket's queue is below half its
    /// budget, so it goes out as the socket drains, never all at once and never past the budget.
    /// False once the socket is gone.
    pub async fn send_draining(&self, frame: Bytes) -> bool {
        self.gate.room_below(self.gate.budget() / 2).await && self.send(frame)
    }

    /// Sends one frame that may be larger than the budget (an answer the client asked for): once
    /// the queue is empty, outside the budget, so it goes out as the socket drains and cannot by
    /// itself close the socket as a slow consumer.
    pub async fn send_whole(&self, frame: Bytes) {
        if self.gate.room_below(0).await {
            self.gate.send_outside_budget(frame);
        }
    }

    /// Closes the socket after what is queued, with this close frame (or none).
    pub fn close(&self, frame: Option<(u16, &'static str)>) {
        self.gate.close(frame);
    }

    /// Frees the socket's queue and drops it as a slow consumer (4008).
    pub fn overflow(&self) {
        self.gate.overflow();
    }

    pub fn budget(&self) -> usize {
        self.gate.budget()
    }

    /// Bytes queued and not yet taken by the kernel.
    pub fn queued(&self) -> usize {
        self.gate.queued()
    }
}

/// Per key, the update number of the latest value a join sent a socket: a live value at or below
/// it is one the socket has, or an older one, and is not written, so no key goes backwards across
/// the switch to live. A key's floor goes once a newer value passed it. At most one per key of the
/// room, and for [`FLOOR_WINDOW`] at most: an older value can only be one still on its way to this
/// node when the join read the values, and once the floors are spent the socket is written from
/// the shared frames again, with no work of its own.
#[derive(Debug)]
pub struct Floors {
    keys: Mutex<HashMap<Box<str>, u64, ahash::RandomState>>,
    until: Instant,
}

/// How long a join's floors hold: far longer than a message takes from its master to a node.
pub const FLOOR_WINDOW: Duration = Duration::from_secs(30);

impl Floors {
    pub fn new(sent: impl IntoIterator<Item = (Box<str>, u64)>) -> Floors {
        Floors {
            keys: Mutex::new(sent.into_iter().collect()),
            until: Instant::now() + FLOOR_WINDOW,
        }
    }

    /// Whether nothing is left to hold back: every key passed, or the window is over.
    pub fn spent(&self) -> bool {
        Instant::now() >= self.until || self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, u64, ahash::RandomState>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a frame of this key goes to the socket.
    fn admits(&self, tag: &Tag) -> bool {
        // A value without an update number (a backend's own SPUBLISH) cannot be placed: it goes.
        let Some(keyed) = tag.as_ref().filter(|k| k.seq != 0) else {
            return true;
        };
        let mut floors = self.lock();
        match floors.get(&keyed.key) {
            Some(&floor) if keyed.seq <= floor => false,
            Some(_) => {
                floors.remove(&keyed.key);
                true
            }
            None => true,
        }
    }
}

/// One member of a topic in a lane's turn: its socket, the form it reads, the first frame number
/// it gets (what it joined at), its keys' floors after a join with `latest`, its `max_rate`, and,
/// when it takes deltas, the values it has.
pub struct Seated {
    pub(crate) member: Outbound,
    pub(crate) form: Form,
    pub(crate) since: u64,
    pub(crate) floors: Option<Arc<Floors>>,
    pub(crate) rate: Option<Arc<Rate>>,
    pub(crate) bases: Option<Arc<Bases>>,
}

/// What a lane's turn writes of one topic, in buffers reused from turn to turn.
#[derive(Default)]
pub struct Scratch {
    /// Per form, the frames the lane has not had.
    pub(crate) shares: [Share; FORMS],
    /// The topic's members in the lane.
    pub(crate) seats: Vec<Seated>,
    /// The frames, keys, whole lengths and links of a seat with floors, a pace, deltas or a
    /// compression context: those that go now.
    passed: (Vec<Bytes>, Vec<Tag>, Vec<u32>, Vec<Linked>),
    /// The frames of a seat that keeps the compression context, as its gate linked them.
    linked: Vec<Bytes>,
}

impl Scratch {
    pub(crate) fn clear(&mut self) {
        self.shares.iter_mut().for_each(Share::clear);
        self.seats.clear();
        self.linked.clear();
    }
}

/// A lane's turn for one topic: every seat gets, in one write, the frames of its form it has not
/// had (those numbered from its join on); a seat that takes deltas gets a key's delta where it has
/// the delta's base and is not conflating, the whole value otherwise; a seat that keeps the
/// compression context gets a message's linked frame where its window has what that refers to.
/// Empties the seats.
pub fn write_turn(s: &mut Scratch) -> Delivery {
    let mut out = Delivery::default();
    for Seated {
        member,
        form,
        since,
        floors,
        rate,
        bases,
    } in s.seats.drain(..)
    {
        let share = &s.shares[form.index()];
        let (mut frames, mut tags, mut full) = (share.since(since), share.tags_since(since), share.full_since(since));
        let mut links = Some(share.links_since(since)).filter(|l| member.context && l.iter().any(Option::is_some));
        if floors.is_some() || rate.is_some() || bases.is_some() {
            let (f, t, l, k) = &mut s.passed;
            f.clear();
            t.clear();
            l.clear();
            k.clear();
            // A conflating socket's queued values may be replaced: it gets whole values.
            let conflating = bases.is_some() && member.gate.conflates(full.iter().map(|l| *l as usize).sum());
            let passing = frames
                .iter()
                .zip(tags)
                .zip(full)
                .zip(share.deltas_since(since))
                .zip(share.links_since(since));
            for ((((share_frame, tag), len), delta), link) in passing {
                if floors.as_ref().is_some_and(|floors| !floors.admits(tag)) {
                    continue;
                }
                let now = match &rate {
                    Some(rate) => rate.admit(share_frame, tag),
                    None => Some(share_frame.clone()),
                };
                let Some(mut frame) = now else { continue };
                let mut tag = tag.clone();
                if let (Some(bases), Some(keyed)) = (&bases, tag.clone()) {
                    let base = delta.as_ref().and_then(|(_, k)| k.delta_of);
                    let has_base = bases.take(&keyed.key, keyed.seq, base);
                    match delta.as_ref().filter(|_| has_base && !conflating) {
                        Some((delta, delta_tag)) => {
                            frame = delta.clone();
                            tag = Some(delta_tag.clone());
                            out.deltas += 1;
                        }
                        None => out.wholes += 1,
                    }
                }
                if links.is_some() {
                    // Paced or sent as a delta, a keyed frame is another one: not the link's.
                    let shared = frame.as_ptr() == share_frame.as_ptr();
                    k.push(link.clone().filter(|_| shared));
                }
                f.push(frame);
                t.push(tag);
                l.push(*len);
            }
            (frames, tags, full) = (f, t, l);
            links = links.map(|_| &k[..]);
        }
        if frames.is_empty() {
            continue;
        }
        let pushed = match links {
            Some(links) => {
                // The frames each socket gets may differ: copied, each then linked or not.
                s.linked.clear();
                s.linked.extend_from_slice(frames);
                let (pushed, linked) = member.gate.write_linked(&mut s.linked, tags, links);
                out.linked += linked;
                frames = &s.linked;
                pushed
            }
            None => member.gate.write_through(frames, tags),
        };
        tally(&mut out, pushed, frames, full);
    }
    out
}

/// Counts one socket's write of `frames` (their whole lengths `full`) as it went.
fn tally(out: &mut Delivery, pushed: Push, frames: &[Bytes], full: &[u32]) {
    out.writes += 1;
    match pushed {
        Push::Queued => {
            out.delivered += frames.len();
            out.bytes += frames.iter().map(Bytes::len).sum::<usize>();
            out.full_bytes += full.iter().map(|l| *l as usize).sum::<usize>();
        }
        Push::Overflow => out.overflowed += 1,
        Push::Closed => {}
    }
}

/// A frame held back for a socket while its join sent it history or latest values: its shard, its
/// position, its key.
pub type HeldFrame = (u32, Option<Pos>, Tag, Bytes);

/// Lets go of the frames held back for a socket while its join replayed history or sent latest
/// values: each in order, but for those the socket has already (at or before `upto` of its shard,
/// or at or below its key's floor), then written.
pub fn release(member: &Outbound, frames: Vec<HeldFrame>, upto: &[Pos], floors: Option<&Floors>) {
    for (shard, pos, tag, frame) in frames {
        let had = match (pos, upto.get(shard as usize)) {
            (Some(pos), Some(upto)) => pos.epoch == upto.epoch && pos.n <= upto.n,
            _ => false,
        };
        let had = had || floors.is_some_and(|f| !f.admits(&tag));
        if !had && matches!(member.gate.push(frame), Push::Overflow | Push::Closed) {
            break;
        }
    }
    member.gate.flush();
}

/// The session's writer: finishes what the gate's non-blocking flushes could not (a congested
/// socket) and writes the session's last frame; returns when the session must end.
pub async fn serve(out: &Outbound, grace: Duration) -> CloseReason {
    let gate = &*out.gate;
    loop {
        let next = gate.next().await;
        // Boxed: what the writer does lives only while it does it, not in every idle session.
        if let Some(end) = Box::pin(act(gate, next, grace)).await {
            return end;
        }
    }
}

/// Does what the gate asked; `Some` when the session must end.
async fn act(gate: &Gate, next: Next, grace: Duration) -> Option<CloseReason> {
    match next {
        Next::Congested => {
            // A client that stopped reading leaves the drain pending; overflow, or a close (idle,
            // drain, expiry), ends the wait, and the close is bounded by the grace period.
            let drained = tokio::select! {
                drained = gate.drain() => drained.is_ok(),
                _ = gate.interrupted() => true,
            };
            (!drained).then_some(CloseReason::Error)
        }
        Next::Overflow => {
            let frame = Some((code::SLOW_CONSUMER, "slow consumer"));
            Some(close(gate, frame, grace, CloseReason::SlowConsumer).await)
        }
        Next::Close(frame) => {
            let why = frame.map_or(CloseReason::Normal, |(c, _)| CloseReason::for_code(c));
            Some(close(gate, frame, grace, why).await)
        }
        Next::Broken => Some(CloseReason::Error),
    }
}

/// Writes what is queued and the close frame (if any) if the socket takes them within `grace`; the
/// connection is dropped after.
async fn close(gate: &Gate, frame: Option<(u16, &'static str)>, grace: Duration, why: CloseReason) -> CloseReason {
    if let Some((code, reason)) = frame {
        gate.finish(wire::close(code, reason));
    }
    let _ = tokio::time::timeout(grace, gate.drain()).await;
    why
}
