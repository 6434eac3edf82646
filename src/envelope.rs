//! The bus envelope: what one node (or a backend job) publishes to a Redis channel and every
//! interested node reads back. MessagePack, positional, versioned:
//!
//! ```text
//! [ version=1, kind, origin, target, from, ts_us, format, data ]
//!   kind    0 = room message (target is the room), 1 = direct message (target is the user id),
//!           2 = disconnect (target is the user id: every socket of the user closes with 4010;
//!           data is JSON, `{"reason":R}`, the app's reason, for the record)
//!   origin  str, id of the publishing node (any string for a backend job)
//!   from    str, sender id
//!   ts_us   uint, publish time in microseconds since the Unix epoch
//!   format  0 = data is MessagePack, 1 = data is JSON text
//!   data    bin, the payload exactly as the publisher encoded it
//!   pos     str, optional: the message's position in its channel's history, `EPOCH:N`, added by
//!           the store when the room keeps history (see [`crate::history::pos`]); nil for none
//!   key     str, optional: what this message is the new value of (`score`, `odds:4711`)
//!   key_seq uint, optional: the key's update number on its channel, added by the store with the
//!           key's latest value (see [`crate::latest`]); nil as published
//! ```
//!
//! A message without a key is an array of 8 (9 with its position); a keyed one is an array of 11
//! whatever it carries, so the store splices its position and update number in place.
//!
//! `data` travels as opaque bytes: no hop re-encodes it, and decoding borrows it from the received
//! buffer. Decoders accept longer arrays and ignore the extra trailing fields, so a later minor
//! version can append fields without breaking older nodes.

use bytes::Bytes;
use rmp::{decode, encode};

use crate::encoding::Encoding;
use crate::history::pos::Pos;

pub const VERSION: u8 = 1;
const FIELDS: u32 = 8;
/// The fields of a keyed envelope: position, key and update number after the eight.
const KEYED_FIELDS: u32 = 11;
/// MessagePack's nil.
const NIL: u8 = 0xc0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Room = 0,
    Direct = 1,
    /// Close every socket of the target user (`POST /disconnect`), on the user's inbox channel.
    Disconnect = 2,
}

/// One message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub kind: Kind,
    pub origin: String,
    pub target: String,
    pub from: String,
    pub ts_us: u64,
    pub format: Encoding,
    pub data: Bytes,
    /// Set by the history store, never by a publisher (see [`crate::history::pos::with_pos`]).
    pub pos: Option<Pos>,
    /// What the message is the new value of, where it is one.
    pub key: Option<String>,
    /// Set by the store of latest values, never by a publisher: the key's update number on its
    /// channel, which orders a key's values (see [`crate::latest`]).
    pub key_seq: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a MessagePack envelope: {0}")]
    Malformed(&'static str),
    #[error("envelope version {0} is not supported")]
    Version(u64),
}

impl Envelope {
    /// Encodes into one buffer sized up front, so publishing allocates once. The position and the
    /// key's update number are never encoded (nil where the layout has them): the stores add them.
    pub fn encode(&self) -> Bytes {
        self.encode_with(None, None)
    }

    /// Encodes with the position and update number as the stores splice them in: what the
    /// embedded bus publishes.
    pub fn encode_stored(&self) -> Bytes {
        self.encode_with(self.pos, self.key_seq)
    }

