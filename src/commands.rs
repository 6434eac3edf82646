//! What each client command does, for one socket: joins (with history, the replay of what the
//! client missed), leaves, publishes, direct messages and `history`. The session reads and
//! rate-limits the commands; this module runs them.
//!
//! # A join that replays history
//! The socket joins holding its live frames back ([`Hub::join_held`]), then reads each shard's
//! history (a read shared with other joins, [`crate::history`]). Everything after the client's
//! `since` goes out first, then the `ok` with where each shard now stands, then what was held that
//! is newer than that ([`Hub::release`]): no gap and no duplicate across the switch to live.

use std::{collections::HashSet, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::join_all;

use crate::{
    auth::Grants,
    bus::{
        stream::{Keep, Pos},
        BusError,
    },
    close::ErrorCode,
    encoding::Encoding,
    envelope::Kind,
    frame::{history_frame, Command, FrameError, Positions, Reply, Request},
    gate::{Gate, Push},
    history::Shared,
    hub::{Hub, SessionId},
    metrics as m,
    node::Node,
    presence::{listed, Presence},
    publish::{wrap, Outgoing},
    topic::Topic,
};

/// A registered socket's place in the hub and in presence, and its rights; leaves every topic on
/// drop.
pub struct Membership {
    hub: Hub,
    presence: Option<Arc<Presence>>,
    id: SessionId,
    grants: Grants,
    rooms: HashSet<Arc<str>>,
}

impl Membership {
    /// Counts the socket as a connection of its user.
    pub fn new(node: &Node, id: SessionId, grants: Grants) -> Membership {
        let presence = node.presence().cloned();
        if let Some(p) = &presence {
            p.connected(&grants.user);
        }
        Membership {
            hub: node.hub().clone(),
            presence,
            id,
            grants,
            rooms: HashSet::new(),
        }
    }

    /// Counts the socket in a room it joined.
    fn entered(&mut self, room: Arc<str>) {
        if let Some(p) = &self.presence {
            p.joined(&room, &self.grants.user);
        }
        self.rooms.insert(room);
    }

    /// Sends the socket a joined room's presence events.
    fn watch(&self, room: &Arc<str>, out: Out<'_>) {
        if let Some(p) = &self.presence {
            p.watch(room, self.id, out.gate.clone(), out.encoding);
        }
    }

    /// Takes the socket out of a room's presence.
    fn exited(&self, room: &str) {
        if let Some(p) = &self.presence {
            p.left(room, &self.grants.user);
            p.unwatch(room, self.id);
        }
    }

    /// The token's expiry, seconds since the Unix epoch.
    pub fn expires(&self) -> Option<u64> {
        self.grants.expires
    }

    /// Commands a second and the burst this connection may send: its token's `limits`, else the
    /// node's `--command-rate` and `--command-burst`.
    pub fn command_limits(&self, config: &crate::config::Config) -> (u32, u32) {
        self.grants
            .limits
            .map_or((config.command_rate, config.command_burst), |l| (l.rate, l.burst))
    }

    pub fn user_topic(&self) -> Topic {
        Topic::User(self.grants.user.clone())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        for room in &self.rooms {
            self.exited(room);
        }
        if let Some(p) = &self.presence {
            p.disconnected(&self.grants.user);
        }
        let topics = self
            .rooms
            .drain()
            .map(Topic::Room)
            .chain([Topic::User(self.grants.user.clone())]);
        self.hub.unregister(self.id, topics);
    }
}

/// Where a command's frames go: the socket's gate, in its encoding.
#[derive(Clone, Copy)]
pub struct Out<'a> {
    pub gate: &'a Arc<Gate>,
    pub encoding: Encoding,
}

