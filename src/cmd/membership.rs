//! A registered socket's place in the hub and in presence, and its rights: what every command of
//! the socket reads and changes. It takes the socket out of every topic when dropped, even if the
//! session panicked or its upgrade never completed.

use std::{collections::HashSet, sync::Arc};

use crate::{
    auth::Grants,
    config::Config,
    fanout::writer::Outbound,
    hub::{Hub, SessionId},
    node::Node,
    presence::Presence,
    topic::Topic,
};

pub struct Membership {
    hub: Hub,
    presence: Option<Arc<Presence>>,
    id: SessionId,
    grants: Grants,
    rooms: HashSet<Arc<str>>,
}

impl Membership {
    /// Counts the socket as a connection of its user.
    pub fn new(node: &Node, id: SessionId, grants: Grants) -> Membership {
        let presence = node.presence().cloned();
        if let Some(p) = &presence {
            p.connected(&grants.user);
        }
        Membership {
            hub: node.hub().clone(),
            presence,
            id,
            grants,
            rooms: HashSet::new(),
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// Whether the socket is in `room`.
    pub fn is_in(&self, room: &str) -> bool {
        self.rooms.contains(room)
    }

    /// Rooms the socket is in.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Counts the socket in a room it joined.
    pub fn entered(&mut self, room: Arc<str>) {
        if let Some(p) = &self.presence {
            p.joined(&room, &self.grants.user);
        }
        self.rooms.insert(room);
    }

    /// Sends the socket a joined room's presence events.
    pub fn watch(&self, room: &Arc<str>, out: &Outbound) {
        if let Some(p) = &self.presence {
            p.watch(room, self.id, out.clone());
        }
    }

    /// Takes the socket out of a room: its presence and its topic. False when it was not in it.
    pub fn leave(&mut self, room: &str) -> bool {
        let Some(room) = self.rooms.take(room) else {
            return false;
        };
        self.exited(&room);
        self.hub.leave(&Topic::Room(room), self.id);
        true
    }

    /// Takes the socket out of a room's presence.
    fn exited(&self, room: &str) {
        if let Some(p) = &self.presence {
            p.left(room, &self.grants.user);
            p.unwatch(room, self.id);
        }
    }

    /// The token's expiry, seconds since the Unix epoch.
    pub fn expires(&self) -> Option<u64> {
        self.grants.expires
    }

    /// Commands a second and the burst this connection may send: its token's `limits`, else the
    /// node's `--command-rate` and `--command-burst`.
    pub fn command_limits(&self, config: &Config) -> (u32, u32) {
        self.grants
            .limits
            .map_or((config.command_rate, config.command_burst), |l| (l.rate, l.burst))
    }

    pub fn user_topic(&self) -> Topic {
        Topic::User(self.grants.user.clone())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        for room in &self.rooms {
            self.exited(room);
        }
        if let Some(p) = &self.presence {
            p.disconnected(&self.grants.user);
        }
        let topics = self
            .rooms
            .drain()
            .map(Topic::Room)
            .chain([Topic::User(self.grants.user.clone())]);
        self.hub.unregister(self.id, topics);
    }
}
