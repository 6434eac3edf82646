//! Server frames, what the node sends: broadcasts ([`broadcast_frame`]), answers ([`Reply`]) and
//! control frames, as they go on the wire, built once and shared.
//!
//! A server's frames are not masked (RFC 6455 §5.1), so a broadcast frame's bytes (header and
//! payload) are the same for every socket: the hub builds them once per message and encoding and
//! every socket is handed a clone of the same `Bytes`. Writes hand frames to the kernel as they
//! are, many per `writev`, with no per-socket framing or copying.

use std::{borrow::Cow, io};

use bytes::{Buf, Bytes};
use serde::Serialize;

use crate::{
    compress,
    encoding::{check_json, check_msgpack, json_to_msgpack, msgpack_to_json, Encoding, TranscodeError},
    envelope::{Envelope, Kind},
    frame::FrameError,
};
use tokio_tungstenite::tungstenite::protocol::frame::{
    coding::{Control, Data, OpCode},
    FrameHeader,
};

/// The longest server frame header: 2 bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// An empty ping, sent every `--ping-interval`.
pub const PING: Bytes = Bytes::from_static(&[0x89, 0x00]);

/// A frame being built: the payload is written behind room for the longest header, which is filled
/// in at the end, so a frame is one allocation and its payload is never copied.
pub struct Payload(Vec<u8>);

impl Payload {
    pub fn with_capacity(payload: usize) -> Payload {
        let mut buf = Vec::with_capacity(MAX_HEADER + payload);
        buf.resize(MAX_HEADER, 0);
        Payload(buf)
    }

    pub fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// What was written so far, without room for the header.
    pub fn body(&self) -> &[u8] {
        &self.0[MAX_HEADER..]
    }

    /// A text frame; the caller wrote UTF-8 (JSON it built or checked).
    pub fn text(self) -> Bytes {
        self.finish(OpCode::Data(Data::Text), false)
    }

    pub fn binary(self) -> Bytes {
        self.finish(OpCode::Data(Data::Binary), false)
    }

    /// A frame whose payload is compressed (RSV1 set, RFC 7692 §6).
    fn finish(self, opcode: OpCode, rsv1: bool) -> Bytes {
        let mut buf = self.0;
        let len = (buf.len() - MAX_HEADER) as u64;
        let header = FrameHeader {
            opcode,
            rsv1,
            ..FrameHeader::default()
        };
        let start = MAX_HEADER - header.len(len);
        // Exactly `header.len(len)` bytes: the slice is the right size, so this cannot fail.
        let _ = header.format(len, &mut &mut buf[start..MAX_HEADER]);
        let mut frame = Bytes::from(buf);
        frame.advance(start);
        frame
    }
}

impl io::Write for Payload {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.put(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A close frame with a code and a reason (at most 123 bytes, as every reason here is).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut p = Payload::with_capacity(2 + reason.len());
    p.put(&code.to_be_bytes());
    p.put(reason.as_bytes());
    p.finish(OpCode::Control(Control::Close), false)
}

/// The compressed form of a data frame the node built ([`crate::compress`]): the same message,
/// RSV1 set, for every socket that negotiated permessage-deflate. `None` when the payload is
/// shorter than `min` or would not shrink: such a frame goes as it is, which the extension allows
/// message by message.
pub fn deflated(frame: &Bytes, min: usize) -> Option<Bytes> {
    if payload_of(frame)?.len() < min {
        return None;
    }
    deflated_after(frame, &[]).filter(|out| out.len() < frame.len())
}

/// The frame a [`deflated`] frame of `frame` is for a socket whose inflater's window ends with
/// `before` (the payloads of the compressed frames it was sent last): the same message compressed
/// as their continuation, RSV1 set. `None` when `frame` is not a data frame the node built
/// uncompressed.
pub fn deflated_after(frame: &Bytes, before: &[u8]) -> Option<Bytes> {
    let (header, payload) = data_frame(frame)?;
    Some(compressed(header.opcode, before, payload))
}

/// A frame of `opcode` carrying `payload` compressed after `before` (alone when empty), RSV1 set.
fn compressed(opcode: OpCode, before: &[u8], payload: &[u8]) -> Bytes {
    let small = compress::deflate_after(before, payload);
    let mut out = Payload::with_capacity(small.len());
    out.put(&small);
    out.finish(opcode, true)
}

/// The payload of a data frame the node built, as the client reads it once inflated (for a
/// compressed frame's uncompressed form: the frame it was made from).
pub fn payload_of(frame: &[u8]) -> Option<&[u8]> {
    data_frame(frame).map(|(_, payload)| payload)
}

/// A data frame the node built, uncompressed: its header and payload.
fn data_frame(frame: &[u8]) -> Option<(FrameHeader, &[u8])> {
    unframe(frame).filter(|(h, _)| !h.rsv1 && matches!(h.opcode, OpCode::Data(_)))
}

/// Whether a frame is compressed (RSV1 set): the client inflates it, and its payload joins the
/// client's window.
pub fn is_compressed(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x40 != 0)
}

