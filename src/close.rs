//! Every close code and `error.code` string of the client contract, in one place.
//!
//! Clients program against these values, so they never change meaning once shipped; add new ones
//! at the end and document them in docs/protocol.md, the client contract.

/// WebSocket close codes the node sends.
pub mod code {
    /// Normal closure (client asked to close, or the node ended the session cleanly).
    pub const NORMAL: u16 = 1000;
    /// The client broke the WebSocket protocol (RFC 6455 §7.4.1): an unmasked frame, reserved bits
    /// set, an unknown opcode, a fragmented or oversized control frame, a continuation with
    /// nothing to continue, a malformed close frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame (or a close frame's reason) that is not valid UTF-8, or a compressed message
    /// that is not valid deflate.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame larger than `--max-frame-bytes` arrived, or a compressed message inflated past it.
    pub const FRAME_TOO_LARGE: u16 = 1009;
    /// Rate limit exceeded again and again (see `--command-rate`).
    pub const POLICY: u16 = 1008;
    /// The node is draining (deploy or shutdown); reconnect to another node.
    pub const DRAIN: u16 = 4001;
    /// Nothing (not even a pong) came from the client within `--idle-timeout`.
    pub const IDLE: u16 = 4002;
    /// The connection's token expired (`exp`); reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The socket's outbound queue passed `--max-buffered-bytes`.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// `code` strings carried by `{"op":"error"}` frames and by HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not valid JSON (text) or MessagePack (binary), or not a map.
    BadFrame,
    /// `op` names no known command.
    UnknownOp,
    /// A field is missing or has the wrong type.
    BadField,
    /// A room name is empty, too long, or has a control character, a brace or an invisible or
    /// bidirectional control character (see [`crate::names`]).
    BadRoom,
    /// A user id breaks the same rules as a room name.
    BadUser,
    /// `data` cannot be carried: MessagePack that has no JSON form, or nested deeper than
    /// `--max-data-depth` (in either encoding).
    BadData,
    /// Joining would pass `--max-rooms-per-conn`.
    TooManyRooms,
    /// `leave` for a room this connection has not joined.
    NotJoined,
    /// The bus cannot take the command right now (Redis unreachable, subscription not in place).
    Unavailable,
    /// Missing or wrong credentials (HTTP only).
    Unauthorized,
    /// The token does not allow this room, or publishing.
    Forbidden,
    /// More commands than `--command-rate` allows on a socket, or more `POST /publish` requests
    /// from one address than `--publish-rate` allows (HTTP 429); slow down.
    RateLimited,
    /// Published and kept in history, but fewer replicas than `--publish-replicas` confirmed it
    /// in time: it may be lost if its master dies now. The error carries its `pos`; do not
    /// publish it again blindly.
    Unconfirmed,
    /// A keyed message with a new key, in a room whose latest values already hold
    /// `--max-keys-per-room` keys: nothing was published.
    TooManyKeys,
}

impl ErrorCode {
    /// The stable wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadField => "bad_field",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::BadUser => "bad_user",
            ErrorCode::BadData => "bad_data",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unconfirmed => "unconfirmed",
            ErrorCode::TooManyKeys => "too_many_keys",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a session ended; the label of `shardcast_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Normal,
    SlowConsumer,
    FrameTooLarge,
    Idle,
    Auth,
    Drain,
    Error,
    RateLimited,
    /// The client broke the WebSocket protocol; closed with 1002.
    ProtocolError,
    /// The client sent text that is not UTF-8; closed with 1007.
    InvalidPayload,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::Idle => "idle",
            CloseReason::Auth => "auth",
            CloseReason::Drain => "drain",
            CloseReason::Error => "error",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidPayload => "invalid_payload",
        }
    }

    /// The close frame the node sends after its reader ended for this reason (`None`: answer the
    /// client's own close). The inverse of [`CloseReason::for_code`] for these reasons.
    pub fn frame(self) -> Option<(u16, &'static str)> {
        match self {
            CloseReason::Normal => None,
            CloseReason::FrameTooLarge => Some((code::FRAME_TOO_LARGE, "frame too large")),
            CloseReason::RateLimited => Some((code::POLICY, "rate limited")),
            CloseReason::ProtocolError => Some((code::PROTOCOL_ERROR, "protocol error")),
            CloseReason::InvalidPayload => Some((code::INVALID_PAYLOAD, "invalid payload")),
            _ => Some((code::NORMAL, "")),
        }
    }

    /// The reason a close the node sends with `code` is counted under.
    pub fn for_code(close_code: u16) -> CloseReason {
        match close_code {
            code::DRAIN => CloseReason::Drain,
            code::IDLE => CloseReason::Idle,
            code::TOKEN_EXPIRED => CloseReason::Auth,
            code::SLOW_CONSUMER => CloseReason::SlowConsumer,
            code::FRAME_TOO_LARGE => CloseReason::FrameTooLarge,
            code::POLICY => CloseReason::RateLimited,
            code::PROTOCOL_ERROR => CloseReason::ProtocolError,
            code::INVALID_PAYLOAD => CloseReason::InvalidPayload,
            _ => CloseReason::Normal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_closes_are_counted_under_their_own_reason() {
        for reason in [
            CloseReason::FrameTooLarge,
            CloseReason::RateLimited,
            CloseReason::ProtocolError,
            CloseReason::InvalidPayload,
        ] {
            let (c, _) = reason.frame().unwrap();
            assert_eq!(CloseReason::for_code(c), reason);
        }
        assert_eq!(CloseReason::Normal.frame(), None);
    }
}
