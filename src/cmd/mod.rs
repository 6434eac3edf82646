//! The client's commands, one file each, as the session hands them over once read and
//! rate-limited: [`join`], [`leave`], [`history`], [`presence`], [`ping`]. Each checks what its
//! frame asks against the socket's rights and runs it. A command's answer is an `ok` (or nothing,
//! when the command sent its own frames), or the [`FrameError`] the client gets as `error`.
//!
//! `pub` and `dm` are publishing's ([`crate::publish`]): they go through the connection's outbox
//! so a sender's messages keep their order on the bus.

pub mod history;
pub mod join;
pub mod leave;
pub mod membership;
pub mod ping;
pub mod presence;

pub use membership::Membership;

use crate::{
    close::ErrorCode,
    fanout::writer::Outbound,
    frame::{Command, FrameError, Request},
    node::Node,
    wire::Reply,
};

/// What a command answers: `Ok(None)` means nothing (more) to answer.
pub type Answer = Result<Option<Reply<'static>>, FrameError>;

/// Runs one command that is not a publish.
pub async fn run(request: Request, node: &Node, membership: &mut Membership, out: &Outbound) -> Answer {
    let id = request.id;
    match request.command {
        Command::Ping => Ok(Some(ping::run(id))),
        Command::Join {
            room,
            since,
            presence,
            latest,
            max_rate,
            delta,
        } => {
            named(node, id, &room, ErrorCode::BadRoom)?;
            let join = join::Join {
                id,
                room,
                since,
                presence,
                latest,
                max_rate,
                delta,
            };
            join::run(join, node, membership, out).await
        }
        Command::History { room, limit } => {
            named(node, id, &room, ErrorCode::BadRoom)?;
            history::run(id, room, limit, node, membership, out).await
        }
        Command::Presence { room } => {
            named(node, id, &room, ErrorCode::BadRoom)?;
            presence::run(id, room, node, membership, out).await
        }
        Command::Leave { room } => leave::run(id, room, membership),
        // Taken out by the session and sent through the connection's outbox.
        Command::Pub { .. } | Command::Dm { .. } => unreachable!("publishes are taken out before run"),
    }
}

/// `ok` answers only commands that carried an id.
fn ok(id: Option<i64>) -> Answer {
    Ok(id.map(|_| Reply::op("ok", id)))
}

/// The bus or a subscription failed: the client may try again.
fn unavailable(id: Option<i64>, e: &dyn std::fmt::Display) -> FrameError {
    FrameError::new(id, ErrorCode::Unavailable, e.to_string())
}

/// A room or user name the command names, checked against the node's name rules.
pub fn named(node: &Node, id: Option<i64>, name: &str, code: ErrorCode) -> Result<(), FrameError> {
    node.config()
        .names
        .check(name)
        .map_err(|e| FrameError::new(id, code, e.to_string()))
}

fn may_join(membership: &Membership, room: &str, id: Option<i64>) -> Result<(), FrameError> {
    if membership.grants().may_join(room) {
        return Ok(());
    }
    Err(FrameError::new(
        id,
        ErrorCode::Forbidden,
        format!("the token does not allow room {room:?}"),
    ))
}
