//! Client frames, both encodings: decoding what a client sends, and building what it receives.
//!
//! A client may send JSON text frames or MessagePack binary frames whatever it negotiated; the node
//! answers in the negotiated encoding. Broadcast frames are built here once per message and
//! encoding, splicing the publisher's `data` bytes in unchanged when the encodings match.

use bytes::Bytes;
use serde::{de::IgnoredAny, Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

pub use crate::encoding::{Encoding, PROTOCOL_JSON, PROTOCOL_MSGPACK};
use crate::{
    bus::stream::{BadPos, Pos},
    close::ErrorCode,
    envelope::{Envelope, Kind},
    names,
    wire::Payload,
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
}

/// The most messages one `history` asks for.
pub const MAX_HISTORY_LIMIT: u64 = 1000;

/// Decodes a text frame (JSON).
pub fn decode_text(text: &str) -> Result<Request, FrameError> {
    let wire: Wire<&RawValue> = serde_json::from_str(text)
        .map_err(|e| FrameError::new(None, ErrorCode::BadFrame, format!("malformed JSON: {e}")))?;
    build(wire, |raw| {
        Ok(Data {
            format: Encoding::Json,
            bytes: Bytes::copy_from_slice(raw.get().as_bytes()),
        })
    })
}

/// Decodes a binary frame (MessagePack).
pub fn decode_binary(bytes: &[u8]) -> Result<Request, FrameError> {
    let wire: Wire<rmpv::Value> = rmp_serde::from_slice(bytes)
        .map_err(|e| FrameError::new(None, ErrorCode::BadFrame, format!("malformed MessagePack: {e}")))?;
    let id = wire.id.as_ref().and_then(|l| match l {
        Loose::Ok(n) => Some(*n),
        Loose::Bad(_) => None,
    });
    build(wire, |value| {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &value)
            .map_err(|e| FrameError::new(id, ErrorCode::BadData, e.to_string()))?;
        // Reject at the source what no JSON subscriber could receive.
        msgpack_to_json(&out)
            .map_err(|e| FrameError::new(id, ErrorCode::BadData, format!("data has no JSON form: {e}")))?;
        Ok(Data {
            format: Encoding::MsgPack,
            bytes: Bytes::from(out),
        })
    })
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
    let command = match op.as_str() {
        "join" => Command::Join {
            room: name(id, wire.room, "room", ErrorCode::BadRoom)?,
            since: since(id, wire.since)?,
        },
        "history" => {
            let room = name(id, wire.room, "room", ErrorCode::BadRoom)?;
            if id.is_none() {
                return Err(FrameError::new(id, ErrorCode::BadField, "`history` needs an `id`"));
            }
            let limit = match wire.limit {
                Some(Loose::Ok(n)) if (1..=MAX_HISTORY_LIMIT).contains(&n) => n as usize,
                None => return Err(FrameError::new(id, ErrorCode::BadField, "missing field `limit`")),
                Some(_) => {
                    return Err(FrameError::new(
                        id,
                        ErrorCode::BadField,
                        format!("`limit` must be a whole number from 1 to {MAX_HISTORY_LIMIT}"),
                    ))
                }
            };
            Command::History { room, limit }
        }
        "leave" => Command::Leave {
            room: name(id, wire.room, "room", ErrorCode::BadRoom)?,
        },
        "pub" => {
            let room = name(id, wire.room, "room", ErrorCode::BadRoom)?;
            Command::Pub {
                room,
                data: data(wire.data)?,
            }
        }
        "dm" => {
            let to = name(id, wire.to, "to", ErrorCode::BadUser)?;
            Command::Dm {
                to,
                data: data(wire.data)?,
            }
        }
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

/// `since`: a list of positions, one per shard (at most [`crate::config::MAX_SHARDS`]).
fn since(id: Option<i64>, field: Option<Loose<Vec<String>>>) -> Result<Option<Vec<Pos>>, FrameError> {
    let bad = |why: &str| FrameError::new(id, ErrorCode::BadField, format!("`since` {why}"));
    match field {
        None => Ok(None),
        Some(Loose::Bad(_)) => Err(bad("must be a list of positions")),
        Some(Loose::Ok(list)) if list.len() > crate::config::MAX_SHARDS as usize => {
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

/// Why a broadcast frame could not be built for one encoding.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("invalid JSON data: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid MessagePack data: {0}")]
    MsgPack(String),
}

/// Transcodes MessagePack `data` to JSON text, refusing trailing bytes.
pub fn msgpack_to_json(data: &[u8]) -> Result<Vec<u8>, TranscodeError> {
    let mut cursor = std::io::Cursor::new(data);
    let mut out = Vec::with_capacity(data.len() + data.len() / 2);
    {
        let mut de = rmp_serde::Deserializer::new(&mut cursor);
        let mut ser = serde_json::Serializer::new(&mut out);
        serde_transcode::transcode(&mut de, &mut ser).map_err(|e| match e.classify() {
            serde_json::error::Category::Io => TranscodeError::MsgPack(e.to_string()),
            _ => TranscodeError::Json(e),
        })?;
    }
    if cursor.position() as usize != data.len() {
        return Err(TranscodeError::MsgPack("trailing bytes".into()));
    }
    Ok(out)
}

/// Transcodes JSON `data` to MessagePack, refusing trailing characters.
pub fn json_to_msgpack(data: &[u8]) -> Result<Vec<u8>, TranscodeError> {
    let mut out = Vec::with_capacity(data.len());
    let mut de = serde_json::Deserializer::from_slice(data);
    let mut ser = rmp_serde::Serializer::new(&mut out);
    serde_transcode::transcode(&mut de, &mut ser).map_err(|e| TranscodeError::MsgPack(e.to_string()))?;
    de.end()?;
    Ok(out)
}

fn check_json(data: &[u8]) -> Result<(), TranscodeError> {
    let mut de = serde_json::Deserializer::from_slice(data);
    IgnoredAny::deserialize(&mut de)?;
    de.end()?;
    Ok(())
}

fn check_msgpack(data: &[u8]) -> Result<(), TranscodeError> {
    let mut cursor = std::io::Cursor::new(data);
    IgnoredAny::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor))
        .map_err(|e| TranscodeError::MsgPack(e.to_string()))?;
    if cursor.position() as usize != data.len() {
        return Err(TranscodeError::MsgPack("trailing bytes".into()));
    }
    Ok(())
}

/// Builds the `msg` (room) or `dm` frame of an envelope in one encoding. A message with a
/// position (a room with history) also carries its shard and position.
pub fn broadcast_frame(encoding: Encoding, env: &Envelope, shard: u32) -> Result<Bytes, TranscodeError> {
    let mut out = Payload::with_capacity(48 + env.target.len() + env.from.len() + env.data.len());
    write_message(&mut out, encoding, env, shard)?;
    Ok(match encoding {
        Encoding::Json => out.text(),
        Encoding::MsgPack => out.binary(),
    })
}

/// Writes a message as one value (a JSON object, a MessagePack map), as a frame holds it.
fn write_message(out: &mut Payload, encoding: Encoding, env: &Envelope, shard: u32) -> Result<(), TranscodeError> {
    let op = match env.kind {
        Kind::Room => "msg",
        Kind::Direct => "dm",
    };
    let room = env.kind == Kind::Room;
    let pos = env.pos.map(|p| p.to_string());
    match encoding {
        Encoding::Json => {
            let converted;
            let data: &[u8] = match env.format {
                Encoding::Json => {
                    check_json(&env.data)?;
                    &env.data
                }
                Encoding::MsgPack => {
                    converted = msgpack_to_json(&env.data)?;
                    &converted
                }
            };
            out.put(b"{\"op\":\"");
            out.put(op.as_bytes());
            out.put(b"\"");
            if room {
                out.put(b",\"room\":");
                serde_json::to_writer(&mut *out, &env.target)?;
            }
            out.put(b",\"from\":");
            serde_json::to_writer(&mut *out, &env.from)?;
            if let Some(pos) = &pos {
                out.put(format!(",\"shard\":{shard},\"pos\":\"{pos}\"").as_bytes());
            }
            out.put(b",\"data\":");
            // Checked or produced by serde_json above, so UTF-8, as a text frame must be.
            out.put(data);
            out.put(b"}");
        }
        Encoding::MsgPack => {
            let converted;
            let data: &[u8] = match env.format {
                Encoding::MsgPack => {
                    check_msgpack(&env.data)?;
                    &env.data
                }
                Encoding::Json => {
                    converted = json_to_msgpack(&env.data)?;
                    &converted
                }
            };
            let fields = 3 + u32::from(room) + if pos.is_some() { 2 } else { 0 };
            // Writes into a Vec cannot fail.
            let _ = rmp::encode::write_map_len(&mut *out, fields);
            let _ = rmp::encode::write_str(&mut *out, "op");
            let _ = rmp::encode::write_str(&mut *out, op);
            if room {
                let _ = rmp::encode::write_str(&mut *out, "room");
                let _ = rmp::encode::write_str(&mut *out, &env.target);
            }
            let _ = rmp::encode::write_str(&mut *out, "from");
            let _ = rmp::encode::write_str(&mut *out, &env.from);
            if let Some(pos) = &pos {
                let _ = rmp::encode::write_str(&mut *out, "shard");
                let _ = rmp::encode::write_uint(&mut *out, u64::from(shard));
                let _ = rmp::encode::write_str(&mut *out, "pos");
                let _ = rmp::encode::write_str(&mut *out, pos);
            }
            let _ = rmp::encode::write_str(&mut *out, "data");
            out.put(data);
        }
    }
    Ok(())
}

/// The answer to `history`: `{"op":"ok","id":I,"msgs":[...]}` with each message as a `msg` frame
/// holds it. Messages that cannot be framed in `encoding` are left out.
pub fn history_frame(encoding: Encoding, id: Option<i64>, msgs: &[(Envelope, u32)]) -> Bytes {
    let mut out = Payload::with_capacity(64 + msgs.iter().map(|(e, _)| 64 + e.data.len()).sum::<usize>());
    let mut framed = Vec::with_capacity(msgs.len());
    for (env, shard) in msgs {
        let mut one = Payload::with_capacity(48 + env.data.len());
        if write_message(&mut one, encoding, env, *shard).is_ok() {
            framed.push(one);
        }
    }
    match encoding {
        Encoding::Json => {
            out.put(b"{\"op\":\"ok\"");
            if let Some(id) = id {
                out.put(format!(",\"id\":{id}").as_bytes());
            }
            out.put(b",\"msgs\":[");
            for (i, one) in framed.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                out.put(one.body());
            }
            out.put(b"]}");
            out.text()
        }
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(&mut out, if id.is_some() { 3 } else { 2 });
            let _ = rmp::encode::write_str(&mut out, "op");
            let _ = rmp::encode::write_str(&mut out, "ok");
            if let Some(id) = id {
                let _ = rmp::encode::write_str(&mut out, "id");
                let _ = rmp::encode::write_sint(&mut out, id);
            }
            let _ = rmp::encode::write_str(&mut out, "msgs");
            let _ = rmp::encode::write_array_len(&mut out, framed.len() as u32);
            for one in &framed {
                out.put(one.body());
            }
            out.binary()
        }
    }
}

