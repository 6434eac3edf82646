//! The bus envelope: what one node (or a backend job) publishes to a Redis channel and every
//! interested node reads back. MessagePack, positional, versioned:
//!
//! ```text
//! [ version=1, kind, origin, target, from, ts_us, format, data ]
//!   kind    0 = room message (target is the room), 1 = direct message (target is the user id)
//!   origin  str, id of the publishing node (any string for a backend job)
//!   from    str, sender id
//!   ts_us   uint, publish time in microseconds since the Unix epoch
//!   format  0 = data is MessagePack, 1 = data is JSON text
//!   data    bin, the payload exactly as the publisher encoded it
//!   pos     str, optional: the message's position in its channel's history, `EPOCH:N`, added by
//!           the store when the room keeps history (see [`crate::history::pos`])
//! ```
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
/// MessagePack's nil.
const NIL: u8 = 0xc0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Room = 0,
    Direct = 1,
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
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a MessagePack envelope: {0}")]
    Malformed(&'static str),
    #[error("envelope version {0} is not supported")]
    Version(u64),
}

impl Envelope {
    /// Encodes into one buffer sized up front, so publishing allocates once. The position is
    /// never encoded: the history store adds it.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        // Writes into a Vec cannot fail.
        let _ = encode::write_array_len(&mut out, FIELDS);
        let _ = encode::write_pfix(&mut out, VERSION);
        let _ = encode::write_pfix(&mut out, self.kind as u8);
        let _ = encode::write_str(&mut out, &self.origin);
        let _ = encode::write_str(&mut out, &self.target);
        let _ = encode::write_str(&mut out, &self.from);
        let _ = encode::write_uint(&mut out, self.ts_us);
        let _ = encode::write_pfix(&mut out, self.format.wire_format());
        let _ = encode::write_bin(&mut out, &self.data);
        Bytes::from(out)
    }

    fn encoded_len_hint(&self) -> usize {
        32 + self.origin.len() + self.target.len() + self.from.len() + self.data.len()
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
        let pos = if len > FIELDS && rd.first() != Some(&NIL) {
            let raw = read_str(&mut rd, "pos")?;
            Some(raw.parse().map_err(|_| DecodeError::Malformed("pos"))?)
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
        })
    }
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
