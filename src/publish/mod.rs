//! The route in: a message from a client (`pub`, `dm`) or from a backend (`POST /publish`) is
//! wrapped in one envelope and handed to the bus on the channel its topic and sender choose. This
//! node does not deliver it directly: every node, this one included, delivers it to its local
//! members from what the bus hands back ([`crate::fanout::worker`]), so one order holds everywhere.
//!
//! A client's publishes are this module's from the session on: [`take`] checks a `pub` or `dm`
//! and wraps it, the connection's [`outbox`] sends it in order and [`published`] answers it.

pub mod outbox;

use std::{future::Future, pin::Pin};

use bytes::Bytes;

use crate::{
    auth::Grants,
    bus::{BusError, Store},
    close::ErrorCode,
    encoding::{msgpack_to_json, Encoding},
    envelope::{self, Envelope, Kind},
    frame::{data_depth_ok, Command, Data, FrameError, Request},
    history::pos::Pos,
    hooks::publish::Moderated,
    latest::Latest,
    metrics as m,
    node::Node,
    topic::Topic,
    wire::{Positions, Reply},
};

/// A message wrapped for the bus: its channel, its envelope, and what its channel keeps of it.
pub struct Outgoing {
    pub channel: String,
    pub envelope: Bytes,
    pub store: Store,
}

/// Wraps `data` from `from` to `target` (a room, or a user's inbox for direct messages) in its
/// envelope, on the channel its topic and sender (or key) choose. A keyed message is kept as its
/// key's latest value.
pub fn wrap(node: &Node, kind: Kind, target: String, from: &str, data: Data, key: Option<String>) -> Outgoing {
    let config = node.config();
    let channel = node
        .naming()
        .publish_channel(&Topic::of(kind, &target), from, key.as_deref());
    let store = match kind {
        Kind::Room => Store {
            keep: config.keep(&target),
            latest: key.clone().map(|key| Latest {
                key,
                ttl: config.latest_ttl,
                max_keys: config.max_keys_per_room,
            }),
        },
        Kind::Direct | Kind::Disconnect => Store::default(),
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
        key,
        key_seq: None,
    };
    Outgoing {
        channel,
        envelope: env.encode(),
        store,
    }
}

/// Publishes `data` from `from` to `target`, as `key`'s new value where it has one. In a room with
/// history the message is appended in the same step: its position is returned.
pub async fn publish(
    node: &Node,
    kind: Kind,
    target: String,
    from: &str,
    data: Data,
    key: Option<String>,
) -> Result<Option<Pos>, BusError> {
    let out = wrap(node, kind, target, from, data, key);
    node.bus().publish(out.channel, out.envelope, out.store).await
}

/// A `pub` or `dm` checked and wrapped for the bus; [`outbox`] sends it.
pub struct Publish {
    pub id: Option<i64>,
    pub direct: bool,
    pub out: Outgoing,
    /// The publish hook's answer to come, for a room that has one: the publish waits for it.
    pub moderation: Option<Moderation>,
}

/// What the publish hook makes of a message: `None` to send it as it is, `Some` to send this
/// instead, or the publisher's error.
pub type Moderation = Pin<Box<dyn Future<Output = Result<Option<Outgoing>, FrameError>> + Send>>;

/// Takes a `pub` or `dm` out of the commands: its names and the right to publish checked, wrapped
/// in its envelope. Any other command comes back as it was.
pub fn take(request: Request, node: &Node, grants: &Grants) -> Result<Result<Publish, FrameError>, Request> {
    let id = request.id;
    let (kind, target, data, code, key) = match request.command {
        Command::Pub { room, data, key } => (Kind::Room, room, data, ErrorCode::BadRoom, key),
        Command::Dm { to, data } => (Kind::Direct, to, data, ErrorCode::BadUser, None),
        command => return Err(Request { id, command }),
    };
    if let Err(e) = node.config().names.check(&target) {
        return Ok(Err(FrameError::new(id, code, e.to_string())));
    }
    if let Some(Err(e)) = key.as_deref().map(|k| node.config().names.check(k)) {
        return Ok(Err(FrameError::new(id, ErrorCode::BadField, format!("`key` {e}"))));
    }
    if !grants.may_publish() {
        return Ok(Err(FrameError::new(
            id,
            ErrorCode::Forbidden,
            "the token does not allow publishing",
        )));
    }
    let moderation = match kind {
        Kind::Room if node.hooks().moderates(&target) => match moderation(node, id, &grants.user, &target, &data, &key)
        {
            Ok(m) => Some(m),
            Err(e) => return Ok(Err(e)),
        },
        _ => None,
    };
    Ok(Ok(Publish {
        id,
        direct: kind == Kind::Direct,
        out: wrap(node, kind, target, &grants.user, data, key),
        moderation,
    }))
}

/// The publish hook's answer to `data` from `user` to `room`, as the envelope to send instead or
/// the publisher's error. Started when first polled: the outbox polls every publish it holds, so
/// the hook's requests go out at once, one per message, and their answers are applied in order.
fn moderation(
    node: &Node,
    id: Option<i64>,
    user: &str,
    room: &str,
    data: &Data,
    key: &Option<String>,
) -> Result<Moderation, FrameError> {
    let json = match data.format {
        Encoding::Json => data.bytes.clone(),
        Encoding::MsgPack => msgpack_to_json(&data.bytes)
            .map(Bytes::from)
            .map_err(|e| FrameError::new(id, ErrorCode::BadData, e.to_string()))?,
    };
    let (node, user, room, key) = (node.clone(), user.to_owned(), room.to_owned(), key.clone());
    Ok(Box::pin(async move {
        let raw: &serde_json::value::RawValue =
            serde_json::from_slice(&json).map_err(|e| FrameError::new(id, ErrorCode::BadData, e.to_string()))?;
        match node.hooks().publish(&user, &room, raw, key.as_deref()).await {
            Ok(Moderated::AsIs) => Ok(None),
            Ok(Moderated::Replaced(bytes)) => {
                replaced(&node, id, &bytes)?;
                let data = Data {
                    format: Encoding::Json,
                    bytes,
                };
                Ok(Some(wrap(&node, Kind::Room, room, &user, data, key)))
            }
            Err(refusal) => Err(refusal.frame_error(id, "publish")),
        }
    }))
}

/// Checks a message the publish hook sent instead, as a publisher's own would be: no larger than
/// `--max-frame-bytes`, no deeper than `--max-data-depth`.
pub fn replaced(node: &Node, id: Option<i64>, data: &[u8]) -> Result<(), FrameError> {
    let config = node.config();
    let (most, depth) = (config.max_frame_bytes, config.max_data_depth);
    let wrong = if data.len() > most {
        format!("over {most} bytes")
    } else if !data_depth_ok(Encoding::Json, data, depth) {
        format!("nested deeper than {depth} levels")
    } else {
        return Ok(());
    };
    Err(FrameError::new(
        id,
        ErrorCode::Unavailable,
        format!("publish hook: the data it sent instead is {wrong}"),
    ))
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
        e @ BusError::TooManyKeys => FrameError::new(id, ErrorCode::TooManyKeys, e.to_string()),
        e => FrameError::new(id, ErrorCode::Unavailable, e.to_string()),
    })?;
    m::published("ws");
    Ok(id.map(|_| Reply {
        pos: pos.map(|p| Positions::One(p.to_string())),
        ..Reply::op("ok", id)
    }))
}
