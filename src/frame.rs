//! Client frames, both encodings: decoding what a client sends into a [`Request`], and the
//! [`FrameError`] it is refused with. What the node sends is [`crate::wire`]'s.
//!
//! A client may send JSON text frames or MessagePack binary frames whatever it negotiated; the node
//! answers in the negotiated encoding.

use bytes::Bytes;
use serde::{de::IgnoredAny, Deserialize, Deserializer};
use serde_json::value::RawValue;

pub use crate::encoding::{Encoding, PROTOCOL_JSON, PROTOCOL_MSGPACK};
use crate::{
    close::ErrorCode,
    encoding::msgpack_to_json,
    history::pos::{BadPos, Pos},
    names,
};

/// A payload as its publisher encoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    pub format: Encoding,
    pub bytes: Bytes,
}

/// A decoded client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// With `since`, the position the client had reached on each shard: what it missed is replayed.
    Join {
        room: String,
        since: Option<Vec<Pos>>,
        /// Also send the room's presence events to this socket.
        presence: bool,
        /// First send the latest message of every key of the room.
        latest: bool,
        /// At most this many messages per second per key to this socket, the latest winning.
        max_rate: Option<u32>,
        /// Keyed values may come as deltas to the socket's previous value of the key.
        delta: bool,
    },
    /// The room's presence: its count of users and, for a small room, who they are.
    Presence {
        room: String,
    },
    /// The newest `limit` messages of a room with history.
    History {
        room: String,
        limit: usize,
    },
    Leave {
        room: String,
    },
    Pub {
        room: String,
        data: Data,
        /// What the message is the new value of, where it is one.
        key: Option<String>,
    },
    Dm {
        to: String,
        data: Data,
    },
    Ping,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: Option<i64>,
    pub command: Command,
}

/// A command the node refuses; becomes an `error` frame and the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub id: Option<i64>,
    pub code: ErrorCode,
    pub message: String,
    /// The position of a message published anyway (`unconfirmed`).
    pub pos: Option<Pos>,
}

impl FrameError {
    pub fn new(id: Option<i64>, code: ErrorCode, message: impl Into<String>) -> FrameError {
        FrameError {
            id,
            code,
            message: message.into(),
            pos: None,
        }
    }
}

/// A field whose wrong type is reported by name instead of failing the whole frame.
#[derive(Deserialize)]
#[serde(untagged)]
enum Loose<T> {
    Ok(T),
    Bad(IgnoredAny),
}

/// `data` as present-or-absent, where an explicit `null` counts as present.
struct Present<D>(Option<D>);

impl<D> Default for Present<D> {
    fn default() -> Self {
        Present(None)
    }
}

impl<'de, D: Deserialize<'de>> Deserialize<'de> for Present<D> {
    fn deserialize<De: Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
        D::deserialize(d).map(|v| Present(Some(v)))
    }
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "D: Deserialize<'de>"))]
struct Wire<D> {
    #[serde(default)]
    op: Option<Loose<String>>,
    #[serde(default)]
    id: Option<Loose<i64>>,
    #[serde(default)]
    room: Option<Loose<String>>,
    #[serde(default)]
    to: Option<Loose<String>>,
    #[serde(default)]
    data: Present<D>,
    #[serde(default)]
    since: Option<Loose<Vec<String>>>,
    #[serde(default)]
    limit: Option<Loose<u64>>,
    #[serde(default)]
    presence: Option<Loose<bool>>,
    #[serde(default)]
    key: Option<Loose<String>>,
    #[serde(default)]
    latest: Option<Loose<bool>>,
    #[serde(default)]
    max_rate: Option<Loose<u64>>,
    #[serde(default)]
    delta: Option<Loose<bool>>,
}

/// The most messages per second per key a join's `max_rate` may ask for.
pub const MAX_RATE: u64 = 1000;

/// The most messages one `history` asks for.
pub const MAX_HISTORY_LIMIT: u64 = 1000;

/// Decodes a text frame (JSON); `data` nested deeper than `max_depth` is refused with `bad_data`.
pub fn decode_text(text: &str, max_depth: usize) -> Result<Request, FrameError> {
    // `data` is taken as raw text, which serde_json skips over without recursing however deep it is.
    let wire: Wire<&RawValue> = serde_json::from_str(text)
        .map_err(|e| FrameError::new(None, ErrorCode::BadFrame, format!("malformed JSON: {e}")))?;
    let id = wire.id.as_ref().and_then(Loose::ok);
    build(wire, |raw| {
        let bytes = raw.get().as_bytes();
        if !data_depth_ok(Encoding::Json, bytes, max_depth) {
            return Err(too_deep(id, max_depth));
        }
        Ok(Data {
            format: Encoding::Json,
            bytes: Bytes::copy_from_slice(bytes),
        })
    })
}

