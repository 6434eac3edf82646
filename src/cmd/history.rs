//! `history`: a room's newest messages over all its shards, in one frame that may be larger than
//! the socket's budget (it goes out whole, once the socket's queue is empty).

use super::{may_join, unavailable, Answer, Membership};
use crate::{fanout::writer::Outbound, node::Node, wire::history_frame};

pub async fn run(
    id: Option<i64>,
    room: String,
    limit: usize,
    node: &Node,
    membership: &Membership,
    out: &Outbound,
) -> Answer {
    may_join(membership, &room, id)?;
    let msgs = match node.config().keep(&room) {
        Some(keep) => node
            .history()
            .newest(node.naming(), &room, limit, keep)
            .await
            .map_err(|e| unavailable(id, &e))?,
        None => Vec::new(),
    };
    out.send_whole(history_frame(out.encoding(), id, &msgs)).await;
    Ok(None)
}
