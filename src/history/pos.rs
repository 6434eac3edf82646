//! A channel's history as the bus keeps it: where a message stands in it ([`Pos`]), how much of it
//! is kept ([`Keep`]), what a read finds ([`Slice`]), and the names of its keys.
//!
//! Every history channel has a stream of its messages and a small hash beside it, both in the
//! channel's own hash slot (`{<channel>}:hist` and `{<channel>}:meta`: Redis hashes only what is
//! inside the braces, so they live on the channel's master), and there too the ids of its recent
//! appends (`{<channel>}:ids:<window>`), which make an append sent again happen once. The hash holds the stream's **epoch**
//! (made when the hash is, from the master's clock) and `n`, the number of the last message. A
//! message's position is `<epoch>:<n>`: numbers follow each other without a hole, so a reader
//! that finds `n + 1` after `n` knows it missed nothing, and one that finds another epoch knows the
//! stream it had read from is gone (expired, flushed, or lost in a failover).
//!
//! Appending and publishing are one step on the owning master (a script, or the embedded bus's
//! lock), and the position travels with the message: it is spliced into the envelope's bytes as a
//! ninth field (see [`crate::envelope`]), so every node sees the same position for the same message.

use std::{fmt, str::FromStr, time::Duration};

use bytes::Bytes;

/// How much of a channel's history is kept: at least `size` messages (Redis trims in whole blocks,
/// so a few more may stay), for `ttl` after the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub size: u32,
    pub ttl: Duration,
}

/// A stream entry's id as its master made it: milliseconds and a sequence number.
pub type EntryId = (u64, u64);

/// Where a message stands in its channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pos {
    pub epoch: u64,
    /// The message's number; 0 before the first message of the epoch.
    pub n: u64,
    /// The message's entry id; absent where no message is (or where it was not read).
    pub id: Option<EntryId>,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.n)?;
        match self.id {
            Some((ms, seq)) => write!(f, ":{ms}-{seq}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a position is EPOCH:N or EPOCH:N:MS-SEQ, whole numbers, as the node gave it")]
pub struct BadPos;

/// A whole number of at most 20 digits, nothing else.
fn digits(t: &str) -> Result<u64, BadPos> {
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadPos);
    }
    t.parse().map_err(|_| BadPos)
}

/// `MS-SEQ`, as Redis writes an entry id.
pub fn parse_entry_id(s: &str) -> Result<EntryId, BadPos> {
    let (ms, seq) = s.split_once('-').ok_or(BadPos)?;
    Ok((digits(ms)?, digits(seq)?))
}

impl FromStr for Pos {
    type Err = BadPos;

    fn from_str(s: &str) -> Result<Pos, BadPos> {
        let mut parts = s.splitn(3, ':');
        let epoch = digits(parts.next().ok_or(BadPos)?)?;
        let n = digits(parts.next().ok_or(BadPos)?)?;
        let id = parts.next().map(parse_entry_id).transpose()?;
        Ok(Pos { epoch, n, id })
    }
}

/// One message of a channel's history: its number, its entry id, and the envelope as published
/// (without its position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub n: u64,
    pub id: EntryId,
    pub envelope: Bytes,
}

/// What one read of a channel's history found: where it stands now, and its newest messages,
/// oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub head: Pos,
    pub entries: Vec<Entry>,
}

impl Slice {
    /// The position of an entry read.
    pub fn pos(&self, entry: &Entry) -> Pos {
        Pos {
            epoch: self.head.epoch,
            n: entry.n,
            id: Some(entry.id),
        }
    }

    /// The messages after `after` if the slice has every one of them: same epoch, the message at
    /// `after` still the one the reader had (when it says which), and nothing missing between it
    /// and the head. `None` when it cannot tell the whole story.
    pub fn after(&self, after: Pos) -> Option<&[Entry]> {
        if after.epoch != self.head.epoch || after.n > self.head.n {
            return None;
        }
        let from = self.entries.partition_point(|e| e.n < after.n);
        let mut rest = &self.entries[from..];
        if let Some(id) = after.id {
            // A number given again after a failover lost the newest messages is not the reader's.
            match rest.first() {
                Some(e) if e.n == after.n && e.id == id => rest = &rest[1..],
                _ => return None,
            }
        } else if rest.first().is_some_and(|e| e.n == after.n) {
            rest = &rest[1..];
        }
        let complete = match rest.first() {
            Some(first) => first.n == after.n + 1 && rest.len() as u64 == self.head.n - after.n,
            None => after.n == self.head.n,
        };
        complete.then_some(rest)
    }
}

/// The stream of a channel's messages: in the channel's slot.
pub fn stream_key(channel: &str) -> String {
    format!("{{{channel}}}:hist")
}

