//! The route in: a message from a client (`pub`, `dm`) or from a backend (`POST /publish`) is
//! wrapped in one envelope and handed to the bus on the channel its topic and sender choose. This
//! node does not deliver it directly: every node, this one included, delivers it to its local
//! members from what the bus hands back ([`crate::deliver`]), so one order holds everywhere.

use crate::{
    bus::BusError,
    envelope::{self, Envelope, Kind},
    frame::Data,
    node::Node,
    topic::Topic,
};

/// Publishes `data` from `from` to `target` (a room, or a user's inbox for direct messages).
pub async fn publish(node: &Node, kind: Kind, target: String, from: &str, data: Data) -> Result<(), BusError> {
    let channel = node.naming().publish_channel(&Topic::of(kind, &target), from);
    let env = Envelope {
        kind,
        origin: node.config().node_id.clone(),
        target,
        from: from.to_owned(),
        ts_us: envelope::now_us(),
        format: data.format,
        data: data.bytes,
    };
    node.bus().publish(channel, env.encode()).await
}
