//! This node's registry: which sockets are connected and which local sockets are in which topic
//! (a room, or a user's direct-message inbox). It knows nothing of Redis: it asks the interest
//! manager for subscriptions and is told when they are in place.
//!
//! Fan-out is in two steps. [`Hub::record`] has a message's frames built once, one per encoding
//! its topic's members use, and adds them to the topic's list for the lanes the hub owns; a lane's
//! turn ([`Hub::write_lane`]) then hands each member of each topic with news in that lane to the
//! writer, which writes it every frame it has not had in one write ([`crate::fanout`]). The
//! topic's entry is locked while a frame is recorded and while a turn lists the lane's members,
//! never while writing and never across an `.await`.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use dashmap::DashMap;
use indexmap::IndexMap;
use tokio::sync::{mpsc, oneshot};

use crate::{
    close::code,
    envelope::{Envelope, Kind},
    fanout::{
        delta::Bases,
        form::{Form, FORMS},
        gate::Push,
        keyed::{Keyed, Tag},
        lanes::{frames_of, Kept, Lanes, Recent, Shaping},
        rate::Rate,
        writer::{self, Floors, HeldFrame, Outbound, Scratch, Seated},
    },
    history::{
        heads::{Advance, Heads},
        pos::Pos,
    },
    metrics::{self as m, Delivery},
    topic::Topic,
};

/// For maps keyed by client input (room and user names): random keys.
type Hasher = ahash::RandomState;
/// A topic's members are keyed by session ids the node assigns itself, never by client input, so a
/// fixed-key hasher is safe there, and it takes no room in every topic (a user's inbox is a topic).
type MemberHasher = std::hash::BuildHasherDefault<ahash::AHasher>;

pub type SessionId = u64;

/// Requests to the interest manager.
#[derive(Debug)]
pub enum Interest {
    /// A topic got its first local member and needs its channels subscribed.
    Want(Topic),
    /// A topic lost its last local member; unsubscribe unless someone joins meanwhile.
    Idle(Topic),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("subscription not in place within {0:?}")]
    Timeout(Duration),
    #[error("subscription failed: {0}")]
    Bus(String),
    #[error("the node is shutting down")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    Unsubscribed,
    Pending,
    Subscribed,
}

/// How a socket joins a topic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Joining {
    /// Its live frames are held back until [`Hub::release`] (it is first sent what it missed).
    pub hold: bool,
    /// It reads keyed values whole or as deltas (`"delta":true`).
    pub delta: bool,
}

/// A member of a topic.
#[derive(Debug)]
struct Seat {
    member: Outbound,
    /// The first frame number the socket gets (see [`crate::fanout::lanes`]).
    since: u64,
    /// While its join replays history or sends latest values: the live frames kept back meanwhile.
    held: Option<Box<Held>>,
    /// After a join with `latest`: the keys whose live values must be newer than what it was sent.
    floors: Option<Arc<Floors>>,
    /// A join's `max_rate`.
    rate: Option<Arc<Rate>>,
    /// It joined with `delta`: keyed values come whole or as deltas.
    delta: bool,
    /// With `delta` and no `max_rate`: the values it has, on which deltas apply.
    bases: Option<Arc<Bases>>,
}

impl Seat {
    fn form(&self) -> Form {
        Form {
            encoding: self.member.encoding(),
            deflate: self.member.deflates(),
            delta: self.delta,
        }
    }
}

/// Live frames kept back for a member while its join replays history, so that the replay and what
/// arrived meanwhile reach the socket in order and once each ([`Hub::join_held`], [`Hub::release`]).
/// A mutex because fan-out adds to it under the topic's read lock.
#[derive(Debug, Default)]
struct Held {
    frames: std::sync::Mutex<HeldFrames>,
    /// Once released: per shard, the position the socket has (its replay's end). The frames are
    /// let go when this node has delivered that far itself; until then a live frame could still be
    /// one the socket has (it got it elsewhere, from a node that was ahead of this one).
    upto: Option<Vec<Pos>>,
}

