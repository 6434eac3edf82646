//! A join that replays history. The socket has joined holding its live frames back
//! ([`crate::hub::Hub::join_with`]); this reads each shard's history (a read shared with other
//! joins, [`super::reads`]) and sends everything after the client's `since` first. The join then
//! answers `ok` with where each shard now stands and lets go of what was held that is newer
//! ([`crate::hub::Hub::release`]): no gap and no duplicate across the switch to live.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;

use super::{
    pos::{Keep, Pos},
    reads::Shared,
};
use crate::{bus::BusError, fanout::writer::Outbound, metrics as m, node::Node};

/// What a replay found: where each shard stands, and whether a client that asked to resume
/// (`since`) got everything it missed.
pub struct Replayed {
    pub heads: Vec<Pos>,
    pub recovered: Option<bool>,
}

/// Sends `out` what it missed of `room` after `since` (one position per shard) when every shard
/// still has all of it; returns where each shard stands.
pub async fn replay(
    node: &Node,
    out: &Outbound,
    room: &str,
    keep: Keep,
    since: Option<Vec<Pos>>,
) -> Result<Replayed, BusError> {
    let shards = node.naming().shards(room) as usize;
    let asked = since.is_some();
    // A list for another shard count (the room was resharded) cannot be resumed from.
    let since = since.filter(|s| s.len() == shards);
    let max = node.config().recover_max;
    let reads = join_all((0..shards).map(|i| {
        let channel = node.naming().room_channel(room, i as u32);
        // From the client's own message on (to check it is still the one it had), no further
        // back than a replay may go.
        let (after, cap) = match &since {
            Some(s) => (s[i].n.saturating_sub(1), max.saturating_add(1)),
            None => (u64::MAX, 0),
        };
        async move { node.history().read(&channel, i as u32, after, cap, keep).await }
    }))
    .await;
    let reads: Vec<Arc<Shared>> = reads.into_iter().collect::<Result<_, _>>()?;
    let replay: Option<Vec<Vec<Bytes>>> = since.as_ref().and_then(|since| {
        reads
            .iter()
            .zip(since)
            .map(|(read, pos)| read.frames_after(*pos, out.encoding()).filter(|f| f.len() <= max))
            .collect()
    });
    let recovered = replay.is_some();
    if let Some(replay) = replay {
        let mut sent = 0;
        for frame in replay.into_iter().flatten() {
            if !out.send_draining(frame).await {
                break;
            }
            sent += 1;
        }
        m::replayed(sent);
    }
    if asked {
        m::recovery(recovered);
    }
    Ok(Replayed {
        heads: reads.iter().map(|r| r.slice.head).collect(),
        recovered: asked.then_some(recovered),
    })
}