    fn encode_with(&self, pos: Option<Pos>, key_seq: Option<u64>) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        let fields = match (&self.key, pos) {
            (Some(_), _) => KEYED_FIELDS,
            (None, Some(_)) => FIELDS + 1,
            (None, None) => FIELDS,
        };
        // Writes into a Vec cannot fail.
        let _ = encode::write_array_len(&mut out, fields);
        let _ = encode::write_pfix(&mut out, VERSION);
        let _ = encode::write_pfix(&mut out, self.kind as u8);
        let _ = encode::write_str(&mut out, &self.origin);
        let _ = encode::write_str(&mut out, &self.target);
        let _ = encode::write_str(&mut out, &self.from);
        let _ = encode::write_uint(&mut out, self.ts_us);
        let _ = encode::write_pfix(&mut out, self.format.wire_format());
        let _ = encode::write_bin(&mut out, &self.data);
        if fields > FIELDS {
            match pos {
                Some(pos) => {
                    let _ = encode::write_str(&mut out, &pos.to_string());
                }
                None => out.push(NIL),
            }
        }
        if let Some(key) = &self.key {
            let _ = encode::write_str(&mut out, key);
            match key_seq {
                Some(n) => {
                    let _ = encode::write_uint(&mut out, n);
                }
                None => out.push(NIL),
            }
        }
        Bytes::from(out)
    }

    fn encoded_len_hint(&self) -> usize {
        let key = self.key.as_ref().map_or(0, |k| k.len() + 16);
        32 + self.origin.len() + self.target.len() + self.from.len() + self.data.len() + key
    }

    /// Decodes an envelope; `data` is a slice of `buf`, not a copy.
    pub fn decode(buf: &Bytes) -> Result<Envelope, DecodeError> {
        let mut rd: &[u8] = buf;
        let len = decode::read_array_len(&mut rd).map_err(|_| DecodeError::Malformed("not an array"))?;
        if len < 1 {
            return Err(DecodeError::Malformed("empty array"));
        }
        let version: u64 = decode::read_int(&mut rd).map_err(|_| DecodeError::Malformed("version"))?;
        if version != u64::from(VERSION) {
            return Err(DecodeError::Version(version));
        }
        if len < FIELDS {
            return Err(DecodeError::Malformed("too few fields"));
        }
        let kind = match decode::read_int::<u8, _>(&mut rd) {
            Ok(0) => Kind::Room,
            Ok(1) => Kind::Direct,
            Ok(2) => Kind::Disconnect,
            _ => return Err(DecodeError::Malformed("kind")),
        };
        let origin = read_str(&mut rd, "origin")?;
        let target = read_str(&mut rd, "target")?;
        let from = read_str(&mut rd, "from")?;
        let ts_us: u64 = decode::read_int(&mut rd).map_err(|_| DecodeError::Malformed("ts_us"))?;
        let format = match decode::read_int::<u8, _>(&mut rd) {
            Ok(0) => Encoding::MsgPack,
            Ok(1) => Encoding::Json,
            _ => return Err(DecodeError::Malformed("format")),
        };
        let n = decode::read_bin_len(&mut rd).map_err(|_| DecodeError::Malformed("data"))? as usize;
        if rd.len() < n {
            return Err(DecodeError::Malformed("data truncated"));
        }
        let start = buf.len() - rd.len();
        let data = buf.slice(start..start + n);
        rd = &rd[n..];
        // A ninth field is the position: a str, or nil for none.
        let pos = match read_optional(&mut rd, len > FIELDS, "pos")? {
            Some(raw) => Some(raw.parse().map_err(|_| DecodeError::Malformed("pos"))?),
            None => None,
        };
        let key = read_optional(&mut rd, len > FIELDS + 1, "key")?;
        let key_seq = if len > FIELDS + 2 && rd.first() != Some(&NIL) {
            Some(decode::read_int(&mut rd).map_err(|_| DecodeError::Malformed("key_seq"))?)
        } else {
            None
        };
        Ok(Envelope {
            kind,
            origin,
            target,
            from,
            ts_us,
            format,
            data,
            pos,
            key,
            key_seq,
        })
    }
}

/// An optional str field: nil (consumed) or absent (`present` false) is none.
fn read_optional(rd: &mut &[u8], present: bool, what: &'static str) -> Result<Option<String>, DecodeError> {
    if !present {
        return Ok(None);
    }
    if rd.first() == Some(&NIL) {
        *rd = &rd[1..];
        return Ok(None);
    }
    read_str(rd, what).map(Some)
}

fn read_str(rd: &mut &[u8], what: &'static str) -> Result<String, DecodeError> {
    let n = decode::read_str_len(rd).map_err(|_| DecodeError::Malformed(what))? as usize;
    if rd.len() < n {
        return Err(DecodeError::Malformed(what));
    }
    let (s, rest) = rd.split_at(n);
    *rd = rest;
    std::str::from_utf8(s)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Malformed(what))
}

