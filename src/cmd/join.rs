//! `join`: puts the socket in a room once the room's channels are subscribed, so that anything
//! published after the `ok` reaches it. In a room with history the join first sends what the
//! client missed after its `since` ([`crate::history::replay`]); with `latest: true` it sends the
//! latest value of every key of the room before anything live (but where it recovered: the
//! replay has what the client missed), and no key goes backwards across the switch to live;
//! `presence: true` starts the room's presence events.

use std::sync::Arc;

use super::{may_join, ok, unavailable, Answer, Membership};
use crate::{
    bus::BusError,
    close::ErrorCode,
    fanout::{
        rate::Rate,
        writer::{Floors, Outbound},
    },
    frame::FrameError,
    history::{
        pos::{Keep, Pos},
        replay::{replay, Replayed},
    },
    hub::Joining,
    latest, metrics as m,
    node::Node,
    topic::Topic,
    wire::{latest_frame, Positions, Reply},
};

/// A `join` as the client sent it.
pub struct Join {
    pub id: Option<i64>,
    pub room: String,
    pub since: Option<Vec<Pos>>,
    pub presence: bool,
    pub latest: bool,
    pub max_rate: Option<u32>,
    pub delta: bool,
}

pub async fn run(join: Join, node: &Node, membership: &mut Membership, out: &Outbound) -> Answer {
    let Join {
        id,
        room,
        since,
        presence,
        latest,
        max_rate,
        delta,
    } = join;
    let room: Arc<str> = room.into();
    if membership.is_in(&room) {
        // Joined already: asking for presence now starts the events; asking for deltas starts
        // the socket's values over, so that a client whose delta did not apply gets whole ones.
        if presence {
            membership.watch(&room, out);
        }
        if delta {
            node.hub().restart_values(&Topic::Room(room), membership.id());
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
    let keep = node.config().keep(&room);
    let answer = match keep {
        None if !latest && max_rate.is_none() => {
            plain(node, membership, id, room.clone(), since.is_some(), delta).await
        }
        _ => {
            let asked = Asked {
                since,
                latest,
                max_rate,
                delta,
            };
            held(node, membership, out, id, room.clone(), keep, asked).await
        }
    };
    if presence && answer.is_ok() {
        membership.watch(&room, out);
    }
    answer
}

/// Joins a room without history; a client that asked to resume is told nothing was recovered.
async fn plain(
    node: &Node,
    membership: &mut Membership,
    id: Option<i64>,
    room: Arc<str>,
    resume: bool,
    delta: bool,
) -> Answer {
    let joining = Joining { hold: false, delta };
    node.hub()
        .join_with(
            Topic::Room(room.clone()),
            membership.id(),
            node.config().join_timeout,
            joining,
        )
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

/// What a held join asks for besides the room.
struct Asked {
    since: Option<Vec<Pos>>,
    latest: bool,
    max_rate: Option<u32>,
    delta: bool,
}

/// Joins holding live frames back while the socket is sent first what it asked for: in a room
/// with history, what it missed after `since` when every shard still has all of it; with `latest`,
/// the latest value of every key (unless the replay recovered everything). Then it answers (with
/// where each shard stands, in a room with history) and goes live, without a gap, a duplicate, or
/// a key going backwards, paced by `max_rate` where it asked for one.
async fn held(
    node: &Node,
    membership: &mut Membership,
    out: &Outbound,
    id: Option<i64>,
    room: Arc<str>,
    keep: Option<Keep>,
    asked: Asked,
) -> Answer {
    let Asked {
        since,
        latest,
        max_rate,
        delta,
    } = asked;
    let topic = Topic::Room(room.clone());
    let joining = Joining { hold: true, delta };
    node.hub()
        .join_with(topic.clone(), membership.id(), node.config().join_timeout, joining)
        .await
        .map_err(|e| unavailable(id, &e))?;
    membership.entered(room.clone());
    let sent = async {
        let replayed = match keep {
            Some(keep) => Some(replay(node, out, &room, keep, since.clone()).await?),
            None => None,
        };
        let floors = match replayed.as_ref().and_then(|r| r.recovered) {
            Some(true) => None,
            _ if latest => Some(send_latest(node, out, &room).await?),
            _ => None,
        };
        Ok::<_, BusError>((replayed, floors))
    };
    let (replayed, floors) = match sent.await {
        Ok(sent) => sent,
        Err(e) => {
            membership.leave(&room);
            return Err(unavailable(id, &e));
        }
    };
    let rate = max_rate.map(|n| {
        let out = out.clone();
        Rate::start(n, Box::new(move |frame| out.send(frame)))
    });
    node.hub().set_keys(&topic, membership.id(), floors, rate);
    let heads = replayed.as_ref().map_or_else(Vec::new, |r| r.heads.clone());
    node.hub().seed(&topic, &heads);
    if id.is_some() {
        let reply = Reply {
            pos: replayed
                .as_ref()
                .map(|r| Positions::Each(r.heads.iter().map(Pos::to_string).collect())),
            recovered: match replayed {
                Some(Replayed { recovered, .. }) => recovered,
                // Nothing to resume from: the room keeps no history.
                None => since.is_some().then_some(false),
            },
            ..Reply::op("ok", id)
        };
        out.send(reply.encode(out.encoding()));
    }
    if keep.is_none() && since.is_some() {
        m::recovery(false);
    }
    node.hub().release(&topic, membership.id(), heads);
    Ok(None)
}

/// Sends the socket the latest value of every key of `room`, marked `latest`, as it drains; the
/// floors that keep each key from going backwards after them.
async fn send_latest(node: &Node, out: &Outbound, room: &str) -> Result<Floors, BusError> {
    let values = latest::room::read(node, room).await?;
    let mut floors = Vec::with_capacity(values.len());
    let mut sent = 0;
    for (env, shard) in &values {
        let Ok(frame) = latest_frame(out.encoding(), env, *shard) else {
            continue;
        };
        if !out.send_draining(frame).await {
            break;
        }
        sent += 1;
        if let Some(key) = &env.key {
            floors.push((key.as_str().into(), env.key_seq.unwrap_or(0)));
        }
    }
    m::latest_sent(sent);
    Ok(Floors::new(floors))
}