/// Runs one command; `Ok(None)` means nothing (more) to answer.
pub async fn run(
    request: Request,
    node: &Node,
    membership: &mut Membership,
    out: Out<'_>,
) -> Result<Option<Reply<'static>>, FrameError> {
    let id = request.id;
    match &request.command {
        Command::Join { room, .. } | Command::History { room, .. } | Command::Presence { room } => {
            named(node, id, room, ErrorCode::BadRoom)?
        }
        // Publishes are checked in `to_publish`.
        Command::Leave { .. } | Command::Ping | Command::Pub { .. } | Command::Dm { .. } => {}
    }
    // `ok` answers only commands that carried an id; a ping is always answered.
    let ok = || Ok(id.map(|_| Reply::op("ok", id)));
    let unavailable = |e: &dyn std::fmt::Display| FrameError::new(id, ErrorCode::Unavailable, e.to_string());
    match request.command {
        Command::Ping => Ok(Some(Reply::op("pong", id))),
        Command::Join { room, since, presence } => {
            let room: Arc<str> = room.into();
            if membership.rooms.contains(&room) {
                // Joined already: asking for presence now starts the events.
                if presence {
                    membership.watch(&room, out);
                }
                return ok();
            }
            may_join(membership, &room, id)?;
            let max = node.config().max_rooms_per_conn;
            if membership.rooms.len() >= max {
                return Err(FrameError::new(
                    id,
                    ErrorCode::TooManyRooms,
                    format!("a connection may be in at most {max} rooms"),
                ));
            }
            if let Some(keep) = node.config().keep(&room) {
                let joined = join_with_history(node, membership, out, id, room.clone(), keep, since).await;
                if presence && joined.is_ok() {
                    membership.watch(&room, out);
                }
                return joined;
            }
            node.hub()
                .join(Topic::Room(room.clone()), membership.id, node.config().join_timeout)
                .await
                .map_err(|e| unavailable(&e))?;
            if presence {
                membership.watch(&room, out);
            }
            membership.entered(room);
            if since.is_some() {
                // Nothing to resume from: the room keeps no history.
                m::recovery(false);
                return Ok(id.map(|_| Reply {
                    recovered: Some(false),
                    ..Reply::op("ok", id)
                }));
            }
            ok()
        }
        Command::History { room, limit } => {
            may_join(membership, &room, id)?;
            let msgs = match node.config().keep(&room) {
                Some(keep) => newest(node, &room, limit, keep).await.map_err(|e| unavailable(&e))?,
                None => Vec::new(),
            };
            send_whole(out.gate, history_frame(out.encoding, id, &msgs)).await;
            Ok(None)
        }
        Command::Leave { room } => {
            let Some(room) = membership.rooms.take(room.as_str()) else {
                return Err(FrameError::new(
                    id,
                    ErrorCode::NotJoined,
                    format!("not in room {room:?}"),
                ));
            };
            membership.exited(&room);
            node.hub().leave(&Topic::Room(room), membership.id);
            ok()
        }
        Command::Presence { room } => {
            may_join(membership, &room, id)?;
            let Some(presence) = node.presence() else {
                return Err(FrameError::new(
                    id,
                    ErrorCode::Unavailable,
                    "presence is off on this node",
                ));
            };
            let total = presence.room(&room).await.map_err(|e| unavailable(&e))?;
            let reply = Reply {
                count: Some(total.count),
                users: listed(&total.users),
                ..Reply::op("ok", id)
            };
            out.gate.send(reply.encode(out.encoding));
            Ok(None)
        }
        // Sent through the connection's outbox (see `to_publish`), never run here.
        Command::Pub { .. } | Command::Dm { .. } => unreachable!("publishes are taken out before run"),
    }
}

/// A `pub` or `dm` checked and wrapped for the bus; [`crate::outbox`] sends it.
pub struct Publish {
    pub id: Option<i64>,
    pub direct: bool,
    pub out: Outgoing,
}

/// Takes a `pub` or `dm` out of the commands: its names and the right to publish checked, wrapped
/// in its envelope. Any other command comes back as it was.
pub fn to_publish(
    request: Request,
    node: &Node,
    membership: &Membership,
) -> Result<Result<Publish, FrameError>, Request> {
    let id = request.id;
    let (kind, target, data, code) = match request.command {
        Command::Pub { room, data } => (Kind::Room, room, data, ErrorCode::BadRoom),
        Command::Dm { to, data } => (Kind::Direct, to, data, ErrorCode::BadUser),
        command => return Err(Request { id, command }),
    };
    if let Err(e) = named(node, id, &target, code) {
        return Ok(Err(e));
    }
    if !membership.grants.may_publish() {
        return Ok(Err(FrameError::new(
            id,
            ErrorCode::Forbidden,
            "the token does not allow publishing",
        )));
    }
    Ok(Ok(Publish {
        id,
        direct: kind == Kind::Direct,
        out: wrap(node, kind, target, &membership.grants.user, data),
    }))
}

/// A command's answer as the frame to send, if any; a refusal is counted by its code.
pub fn encode(answer: Result<Option<Reply<'_>>, FrameError>, encoding: Encoding) -> Option<Bytes> {
    match answer {
        Ok(reply) => reply.map(|r| r.encode(encoding)),
        Err(e) => {
            m::bad_frame(e.code.as_str());
            Some(Reply::error(&e).encode(encoding))
        }
    }
}

/// The answer to a publish once the bus has it: `ok` (with its position in a room with history)
/// or the error.
pub fn published(p: &Publish, result: Result<Option<Pos>, BusError>) -> Result<Option<Reply<'static>>, FrameError> {
    let id = p.id;
    let pos = result.map_err(|e| match e {
        BusError::Unconfirmed(pos) if !p.direct => FrameError {
            pos: Some(pos),
            ..FrameError::new(id, ErrorCode::Unconfirmed, e.to_string())
        },
        e => FrameError::new(id, ErrorCode::Unavailable, e.to_string()),
    })?;
    m::published("ws");
    Ok(id.map(|_| Reply {
        pos: pos.map(|p| Positions::One(p.to_string())),
        ..Reply::op("ok", id)
    }))
}

