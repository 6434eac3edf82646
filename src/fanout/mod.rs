//! The way out: everything between a message the bus hands over and the bytes on a socket, and
//! the one route every other frame the node sends takes too.
//!
//! - [`worker`]: the delivery workers: the bus's sink, decoding once per node, one loop that
//!   records messages for the lanes and writes its lanes when its schedule says.
//! - [`lanes`]: a message's frames built once per encoding ([`lanes::frames_of`]), recorded per
//!   topic and shared by every socket; which lane each socket is in.
//! - [`form`]: the forms of a message's frames: per encoding, compressed or not, keyed values
//!   whole or as deltas.
//! - [`context`]: compression with context, once per message: a room's last compressed messages,
//!   and what each socket's inflater read last of them.
//! - [`delta`]: shared deltas per key: the last value per key a topic framed, and the values each
//!   socket has.
//! - [`keyed`]: a frame's key, shared by its copies on every lane.
//! - [`schedule`]: when a worker writes its lanes: adaptive ([`schedule::Gather`]) or on a fixed
//!   grid ([`schedule::Grid`]).
//! - [`writer`]: the only caller of a gate's writes: a lane's turn, held frames let go, and
//!   [`writer::Outbound`], the entry point for replies, presence events, pings, replays, drain
//!   notices and closes.
//! - [`gate`]: one socket's byte budget and non-blocking writes, and conflation for a socket that
//!   falls behind.
//! - [`rate`]: `max_rate`, at most N values per second of each key to one socket.
//!
//! Who is in which topic is the hub's ([`crate::hub`]): a worker asks it to record a message
//! and to write a lane, and the hub hands the lane's members to the writer.

pub mod context;
pub mod delta;
pub mod form;
pub mod gate;
pub mod keyed;
pub mod lanes;
pub mod rate;
pub mod schedule;
pub mod worker;
pub mod writer;