/// The hash beside it (epoch and last number): in the channel's slot too.
pub fn meta_key(channel: &str) -> String {
    format!("{{{channel}}}:meta")
}

/// The ids of the appends made in one window of time, with their positions, so that an append
/// sent again is not appended twice (see `bus::redis::scripts`): in the channel's slot too.
pub fn ids_key(channel: &str, window: u64) -> String {
    format!("{{{channel}}}:ids:{window}")
}

/// An envelope as published (a MessagePack array of 8) with its position added as a ninth field,
/// spliced in without re-encoding: what the Redis script does with `cmsgpack`, for the embedded
/// bus. `None` when the envelope is not an array of 8.
pub fn with_pos(envelope: &[u8], pos: Pos) -> Option<Bytes> {
    const FIXARRAY_8: u8 = 0x98;
    const FIXARRAY_9: u8 = 0x99;
    if envelope.first() != Some(&FIXARRAY_8) {
        return None;
    }
    let pos = pos.to_string();
    let mut out = Vec::with_capacity(envelope.len() + 2 + pos.len());
    out.push(FIXARRAY_9);
    out.extend_from_slice(&envelope[1..]);
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_str(&mut out, &pos);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_back_and_refuse_anything_else() {
        let p = Pos {
            epoch: 1_733_137_000_123_456,
            n: 42,
            id: Some((1_733_137_001_234, 7)),
        };
        assert_eq!(p.to_string(), "1733137000123456:42:1733137001234-7");
        assert_eq!(p.to_string().parse::<Pos>(), Ok(p));
        let bare = Pos { id: None, ..p };
        assert_eq!(bare.to_string().parse::<Pos>(), Ok(bare));
        for bad in [
            "",
            ":",
            "1:",
            ":1",
            "1:2:3",
            "1:2:3-",
            "1:2:-3",
            "1:2:3-4:5",
            "a:1",
            "1:-1",
            "1:+1",
            " 1:1",
            "99999999999999999999999:1",
        ] {
            assert_eq!(bad.parse::<Pos>(), Err(BadPos), "{bad:?}");
        }
    }

    #[test]
    fn a_slice_tells_the_whole_story_after_a_position_or_nothing() {
        let e = |n: u64| Entry {
            n,
            id: (100 + n, 0),
            envelope: Bytes::from(vec![n as u8]),
        };
        let at = |n| Pos {
            epoch: 7,
            n,
            id: Some((100 + n, 0)),
        };
        let slice = Slice {
            head: at(5),
            entries: vec![e(2), e(3), e(4), e(5)],
        };
        assert_eq!(slice.after(at(2)).unwrap(), &[e(3), e(4), e(5)]);
        assert_eq!(slice.after(at(4)).unwrap(), &[e(5)]);
        assert_eq!(slice.after(at(5)).unwrap(), &[] as &[Entry]);
        assert_eq!(slice.after(Pos { id: None, ..at(3) }).unwrap(), &[e(4), e(5)]);
        assert!(slice.after(at(1)).is_none(), "message 1 is not in the slice");
        assert!(slice.after(at(6)).is_none(), "ahead of the stream");
        assert!(slice.after(Pos { epoch: 8, ..at(4) }).is_none(), "another epoch");
        assert!(
            slice
                .after(Pos {
                    id: Some((999, 0)),
                    ..at(3)
                })
                .is_none(),
            "number 3 is another message now"
        );
        // A hole inside (a stream deleted and started again under the same count).
        let holed = Slice {
            head: at(5),
            entries: vec![e(2), e(3), e(5)],
        };
        assert!(holed.after(at(2)).is_none());
    }

    #[test]
    fn keys_hash_to_the_channels_slot() {
        let ch = "ws:room:lobby:shard3";
        for key in [stream_key(ch), meta_key(ch), ids_key(ch, 123_456)] {
            assert_eq!(
                fred::util::redis_keyslot(key.as_bytes()),
                fred::util::redis_keyslot(ch.as_bytes())
            );
        }
    }

    #[test]
    fn the_position_is_spliced_as_a_ninth_field() {
        let env = crate::envelope::Envelope::to_room("r", Bytes::from_static(b"1"));
        let pos = Pos {
            epoch: 9,
            n: 3,
            id: Some((1, 0)),
        };
        let spliced = with_pos(&env.encode(), pos).unwrap();
        let back = crate::envelope::Envelope::decode(&spliced).unwrap();
        assert_eq!(back.pos, Some(pos));
        assert_eq!(back.data, env.data);
        assert!(with_pos(b"\x91\x01", pos).is_none());
    }
}