/// A room or user name the command names, checked against the node's name rules.
fn named(node: &Node, id: Option<i64>, name: &str, code: ErrorCode) -> Result<(), FrameError> {
    node.config()
        .names
        .check(name)
        .map_err(|e| FrameError::new(id, code, e.to_string()))
}

fn may_join(membership: &Membership, room: &str, id: Option<i64>) -> Result<(), FrameError> {
    if membership.grants.may_join(room) {
        return Ok(());
    }
    Err(FrameError::new(
        id,
        ErrorCode::Forbidden,
        format!("the token does not allow room {room:?}"),
    ))
}

/// Joins a room with history: replays what the client missed after `since` (one position per
/// shard) when every shard still has all of it, then answers with where each shard stands.
async fn join_with_history(
    node: &Node,
    membership: &mut Membership,
    out: Out<'_>,
    id: Option<i64>,
    room: Arc<str>,
    keep: Keep,
    since: Option<Vec<Pos>>,
) -> Result<Option<Reply<'static>>, FrameError> {
    let topic = Topic::Room(room.clone());
    node.hub()
        .join_held(topic.clone(), membership.id, node.config().join_timeout)
        .await
        .map_err(|e| FrameError::new(id, ErrorCode::Unavailable, e.to_string()))?;
    membership.entered(room.clone());
    let shards = node.naming().shards(&room) as usize;
    let asked = since.is_some();
    // A list for another shard count (the room was resharded) cannot be resumed from.
    let since = since.filter(|s| s.len() == shards);
    let max = node.config().recover_max;
    let reads = join_all((0..shards).map(|i| {
        let channel = node.naming().room_channel(&room, i as u32);
        // From the client's own message on (to check it is still the one it had), no further
        // back than a replay may go.
        let (after, cap) = match &since {
            Some(s) => (s[i].n.saturating_sub(1), max.saturating_add(1)),
            None => (u64::MAX, 0),
        };
        async move { node.history().read(&channel, i as u32, after, cap, keep).await }
    }))
    .await;
    let reads: Vec<Arc<Shared>> = match reads.into_iter().collect() {
        Ok(reads) => reads,
        Err(e) => {
            membership.rooms.remove(&room);
            membership.exited(&room);
            node.hub().leave(&topic, membership.id);
            return Err(FrameError::new(id, ErrorCode::Unavailable, e.to_string()));
        }
    };
    let replay: Option<Vec<Vec<Bytes>>> = since.as_ref().and_then(|since| {
        reads
            .iter()
            .zip(since)
            .map(|(read, pos)| read.frames_after(*pos, out.encoding).filter(|f| f.len() <= max))
            .collect()
    });
    let recovered = replay.is_some();
    if let Some(replay) = replay {
        let mut sent = 0;
        for frame in replay.into_iter().flatten() {
            if !send_draining(out.gate, frame).await {
                break;
            }
            sent += 1;
        }
        m::replayed(sent);
    }
    if asked {
        m::recovery(recovered);
    }
    let heads: Vec<Pos> = reads.iter().map(|r| r.slice.head).collect();
    if id.is_some() {
        let reply = Reply {
            pos: Some(Positions::Each(heads.iter().map(Pos::to_string).collect())),
            recovered: asked.then_some(recovered),
            ..Reply::op("ok", id)
        };
        out.gate.send(reply.encode(out.encoding));
    }
    node.hub().release(&topic, membership.id, heads);
    Ok(None)
}

/// The newest `limit` messages of a room over all its shards, oldest first by publish time.
async fn newest(
    node: &Node,
    room: &str,
    limit: usize,
    keep: Keep,
) -> Result<Vec<(crate::envelope::Envelope, u32)>, BusError> {
    let shards = node.naming().shards(room);
    let reads = join_all((0..shards).map(|i| {
        let channel = node.naming().room_channel(room, i);
        async move { node.history().read(&channel, i, 0, limit, keep).await }
    }))
    .await;
    let mut msgs = Vec::new();
    for read in reads {
        let read = read?;
        msgs.extend(read.envelopes().map(|env| (env, read.shard())));
    }
    msgs.sort_by_key(|(env, _)| env.ts_us);
    let skip = msgs.len().saturating_sub(limit);
    msgs.drain(..skip);
    Ok(msgs)
}

/// How often a replay looks whether the socket has taken enough of it to go on.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// Sends a frame once the socket's queue is below half its budget, so a long replay goes out as
/// the socket drains, never all at once and never past the budget. False once the socket is gone.
async fn send_draining(gate: &Gate, frame: Bytes) -> bool {
    while gate.queued() > gate.budget() / 2 {
        if gate.is_closing() {
            return false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    matches!(gate.send(frame), Push::Queued)
}

/// Sends one frame that may be larger than the budget (an answer the client asked for): once
/// the queue is empty, outside the budget, so it goes out as the socket drains and cannot by
/// itself close the socket as a slow consumer.
async fn send_whole(gate: &Gate, frame: Bytes) {
    while gate.queued() > 0 {
        if gate.is_closing() {
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    gate.send_outside_budget(frame);
}
