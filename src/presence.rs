//! Presence: how many users are in each room (and, for small rooms, who), and whether a user is
//! connected anywhere.
//!
//! # Model
//! Each node writes only its own contribution: per room, its distinct local users (and their
//! names while fewer than `--presence-list-max`); per user, its connections. A room's
//! contribution is written in the tick after its local membership changed, so a storm of 20,000
//! joins costs one write per room per node per tick, never one per join; and every contribution
//! is written again a few times per `--presence-ttl`, which it expires after unless refreshed:
//! a node that dies drops out within the TTL, with no cleanup to run. Totals are sums of the live
//! contributions ([`Total::sum`]); where they are kept is [`crate::bus::presence`].
//!
//! A node with members in a room (or sockets watching its events) reads the room's total once a
//! tick and answers from that; a read of any other room costs one round trip. The same tick sends
//! the watchers of a room `presence` when its count changed and, for a listed room, `joined` and
//! `left` per user (a user with two tabs on two nodes joins once and leaves with the last one).
//!
//! Each watcher's events are the difference to what that watcher was told, not to what the room
//! last announced: a watcher holding no list of a listed room (new, or watching since the room was
//! too large to list) gets the list in its `presence`, and `joined` / `left` after that, so a user
//! who arrived before a watcher's first event is in its list rather than never announced.
//! Watchers told the same state share its frames, encoded once per encoding.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{
        presence::{Contribution, Total},
        Bus, BusError, Naming,
    },
    config::Config,
    encoding::Encoding,
    fanout::writer::Outbound,
    hub::SessionId,
    metrics as m,
    wire::Reply,
};

/// Presence calls a tick has in flight at once, pipelined on the bus's connections.
const IN_FLIGHT: usize = 64;

pub struct Presence {
    node: String,
    bus: Arc<Bus>,
    naming: Naming,
    tick: Duration,
    ttl: Duration,
    list_max: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<Arc<str>, Room>,
    /// This node's connections per user.
    users: HashMap<Arc<str>, u32>,
    /// Users whose connections changed since the last write.
    changed: HashSet<Arc<str>>,
    /// This node has written users that may still be there.
    users_written: bool,
}

#[derive(Default)]
struct Room {
    /// Sockets in the room on this node, per user.
    local: HashMap<Arc<str>, u32>,
    /// The local users changed since the contribution was last written.
    dirty: bool,
    /// When the contribution was last written (taken before the write).
    written: Option<Instant>,
    watchers: Vec<Watcher>,
    /// The total as last read, shared with the watchers it was announced to.
    total: Option<Arc<Total>>,
}

impl Room {
    fn idle(&self) -> bool {
        self.local.is_empty() && self.watchers.is_empty() && !self.dirty && self.written.is_none()
    }

    fn contribution(&self, list_max: usize) -> Option<Contribution> {
        if self.local.is_empty() {
            return None;
        }
        let listed = self.local.len() < list_max;
        Some(Contribution {
            count: self.local.len() as u64,
            users: listed.then(|| self.local.keys().map(|u| u.to_string()).collect()),
        })
    }
}

/// A socket that joined with `presence: true`.
struct Watcher {
    id: SessionId,
    out: Outbound,
    /// The total it was last told (`None`: nothing yet). Watchers in sync hold the same `Arc`,
    /// which is how [`announce`] finds who can share frames.
    told: Option<Arc<Total>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under this lock is a single step, so a panic elsewhere leaves it consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A user's online status over every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Online {
    pub connections: u64,
}

impl Presence {
    /// This node's presence, as `config` sets it (node id, tick, TTL, list size).
    pub fn new(config: &Config, bus: Arc<Bus>, naming: Naming) -> Presence {
        Presence {
            node: config.node_id.clone(),
            bus,
            naming,
            tick: config.presence_tick,
            ttl: config.presence_ttl,
            list_max: config.presence_list_max,
            state: Mutex::new(State::default()),
        }
    }

    /// A socket of `user` joined `room` on this node.
    pub fn joined(&self, room: &Arc<str>, user: &Arc<str>) {
        let mut state = lock(&self.state);
        let r = state.rooms.entry(room.clone()).or_default();
        let n = r.local.entry(user.clone()).or_default();
        *n += 1;
        if *n == 1 {
            r.dirty = true;
        }
    }