#[derive(Debug, Default)]
struct HeldFrames {
    frames: Vec<HeldFrame>,
    bytes: usize,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldFrames> {
        // Each change under this lock is one step.
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a frame back, within the socket's budget like a queued one: past it the socket is
    /// closed as a slow consumer.
    fn keep(&self, member: &Outbound, shard: u32, n: Option<Pos>, tag: &Tag, frame: &Bytes) -> Push {
        let mut held = self.lock();
        if held.bytes + frame.len() > member.budget() {
            *held = HeldFrames::default();
            member.overflow();
            return Push::Overflow;
        }
        held.bytes += frame.len();
        held.frames.push((shard, n, tag.clone(), frame.clone()));
        Push::Queued
    }
}

#[derive(Debug)]
struct Entry {
    members: IndexMap<SessionId, Seat, MemberHasher>,
    /// Members per form: the frames the topic builds for each message.
    forms: [u32; FORMS],
    /// What the topic kept of the messages it framed: per key the last value, for members that
    /// take deltas; its last compressed messages, for members that keep the node's context.
    kept: Kept,
    /// Frames some lane has not had yet.
    recent: Option<Box<Recent>>,
    /// Members whose live frames are held back (see [`Held`]).
    held: u32,
    /// Of those, members released and waiting for this node to catch up with them.
    releasing: u32,
    /// In a room with history: where each shard stands on this node. Forgotten with the topic,
    /// that is when its channels are unsubscribed.
    heads: Heads,
    /// A `--conflate` room.
    conflate: bool,
    state: SubState,
    waiters: Vec<oneshot::Sender<Result<(), JoinError>>>,
}

impl Entry {
    /// Adds a member; one already in keeps the frames it has not had yet, unless it now reads
    /// another form (with or without `delta`): it then gets frames from `since` on, as a new one.
    fn insert(&mut self, id: SessionId, member: Outbound, since: u64, hold: bool, delta: bool) {
        let (since, held) = match self.members.swap_remove(&id) {
            Some(old) => {
                self.forms[old.form().index()] -= 1;
                self.held -= u32::from(old.held.is_some());
                self.releasing -= u32::from(old.held.as_ref().is_some_and(|h| h.upto.is_some()));
                (if old.delta == delta { old.since } else { since }, old.held)
            }
            None => (since, None),
        };
        let held = held.or_else(|| hold.then(Box::default));
        self.held += u32::from(held.is_some());
        let seat = Seat {
            member,
            since,
            held,
            floors: None,
            rate: None,
            delta,
            bases: delta.then(Arc::default),
        };
        self.forms[seat.form().index()] += 1;
        self.members.insert(id, seat);
    }

    fn remove(&mut self, id: SessionId) -> bool {
        let Some(seat) = self.members.swap_remove(&id) else {
            return false;
        };
        self.forms[seat.form().index()] -= 1;
        self.held -= u32::from(seat.held.is_some());
        self.releasing -= u32::from(seat.held.as_ref().is_some_and(|h| h.upto.is_some()));
        true
    }
}

#[cfg(test)]
impl Hub {
    /// A hub on `lanes` whose subscriptions are granted as soon as they are asked for (no bus),
    /// for tests.
    pub(crate) fn granting(lanes: Lanes) -> Hub {
        let (hub, mut interest) = Hub::new(lanes);
        let answering = hub.clone();
        tokio::spawn(async move {
            while let Some(i) = interest.recv().await {
                if let Interest::Want(t) = i {
                    answering.subscribed(&t, Ok(()));
                }
            }
        });
        hub
    }
}

/// A cheap handle on the registry.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    topics: DashMap<Topic, Entry, Hasher>,
    sessions: DashMap<SessionId, Outbound, Hasher>,
    next_id: AtomicU64,
    interest: mpsc::UnboundedSender<Interest>,
    /// The lanes the workers write: where frames are recorded, and where joins read their first
    /// frame number.
    lanes: Arc<Lanes>,
    /// Rooms whose keyed messages are conflated for a socket that falls behind.
    conflate: Vec<glob::Pattern>,
    /// How frames are compressed and keyed values sent as deltas.
    shaping: Shaping,
}

impl Hub {
    /// A hub whose topics are written on `lanes`, and the receiving end of its interest requests
    /// (for the interest manager).
    pub fn new(lanes: Lanes) -> (Hub, mpsc::UnboundedReceiver<Interest>) {
        Hub::shaping(lanes, Vec::new(), Shaping::default())
    }