/// Builds the `msg` (room) or `dm` frame of an envelope in one encoding. A message with a
/// position (a room with history) also carries its shard and position, a keyed one its key.
pub fn broadcast_frame(encoding: Encoding, env: &Envelope, shard: u32) -> Result<Bytes, TranscodeError> {
    framed(encoding, env, shard, false, Carried::Value)
}

/// The frame of a key's latest value sent on a join: a `msg` frame marked `"latest":true`.
pub fn latest_frame(encoding: Encoding, env: &Envelope, shard: u32) -> Result<Bytes, TranscodeError> {
    framed(encoding, env, shard, true, Carried::Value)
}

/// What the `data` of a keyed `msg` frame carries.
#[derive(Debug, Clone, Copy)]
pub enum Carried<'a> {
    /// The value, as every socket that did not join with `delta` reads it.
    Value,
    /// For a socket that joined with `delta`: `"delta":false` and the value's exact bytes (its
    /// JSON text as a string, or its MessagePack bytes as `bin`), the base of the next delta.
    Whole,
    /// For a socket that joined with `delta` and has the key's previous value: `"delta":true` and
    /// the fossil delta from that value's bytes to this one's (a string, or `bin`).
    Delta(&'a [u8]),
}

/// The `msg` frame of a keyed message for a socket that joined with `delta` ([`Carried`]). A delta
/// that is not UTF-8 cannot be a JSON string: an error, and such a socket gets the whole value.
pub fn keyed_frame(
    encoding: Encoding,
    env: &Envelope,
    shard: u32,
    carried: Carried<'_>,
) -> Result<Bytes, TranscodeError> {
    framed(encoding, env, shard, false, carried)
}

/// A message's data as `encoding` puts it in a frame: the bytes a delta is computed between.
pub fn value_of(encoding: Encoding, env: &Envelope) -> Result<Cow<'_, [u8]>, TranscodeError> {
    Ok(match (encoding, env.format) {
        (Encoding::Json, Encoding::Json) => {
            check_json(&env.data)?;
            Cow::Borrowed(&env.data)
        }
        (Encoding::Json, Encoding::MsgPack) => Cow::Owned(msgpack_to_json(&env.data)?),
        (Encoding::MsgPack, Encoding::MsgPack) => {
            check_msgpack(&env.data)?;
            Cow::Borrowed(&env.data)
        }
        (Encoding::MsgPack, Encoding::Json) => Cow::Owned(json_to_msgpack(&env.data)?),
    })
}

fn framed(
    encoding: Encoding,
    env: &Envelope,
    shard: u32,
    latest: bool,
    carried: Carried<'_>,
) -> Result<Bytes, TranscodeError> {
    let key = env.key.as_ref().map_or(0, |k| k.len() + 24);
    let mut out = Payload::with_capacity(64 + env.target.len() + env.from.len() + env.data.len() + key);
    write_message(&mut out, encoding, env, shard, latest, carried)?;
    Ok(match encoding {
        Encoding::Json => out.text(),
        Encoding::MsgPack => out.binary(),
    })
}

/// The same `msg` frame with `"skipped":N` added: the values of its key the socket did not get
/// (added to those a frame marked already says). The field goes first (JSON) or as the map's first
/// pair (MessagePack, a `msg` map has fewer than 16 pairs), so nothing else is re-encoded. `None`
/// for a frame the node did not build this way.
pub fn with_skipped(frame: &[u8], skipped: u32) -> Option<Bytes> {
    let (header, payload) = unframe(frame)?;
    if !header.rsv1 {
        return skipped_added(header.opcode, payload, skipped).map(|p| p.finish(header.opcode, false));
    }
    // A compressed frame (a socket that negotiated permessage-deflate): inflated, marked and
    // compressed again, for this socket alone. Only a conflating socket's frames come here.
    let plain = compress::inflate(payload, MAX_EDITED)?;
    let marked = skipped_added(header.opcode, &plain, skipped)?;
    Some(compressed(header.opcode, &[], marked.body()))
}

/// The largest frame [`with_skipped`] inflates to mark it: the node's own frames are never larger
/// than what a publish may carry, well below this.
const MAX_EDITED: usize = 64 << 20;

