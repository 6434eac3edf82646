//! Latest values: the newest message of each key of a room, for a socket that joins now.
//!
//! A keyed message (`"key":"score"`) is the new value of one thing. Its channel is chosen by its
//! key ([`crate::bus::Naming::publish_channel`]), so every update of one key has one order on every
//! node, and the store publishing it keeps it as the key's latest value in the same step: in Redis,
//! the store script on the channel's master (`bus::redis::scripts`), embedded, under the bus's
//! lock. Beside each channel, in its slot:
//!
//! - `{<channel>}:latest`, a hash of key to the envelope as published (with its position where the
//!   room keeps history, and its update number);
//! - `{<channel>}:latest:at`, the keys by the time of their last update, so that a key not updated
//!   for `--latest-ttl` is forgotten (Redis 7.0 has no expiry per hash field);
//! - `{<channel>}:latest:n`, the channel's count of keyed updates: a message's **update number**
//!   (`key_seq` in the envelope), which orders a key's values whatever node or clock published
//!   them.
//!
//! All three expire `--latest-ttl` after the channel's last keyed message. A channel holds at most
//! `--max-keys-per-room` keys; a new key past it is refused before anything is written.
//!
//! A room's values are read shard by shard, all at once ([`room`]): what a join with `latest` sends
//! first, and what `GET /rooms/<room>/latest` answers.

pub mod room;

use std::time::Duration;

/// What a keyed message asks its channel to keep: it as `key`'s latest value, for `ttl`, where the
/// channel holds at most `max_keys` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub key: String,
    pub ttl: Duration,
    pub max_keys: u32,
}

/// The hash of a channel's latest values: in the channel's slot.
pub fn values_key(channel: &str) -> String {
    format!("{{{channel}}}:latest")
}

/// The keys of a channel by the time of their last update: in the channel's slot too.
pub fn times_key(channel: &str) -> String {
    format!("{{{channel}}}:latest:at")
}

/// The channel's count of keyed updates: in the channel's slot too.
pub fn seq_key(channel: &str) -> String {
    format!("{{{channel}}}:latest:n")
}

/// The bytes of `key` packed as a MessagePack str, as the envelope holds it: the store script cuts
/// the envelope there.
pub fn packed_len(key: &str) -> usize {
    let n = key.len();
    n + match n {
        0..=31 => 1,
        32..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_to_the_channels_slot() {
        let ch = "ws:room:match:shard2";
        for key in [values_key(ch), times_key(ch), seq_key(ch)] {
            assert_eq!(
                fred::util::redis_keyslot(key.as_bytes()),
                fred::util::redis_keyslot(ch.as_bytes())
            );
        }
    }

    #[test]
    fn the_packed_length_is_what_the_envelope_holds() {
        for n in [1, 31, 32, 255, 256, 1000] {
            let key = "k".repeat(n);
            let mut out = Vec::new();
            rmp::encode::write_str(&mut out, &key).unwrap();
            assert_eq!(packed_len(&key), out.len(), "{n}");
        }
    }
}
