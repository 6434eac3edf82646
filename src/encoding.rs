//! The two wire encodings, JSON and MessagePack: of a client's frames (chosen by the WebSocket
//! subprotocol) and of a message's `data` (the envelope's `format`). The lowest shared type of the
//! crate: envelopes, client frames and fan-out all speak in it.

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
