//! A frame's key: what a keyed message's frames carry beside their bytes, made once per message and
//! shared by its frames on every lane ([`super::lanes`]). The writer reads it for a socket that must
//! not get a key's values out of order (after a join with `latest`) or is paced (`max_rate`,
//! [`super::rate`]); the gate for a socket that conflates ([`super::gate`]).

use std::sync::Arc;

/// What a keyed message's frames are the value of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    pub room: Arc<str>,
    pub key: Box<str>,
    /// The key's update number (0 where the store gave none).
    pub seq: u64,
    /// The room is conflated for a socket that falls behind (`--conflate`).
    pub conflate: bool,
    /// On a delta frame's key: the update number of the value the delta turns into this one. A
    /// conflating socket never has a delta replace a queued value (its base would be lost).
    pub delta_of: Option<u64>,
}

/// A frame's key, where it has one.
pub type Tag = Option<Arc<Keyed>>;