/// Decodes a binary frame (MessagePack); `data` nested deeper than `max_depth` is refused with
/// `bad_data`.
pub fn decode_binary(bytes: &[u8], max_depth: usize) -> Result<Request, FrameError> {
    // Decoding `data` into a value recurses once per level: deep data is refused before that.
    if let Some(id) = msgpack_frame_too_deep(bytes, max_depth) {
        return Err(too_deep(id, max_depth));
    }
    let wire: Wire<rmpv::Value> = rmp_serde::from_slice(bytes)
        .map_err(|e| FrameError::new(None, ErrorCode::BadFrame, format!("malformed MessagePack: {e}")))?;
    let id = wire.id.as_ref().and_then(Loose::ok);
    build(wire, |value| {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &value)
            .map_err(|e| FrameError::new(id, ErrorCode::BadData, e.to_string()))?;
        // A frame sent as an array rather than a map is not seen by the check above.
        if !data_depth_ok(Encoding::MsgPack, &out, max_depth) {
            return Err(too_deep(id, max_depth));
        }
        // Reject at the source what no JSON subscriber could receive.
        msgpack_to_json(&out)
            .map_err(|e| FrameError::new(id, ErrorCode::BadData, format!("data has no JSON form: {e}")))?;
        Ok(Data {
            format: Encoding::MsgPack,
            bytes: Bytes::from(out),
        })
    })
}

impl<T: Copy> Loose<T> {
    fn ok(&self) -> Option<T> {
        match self {
            Loose::Ok(v) => Some(*v),
            Loose::Bad(_) => None,
        }
    }
}

fn too_deep(id: Option<i64>, max_depth: usize) -> FrameError {
    FrameError::new(
        id,
        ErrorCode::BadData,
        format!("data nests deeper than {max_depth} levels"),
    )
}

fn build<D>(wire: Wire<D>, data: impl FnOnce(D) -> Result<Data, FrameError>) -> Result<Request, FrameError> {
    let id = match wire.id {
        None => None,
        Some(Loose::Ok(n)) => Some(n),
        Some(Loose::Bad(_)) => return Err(FrameError::new(None, ErrorCode::BadField, "`id` must be an integer")),
    };
    let op = match wire.op {
        Some(Loose::Ok(op)) => op,
        Some(Loose::Bad(_)) => return Err(FrameError::new(id, ErrorCode::BadField, "`op` must be a string")),
        None => return Err(FrameError::new(id, ErrorCode::BadField, "missing field `op`")),
    };
    let data = |present: Present<D>| match present.0 {
        Some(d) => data(d),
        None => Err(FrameError::new(id, ErrorCode::BadField, "missing field `data`")),
    };
    let room = |field| name(id, field, "room", ErrorCode::BadRoom);
    let command = match op.as_str() {
        "join" => Command::Join {
            room: room(wire.room)?,
            since: since(id, wire.since)?,
            presence: flag(id, wire.presence, "`presence` must be true or false")?,
            latest: flag(id, wire.latest, "`latest` must be true or false")?,
            max_rate: max_rate(id, wire.max_rate)?,
            delta: flag(id, wire.delta, "`delta` must be true or false")?,
        },
        "presence" => Command::Presence {
            room: with_id(id, "presence", room(wire.room))?,
        },
        "history" => Command::History {
            room: with_id(id, "history", room(wire.room))?,
            limit: limit(id, wire.limit)?,
        },
        "leave" => Command::Leave { room: room(wire.room)? },
        "pub" => Command::Pub {
            room: room(wire.room)?,
            key: wire
                .key
                .map(|k| name(id, Some(k), "key", ErrorCode::BadField))
                .transpose()?,
            data: data(wire.data)?,
        },
        "dm" => Command::Dm {
            to: name(id, wire.to, "to", ErrorCode::BadUser)?,
            data: data(wire.data)?,
        },
        "ping" => Command::Ping,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(FrameError::new(
                id,
                ErrorCode::UnknownOp,
                format!("unknown op {shown:?}"),
            ));
        }
    };
    Ok(Request { id, command })
}

/// A command that is answered with data of its own (`presence`, `history`) needs an `id` to
/// answer with; checked after its room.
fn with_id(id: Option<i64>, op: &str, room: Result<String, FrameError>) -> Result<String, FrameError> {
    let room = room?;
    if id.is_none() {
        return Err(FrameError::new(
            id,
            ErrorCode::BadField,
            format!("`{op}` needs an `id`"),
        ));
    }
    Ok(room)
}

/// An optional true or false, false when absent.
fn flag(id: Option<i64>, field: Option<Loose<bool>>, bad: &'static str) -> Result<bool, FrameError> {
    match field {
        None => Ok(false),
        Some(Loose::Ok(b)) => Ok(b),
        Some(Loose::Bad(_)) => Err(FrameError::new(id, ErrorCode::BadField, bad)),
    }
}