/// A `msg` payload with `"skipped":N` added, as [`with_skipped`] places it.
fn skipped_added(opcode: OpCode, payload: &[u8], skipped: u32) -> Option<Payload> {
    const JSON_FIELD: &[u8] = b"{\"skipped\":";
    const MSGPACK_KEY: &[u8] = b"\xa7skipped";
    let mut out = Payload::with_capacity(payload.len() + 16);
    match opcode {
        OpCode::Data(Data::Text) if payload.first() == Some(&b'{') => {
            let (had, rest) = match payload.strip_prefix(JSON_FIELD) {
                Some(rest) => {
                    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                    let had: u32 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
                    (had, rest.get(digits + 1..)?)
                }
                None => (0, &payload[1..]),
            };
            out.put(format!("{{\"skipped\":{},", had.saturating_add(skipped)).as_bytes());
            out.put(rest);
        }
        OpCode::Data(Data::Binary) if payload.first().is_some_and(|b| (0x80..0x8f).contains(b)) => {
            let body = &payload[1..];
            let (header, had, rest) = match body.strip_prefix(MSGPACK_KEY) {
                Some(mut after) => {
                    let had: u32 = rmp::decode::read_int(&mut after).ok()?;
                    (payload[0], had, after)
                }
                None => (payload[0] + 1, 0, body),
            };
            out.put(&[header]);
            let _ = rmp::encode::write_str(&mut out, "skipped");
            let _ = rmp::encode::write_uint(&mut out, u64::from(had.saturating_add(skipped)));
            out.put(rest);
        }
        _ => return None,
    }
    Some(out)
}

/// The header and payload of one whole, final, unmasked frame, as [`Payload`] builds them.
fn unframe(frame: &[u8]) -> Option<(FrameHeader, &[u8])> {
    let mut cursor = io::Cursor::new(frame);
    let (header, len) = FrameHeader::parse(&mut cursor).ok().flatten()?;
    let payload = &frame[cursor.position() as usize..];
    (header.is_final && header.mask.is_none() && payload.len() as u64 == len).then_some((header, payload))
}

