//! The route in: a message from a client (`pub`, `dm`) or from a backend (`POST /publish`) is
//! wrapped in one envelope and handed to the bus on the channel its topic and sender choose. This
//! node does not deliver it directly: every node, this one included, delivers it to its local
//! members from what the bus hands back ([`crate::fanout::worker`]), so one order holds everywhere.
//!
//! A client's publishes are this module's from the session on: [`take`] checks a `pub` or `dm`
//! and wraps it, the connection's [`outbox`] sends it in order and [`published`] answers it.

pub mod outbox;

use bytes::Bytes;

use crate::{
    auth::Grants,
    bus::BusError,
    close::ErrorCode,
    envelope::{self, Envelope, Kind},
    frame::{Command, Data, FrameError, Request},
    history::pos::{Keep, Pos},
    metrics as m,
    node::Node,
    topic::Topic,
    wire::{Positions, Reply},
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

/// A `pub` or `dm` checked and wrapped for the bus; [`outbox`] sends it.
pub struct Publish {
    pub id: Option<i64>,
    pub direct: bool,
    pub out: Outgoing,
}

/// Takes a `pub` or `dm` out of the commands: its names and the right to publish checked, wrapped
/// in its envelope. Any other command comes back as it was.
pub fn take(request: Request, node: &Node, grants: &Grants) -> Result<Result<Publish, FrameError>, Request> {
    let id = request.id;
    let (kind, target, data, code) = match request.command {
        Command::Pub { room, data } => (Kind::Room, room, data, ErrorCode::BadRoom),
        Command::Dm { to, data } => (Kind::Direct, to, data, ErrorCode::BadUser),
        command => return Err(Request { id, command }),
    };
    if let Err(e) = node.config().names.check(&target) {
        return Ok(Err(FrameError::new(id, code, e.to_string())));
    }
    if !grants.may_publish() {
        return Ok(Err(FrameError::new(
            id,
            ErrorCode::Forbidden,
            "the token does not allow publishing",
        )));
    }
    Ok(Ok(Publish {
        id,
        direct: kind == Kind::Direct,
        out: wrap(node, kind, target, &grants.user, data),
    }))
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