/// A join's `max_rate`: a whole number from 1 to [`MAX_RATE`], or none.
fn max_rate(id: Option<i64>, field: Option<Loose<u64>>) -> Result<Option<u32>, FrameError> {
    match field {
        None => Ok(None),
        Some(Loose::Ok(n)) if (1..=MAX_RATE).contains(&n) => Ok(Some(n as u32)),
        Some(_) => Err(FrameError::new(
            id,
            ErrorCode::BadField,
            format!("`max_rate` must be a whole number from 1 to {MAX_RATE}"),
        )),
    }
}

/// `history`'s `limit`: a whole number from 1 to [`MAX_HISTORY_LIMIT`].
fn limit(id: Option<i64>, field: Option<Loose<u64>>) -> Result<usize, FrameError> {
    match field {
        Some(Loose::Ok(n)) if (1..=MAX_HISTORY_LIMIT).contains(&n) => Ok(n as usize),
        None => Err(FrameError::new(id, ErrorCode::BadField, "missing field `limit`")),
        Some(_) => Err(FrameError::new(
            id,
            ErrorCode::BadField,
            format!("`limit` must be a whole number from 1 to {MAX_HISTORY_LIMIT}"),
        )),
    }
}

/// `since`: a list of positions, one per shard (at most [`crate::bus::MAX_SHARDS`]).
fn since(id: Option<i64>, field: Option<Loose<Vec<String>>>) -> Result<Option<Vec<Pos>>, FrameError> {
    let bad = |why: &str| FrameError::new(id, ErrorCode::BadField, format!("`since` {why}"));
    match field {
        None => Ok(None),
        Some(Loose::Bad(_)) => Err(bad("must be a list of positions")),
        Some(Loose::Ok(list)) if list.len() > crate::bus::MAX_SHARDS as usize => {
            Err(bad("has more positions than a room has shards"))
        }
        Some(Loose::Ok(list)) => list
            .iter()
            .map(|p| p.parse().map_err(|e: BadPos| bad(&format!("{p:?}: {e}"))))
            .collect::<Result<_, _>>()
            .map(Some),
    }
}

fn name(id: Option<i64>, field: Option<Loose<String>>, key: &str, code: ErrorCode) -> Result<String, FrameError> {
    match field {
        Some(Loose::Ok(s)) => match names::check(&s) {
            Ok(()) => Ok(s),
            Err(e) => Err(FrameError::new(id, code, format!("`{key}` {e}"))),
        },
        Some(Loose::Bad(_)) => Err(FrameError::new(
            id,
            ErrorCode::BadField,
            format!("`{key}` must be a string"),
        )),
        None => Err(FrameError::new(
            id,
            ErrorCode::BadField,
            format!("missing field `{key}`"),
        )),
    }
}

/// The deepest `--max-data-depth` may be. Data this deep still goes through every transcoding the
/// node does: serde_json refuses to read JSON nested deeper than 127 levels, rmp_serde MessagePack
/// past 1,024.
pub const MAX_DATA_DEPTH: usize = 127;

/// `--max-data-depth` unless set.
pub const DEFAULT_DATA_DEPTH: usize = 64;

/// Whether `data` in `format` nests arrays and maps at most `max` deep: a scalar is depth 0, `[1]`
/// and `{"a":1}` depth 1, `[[]]` depth 2, the same in both encodings.
///
/// The one rule for `data` wherever it comes from: client frames, `POST /publish`, and envelopes
/// read from the bus. Only nesting is measured: data that is invalid or truncated passes here and
/// is refused where it is decoded. One pass over the bytes, without allocating or recursing, and
/// at once for data shorter than `max` bytes (each level takes a byte at least). A `max` above
/// [`MAX_DATA_DEPTH`] counts as that.
pub fn data_depth_ok(format: Encoding, data: &[u8], max: usize) -> bool {
    let max = max.min(MAX_DATA_DEPTH);
    if data.len() <= max {
        return true;
    }
    match format {
        Encoding::Json => json_depth_ok(data, max),
        Encoding::MsgPack => !matches!(msgpack_skip(data, max), Skip::TooDeep),
    }
}

