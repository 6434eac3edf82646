//! Server frames as they go on the wire, built once and shared.
//!
//! A server's frames are not masked (RFC 6455 §5.1), so a broadcast frame's bytes (header and
//! payload) are the same for every socket: the hub builds them once per message and encoding and
//! every socket is handed a clone of the same `Bytes`. Writes hand frames to the kernel as they
//! are, many per `writev`, with no per-socket framing or copying.

use std::io;

use bytes::{Buf, Bytes};
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
        self.finish(OpCode::Data(Data::Text))
    }

    pub fn binary(self) -> Bytes {
        self.finish(OpCode::Data(Data::Binary))
    }

    fn finish(self, opcode: OpCode) -> Bytes {
        let mut buf = self.0;
        let len = (buf.len() - MAX_HEADER) as u64;
        let header = FrameHeader {
            opcode,
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
    p.finish(OpCode::Control(Control::Close))
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