/// Microseconds since the Unix epoch, the envelope's clock.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Bytes an envelope adds beyond data, target and sender (the budget is 48 with a short node id).
pub fn overhead(env: &Envelope) -> usize {
    env.encode().len() - env.data.len() - env.target.len() - env.from.len()
}

#[cfg(test)]
impl Envelope {
    /// A JSON message to `room` from a publisher `p` of node `n1`, as the unit tests publish it.
    pub(crate) fn to_room(room: &str, data: Bytes) -> Envelope {
        Envelope {
            kind: Kind::Room,
            origin: "n1".into(),
            target: room.into(),
            from: "p".into(),
            ts_us: 0,
            format: Encoding::Json,
            data,
            pos: None,
            key: None,
            key_seq: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(data: &[u8]) -> Envelope {
        Envelope {
            kind: Kind::Room,
            origin: "node-a1b2".into(),
            target: "stadium".into(),
            from: "alice".into(),
            ts_us: 1_790_000_000_000_000,
            format: Encoding::Json,
            data: Bytes::copy_from_slice(data),
            pos: None,
            key: None,
            key_seq: None,
        }
    }

    #[test]
    fn round_trips_and_borrows_data() {
        let env = sample(br#"{"score":[1,0]}"#);
        let wire = env.encode();
        let back = Envelope::decode(&wire).unwrap();
        assert_eq!(back, env);
        // The payload is a view into the received buffer, not a copy.
        let start = back.data.as_ptr() as usize - wire.as_ptr() as usize;
        assert_eq!(&wire[start..start + back.data.len()], &back.data[..]);
        assert_eq!(wire.len() - start, back.data.len());
    }

    #[test]
    fn overhead_is_within_budget() {
        for size in [0usize, 16, 300, 70_000] {
            let env = sample(&vec![b'1'; size]);
            assert!(overhead(&env) <= 48, "size {size}: {} bytes", overhead(&env));
        }
    }

    #[test]
    fn direct_and_msgpack_round_trip() {
        let mut env = sample(&[0x93, 1, 2, 3]);
        env.kind = Kind::Direct;
        env.format = Encoding::MsgPack;
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
    }

    #[test]
    fn later_versions_may_append_fields() {
        let env = sample(b"1");
        let mut wire = env.encode().to_vec();
        wire[0] = 0x9a; // fixarray of 10
        wire.push(0xc0); // nil: no position
        wire.push(0xc0); // nil, a field appended later
        assert_eq!(Envelope::decode(&Bytes::from(wire)).unwrap(), env);
    }

    #[test]
    fn a_keyed_envelope_has_eleven_fields_and_the_stores_fill_them() {
        let mut env = sample(b"[2,1]");
        env.key = Some("score".into());
        let wire = env.encode();
        assert_eq!(wire[0], 0x9b);
        assert_eq!(&wire[wire.len() - 8..], b"\xc0\xa5score\xc0");
        assert_eq!(Envelope::decode(&wire).unwrap(), env);
        env.pos = Some("7:3".parse().unwrap());
        env.key_seq = Some(300);
        let stored = env.encode_stored();
        assert_eq!(Envelope::decode(&stored).unwrap(), env);
        // What a publisher encodes never carries what only the stores know.
        assert_eq!(env.encode(), wire);
        // An unkeyed envelope stays an array of 8, 9 with its position.
        let mut plain = sample(b"1");
        assert_eq!(plain.encode()[0], 0x98);
        plain.pos = Some("7:4".parse().unwrap());
        assert_eq!(plain.encode_stored()[0], 0x99);
        assert_eq!(Envelope::decode(&plain.encode_stored()).unwrap(), plain);
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let env = sample(b"[1,2]").encode();
        for cut in 0..env.len() {
            assert!(
                Envelope::decode(&env.slice(..cut)).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        assert_eq!(
            Envelope::decode(&Bytes::from_static(&[0x92, 0x02, 0x00])),
            Err(DecodeError::Version(2))
        );
        for junk in [&b""[..], b"\xff\xff", b"hello", b"\x98\x01\x05"] {
            assert!(Envelope::decode(&Bytes::copy_from_slice(junk)).is_err());
        }
    }
}
