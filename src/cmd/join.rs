//! `join`: puts the socket in a room once the room's channels are subscribed, so that anything
//! published after the `ok` reaches it. In a room with history the join first sends what the
//! client missed after its `since` ([`crate::history::replay`]); `presence: true` starts the
//! room's presence events.

use std::sync::Arc;

use super::{may_join, ok, unavailable, Answer, Membership};
use crate::{
    close::ErrorCode,
    fanout::writer::Outbound,
    frame::FrameError,
    history::{
        pos::{Keep, Pos},
        replay::replay,
    },
    metrics as m,
    node::Node,
    topic::Topic,
    wire::{Positions, Reply},
};

/// A `join` as the client sent it.
pub struct Join {
    pub id: Option<i64>,
    pub room: String,
    pub since: Option<Vec<Pos>>,
    pub presence: bool,
}

pub async fn run(join: Join, node: &Node, membership: &mut Membership, out: &Outbound) -> Answer {
    let Join {
        id,
        room,
        since,
        presence,
    } = join;
    let room: Arc<str> = room.into();
    if membership.is_in(&room) {
        // Joined already: asking for presence now starts the events.
        if presence {
            membership.watch(&room, out);
        }
        return ok(id);
    }
    may_join(membership, &room, id)?;
    let max = node.config().max_rooms_per_conn;
    if membership.rooms() >= max {
        return Err(FrameError::new(
            id,
            ErrorCode::TooManyRooms,
            format!("a connection may be in at most {max} rooms"),
        ));
    }
    let answer = match node.config().keep(&room) {
        Some(keep) => with_history(node, membership, out, id, room.clone(), keep, since).await,
        None => plain(node, membership, id, room.clone(), since.is_some()).await,
    };
    if presence && answer.is_ok() {
        membership.watch(&room, out);
    }
    answer
}

/// Joins a room without history; a client that asked to resume is told nothing was recovered.
async fn plain(node: &Node, membership: &mut Membership, id: Option<i64>, room: Arc<str>, resume: bool) -> Answer {
    node.hub()
        .join(Topic::Room(room.clone()), membership.id(), node.config().join_timeout)
        .await
        .map_err(|e| unavailable(id, &e))?;
    membership.entered(room);
    if resume {
        // Nothing to resume from: the room keeps no history.
        m::recovery(false);
        return Ok(id.map(|_| Reply {
            recovered: Some(false),
            ..Reply::op("ok", id)
        }));
    }
    ok(id)
}

/// Joins a room with history: replays what the client missed after `since` when every shard
/// still has all of it, then answers with where each shard stands and goes live.
async fn with_history(
    node: &Node,
    membership: &mut Membership,
    out: &Outbound,
    id: Option<i64>,
    room: Arc<str>,
    keep: Keep,
    since: Option<Vec<Pos>>,
) -> Answer {
    let topic = Topic::Room(room.clone());
    node.hub()
        .join_held(topic.clone(), membership.id(), node.config().join_timeout)
        .await
        .map_err(|e| unavailable(id, &e))?;
    membership.entered(room.clone());
    let replayed = match replay(node, out, &room, keep, since).await {
        Ok(replayed) => replayed,
        Err(e) => {
            membership.leave(&room);
            return Err(unavailable(id, &e));
        }
    };
    if id.is_some() {
        let reply = Reply {
            pos: Some(Positions::Each(replayed.heads.iter().map(Pos::to_string).collect())),
            recovered: replayed.recovered,
            ..Reply::op("ok", id)
        };
        out.send(reply.encode(out.encoding()));
    }
    node.hub().release(&topic, membership.id(), replayed.heads);
    Ok(None)
}