    /// [`Hub::new`], with the rooms (`--conflate`) whose keyed messages are conflated for a socket
    /// that falls behind, and how frames are compressed and keyed values sent as deltas.
    pub fn shaping(
        lanes: Lanes,
        conflate: Vec<glob::Pattern>,
        shaping: Shaping,
    ) -> (Hub, mpsc::UnboundedReceiver<Interest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub {
            inner: Arc::new(Inner {
                topics: DashMap::with_hasher(Hasher::new()),
                sessions: DashMap::with_hasher(Hasher::new()),
                next_id: AtomicU64::new(1),
                interest: tx,
                lanes: Arc::new(lanes),
                conflate,
                shaping,
            }),
        };
        (hub, rx)
    }

    /// The lanes this hub's topics are written on.
    pub fn lanes(&self) -> &Arc<Lanes> {
        &self.inner.lanes
    }

    /// Registers a socket; it is in no topic yet.
    pub fn register(&self, member: Outbound) -> SessionId {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.sessions.insert(id, member);
        id
    }

    /// Forgets a socket and takes it out of `topics`.
    pub fn unregister(&self, id: SessionId, topics: impl IntoIterator<Item = Topic>) {
        for topic in topics {
            self.leave(&topic, id);
        }
        self.inner.sessions.remove(&id);
    }

