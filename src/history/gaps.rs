//! The node's own gaps. In a room with history every message is numbered per shard. A worker
//! that sees a shard's number skip (the node was resubscribing after a reconnect, a failover or a
//! slot move) reads what it missed from the shard's history and delivers it first, once and in
//! order, then the message that showed the gap ([`Gaps::in_order`]). One that sees a number again
//! drops it. Where each shard stands on this node is [`super::heads`].

use std::sync::Arc;

use bytes::Bytes;

use super::{heads::Advance, pos::Pos};
use crate::{bus::Bus, config::Config, envelope::Envelope, hub::Hub, metrics as m, topic::Topic};

/// Reads back what the node missed of a shard with history.
pub struct Gaps {
    bus: Arc<Bus>,
    config: Config,
}

impl Gaps {
    pub fn new(bus: Arc<Bus>, config: Config) -> Gaps {
        Gaps { bus, config }
    }

    /// The messages of `channel` (shard `shard` of `room`) after `after` and before `upto`, in
    /// order, with their positions: what the store still has of them.
    async fn fill(&self, channel: &[u8], room: &str, shard: u32, after: Pos, upto: Pos) -> Vec<Envelope> {
        let (Some(keep), Ok(channel)) = (self.config.keep(room), std::str::from_utf8(channel)) else {
            return Vec::new();
        };
        let missing = upto.n - after.n - 1;
        // The newest messages after `after`: as many as a join may replay.
        let slice = match self.bus.read(channel, after.n, self.config.recover_max, keep).await {
            Ok(slice) if slice.head.epoch == after.epoch => slice,
            Ok(_) => return Vec::new(),
            Err(e) => {
                tracing::warn!(channel, shard, error = %e, "cannot read back what the node missed");
                return Vec::new();
            }
        };
        let filled: Vec<Envelope> = slice
            .entries
            .iter()
            .filter(|e| e.n > after.n && e.n < upto.n)
            .filter_map(|entry| {
                let mut env = Envelope::decode(&entry.envelope).ok()?;
                env.pos = Some(slice.pos(entry));
                Some(env)
            })
            .collect();
        m::gap_filled(filled.len(), missing as usize - filled.len().min(missing as usize));
        filled
    }
}

/// A decoded envelope, its channel and its shard.
pub type Decoded = (Bytes, Envelope, u32);

impl Gaps {
    /// Hands each envelope to `deliver` in order; one with a position goes after whatever its
    /// shard skipped (read back from history), and not at all when its shard had it already.
    pub async fn in_order(&self, hub: &Hub, decoded: &mut Vec<Decoded>, mut deliver: impl FnMut(&Envelope, u32)) {
        for (channel, env, shard) in decoded.drain(..) {
            let Some(pos) = env.pos else {
                deliver(&env, shard);
                continue;
            };
            let topic = Topic::of(env.kind, &env.target);
            match hub.advance(&topic, shard, pos) {
                Advance::Next => {}
                Advance::Stale => {
                    m::bus_dropped("duplicate", 1);
                    continue;
                }
                Advance::Gap(after) => {
                    // What history still has of the gap (its oldest may be trimmed): the shard's head
                    // moves past each, then to this message, so the next is not a gap again.
                    for missed in self.fill(&channel, &env.target, shard, after, pos).await {
                        if let Some(p) = missed.pos {
                            hub.skip_to(&topic, shard, p);
                        }
                        deliver(&missed, shard);
                    }
                    hub.skip_to(&topic, shard, pos);
                }
            }
            deliver(&env, shard);
            hub.settle(&topic);
        }
    }
}