/// A small reply to one connection: `ok`, `error`, `pong` or `reconnect`.
#[derive(Debug, Serialize)]
pub struct Reply<'a> {
    pub op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// A publish's position, or where each shard of a joined room stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pos: Option<Positions>,
    /// Whether a join with `since` replayed everything the client missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// `pos` in a reply: one position (a publish), or one per shard (a join).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Positions {
    One(String),
    Each(Vec<String>),
}

impl<'a> Reply<'a> {
    pub fn op(op: &'a str, id: Option<i64>) -> Reply<'a> {
        Reply {
            op,
            id,
            code: None,
            message: None,
            after_ms: None,
            pos: None,
            recovered: None,
        }
    }

    pub fn error(err: &'a FrameError) -> Reply<'a> {
        Reply {
            op: "error",
            id: err.id,
            code: Some(err.code.as_str()),
            message: Some(&err.message),
            after_ms: None,
            pos: err.pos.map(|p| Positions::One(p.to_string())),
            recovered: None,
        }
    }

    /// The reply's wire frame. A reply is a few fields of known types: serializing it cannot fail.
    pub fn encode(&self, encoding: Encoding) -> Bytes {
        let mut out = Payload::with_capacity(64);
        match encoding {
            Encoding::Json => {
                let _ = serde_json::to_writer(&mut out, self);
                out.text()
            }
            Encoding::MsgPack => {
                let _ = rmp_serde::encode::write_named(&mut out, self);
                out.binary()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Message;

    fn err(text: &str) -> FrameError {
        decode_text(text).unwrap_err()
    }

    #[test]
    fn decodes_every_command_from_json() {
        let r = decode_text(r#"{"op":"join","room":"stadium","id":7}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: Some(7),
                command: Command::Join {
                    room: "stadium".into(),
                    since: None
                }
            }
        );
        let r = decode_text(r#"{"op":"pub","room":"s","data":{"a":[1, 2]}}"#).unwrap();
        assert_eq!(
            r.command,
            Command::Pub {
                room: "s".into(),
                data: Data {
                    format: Encoding::Json,
                    bytes: Bytes::from_static(br#"{"a":[1, 2]}"#)
                }
            }
        );
        let r = decode_text(r#"{"op":"dm","to":"bob","data":null}"#).unwrap();
        assert!(matches!(r.command, Command::Dm { ref to, ref data } if to == "bob" && &data.bytes[..] == b"null"));
        assert_eq!(decode_text(r#"{"op":"ping"}"#).unwrap().command, Command::Ping);
        assert_eq!(
            decode_text(r#"{"op":"leave","room":"s"}"#).unwrap().command,
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
        let r = decode_binary(&bytes).unwrap();
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
            decode_binary(b"\xc1\xff\x00garbage").unwrap_err().code,
            ErrorCode::BadFrame
        );
        assert_eq!(decode_binary(b"").unwrap_err().code, ErrorCode::BadFrame);
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
        assert_eq!(decode_binary(&b).unwrap_err().code, ErrorCode::BadData);
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
