//! A room's latest values: every shard's, read at once (one round trip per shard, concurrently).

use futures_util::future::join_all;

use crate::{bus::BusError, envelope::Envelope, node::Node};

/// The latest value of every key of `room`, each with its shard, oldest update first within a
/// shard. Values that do not decode are left out (and logged): they cannot be framed.
pub async fn read(node: &Node, room: &str) -> Result<Vec<(Envelope, u32)>, BusError> {
    let shards = node.naming().shards(room);
    let ttl = node.config().latest_ttl;
    let reads = join_all((0..shards).map(|shard| async move {
        let channel = node.naming().room_channel(room, shard);
        node.bus().latest(&channel, ttl).await.map(|values| (shard, values))
    }))
    .await;
    let mut out = Vec::new();
    for read in reads {
        let (shard, values) = read?;
        let mut decoded: Vec<(Envelope, u32)> = values
            .iter()
            .filter_map(|raw| match Envelope::decode(raw) {
                Ok(env) if env.key.is_some() => Some((env, shard)),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(room, shard, error = %e, "a latest value does not decode");
                    None
                }
            })
            .collect();
        decoded.sort_by_key(|(env, _)| env.key_seq);
        out.extend(decoded);
    }
    Ok(out)
}
