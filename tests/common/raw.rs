//! A WebSocket client written by hand over a TCP socket, for the frames a well-behaved client
//! library refuses to send. Every read has a deadline.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

/// The mask every frame of this client is sent with.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame the node sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN, RSV and opcode bits as sent.
    pub head: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn opcode(&self) -> u8 {
        self.head & 0x0f
    }

    /// A close frame's code and reason.
    pub fn close(&self) -> Option<(u16, String)> {
        if self.opcode() != 0x8 {
            return None;
        }
        match self.payload.as_slice() {
            [] => Some((1005, String::new())),
            [a, b, reason @ ..] => Some((u16::from_be_bytes([*a, *b]), String::from_utf8_lossy(reason).into())),
            _ => Some((0, String::new())),
        }
    }
}

/// What the node sent until it closed the connection (or the deadline passed).
#[derive(Debug, Default)]
pub struct Ending {
    pub frames: Vec<Frame>,
    /// The socket ended (end of stream or reset) before the deadline.
    pub closed: bool,
    /// Bytes that are not a whole frame.
    pub rest: Vec<u8>,
}

impl Ending {
    /// The first close frame's code and reason.
    pub fn close(&self) -> Option<(u16, String)> {
        self.frames.iter().find_map(Frame::close)
    }
}

pub struct RawWs {
    pub tcp: TcpStream,
    buf: Vec<u8>,
}

/// The opening handshake of `GET /ws{query}`, with `extra` header lines; panics unless 101.
pub async fn connect(addr: SocketAddr, query: &str, extra: &str) -> RawWs {
    connect_answered(addr, query, extra).await.0
}

/// The same, with the head of the node's answer (status line and headers).
pub async fn connect_answered(addr: SocketAddr, query: &str, extra: &str) -> (RawWs, String) {
    let mut tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let request = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("handshake answer in time")
            .expect("read handshake answer");
        assert!(n > 0, "closed during the handshake: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    let ws = RawWs {
        tcp,
        buf: buf[end..].to_vec(),
    };
    (ws, head)
}

/// A header's value in the head of an answer, if it is there once.
pub fn answer_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A frame as a client sends it: `head` (FIN, RSV, opcode) as given, the payload masked.
pub fn masked(head: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = header(head, 0x80, payload.len());
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// A frame without a mask, which a client must never send.
pub fn unmasked(head: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = header(head, 0, payload.len());
    out.extend_from_slice(payload);
    out
}

fn header(head: u8, mask_bit: u8, len: usize) -> Vec<u8> {
    let mut out = vec![head];
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out
}

/// Whole server frames at the front of `buf`, and how many bytes they took.
pub fn parse(buf: &[u8]) -> (Vec<Frame>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((frame, len)) = first(&buf[at..]) {
        frames.push(frame);
        at += len;
    }
    (frames, at)
}

/// The whole server frame at the front of `buf`, if there is one, and its length.
fn first(rest: &[u8]) -> Option<(Frame, usize)> {
    if rest.len() < 2 {
        return None;
    }
    let (len, start) = match rest[1] & 0x7f {
        126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
        127 if rest.len() >= 10 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    // A server never masks; a mask bit here is a node bug the caller sees as leftover bytes.
    if rest[1] & 0x80 != 0 || rest.len() < start + len {
        return None;
    }
    let frame = Frame {
        head: rest[0],
        payload: rest[start..start + len].to_vec(),
    };
    Some((frame, start + len))
}

impl RawWs {
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(bytes).await
    }

    /// Reads until the node closes the socket or `within` passes.
    pub async fn read_to_end(&mut self, within: Duration) -> Ending {
        let deadline = Instant::now() + within;
        let mut closed = false;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        let (frames, used) = parse(&self.buf);
        Ending {
            frames,
            closed,
            rest: self.buf[used..].to_vec(),
        }
    }

    /// The node's next frame, or `None` when none came within `within` (or the socket ended).
    pub async fn next_frame(&mut self, within: Duration) -> Option<Frame> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((frame, len)) = first(&self.buf) {
                self.buf.drain(..len);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until the first close frame (or the end, or `within`) and returns its code and reason.
    pub async fn close_frame(&mut self, within: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + within;
        loop {
            let (frames, _) = parse(&self.buf);
            if let Some(close) = frames.iter().find_map(Frame::close) {
                return Some(close);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }
}
