//! Shared deltas per key: for the sockets that joined a room with `delta`, a keyed message may go as
//! the difference to the key's previous value (a fossil delta, which browsers apply with the npm
//! `fossil-delta` package). The delta is computed once per message per node, against the previous
//! value this node framed ([`Values`]); it goes to every socket whose last value of that key is that
//! one ([`Bases`]), and the whole value to every other.

use std::{borrow::Cow, collections::HashMap, sync::Mutex};

/// Per key of one topic, the last value this node framed for sockets that joined with `delta`, in
/// each encoding they read. Bounded: past [`MAX_VALUE_BYTES`] it starts over (every key's next
/// value then goes whole), and it goes with the topic.
#[derive(Debug, Default)]
pub struct Values {
    keys: HashMap<Box<str>, Last, ahash::RandomState>,
    bytes: usize,
}

/// The most bytes of values one topic keeps for its deltas.
const MAX_VALUE_BYTES: usize = 64 << 20;

#[derive(Debug)]
struct Last {
    /// The value's update number.
    seq: u64,
    /// Per encoding: the value's bytes as a frame carries them.
    bytes: [Option<Vec<u8>>; 2],
    /// Messages of the key since one went whole to every socket.
    run: u32,
}

/// What a keyed message's frames can be built from.
#[derive(Debug, Default)]
pub struct Next {
    /// The update number of the value the deltas turn into this one.
    pub base: Option<u64>,
    /// Per encoding: the delta from that value to this one, where one is due.
    pub deltas: [Option<Vec<u8>>; 2],
}

impl Values {
    /// Takes the value numbered `seq` of `key` (per encoding, where sockets read it): the deltas to
    /// it from the key's previous value, unless a whole value is due (every `full_every` messages
    /// of the key). The value becomes the key's last.
    pub fn next(&mut self, key: &str, seq: u64, values: [Option<Cow<'_, [u8]>>; 2], full_every: u32) -> Next {
        let mut next = Next::default();
        let last = self.keys.get(key);
        let due = last.filter(|l| l.seq < seq && l.run + 1 < full_every);
        if let Some(last) = due {
            for ((delta, value), before) in next.deltas.iter_mut().zip(&values).zip(&last.bytes) {
                if let (Some(value), Some(before)) = (value, before) {
                    // Target first, then source: the delta turns `before` into `value`.
                    *delta = Some(fossil_delta::delta(value.as_ref(), before));
                }
            }
            if next.deltas.iter().any(Option::is_some) {
                next.base = Some(last.seq);
            }
        }
        let run = match (due, next.base) {
            (Some(last), Some(_)) => last.run + 1,
            _ => 0,
        };
        let bytes = values.map(|v| v.map(Cow::into_owned));
        let size = key.len() + bytes.iter().flatten().map(Vec::len).sum::<usize>();
        if self.bytes + size > MAX_VALUE_BYTES {
            self.keys.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        if let Some(old) = self.keys.insert(key.into(), Last { seq, bytes, run }) {
            self.bytes -= key.len() + old.bytes.iter().flatten().map(Vec::len).sum::<usize>();
        }
        next
    }
}

/// Per key, the update number of the last value one socket was sent from the shared frames (whole
/// or as a delta): a delta based on that value is one it can apply. At most one entry per key of
/// the room; it goes with the socket's membership.
///
/// Every delta socket of a stadium is asked once per keyed message, so the common case (a room
/// of a few keys) is a short array inline, one cache line from the socket's seat, not a hash map
/// behind pointers. Keys are known by a 64-bit hash of their name (the same for every socket), so
/// nothing is allocated per socket per message.
#[derive(Debug, Default)]
pub struct Bases {
    keys: Mutex<Keys>,
}

/// Keys kept inline before the rest go to a map.
const NEAR: usize = 4;

#[derive(Debug, Default)]
struct Keys {
    /// `(key hash, update number)`, the first `used` of them.
    near: [(u64, u64); NEAR],
    used: usize,
    far: HashMap<u64, u64, ahash::RandomState>,
}

/// The hash a key is known by in [`Bases`]: one hasher for the process, so every socket agrees.
fn key_hash(key: &str) -> u64 {
    static HASHER: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(ahash::RandomState::new).hash_one(key)
}

impl Bases {
    /// Records that the socket gets the value numbered `seq` of `key`; true when its last value of
    /// the key is `base`, so the delta from `base` is one it can apply.
    pub fn take(&self, key: &str, seq: u64, base: Option<u64>) -> bool {
        let hash = key_hash(key);
        // Each change under this lock is one step.
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let keys = &mut *keys;
        let had = match keys.near[..keys.used].iter_mut().find(|(h, _)| *h == hash) {
            Some((_, had)) => Some(std::mem::replace(had, seq)),
            None if keys.used < NEAR && keys.far.is_empty() => {
                keys.near[keys.used] = (hash, seq);
                keys.used += 1;
                None
            }
            None => keys.far.insert(hash, seq),
        };
        base.is_some() && had == base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(v: &str) -> [Option<Cow<'_, [u8]>>; 2] {
        [Some(Cow::Borrowed(v.as_bytes())), None]
    }

    #[test]
    fn a_delta_turns_the_previous_value_into_the_next_and_a_whole_one_comes_every_n() {
        let mut values = Values::default();
        let a = r#"{"home":"Arsenal","away":"Chelsea","score":[0,0],"minute":1,"events":["kick-off"]}"#;
        let b = r#"{"home":"Arsenal","away":"Chelsea","score":[1,0],"minute":9,"events":["kick-off","goal"]}"#;
        let first = values.next("state", 1, json(a), 3);
        assert!(first.base.is_none(), "no previous value: whole");
        let second = values.next("state", 2, json(b), 3);
        assert_eq!(second.base, Some(1));
        let delta = second.deltas[0].as_ref().expect("a delta");
        assert!(delta.len() < b.len(), "{} of {}", delta.len(), b.len());
        assert_eq!(fossil_delta::apply(a, delta).unwrap(), b.as_bytes());
        assert!(second.deltas[1].is_none(), "no socket reads MessagePack");
        // full_every 3: of every three messages of a key one goes whole, then deltas again.
        assert_eq!(values.next("state", 3, json(a), 3).base, Some(2));
        assert!(values.next("state", 4, json(b), 3).base.is_none());
        assert_eq!(values.next("state", 5, json(a), 3).base, Some(4));
        // An older or repeated number never gets a delta.
        assert!(values.next("state", 5, json(b), 3).base.is_none());
    }

    #[test]
    fn a_socket_gets_a_delta_only_on_the_value_it_has() {
        let bases = Bases::default();
        assert!(!bases.take("k", 5, Some(4)), "it never had the key");
        assert!(bases.take("k", 6, Some(5)));
        assert!(!bases.take("k", 8, Some(7)), "it missed 7");
        assert!(!bases.take("k", 9, None), "a whole value");
        assert!(bases.take("k", 10, Some(9)));
        // Past the keys kept inline, as before.
        for (i, key) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
            assert!(!bases.take(key, 1, Some(0)), "{key} is new");
            assert!(bases.take(key, 2, Some(1)), "{key} ({i}) has 1");
        }
        assert!(bases.take("k", 11, Some(10)), "k kept its number");
    }
}