    /// A socket of `user` left `room` (or closed).
    pub fn left(&self, room: &str, user: &str) {
        let mut state = lock(&self.state);
        let Some(r) = state.rooms.get_mut(room) else { return };
        let Some(n) = r.local.get_mut(user) else { return };
        *n -= 1;
        if *n == 0 {
            r.local.remove(user);
            r.dirty = true;
        }
    }

    /// Sends `room`'s presence events to this socket until [`Presence::unwatch`].
    pub fn watch(&self, room: &Arc<str>, id: SessionId, out: Outbound) {
        let mut state = lock(&self.state);
        let r = state.rooms.entry(room.clone()).or_default();
        r.watchers.retain(|w| w.id != id);
        r.watchers.push(Watcher { id, out, told: None });
    }

    pub fn unwatch(&self, room: &str, id: SessionId) {
        if let Some(r) = lock(&self.state).rooms.get_mut(room) {
            r.watchers.retain(|w| w.id != id);
        }
    }

    /// A socket of `user` opened on this node.
    pub fn connected(&self, user: &Arc<str>) {
        let mut state = lock(&self.state);
        *state.users.entry(user.clone()).or_default() += 1;
        state.changed.insert(user.clone());
    }

    /// A socket of `user` closed.
    pub fn disconnected(&self, user: &Arc<str>) {
        let mut state = lock(&self.state);
        if let Some(n) = state.users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                state.users.remove(user);
            }
            state.changed.insert(user.clone());
        }
    }

    /// The room's presence: as of this node's last tick when it tracks the room, else read now.
    pub async fn room(&self, room: &str) -> Result<Total, BusError> {
        if let Some(total) = lock(&self.state)
            .rooms
            .get(room)
            .and_then(|r| r.total.as_deref().cloned())
        {
            return Ok(total);
        }
        self.read(room).await
    }

    /// Whether the user is connected to any node, and with how many connections.
    pub async fn user(&self, user: &str) -> Result<Online, BusError> {
        m::presence_read();
        let connections = self
            .bus
            .presence_connections(&self.naming.presence_users(), user)
            .await?;
        Ok(Online { connections })
    }

    async fn read(&self, room: &str) -> Result<Total, BusError> {
        m::presence_read();
        let values = self.bus.presence_get(&self.naming.presence_room(room)).await?;
        let contributions = values.iter().filter_map(|v| Contribution::decode(v));
        Ok(Total::sum(contributions, self.list_max))
    }

    /// Ticks until `cancel`: writes what changed, refreshes what is due, reads the totals of the
    /// rooms this node tracks and tells their watchers.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut every = tokio::time::interval(self.tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = cancel.cancelled() => return,
            }
            self.tick().await;
        }
    }

    /// One tick.
    pub async fn tick(&self) {
        let now = Instant::now();
        self.write_rooms(now).await;
        self.write_users().await;
        self.read_rooms().await;
    }

    /// A contribution is written again once this old, so it is refreshed a few times per TTL and
    /// at the latest a tick before it would expire.
    fn refresh_after(&self) -> Duration {
        (self.ttl / 3)
            .min(self.ttl.saturating_sub(self.tick * 2))
            .saturating_sub(self.tick / 2)
    }

    async fn write_rooms(&self, now: Instant) {
        let refresh = self.refresh_after();
        let writes: Vec<(Arc<str>, Option<Bytes>)> = {
            let mut state = lock(&self.state);
            let mut oldest = Duration::ZERO;
            let writes = state
                .rooms
                .iter_mut()
                .filter_map(|(room, r)| {
                    let age = r.written.map(|w| now.duration_since(w));
                    if let Some(age) = age {
                        oldest = oldest.max(age);
                    }
                    let due = r.dirty || (age.is_some_and(|a| a >= refresh) && !r.local.is_empty());
                    if !due {
                        return None;
                    }
                    r.dirty = false;
                    if r.local.is_empty() && r.written.is_none() {
                        // Joined and left between two ticks: nothing was written to withdraw.
                        return None;
                    }
                    Some((room.clone(), r.contribution(self.list_max).map(|c| c.encode())))
                })
                .collect();
            m::presence_rooms(state.rooms.len(), oldest);
            writes
        };
        // Per room: whether it was written, and whether that put a contribution there.
        let done: Vec<(Arc<str>, bool, bool)> = stream::iter(writes)
            .map(|(room, value)| async move {
                m::presence_write("room");
                let index = self.naming.presence_room(&room);
                let put = value.is_some();
                match self.bus.presence_put(&index, &self.node, self.ttl, value).await {
                    Ok(()) => (room, true, put),
                    Err(e) => {
                        tracing::debug!(room = %room, error = %e, "presence write failed");
                        (room, false, put)
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut state = lock(&self.state);
        for (room, ok, put) in done {
            let Some(r) = state.rooms.get_mut(&room) else { continue };
            if ok {
                r.written = put.then_some(now);
            } else {
                // Tried again next tick, a withdrawal too.
                m::presence_error();
                r.dirty = true;
            }
        }
        state.rooms.retain(|_, r| !r.idle());
    }

    async fn write_users(&self) {
        let (changes, was_written) = {
            let mut state = lock(&self.state);
            if state.changed.is_empty() && !state.users_written {
                return;
            }
            let changed = std::mem::take(&mut state.changed);
            (connections_of(&state.users, changed), state.users_written)
        };
        let index = self.naming.presence_users();
        m::presence_write("users");
        let result = match self
            .bus
            .presence_beat(&index, &self.node, self.ttl, false, &changes)
            .await
        {
            // Gone (expired while Redis was out of reach, or lost in a failover): all again.
            Ok(false) if was_written => {
                let all = {
                    let state = lock(&self.state);
                    connections_of(&state.users, state.users.keys().cloned().collect())
                };
                m::presence_write("users");
                self.bus.presence_beat(&index, &self.node, self.ttl, true, &all).await
            }
            other => other,
        };
        let mut state = lock(&self.state);
        match result {
            Ok(_) => state.users_written = !state.users.is_empty() || !state.changed.is_empty(),
            Err(e) => {
                m::presence_error();
                tracing::debug!(error = %e, "presence write of users failed");
                state.changed.extend(changes.into_iter().map(|(u, _)| u));
            }
        }
    }

    async fn read_rooms(&self) {
        let rooms: Vec<Arc<str>> = {
            let state = lock(&self.state);
            state
                .rooms
                .iter()
                .filter(|(_, r)| !r.local.is_empty() || !r.watchers.is_empty())
                .map(|(room, _)| room.clone())
                .collect()
        };
        let totals: Vec<(Arc<str>, Total)> = stream::iter(rooms)
            .map(|room| async move {
                match self.read(&room).await {
                    Ok(total) => Some((room, total)),
                    Err(e) => {
                        m::presence_error();
                        tracing::debug!(room = %room, error = %e, "presence read failed");
                        None
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        let mut state = lock(&self.state);
        for (room, total) in totals {
            let Some(r) = state.rooms.get_mut(&room) else { continue };
            let total = Arc::new(total);
            announce(&room, &mut r.watchers, &total);
            r.total = Some(total);
        }
    }
}

/// Each user's connections now (0 for those gone).
fn connections_of(users: &HashMap<Arc<str>, u32>, which: HashSet<Arc<str>>) -> Vec<(Arc<str>, u32)> {
    which
        .into_iter()
        .map(|u| {
            let n = users.get(&u).copied().unwrap_or(0);
            (u, n)
        })
        .collect()
}

/// What a watcher is told now, after it was told `told` (`None`: nothing yet).
#[derive(Debug, Default, PartialEq, Eq)]
struct Diff<'a> {
    /// It gets `presence`: the count changed, it was told nothing yet, or it gets the list.
    presence: bool,
    /// The room's users, in `presence`, to a watcher of a listed room that holds no list.
    users: Option<Vec<&'a str>>,
    joined: Vec<&'a str>,
    left: Vec<&'a str>,
}

impl Diff<'_> {
    fn is_empty(&self) -> bool {
        !self.presence && self.joined.is_empty() && self.left.is_empty()
    }
}

/// What a watcher that was told `told` hears of `now`: the count when it changed (or when it was
/// told nothing yet); for a listed room, the list if it holds none, else who joined and who left
/// since its list.
fn changes<'a>(told: Option<&'a Total>, now: &'a Total) -> Diff<'a> {
    let presence = told.is_none_or(|t| t.count != now.count);
    let Some(users) = &now.users else {
        // Counted, not listed: the count is all there is to tell.
        return Diff {
            presence,
            ..Diff::default()
        };
    };
    match told.and_then(|t| t.users.as_ref()) {
        Some(was) => Diff {
            presence,
            users: None,
            joined: users.difference(was).map(String::as_str).collect(),
            left: was.difference(users).map(String::as_str).collect(),
        },
        // Told nothing yet, or only counts while the room was too large to list: every user in
        // the room is announced by being in this list.
        None => Diff {
            presence: true,
            users: listed(&now.users),
            ..Diff::default()
        },
    }
}

/// Tells a room's watchers what changed since each was last told, and records that they were told
/// `now`.
fn announce(room: &str, watchers: &mut [Watcher], now: &Arc<Total>) {
    // Watchers told the same state share its diff and frames: nearly always one group in sync and
    // one of watchers new since the last tick, so the cost is per room and tick, not per watcher.
    let mut states: Vec<Option<Arc<Total>>> = Vec::new();
    let group: Vec<usize> = watchers
        .iter()
        .map(|w| match states.iter().position(|s| same(s, &w.told)) {
            Some(g) => g,
            None => {
                states.push(w.told.clone());
                states.len() - 1
            }
        })
        .collect();
    let diffs: Vec<Diff> = states.iter().map(|s| changes(s.as_deref(), now)).collect();
    let mut frames: Vec<[Option<Vec<Bytes>>; 2]> = vec![[None, None]; states.len()];
    for (w, g) in watchers.iter_mut().zip(group) {
        let diff = &diffs[g];
        if !diff.is_empty() {
            let encoding = w.out.encoding();
            let events = frames[g][encoding.index()].get_or_insert_with(|| events(encoding, room, now.count, diff));
            for frame in events.iter() {
                w.out.send(frame.clone());
            }
        }
        w.told = Some(now.clone());
    }
}

/// Whether two watchers were told the same state (the same read, not merely an equal one).
fn same(a: &Option<Arc<Total>>, b: &Option<Arc<Total>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// A diff's events in one encoding: `presence` first, then `left`, then `joined`.
fn events(encoding: Encoding, room: &str, count: u64, diff: &Diff) -> Vec<Bytes> {
    let event = |op, user| {
        Reply {
            room: Some(room),
            user: Some(user),
            ..Reply::op(op, None)
        }
        .encode(encoding)
    };
    let presence = diff.presence.then(|| {
        Reply {
            room: Some(room),
            count: Some(count),
            users: diff.users.clone(),
            ..Reply::op("presence", None)
        }
        .encode(encoding)
    });
    presence
        .into_iter()
        .chain(diff.left.iter().map(|u| event("left", *u)))
        .chain(diff.joined.iter().map(|u| event("joined", *u)))
        .collect()
}

/// A room's users as a reply lists them.
pub fn listed(users: &Option<BTreeSet<String>>) -> Option<Vec<&str>> {
    users.as_ref().map(|u| u.iter().map(String::as_str).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::gate::Gate;

    fn total(users: &[&str]) -> Total {
        Total {
            count: users.len() as u64,
            users: Some(users.iter().map(|u| u.to_string()).collect()),
        }
    }

    fn counted(count: u64) -> Total {
        Total { count, users: None }
    }

    #[test]
    fn a_watcher_hears_the_difference_to_what_it_was_told_and_a_fresh_one_the_list() {
        let was = total(&["a", "b"]);
        let now = total(&["b", "c"]);
        assert_eq!(
            changes(Some(&was), &now),
            Diff {
                presence: false,
                users: None,
                joined: vec!["c"],
                left: vec!["a"],
            }
        );
        assert!(changes(Some(&now), &now).is_empty());
        let fresh = Diff {
            presence: true,
            users: Some(vec!["b", "c"]),
            ..Diff::default()
        };
        assert_eq!(changes(None, &now), fresh);
        // Only counted while the room was too large: the list again once it is small.
        assert_eq!(changes(Some(&counted(5000)), &now), fresh);
        // Too large to list: counts only, to a fresh watcher too.
        let big = counted(5000);
        let count_only = Diff {
            presence: true,
            ..Diff::default()
        };
        assert_eq!(changes(Some(&was), &big), count_only);
        assert_eq!(changes(None, &big), count_only);
        assert!(changes(Some(&big), &counted(5000)).is_empty());
    }

    /// A watcher whose frames stay queued (no socket attached), counted in bytes.
    fn watcher(id: SessionId, encoding: Encoding, told: Option<Arc<Total>>) -> (Watcher, Arc<Gate>) {
        let gate = Arc::new(Gate::new(1 << 20));
        let out = Outbound::new(gate.clone(), encoding);
        (Watcher { id, out, told }, gate)
    }

    fn bytes(frames: &[Bytes]) -> usize {
        frames.iter().map(Bytes::len).sum()
    }

    #[test]
    fn watchers_in_sync_and_a_new_one_each_hear_their_own_difference() {
        let was = Arc::new(total(&["a", "b"]));
        let (in_sync, in_sync_gate) = watcher(1, Encoding::Json, Some(was.clone()));
        let (packed, packed_gate) = watcher(2, Encoding::MsgPack, Some(was.clone()));
        let (fresh, fresh_gate) = watcher(3, Encoding::Json, None);
        let mut watchers = vec![in_sync, packed, fresh];
        let now = Arc::new(total(&["b", "c"]));
        announce("r", &mut watchers, &now);

        let heard = |encoding, told: Option<&Total>| bytes(&events(encoding, "r", 2, &changes(told, &now)));
        assert_eq!(in_sync_gate.queued(), heard(Encoding::Json, Some(&*was)));
        assert_eq!(packed_gate.queued(), heard(Encoding::MsgPack, Some(&*was)));
        assert_eq!(fresh_gate.queued(), heard(Encoding::Json, None));
        assert!(watchers
            .iter()
            .all(|w| w.told.as_ref().is_some_and(|t| Arc::ptr_eq(t, &now))));

        // All in sync now: an unchanged room tells nobody anything.
        let queued: Vec<usize> = [&in_sync_gate, &packed_gate, &fresh_gate].map(|g| g.queued()).into();
        assert!(queued.iter().all(|&q| q > 0), "{queued:?}");
        announce("r", &mut watchers, &Arc::new(total(&["b", "c"])));
        assert_eq!(queued, [&in_sync_gate, &packed_gate, &fresh_gate].map(|g| g.queued()));
    }

    #[test]
    fn contributions_are_refreshed_a_few_times_per_ttl_and_a_tick_before_they_expire() {
        let p = |tick, ttl| {
            let config = Config {
                presence_tick: Duration::from_secs(tick),
                presence_ttl: Duration::from_secs(ttl),
                ..Config::default()
            };
            Presence::new(&config, memory_bus(), Naming::new("r:", "u:", 1, HashMap::new()))
        };
        // The defaults: written again at every tick.
        assert_eq!(p(1, 3).refresh_after(), Duration::from_millis(500));
        assert_eq!(p(1, 30).refresh_after(), Duration::from_millis(9500));
        assert_eq!(p(1, 2).refresh_after(), Duration::ZERO);
    }

    struct Nothing;

    impl crate::bus::Sink for Nothing {
        fn receive(&self, _: Bytes, _: Bytes) {}
    }

    fn memory_bus() -> Arc<Bus> {
        Arc::new(Bus::Memory(crate::bus::memory::MemoryBus::new(Arc::new(Nothing))))
    }

    #[tokio::test]
    async fn a_storm_of_joins_is_one_write_and_a_closed_node_withdraws() {
        let bus = memory_bus();
        let naming = Naming::new("r:", "u:", 1, HashMap::new());
        let node = |id: &str| {
            let config = Config {
                node_id: id.into(),
                presence_list_max: 100,
                ..Config::default()
            };
            Presence::new(&config, bus.clone(), naming.clone())
        };
        let (a, b) = (node("a"), node("b"));
        let room: Arc<str> = "stadium".into();
        for i in 0..20_000 {
            let user: Arc<str> = format!("u{}", i % 20).into();
            a.joined(&room, &user);
        }
        let ann: Arc<str> = "u0".into();
        b.joined(&room, &ann);
        b.connected(&ann);
        let written = |p: &Presence| lock(&p.state).rooms.values().filter(|r| r.dirty).count();
        assert_eq!(written(&a), 1);
        a.tick().await;
        b.tick().await;
        // 20 users on a, one of them on b too: listed, so counted once.
        let t = a.room("stadium").await.unwrap();
        assert_eq!(t.count, 20);
        assert!(t.users.as_ref().unwrap().contains("u19"));
        assert_eq!(b.user("u0").await.unwrap(), Online { connections: 1 });
        for i in 0..20_000 {
            a.left("stadium", &format!("u{}", i % 20));
        }
        b.left("stadium", "u0");
        b.disconnected(&ann);
        a.tick().await;
        b.tick().await;
        assert_eq!(a.room("stadium").await.unwrap(), total(&[]));
        assert_eq!(b.user("u0").await.unwrap(), Online { connections: 0 });
        // Nothing left to track once withdrawn.
        assert!(lock(&a.state).rooms.is_empty());
    }
}
