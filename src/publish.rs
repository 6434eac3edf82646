//! The route in: a message from a client (`pub`, `dm`) or from a backend (`POST /publish`) is
//! wrapped in one envelope and handed to the bus on the channel its topic and sender choose. This
//! node does not deliver it directly: every node, this one included, delivers it to its local
//! members from what the bus hands back ([`crate::deliver`]), so one order holds everywhere.

use bytes::Bytes;

use crate::{
    bus::{
        stream::{Keep, Pos},
        BusError,
    },
    envelope::{self, Envelope, Kind},
    frame::Data,
    node::Node,
    topic::Topic,
};

/// A message wrapped for the bus: its channel, its envelope, and how its room keeps history.
pub struct Outgoing {
    pub channel: String,
    pub envelope: Bytes,
    pub keep: Option<Keep>,
}

/// Wraps `data` from `from` to `target` (a room, or a user's inbox for direct messages) in its
/// envelope, on the channel its topic and sender choose.
pub fn wrap(node: &Node, kind: Kind, target: String, from: &str, data: Data) -> Outgoing {
    let channel = node.naming().publish_channel(&Topic::of(kind, &target), from);
    let keep = match kind {
        Kind::Room => node.config().keep(&target),
        Kind::Direct => None,
    };
    let env = Envelope {
        kind,
        origin: node.config().node_id.clone(),
        target,
        from: from.to_owned(),
        ts_us: envelope::now_us(),
        format: data.format,
        data: data.bytes,
        pos: None,
    };
    Outgoing {
        channel,
        envelope: env.encode(),
        keep,
    }
}

/// Publishes `data` from `from` to `target`. In a room with history the message is appended in
/// the same step: its position is returned.
pub async fn publish(node: &Node, kind: Kind, target: String, from: &str, data: Data) -> Result<Option<Pos>, BusError> {
    let out = wrap(node, kind, target, from, data);
    node.bus().publish(out.channel, out.envelope, out.keep).await
}
