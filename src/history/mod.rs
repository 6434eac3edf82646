//! History: everything about rooms that keep their messages, in one place.
//!
//! - [`pos`]: where a message stands in its channel's history ([`pos::Pos`]), how much is kept
//!   ([`pos::Keep`]), what a read finds, and the store's key names. The lowest module of the
//!   crate: the envelope and the bus use it, it uses nothing of the node.
//! - [`reads`]: the store's reads for joins and the `history` command, shared between joins.
//! - [`heads`]: where each shard stands on this node.
//! - [`gaps`]: the node's own gaps, read back and delivered in order.
//! - [`replay`]: a join that sends the client what it missed, then goes live without a gap or
//!   a duplicate.
//!
//! Appending is one step with publishing, on the owning master (a script, or the embedded bus's
//! lock): that is the bus's ([`crate::bus`]).

pub mod gaps;
pub mod heads;
pub mod pos;
pub mod reads;
pub mod replay;
