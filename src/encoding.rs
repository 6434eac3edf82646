//! The two wire encodings, JSON and MessagePack: of a client's frames (chosen by the WebSocket
//! subprotocol) and of a message's `data` (the envelope's `format`). The lowest shared type of the
//! crate: envelopes, client frames and fan-out all speak in it. Transcoding a message's `data`
//! from one to the other is here too.

use serde::{de::IgnoredAny, Deserialize};

/// The `Sec-WebSocket-Protocol` that selects JSON text frames (also the default).
pub const PROTOCOL_JSON: &str = "shardcast.v1.json";
/// The `Sec-WebSocket-Protocol` that selects MessagePack binary frames.
pub const PROTOCOL_MSGPACK: &str = "shardcast.v1.msgpack";

/// A wire encoding: of a client's frames, and of a message's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    pub const ALL: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

    pub fn from_protocol(protocol: &str) -> Option<Encoding> {
        match protocol {
            PROTOCOL_JSON => Some(Encoding::Json),
            PROTOCOL_MSGPACK => Some(Encoding::MsgPack),
            _ => None,
        }
    }

    /// The envelope's `format` value for data in this encoding.
    pub fn wire_format(self) -> u8 {
        match self {
            Encoding::MsgPack => 0,
            Encoding::Json => 1,
        }
    }

    /// A dense index, for per-encoding tables.
    pub fn index(self) -> usize {
        match self {
            Encoding::Json => 0,
            Encoding::MsgPack => 1,
        }
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

pub(crate) fn check_json(data: &[u8]) -> Result<(), TranscodeError> {
    let mut de = serde_json::Deserializer::from_slice(data);
    IgnoredAny::deserialize(&mut de)?;
    de.end()?;
    Ok(())
}

pub(crate) fn check_msgpack(data: &[u8]) -> Result<(), TranscodeError> {
    let mut cursor = std::io::Cursor::new(data);
    IgnoredAny::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor))
        .map_err(|e| TranscodeError::MsgPack(e.to_string()))?;
    if cursor.position() as usize != data.len() {
        return Err(TranscodeError::MsgPack("trailing bytes".into()));
    }
    Ok(())
}