/// Writes a message as one value (a JSON object, a MessagePack map), as a frame holds it.
fn write_message(
    out: &mut Payload,
    encoding: Encoding,
    env: &Envelope,
    shard: u32,
    latest: bool,
    carried: Carried<'_>,
) -> Result<(), TranscodeError> {
    let op = match env.kind {
        Kind::Room => "msg",
        // Never framed: the hub closes the user's sockets instead.
        Kind::Direct | Kind::Disconnect => "dm",
    };
    let room = env.kind == Kind::Room;
    let pos = env.pos.map(|p| p.to_string());
    let value = value_of(encoding, env)?;
    let (delta, data): (Option<bool>, &[u8]) = match carried {
        Carried::Value => (None, &value),
        Carried::Whole => (Some(false), &value),
        Carried::Delta(delta) => (Some(true), delta),
    };
    match encoding {
        Encoding::Json => {
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
            if let Some(key) = &env.key {
                out.put(b",\"key\":");
                serde_json::to_writer(&mut *out, key)?;
            }
            if latest {
                out.put(b",\"latest\":true");
            }
            out.put(b",\"data\":");
            match delta {
                // Checked or produced by serde_json, so UTF-8, as a text frame must be.
                None => out.put(data),
                Some(delta) => {
                    let text = std::str::from_utf8(data)
                        .map_err(|_| <serde_json::Error as serde::de::Error>::custom("a delta that is not UTF-8"))?;
                    serde_json::to_writer(&mut *out, text)?;
                    out.put(if delta { b",\"delta\":true" } else { b",\"delta\":false" });
                }
            }
            out.put(b"}");
        }
        Encoding::MsgPack => {
            let fields = 3
                + u32::from(room)
                + if pos.is_some() { 2 } else { 0 }
                + u32::from(env.key.is_some())
                + u32::from(latest)
                + u32::from(delta.is_some());
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
            if let Some(key) = &env.key {
                let _ = rmp::encode::write_str(&mut *out, "key");
                let _ = rmp::encode::write_str(&mut *out, key);
            }
            if latest {
                let _ = rmp::encode::write_str(&mut *out, "latest");
                let _ = rmp::encode::write_bool(&mut *out, true);
            }
            if let Some(delta) = delta {
                let _ = rmp::encode::write_str(&mut *out, "delta");
                let _ = rmp::encode::write_bool(&mut *out, delta);
            }
            let _ = rmp::encode::write_str(&mut *out, "data");
            match delta {
                None => out.put(data),
                Some(_) => {
                    let _ = rmp::encode::write_bin(&mut *out, data);
                }
            }
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
        if write_message(&mut one, encoding, env, *shard, false, Carried::Value).is_ok() {
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

/// The body of `GET /rooms/<room>/latest`: `{"room":R,"msgs":[...]}`, each message as a `msg`
/// frame of a join with `latest` holds it. Messages that cannot be framed as JSON are left out.
pub fn latest_body(room: &str, msgs: &[(Envelope, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + msgs.iter().map(|(e, _)| 96 + e.data.len()).sum::<usize>());
    out.extend_from_slice(b"{\"room\":");
    // Writes into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, room);
    out.extend_from_slice(b",\"msgs\":[");
    let mut first = true;
    for (env, shard) in msgs {
        let mut one = Payload::with_capacity(48 + env.data.len());
        if write_message(&mut one, Encoding::Json, env, *shard, true, Carried::Value).is_ok() {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(one.body());
        }
    }
    out.extend_from_slice(b"]}");
    out
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
    /// The room a presence event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    /// The user who joined or left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// A room's count of users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// A small room's users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<&'a str>>,
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
            room: None,
            user: None,
            count: None,
            users: None,
        }
    }

    pub fn error(err: &'a FrameError) -> Reply<'a> {
        Reply {
            code: Some(err.app_code.as_deref().unwrap_or(err.code.as_str())),
            message: Some(&err.message),
            pos: err.pos.map(|p| Positions::One(p.to_string())),
            ..Reply::op("error", err.id)
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

/// A command's answer as the frame to send, if any; a refusal is counted by its code.
pub fn encode(answer: Result<Option<Reply<'_>>, FrameError>, encoding: Encoding) -> Option<Bytes> {
    match answer {
        Ok(reply) => reply.map(|r| r.encode(encoding)),
        Err(e) => {
            crate::metrics::bad_frame(e.code.as_str());
            Some(Reply::error(&e).encode(encoding))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::{protocol::Role, Message, WebSocket};

    /// Reads `bytes` as a client would, with tungstenite's own parser.
    pub(crate) fn read_all(bytes: &[u8]) -> Vec<Message> {
        let mut ws = WebSocket::from_raw_socket(std::io::Cursor::new(bytes.to_vec()), Role::Client, None);
        let mut out = Vec::new();
        while let Ok(msg) = ws.read() {
            out.push(msg);
        }
        out
    }

    #[test]
    fn a_keyed_frame_carries_its_key_and_marks_are_added_without_reencoding() {
        let mut env = Envelope::to_room("m", Bytes::from_static(br#"{"h":1}"#));
        env.key = Some("score".into());
        for encoding in Encoding::ALL {
            let read = |frame: &Bytes| -> serde_json::Value {
                match read_all(frame).pop().unwrap() {
                    Message::Text(t) => serde_json::from_str(&t).unwrap(),
                    Message::Binary(b) => rmp_serde::from_slice(&b).unwrap(),
                    other => panic!("{other:?}"),
                }
            };
            let live = broadcast_frame(encoding, &env, 0).unwrap();
            let v = read(&live);
            assert_eq!((v["key"].as_str(), v.get("latest")), (Some("score"), None), "{v}");
            assert_eq!(read(&latest_frame(encoding, &env, 0).unwrap())["latest"], true);
            let once = with_skipped(&live, 3).unwrap();
            let v = read(&once);
            assert_eq!(
                (v["skipped"].as_u64(), v["data"]["h"].as_u64()),
                (Some(3), Some(1)),
                "{v}"
            );
            // Marked again: the counts add up, the field is there once.
            let twice = read(&with_skipped(&once, 2).unwrap());
            assert_eq!(twice["skipped"], 5, "{twice}");
            assert_eq!(twice.as_object().unwrap().len(), v.as_object().unwrap().len());
        }
        assert!(with_skipped(&PING, 1).is_none());
        assert!(with_skipped(b"\x81", 1).is_none());
    }

    #[test]
    fn frames_parse_as_a_client_reads_them() {
        let long = "é".repeat(40_000); // 80,000 bytes: the 64-bit length form
        let mid = vec![7u8; 300]; // the 16-bit length form
        let mut wire = Vec::new();
        let text = |s: &[u8]| {
            let mut p = Payload::with_capacity(s.len());
            p.put(s);
            p.text()
        };
        let mut bin = Payload::with_capacity(0);
        bin.put(&mid);
        for f in [
            text(b"{\"op\":\"msg\"}"),
            bin.binary(),
            PING,
            text(long.as_bytes()),
            text(b""),
            close(4008, "slow consumer"),
        ] {
            wire.extend_from_slice(&f);
        }
        let msgs = read_all(&wire);
        assert_eq!(msgs.len(), 6, "{msgs:?}");
        assert_eq!(msgs[0], Message::text("{\"op\":\"msg\"}"));
        assert_eq!(msgs[1], Message::binary(mid));
        assert!(matches!(msgs[2], Message::Ping(ref p) if p.is_empty()));
        assert_eq!(msgs[3], Message::text(long));
        assert_eq!(msgs[4], Message::text(""));
        let Message::Close(Some(c)) = &msgs[5] else {
            panic!("{:?}", msgs[5])
        };
        assert_eq!((u16::from(c.code), c.reason.as_str()), (4008, "slow consumer"));
    }
}
