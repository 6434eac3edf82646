//! `presence`: a room's count, and its users when the room is small enough to list them.

use super::{may_join, unavailable, Answer, Membership};
use crate::{close::ErrorCode, fanout::writer::Outbound, frame::FrameError, node::Node, presence::listed, wire::Reply};

pub async fn run(id: Option<i64>, room: String, node: &Node, membership: &Membership, out: &Outbound) -> Answer {
    may_join(membership, &room, id)?;
    let Some(presence) = node.presence() else {
        return Err(FrameError::new(
            id,
            ErrorCode::Unavailable,
            "presence is off on this node",
        ));
    };
    let total = presence.room(&room).await.map_err(|e| unavailable(id, &e))?;
    let reply = Reply {
        count: Some(total.count),
        users: listed(&total.users),
        ..Reply::op("ok", id)
    };
    out.send(reply.encode(out.encoding()));
    Ok(None)
}