fn json_depth_ok(data: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                // Brackets inside a string do not nest: skip to its closing quote, past escapes.
                loop {
                    i += 1;
                    match data.get(i..).and_then(|rest| memchr::memchr2(b'"', b'\\', rest)) {
                        // The string runs to the end: nothing deeper follows.
                        None => return true,
                        Some(at) if data[i + at] == b'"' => {
                            i += at;
                            break;
                        }
                        // A backslash: the loop steps over the byte it escapes.
                        Some(at) => i += at + 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    true
}

/// What skipping one MessagePack value found.
#[derive(Debug, PartialEq, Eq)]
enum Skip {
    /// The value is this many bytes long and nests at most the given depth.
    Len(usize),
    /// It nests deeper.
    TooDeep,
    /// It is cut short or not MessagePack; its depth as far as it goes is within the limit.
    Broken,
}

/// The MessagePack item whose marker is at `data[i]`: the index past its header (and past a
/// scalar's payload), and for an array or map the items it holds (a map's keys and values both
/// count). `None` when cut short or not MessagePack.
fn msgpack_item(data: &[u8], i: usize) -> Option<(usize, Option<u64>)> {
    let marker = *data.get(i)?;
    let i = i + 1;
    let be = |n: usize| -> Option<u64> {
        let bytes = data.get(i..i.checked_add(n)?)?;
        Some(bytes.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
    };
    // Either a container with this many items, or a scalar with this many more bytes.
    let (items, skip): (Option<u64>, u64) = match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (None, 0),
        0x80..=0x8f => (Some(2 * u64::from(marker & 0x0f)), 0),
        0x90..=0x9f => (Some(u64::from(marker & 0x0f)), 0),
        0xa0..=0xbf => (None, u64::from(marker & 0x1f)),
        // bin and str 8/16/32: length, payload.
        0xc4 | 0xd9 => (None, 1 + be(1)?),
        0xc5 | 0xda => (None, 2 + be(2)?),
        0xc6 | 0xdb => (None, 4 + be(4)?),
        // ext 8/16/32: length, type byte, payload.
        0xc7 => (None, 2 + be(1)?),
        0xc8 => (None, 3 + be(2)?),
        0xc9 => (None, 5 + be(4)?),
        0xcc | 0xd0 => (None, 1),
        0xcd | 0xd1 => (None, 2),
        0xca | 0xce | 0xd2 => (None, 4),
        0xcb | 0xcf | 0xd3 => (None, 8),
        // fixext 1/2/4/8/16: type byte, payload.
        0xd4 => (None, 2),
        0xd5 => (None, 3),
        0xd6 => (None, 5),
        0xd7 => (None, 9),
        0xd8 => (None, 17),
        0xdc => (Some(be(2)?), 2),
        0xdd => (Some(be(4)?), 4),
        0xde => (Some(2 * be(2)?), 2),
        0xdf => (Some(2 * be(4)?), 4),
        // 0xc1 is never used.
        _ => return None,
    };
    let end = i.checked_add(usize::try_from(skip).ok()?)?;
    (end <= data.len()).then_some((end, items))
}

/// Skips the MessagePack value at the start of `data` if it nests at most `max` (at most
/// [`MAX_DATA_DEPTH`]) deep. What each open array or map still holds is counted in a fixed array
/// on the stack.
fn msgpack_skip(data: &[u8], max: usize) -> Skip {
    let max = max.min(MAX_DATA_DEPTH);
    // The innermost open container's count at `open[depth]`.
    let mut open = [0u64; MAX_DATA_DEPTH + 1];
    let mut depth = 0usize;
    let mut i = 0usize;
    loop {
        let Some((next, items)) = msgpack_item(data, i) else {
            return Skip::Broken;
        };
        i = next;
        if let Some(n) = items {
            if depth == max {
                return Skip::TooDeep;
            }
            if n > 0 {
                depth += 1;
                open[depth] = n;
                continue;
            }
        }
        // One item is complete, which may complete the containers around it.
        loop {
            if depth == 0 {
                return Skip::Len(i);
            }
            open[depth] -= 1;
            if open[depth] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

/// The length of the MessagePack value at the start of `data`, however deep: one count of the
/// items still to read is all it takes, since every container says how many it holds.
fn msgpack_len(data: &[u8]) -> Option<usize> {
    let (mut i, mut pending) = (0usize, 1u64);
    while pending > 0 {
        let (next, items) = msgpack_item(data, i)?;
        i = next;
        pending = (pending - 1).saturating_add(items.unwrap_or(0));
    }
    Some(i)
}

/// For a MessagePack frame that is a map whose `data` nests deeper than `max`: the frame's `id`,
/// if it has one, found without decoding anything else. `None` for every other frame, which is
/// then decoded as usual.
fn msgpack_frame_too_deep(frame: &[u8], max: usize) -> Option<Option<i64>> {
    if frame.len() <= max {
        return None;
    }
    let mut rd = frame;
    let Ok(entries) = rmp::decode::read_map_len(&mut rd) else {
        // Not a map (an array of positional fields, say): decoding it recurses as deep as it
        // nests, so it is measured whole; the frame itself is one level above where `data` is.
        if msgpack_skip(frame, max.saturating_add(1)) != Skip::TooDeep {
            return None;
        }
        // The id is the second positional field.
        let mut rd = frame;
        let id = rmp::decode::read_array_len(&mut rd)
            .ok()
            .filter(|n| *n >= 2)
            .and_then(|_| rmp::decode::read_int::<i64, _>(&mut rd.get(msgpack_len(rd)?..)?).ok());
        return Some(id);
    };
    let (mut id, mut too_deep) = (None, false);
    for _ in 0..entries {
        let n = rmp::decode::read_str_len(&mut rd).ok()? as usize;
        let key = rd.get(..n)?;
        rd = &rd[n..];
        match key {
            b"id" => id = rmp::decode::read_int::<i64, _>(&mut &rd[..]).ok(),
            b"data" => too_deep = msgpack_skip(rd, max) == Skip::TooDeep,
            _ => {}
        }
        // Past the value, however deep, to find an `id` that comes after `data`.
        let Some(len) = msgpack_len(rd) else { break };
        rd = &rd[len..];
    }
    too_deep.then_some(id)
}

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use tokio_tungstenite::tungstenite::Message;

    use super::*;
    use crate::{
        encoding::json_to_msgpack,
        envelope::{Envelope, Kind},
        wire::{broadcast_frame, Reply},
    };

    const D: usize = DEFAULT_DATA_DEPTH;

    fn err(text: &str) -> FrameError {
        decode_text(text, D).unwrap_err()
    }

    #[test]
    fn a_frame_that_is_a_deep_array_is_refused_before_it_is_decoded() {
        // Decoded, it would recurse once per level: 60,000 levels overflow a worker's stack.
        let e = decode_binary(&[0x91; 60_000], D).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadData, "{e:?}");
        // A shallow one is not refused as deep.
        assert_ne!(
            decode_binary(&[0x92, 0x01, 0x02], D).unwrap_err().code,
            ErrorCode::BadData
        );
    }

    #[test]
    fn decodes_presence_and_a_join_that_watches_it() {
        let r = decode_text(r#"{"op":"presence","room":"lobby","id":3,"extra":[1]}"#, D).unwrap();
        assert_eq!(
            r,
            Request {
                id: Some(3),
                command: Command::Presence { room: "lobby".into() }
            }
        );
        assert_eq!(err(r#"{"op":"presence","room":"lobby"}"#).code, ErrorCode::BadField);
        let r = decode_text(r#"{"op":"join","room":"lobby","presence":true}"#, D).unwrap();
        assert!(matches!(r.command, Command::Join { presence: true, .. }));
        let e = err(r#"{"op":"join","room":"lobby","id":4,"presence":1}"#);
        assert_eq!((e.code, e.id), (ErrorCode::BadField, Some(4)));
    }

    #[test]
    fn decodes_keys_latest_and_max_rate_and_refuses_bad_ones() {
        let r = decode_text(r#"{"op":"pub","room":"m","key":"odds:4711","data":1}"#, D).unwrap();
        assert!(matches!(r.command, Command::Pub { key: Some(ref k), .. } if k == "odds:4711"));
        let r = decode_text(r#"{"op":"join","room":"m","latest":true,"max_rate":2}"#, D).unwrap();
        assert!(matches!(
            r.command,
            Command::Join {
                latest: true,
                max_rate: Some(2),
                delta: false,
                ..
            }
        ));
        let r = decode_text(r#"{"op":"join","room":"m","delta":true}"#, D).unwrap();
        assert!(matches!(r.command, Command::Join { delta: true, .. }));
        let long = format!(
            r#"{{"op":"pub","room":"m","id":1,"key":"{}","data":1}}"#,
            "k".repeat(129)
        );
        for bad in [
            r#"{"op":"pub","room":"m","id":1,"key":"{hot}","data":1}"#,
            r#"{"op":"pub","room":"m","id":1,"key":"a\u0007b","data":1}"#,
            r#"{"op":"pub","room":"m","id":1,"key":"a\u202Eb","data":1}"#,
            r#"{"op":"pub","room":"m","id":1,"key":"","data":1}"#,
            r#"{"op":"pub","room":"m","id":1,"key":7,"data":1}"#,
            long.as_str(),
            r#"{"op":"join","room":"m","id":1,"latest":"yes"}"#,
            r#"{"op":"join","room":"m","id":1,"max_rate":0}"#,
            r#"{"op":"join","room":"m","id":1,"max_rate":1001}"#,
            r#"{"op":"join","room":"m","id":1,"max_rate":2.5}"#,
            r#"{"op":"join","room":"m","id":1,"max_rate":"2"}"#,
            r#"{"op":"join","room":"m","id":1,"delta":"yes"}"#,
            r#"{"op":"join","room":"m","id":1,"delta":1}"#,
        ] {
            let e = err(bad);
            assert_eq!((e.code, e.id), (ErrorCode::BadField, Some(1)), "{bad}");
        }
    }

    #[test]
    fn decodes_every_command_from_json() {
        let r = decode_text(r#"{"op":"join","room":"stadium","id":7}"#, D).unwrap();
        assert_eq!(
            r,
            Request {
                id: Some(7),
                command: Command::Join {
                    room: "stadium".into(),
                    since: None,
                    presence: false,
                    latest: false,
                    max_rate: None,
                    delta: false,
                }
            }
        );
        let r = decode_text(r#"{"op":"pub","room":"s","data":{"a":[1, 2]}}"#, D).unwrap();
        assert_eq!(
            r.command,
            Command::Pub {
                room: "s".into(),
                data: Data {
                    format: Encoding::Json,
                    bytes: Bytes::from_static(br#"{"a":[1, 2]}"#)
                },
                key: None,
            }
        );
        let r = decode_text(r#"{"op":"dm","to":"bob","data":null}"#, D).unwrap();
        assert!(matches!(r.command, Command::Dm { ref to, ref data } if to == "bob" && &data.bytes[..] == b"null"));
        assert_eq!(decode_text(r#"{"op":"ping"}"#, D).unwrap().command, Command::Ping);
        assert_eq!(
            decode_text(r#"{"op":"leave","room":"s"}"#, D).unwrap().command,
            Command::Leave { room: "s".into() }
        );
    }

    #[test]
    fn decodes_msgpack_and_keeps_binary_data_form() {
        #[derive(Serialize)]
        struct W<'a> {
            op: &'a str,
            room: &'a str,
            id: i64,
            data: (u8, &'a str),
        }
        let bytes = rmp_serde::to_vec_named(&W {
            op: "pub",
            room: "r",
            id: 3,
            data: (1, "x"),
        })
        .unwrap();
        let r = decode_binary(&bytes, D).unwrap();
        assert_eq!(r.id, Some(3));
        let Command::Pub { data, .. } = r.command else { panic!() };
        assert_eq!(data.format, Encoding::MsgPack);
        assert_eq!(msgpack_to_json(&data.bytes).unwrap(), br#"[1,"x"]"#);
    }

    #[test]
    fn bad_input_gets_stable_codes_and_keeps_the_id() {
        assert_eq!(err("{not json").code, ErrorCode::BadFrame);
        assert_eq!(err("42").code, ErrorCode::BadFrame);
        assert_eq!(err(r#"{"op":"join","room":"a"} trailing"#).code, ErrorCode::BadFrame);
        let e = err(r#"{"op":"fly","id":5}"#);
        assert_eq!((e.code, e.id), (ErrorCode::UnknownOp, Some(5)));
        let e = err(r#"{"op":"join","id":6}"#);
        assert_eq!((e.code, e.id), (ErrorCode::BadField, Some(6)));
        assert_eq!(err(r#"{"op":"join","room":7}"#).code, ErrorCode::BadField);
        assert_eq!(err(r#"{"op":3}"#).code, ErrorCode::BadField);
        assert_eq!(err(r#"{"op":"ping","id":"x"}"#).code, ErrorCode::BadField);
        assert_eq!(err(r#"{"op":"pub","room":"a"}"#).code, ErrorCode::BadField);
        assert_eq!(err(r#"{"op":"join","room":""}"#).code, ErrorCode::BadRoom);
        assert_eq!(err(r#"{"op":"join","room":"a\u0007"}"#).code, ErrorCode::BadRoom);
        let long = format!(r#"{{"op":"join","room":"{}"}}"#, "r".repeat(129));
        assert_eq!(err(&long).code, ErrorCode::BadRoom);
        assert_eq!(err(r#"{"op":"dm","to":"","data":1}"#).code, ErrorCode::BadUser);
        assert_eq!(
            decode_binary(b"\xc1\xff\x00garbage", D).unwrap_err().code,
            ErrorCode::BadFrame
        );
        assert_eq!(decode_binary(b"", D).unwrap_err().code, ErrorCode::BadFrame);
    }

    #[test]
    fn msgpack_data_without_json_form_is_refused() {
        // {op:"pub", room:"r", data:{[1]: 2}}: a map key that is an array has no JSON form.
        let mut b = Vec::new();
        rmp::encode::write_map_len(&mut b, 3).unwrap();
        rmp::encode::write_str(&mut b, "op").unwrap();
        rmp::encode::write_str(&mut b, "pub").unwrap();
        rmp::encode::write_str(&mut b, "room").unwrap();
        rmp::encode::write_str(&mut b, "r").unwrap();
        rmp::encode::write_str(&mut b, "data").unwrap();
        rmp::encode::write_map_len(&mut b, 1).unwrap();
        rmp::encode::write_array_len(&mut b, 1).unwrap();
        rmp::encode::write_uint(&mut b, 1).unwrap();
        rmp::encode::write_uint(&mut b, 2).unwrap();
        assert_eq!(decode_binary(&b, D).unwrap_err().code, ErrorCode::BadData);
    }

    /// `depth` arrays, one inside the other, around a 1.
    fn nested_json(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    fn nested_msgpack(depth: usize) -> Vec<u8> {
        let mut b = vec![0x91; depth];
        b.push(0x01);
        b
    }

    /// The nesting of a JSON value, measured the slow way.
    fn depth_of(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
            serde_json::Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn data_depth_is_the_same_in_both_encodings() {
        for text in [
            "1",
            "\"x\"",
            "[]",
            "{}",
            "[[]]",
            r#"{"a":[1,{"b":[]}],"c":2}"#,
            r#"["[[[[", "\\", "\"[", {"]]]]":"}{"}]"#,
            r#"["\"[[[[[[", "\\\"[[[", "\\", 1]"#,
            &nested_json(70),
        ] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let depth = depth_of(&v);
            let mp = json_to_msgpack(text.as_bytes()).unwrap();
            for max in [0, 1, 2, 3, depth.saturating_sub(1), depth, depth + 1] {
                let want = depth <= max;
                assert_eq!(
                    data_depth_ok(Encoding::Json, text.as_bytes(), max),
                    want,
                    "{text} max {max}"
                );
                assert_eq!(
                    data_depth_ok(Encoding::MsgPack, &mp, max),
                    want,
                    "{text} max {max} (MessagePack)"
                );
            }
        }
        // A map whose key is an array (no JSON form) nests like any other container.
        let mp = [0x81, 0x91, 0x91, 0x01, 0x02];
        assert!(data_depth_ok(Encoding::MsgPack, &mp, 3));
        assert!(!msgpack_skip(&mp, 2).eq(&Skip::Len(5)));
        assert_eq!(msgpack_skip(&mp, 3), Skip::Len(5));
        assert_eq!(msgpack_len(&mp), Some(5));
    }

    #[test]
    fn data_depth_stops_at_the_limit() {
        for depth in [63, 64, 65, 1000, 32_000] {
            let want = depth <= 64;
            assert_eq!(
                data_depth_ok(Encoding::Json, nested_json(depth).as_bytes(), 64),
                want,
                "{depth}"
            );
            assert_eq!(
                data_depth_ok(Encoding::MsgPack, &nested_msgpack(depth), 64),
                want,
                "{depth}"
            );
            assert_eq!(msgpack_len(&nested_msgpack(depth)), Some(depth + 1));
        }
        // Truncated or broken data passes: it is refused where it is decoded.
        assert!(data_depth_ok(Encoding::MsgPack, &[0x91; 10], 64));
        assert!(data_depth_ok(
            Encoding::MsgPack,
            &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01],
            1
        ));
        assert!(data_depth_ok(
            Encoding::Json,
            &b"[[[[[[[[[[[[[[[[[[[[\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["[..],
            20
        ));
        // A limit past the most a node may be configured with counts as that most.
        assert!(!data_depth_ok(
            Encoding::Json,
            nested_json(MAX_DATA_DEPTH + 1).as_bytes(),
            usize::MAX
        ));
        assert!(!data_depth_ok(
            Encoding::MsgPack,
            &nested_msgpack(MAX_DATA_DEPTH + 1),
            usize::MAX
        ));
    }

    #[test]
    fn data_at_the_deepest_limit_transcodes_both_ways() {
        let json = nested_json(MAX_DATA_DEPTH);
        let mp = json_to_msgpack(json.as_bytes()).expect("JSON to MessagePack at the deepest limit");
        assert_eq!(mp, nested_msgpack(MAX_DATA_DEPTH));
        assert_eq!(msgpack_to_json(&mp).unwrap(), json.as_bytes());
        for format in Encoding::ALL {
            let data = match format {
                Encoding::Json => Bytes::from(json.clone()),
                Encoding::MsgPack => Bytes::from(mp.clone()),
            };
            let e = Envelope {
                format,
                data,
                ..env(Encoding::Json, b"", Kind::Room)
            };
            for enc in Encoding::ALL {
                broadcast_frame(enc, &e, 0).unwrap_or_else(|err| panic!("{format:?} as {enc:?}: {err}"));
            }
        }
    }

    #[test]
    fn deep_data_is_refused_with_bad_data_and_the_id() {
        for depth in [65, 32_000] {
            let text = format!(r#"{{"op":"pub","room":"r","id":4,"data":{}}}"#, nested_json(depth));
            let e = decode_text(&text, 64).unwrap_err();
            assert_eq!((e.code, e.id), (ErrorCode::BadData, Some(4)), "JSON {depth}");
            // MessagePack, the id after the data.
            let mut b = Vec::new();
            rmp::encode::write_map_len(&mut b, 4).unwrap();
            for (k, v) in [("op", "pub"), ("room", "r")] {
                rmp::encode::write_str(&mut b, k).unwrap();
                rmp::encode::write_str(&mut b, v).unwrap();
            }
            rmp::encode::write_str(&mut b, "data").unwrap();
            b.extend(nested_msgpack(depth));
            rmp::encode::write_str(&mut b, "id").unwrap();
            rmp::encode::write_uint(&mut b, 4).unwrap();
            let e = decode_binary(&b, 64).unwrap_err();
            assert_eq!((e.code, e.id), (ErrorCode::BadData, Some(4)), "MessagePack {depth}");
        }
        let text = format!(r#"{{"op":"dm","to":"u","data":{}}}"#, nested_json(64));
        assert!(decode_text(&text, 64).is_ok());
        let frame = rmp_serde::to_vec_named(&serde_json::json!({"op":"pub","room":"r","data":[[[1]]]})).unwrap();
        assert!(decode_binary(&frame, 3).is_ok());
        assert_eq!(decode_binary(&frame, 2).unwrap_err().code, ErrorCode::BadData);
        // A frame sent as an array (positional fields) is held to the same rule.
        let positional = rmp_serde::to_vec(&("pub", 9, "r", (), [[[1]]])).unwrap();
        let e = decode_binary(&positional, 2).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadData, Some(9)), "{e}");
    }

    /// The payload of a text frame, read as a client reads it.
    fn text(frame: Bytes) -> String {
        match crate::wire::tests::read_all(&frame).as_slice() {
            [Message::Text(t)] => t.to_string(),
            other => panic!("{other:?}"),
        }
    }

    fn binary(frame: Bytes) -> Bytes {
        match crate::wire::tests::read_all(&frame).as_slice() {
            [Message::Binary(b)] => b.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn env(format: Encoding, data: &'static [u8], kind: Kind) -> Envelope {
        Envelope {
            kind,
            origin: "n1".into(),
            target: "st\"adium".into(),
            from: "al".into(),
            ts_us: 1,
            format,
            data: Bytes::from_static(data),
            pos: None,
            key: None,
            key_seq: None,
        }
    }

    #[test]
    fn broadcast_frames_in_both_encodings() {
        let json = env(Encoding::Json, br#"{"s":[1,0]}"#, Kind::Room);
        let t = text(broadcast_frame(Encoding::Json, &json, 0).unwrap());
        assert_eq!(t, r#"{"op":"msg","room":"st\"adium","from":"al","data":{"s":[1,0]}}"#);
        let b = binary(broadcast_frame(Encoding::MsgPack, &json, 0).unwrap());
        let v: serde_json::Value = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"msg","room":"st\"adium","from":"al","data":{"s":[1,0]}})
        );

        let mp = env(Encoding::MsgPack, &[0x92, 0x01, 0xa1, b'x'], Kind::Direct);
        let t = text(broadcast_frame(Encoding::Json, &mp, 0).unwrap());
        assert_eq!(t, r#"{"op":"dm","from":"al","data":[1,"x"]}"#);
        let b = binary(broadcast_frame(Encoding::MsgPack, &mp, 0).unwrap());
        assert!(b.ends_with(&[0xa4, b'd', b'a', b't', b'a', 0x92, 0x01, 0xa1, b'x']));
    }

    #[test]
    fn transcoding_keeps_every_float_digit() {
        // Found by tests/fuzz.rs: without exact float parsing the last digit was lost.
        let mp = json_to_msgpack(b"{\"\":2.3906368994147834e-39}").unwrap();
        assert_eq!(msgpack_to_json(&mp).unwrap(), b"{\"\":2.3906368994147834e-39}");
    }

    #[test]
    fn broken_data_from_a_backend_is_refused() {
        for (format, data) in [
            (Encoding::Json, &b"{\"a\":"[..]),
            (Encoding::Json, b"1 2"),
            (Encoding::MsgPack, b"\x92\x01"),
            (Encoding::MsgPack, b"\x01\x02"),
        ] {
            let e = Envelope {
                data: Bytes::copy_from_slice(data),
                ..env(format, b"", Kind::Room)
            };
            for enc in Encoding::ALL {
                assert!(broadcast_frame(enc, &e, 0).is_err(), "{format:?} {data:?} as {enc:?}");
            }
        }
    }

    #[test]
    fn replies_in_both_encodings() {
        let e = FrameError::new(Some(9), ErrorCode::BadRoom, "bad");
        let t = text(Reply::error(&e).encode(Encoding::Json));
        assert_eq!(t, r#"{"op":"error","id":9,"code":"bad_room","message":"bad"}"#);
        let b = binary(Reply::op("ok", Some(1)).encode(Encoding::MsgPack));
        let v: serde_json::Value = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(v, serde_json::json!({"op":"ok","id":1}));
    }
}
