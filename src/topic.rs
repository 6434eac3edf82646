//! What a local socket can be in: a room, or the inbox of one user's sockets. Named here, below
//! the bus and the hub, because both speak of it: the bus names a topic's channels, the hub keeps
//! its members.

use std::sync::Arc;

use crate::envelope::Kind;

/// Something local sockets can be in: a room, or the inbox of one user's sockets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Room(Arc<str>),
    User(Arc<str>),
}

impl Topic {
    /// The topic an envelope of `kind` addressed to `target` belongs to.
    pub fn of(kind: Kind, target: &str) -> Topic {
        match kind {
            Kind::Room => Topic::Room(target.into()),
            Kind::Direct | Kind::Disconnect => Topic::User(target.into()),
        }
    }
}