    pub fn sessions(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Topics with local members (or waiting for their unsubscribe delay).
    pub fn topics(&self) -> usize {
        self.inner.topics.len()
    }

    /// Every registered socket, for draining.
    pub fn members(&self) -> Vec<Outbound> {
        self.inner.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// Adds a registered socket to a topic and waits until the topic's channels are subscribed,
    /// so that anything published after this returns reaches the socket. On failure the socket is
    /// taken out of the topic again.
    pub async fn join(&self, topic: Topic, id: SessionId, timeout: Duration) -> Result<(), JoinError> {
        self.join_with(topic, id, timeout, Joining::default()).await
    }

    /// Joins as [`Hub::join`] does, as `joining` says: holding the socket's live frames back until
    /// [`Hub::release`], for a join that first sends the socket what it missed (leaving drops what
    /// was held); reading keyed values as deltas.
    pub async fn join_with(
        &self,
        topic: Topic,
        id: SessionId,
        timeout: Duration,
        joining: Joining,
    ) -> Result<(), JoinError> {
        let Some(rx) = self.enter(&topic, id, joining)? else {
            return Ok(());
        };
        let asked = Instant::now();
        let outcome = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(JoinError::Closed),
            Err(_) => Err(JoinError::Timeout(timeout)),
        };
        m::join_waited(asked.elapsed());
        if outcome.is_err() {
            self.leave(&topic, id);
        }
        outcome
    }

    /// Adds a registered socket to a topic without waiting: the subscription is made, and retried
    /// while the bus is down, in the background.
    pub fn join_later(&self, topic: Topic, id: SessionId) -> Result<(), JoinError> {
        self.enter(&topic, id, Joining::default()).map(drop)
    }

    /// Inserts the member; returns a receiver when the topic is not subscribed yet.
    fn enter(
        &self,
        topic: &Topic,
        id: SessionId,
        joining: Joining,
    ) -> Result<Option<oneshot::Receiver<Result<(), JoinError>>>, JoinError> {
        let Some(member) = self.inner.sessions.get(&id).map(|m| m.clone()) else {
            return Err(JoinError::Closed);
        };
        let mut entry = self.inner.topics.entry(topic.clone()).or_insert_with(|| Entry {
            // Most topics are one user's inbox with one socket: start small, rooms grow as needed.
            members: IndexMap::with_capacity_and_hasher(1, MemberHasher::default()),
            forms: [0; FORMS],
            kept: Kept::default(),
            recent: None,
            held: 0,
            releasing: 0,
            heads: Heads::default(),
            conflate: match topic {
                Topic::Room(room) => self.inner.conflate.iter().any(|p| p.matches(room)),
                Topic::User(_) => false,
            },
            state: SubState::Unsubscribed,
            waiters: Vec::new(),
        });
        let since = self.inner.lanes.next_seq();
        entry.insert(id, member, since, joining.hold, joining.delta);
        if entry.state == SubState::Subscribed {
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        entry.waiters.push(tx);
        if entry.state == SubState::Unsubscribed {
            entry.state = SubState::Pending;
            if self.inner.interest.send(Interest::Want(topic.clone())).is_err() {
                entry.remove(id);
                return Err(JoinError::Closed);
            }
        }
        Ok(Some(rx))
    }

    /// Where a message with a position stands against the last one delivered on its shard.
    pub fn advance(&self, topic: &Topic, shard: u32, pos: Pos) -> Advance {
        let Some(mut entry) = self.inner.topics.get_mut(topic) else {
            return Advance::Next;
        };
        entry.heads.advance(shard, pos)
    }

    /// Moves a shard's head to `pos` whatever it was: after a gap, to what was read back of it
    /// and then to the message that showed it.
    pub fn skip_to(&self, topic: &Topic, shard: u32, pos: Pos) {
        let Some(mut entry) = self.inner.topics.get_mut(topic) else {
            return;
        };
        entry.heads.skip_to(shard, pos);
    }

    /// Ends a held join once the socket has `upto` (per shard: its replay's end, or where the
    /// shard stood when it joined): from when this node has delivered that far on every shard, the
    /// frames held back go out, in order, but for those the socket has; then it gets live frames
    /// as any member. Until then the socket stays held ([`Hub::settle`] lets it go). False when
    /// the socket was not held in the topic.
    pub fn release(&self, topic: &Topic, id: SessionId, upto: Vec<Pos>) -> bool {
        let Some(mut entry) = self.inner.topics.get_mut(topic) else {
            return false;
        };
        let Some(held) = entry.members.get_mut(&id).and_then(|seat| seat.held.as_mut()) else {
            return false;
        };
        if held.upto.replace(upto).is_none() {
            entry.releasing += 1;
        }
        self.settle_entry(&mut entry);
        true
    }

    /// Seeds a topic's shard heads where this node delivered nothing yet (see [`Heads::seed`]).
    pub fn seed(&self, topic: &Topic, heads: &[Pos]) {
        if let Some(mut entry) = self.inner.topics.get_mut(topic) {
            for (shard, pos) in heads.iter().enumerate() {
                entry.heads.seed(shard as u32, *pos);
            }
        }
    }

    /// Sets a held socket's floors (what a join with `latest` sent it, so that neither what was
    /// held nor what comes live takes a key backwards) and pace (`max_rate`), before its release.
    pub fn set_keys(&self, topic: &Topic, id: SessionId, floors: Option<Floors>, rate: Option<Arc<Rate>>) {
        self.with_seat(topic, id, |seat| {
            seat.floors = floors.map(Arc::new);
            // A paced socket's values are sent late or not at all: it gets them whole.
            if rate.is_some() {
                seat.bases = None;
            }
            seat.rate = rate;
        });
    }

    /// Starts a socket's values of a topic over (a client whose delta did not apply joined again):
    /// the next value of every key goes to it whole.
    pub fn restart_values(&self, topic: &Topic, id: SessionId) {
        self.with_seat(topic, id, |seat| {
            if seat.bases.is_some() {
                seat.bases = Some(Arc::default());
            }
        });
    }

    /// Changes a member's seat in a topic, if it has one.
    fn with_seat(&self, topic: &Topic, id: SessionId, change: impl FnOnce(&mut Seat)) {
        if let Some(seat) = self
            .inner
            .topics
            .get_mut(topic)
            .as_mut()
            .and_then(|e| e.members.get_mut(&id))
        {
            change(seat);
        }
    }

    /// Lets go of the held sockets of a topic whose shards this node has now delivered as far as
    /// each socket has: after every message with a position.
    pub fn settle(&self, topic: &Topic) {
        if self.inner.topics.get(topic).is_none_or(|e| e.releasing == 0) {
            return;
        }
        if let Some(mut entry) = self.inner.topics.get_mut(topic) {
            self.settle_entry(&mut entry);
        }
    }

    fn settle_entry(&self, entry: &mut Entry) {
        if entry.releasing == 0 {
            return;
        }
        // Paced frames recorded so far were held for it: a socket let go takes the lanes' frames
        // from here on.
        let next = self.inner.lanes.next_seq();
        let heads = &entry.heads;
        let mut let_go = 0;
        for seat in entry.members.values_mut() {
            let ready = seat
                .held
                .as_ref()
                .and_then(|h| h.upto.as_ref())
                .is_some_and(|upto| heads.reached(upto));
            let Some(held) = seat.held.take_if(|_| ready) else {
                continue;
            };
            let_go += 1;
            seat.since = next;
            let upto = held.upto.unwrap_or_default();
            let frames = held.frames.into_inner().unwrap_or_else(|p| p.into_inner()).frames;
            // Written under the topic's lock, so no live frame can overtake them.
            writer::release(&seat.member, frames, &upto, seat.floors.as_deref());
        }
        entry.held -= let_go;
        entry.releasing -= let_go;
    }

    /// Takes a socket out of a topic; true when it was in it.
    pub fn leave(&self, topic: &Topic, id: SessionId) -> bool {
        let Some(mut entry) = self.inner.topics.get_mut(topic) else {
            return false;
        };
        let was = entry.remove(id);
        if was && entry.members.is_empty() {
            drop(entry);
            let _ = self.inner.interest.send(Interest::Idle(topic.clone()));
        }
        was
    }

    /// Called by the interest manager once a topic's subscription attempt finished.
    pub fn subscribed(&self, topic: &Topic, result: Result<(), JoinError>) {
        let Some(mut entry) = self.inner.topics.get_mut(topic) else {
            return;
        };
        entry.state = if result.is_ok() {
            SubState::Subscribed
        } else {
            SubState::Unsubscribed
        };
        // Taken, not drained: the list is empty for the topic's life after this.
        for waiter in std::mem::take(&mut entry.waiters) {
            let _ = waiter.send(result.clone());
        }
    }

    /// Whether a topic has an entry (members, or a pending unsubscribe).
    pub fn has_topic(&self, topic: &Topic) -> bool {
        self.inner.topics.contains_key(topic)
    }

    /// Topics with members whose subscription failed and is not being retried yet: marks them
    /// pending again and returns them, for the interest manager's retry.
    pub fn take_unsubscribed(&self) -> Vec<Topic> {
        let mut out = Vec::new();
        for mut e in self.inner.topics.iter_mut() {
            if e.state == SubState::Unsubscribed && !e.members.is_empty() {
                e.state = SubState::Pending;
                out.push(e.key().clone());
            }
        }
        out
    }

    /// Rooms with local members.
    pub fn rooms(&self) -> usize {
        self.inner
            .topics
            .iter()
            .filter(|e| matches!(e.key(), Topic::Room(_)))
            .count()
    }

    /// Called by the interest manager after the unsubscribe delay: drops the topic if it is still
    /// empty. True when it was dropped (and the manager should unsubscribe its channels).
    pub fn remove_if_idle(&self, topic: &Topic) -> bool {
        self.inner
            .topics
            .remove_if(topic, |_, e| e.members.is_empty())
            .is_some()
    }

    /// Adds one message's frames (one per encoding its members use) to its topic, for the lanes'
    /// next turns.
    pub fn record(&self, env: &Envelope, shard: u32) {
        let topic = Topic::of(env.kind, &env.target);
        let Some(mut entry) = self.inner.topics.get_mut(&topic) else {
            return;
        };
        if entry.members.is_empty() {
            return;
        }
        if env.kind == Kind::Disconnect {
            for seat in entry.members.values() {
                seat.member.close(Some((code::REMOVED, "removed by the app")));
            }
            return;
        }
        let tag: Tag = match (&env.key, &topic) {
            (Some(key), Topic::Room(room)) => Some(Arc::new(Keyed {
                room: room.clone(),
                key: key.as_str().into(),
                seq: env.key_seq.unwrap_or(0),
                conflate: entry.conflate,
                delta_of: None,
            })),
            _ => None,
        };
        let entry = &mut *entry;
        let frames = frames_of(
            env,
            shard,
            &entry.forms,
            &topic,
            &tag,
            &mut entry.kept,
            self.inner.shaping,
        );
        if entry.held > 0 {
            let n = env.pos;
            for seat in entry.members.values() {
                if let (Some(held), Some(framed)) = (&seat.held, &frames[seat.form().index()]) {
                    held.keep(&seat.member, shard, n, &tag, &framed.whole);
                }
            }
        }
        self.inner.lanes.record(&topic, &mut entry.recent, frames, tag);
    }

    /// Lane `lane`'s turn: every topic with news for it hands its members in the lane to the
    /// writer, which writes each, in one write, the frames it has not had (those numbered from
    /// its join on).
    pub fn write_lane(&self, lane: usize, s: &mut Scratch) -> Delivery {
        let mut total = Delivery::default();
        for topic in self.inner.lanes.take_dirty(lane) {
            if self.seats_of(&topic, lane, s) {
                // The map's lock is released: writing a lane takes a while, joins and leaves need
                // not wait.
                let d = writer::write_turn(s);
                m::delivered(&d);
                total.delivered += d.delivered;
                total.bytes += d.bytes;
                total.overflowed += d.overflowed;
                total.writes += d.writes;
                total.full_bytes += d.full_bytes;
                total.deltas += d.deltas;
                total.wholes += d.wholes;
                total.linked += d.linked;
            }
        }
        total
    }

    /// Fills `s` with what lane `lane` gets of `topic`: the frames it has not had, and its
    /// members in the lane but for those whose frames are held. False when there is nothing.
    fn seats_of(&self, topic: &Topic, lane: usize, s: &mut Scratch) -> bool {
        s.clear();
        let Some(mut entry) = self.inner.topics.get_mut(topic) else {
            return false;
        };
        let entry = &mut *entry;
        let Some(recent) = entry.recent.as_mut() else {
            return false;
        };
        if recent.take_for(lane, &mut s.shares) {
            entry.recent = None;
        }
        let lanes = self.inner.lanes.count();
        for seat in entry.members.values_mut() {
            if seat.held.is_none() && seat.member.lane(lanes) == lane {
                // Spent floors are dropped: the socket is written from the shared frames again.
                if seat.floors.as_ref().is_some_and(|f| f.spent()) {
                    seat.floors = None;
                }
                s.seats.push(Seated {
                    member: seat.member.clone(),
                    form: seat.form(),
                    since: seat.since,
                    floors: seat.floors.clone(),
                    rate: seat.rate.clone(),
                    bases: seat.bases.clone(),
                });
            }
        }
        true
    }

    /// Per-socket queued bytes, for the sampled queue metrics.
    pub fn queue_depths(&self) -> Vec<usize> {
        self.inner.sessions.iter().map(|e| e.value().queued()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encoding::Encoding, fanout::gate::Gate, wire::broadcast_frame};

    fn message(room: &str, data: &'static [u8]) -> Envelope {
        Envelope::to_room(room, Bytes::from_static(data))
    }

    /// A socket that is not connected yet: what fan-out pushes stays queued and counted.
    async fn member(hub: &Hub, room: &str, encoding: Encoding, budget: usize) -> Arc<Gate> {
        let gate = Arc::new(Gate::new(budget));
        let id = hub.register(Outbound::new(gate.clone(), encoding));
        hub.join(Topic::Room(room.into()), id, Duration::from_secs(5))
            .await
            .unwrap();
        gate
    }

    /// A message recorded for one lane and that lane's turn: what the members got.
    fn deliver(hub: &Hub, env: &Envelope) -> Delivery {
        hub.record(env, 0);
        hub.write_lane(0, &mut Scratch::default())
    }

    /// A hub whose topics are written on one lane.
    fn one_lane() -> Hub {
        Hub::granting(Lanes::new(1, 1))
    }

    #[tokio::test]
    async fn a_message_reaches_each_member_of_its_room_once_in_its_encoding() {
        let hub = one_lane();
        let json = [
            member(&hub, "r", Encoding::Json, 1 << 20).await,
            member(&hub, "r", Encoding::Json, 1 << 20).await,
        ];
        let msgpack = member(&hub, "r", Encoding::MsgPack, 1 << 20).await;
        let elsewhere = member(&hub, "other", Encoding::Json, 1 << 20).await;
        let env = message("r", b"[1,2,3]");
        let json_frame = broadcast_frame(Encoding::Json, &env, 0).unwrap();
        let msgpack_frame = broadcast_frame(Encoding::MsgPack, &env, 0).unwrap();

        let d = deliver(&hub, &env);
        assert_eq!(
            d,
            Delivery {
                delivered: 3,
                bytes: 2 * json_frame.len() + msgpack_frame.len(),
                full_bytes: 2 * json_frame.len() + msgpack_frame.len(),
                writes: 3,
                ..Delivery::default()
            }
        );
        for gate in &json {
            assert_eq!(gate.queued(), json_frame.len());
        }
        assert_eq!(msgpack.queued(), msgpack_frame.len());
        assert_eq!(elsewhere.queued(), 0, "another room's member gets nothing");

        // Two messages before the lane's turn: one write each, with both frames.
        hub.record(&env, 0);
        let d = deliver(&hub, &env);
        assert_eq!((d.delivered, d.writes), (6, 3));
        assert_eq!(msgpack.queued(), 3 * msgpack_frame.len());
    }

    #[tokio::test]
    async fn a_join_with_latest_holds_back_older_values_and_once_its_floors_are_spent_takes_the_shared_path() {
        let hub = one_lane();
        let topic = Topic::Room("r".into());
        let gate = Arc::new(Gate::new(1 << 20));
        let id = hub.register(Outbound::new(gate.clone(), Encoding::Json));
        let held = Joining {
            hold: true,
            delta: false,
        };
        hub.join_with(topic.clone(), id, Duration::from_secs(5), held)
            .await
            .unwrap();
        // The join sent the socket `score` at update 5.
        hub.set_keys(&topic, id, Some(Floors::new([("score".into(), 5)])), None);
        hub.release(&topic, id, Vec::new());
        let keyed = |seq: u64| {
            let mut env = message("r", b"1");
            env.key = Some("score".into());
            env.key_seq = Some(seq);
            env
        };
        let floors = |hub: &Hub| hub.inner.topics.get(&topic).unwrap().members[&id].floors.is_some();
        // An older value on its way, and the one sent: neither written.
        assert_eq!(deliver(&hub, &keyed(4)).delivered, 0);
        assert_eq!(deliver(&hub, &keyed(5)).delivered, 0);
        assert!(floors(&hub));
        // A newer one goes and lifts the key's floor; the next turn drops the spent floors.
        assert_eq!(deliver(&hub, &keyed(6)).delivered, 1);
        assert_eq!(deliver(&hub, &keyed(7)).delivered, 1);
        assert!(!floors(&hub), "spent floors dropped");
    }

    #[tokio::test]
    async fn an_overflowing_member_is_counted_and_the_others_still_get_the_message() {
        let hub = one_lane();
        let small = member(&hub, "r", Encoding::Json, 8).await;
        let big = member(&hub, "r", Encoding::Json, 1 << 20).await;
        let d = deliver(&hub, &message("r", b"\"a long enough payload\""));
        assert_eq!((d.delivered, d.overflowed), (1, 1));
        assert_eq!(small.queued(), 0, "an overflowed gate is freed");
        assert!(big.queued() > 0);
        // Data that is not JSON cannot be framed in either encoding: counted per member, sent to none.
        let _msgpack = member(&hub, "r", Encoding::MsgPack, 1 << 20).await;
        let queued = big.queued();
        let d = deliver(&hub, &message("r", b"{not json"));
        assert_eq!((d.delivered, d.writes), (0, 0));
        assert_eq!(big.queued(), queued);
    }

    #[tokio::test]
    async fn the_first_join_asks_for_the_topic_and_the_last_leave_lets_it_go() {
        let (hub, mut interest) = Hub::new(Lanes::new(1, 1));
        let id = hub.register(Outbound::new(Arc::new(Gate::new(1024)), Encoding::Json));
        let other = hub.register(Outbound::new(Arc::new(Gate::new(1024)), Encoding::Json));
        let room = Topic::Room("r".into());
        hub.join_later(room.clone(), id).unwrap();
        hub.join_later(room.clone(), other).unwrap();
        assert!(matches!(interest.try_recv(), Ok(Interest::Want(t)) if t == room));
        assert!(interest.try_recv().is_err(), "asked for once, however many join");
        assert!(hub.leave(&room, id));
        assert!(!hub.leave(&room, id), "not in it any more");
        assert!(interest.try_recv().is_err(), "a member is left");
        hub.unregister(other, [room.clone()]);
        assert!(matches!(interest.try_recv(), Ok(Interest::Idle(t)) if t == room));
        assert!(hub.remove_if_idle(&room));
        assert_eq!(hub.sessions(), 1);
    }
}
