//! A WebSocket client of its own for the feed viewers, because tungstenite refuses frames with
//! RSV1 and counts no bytes: it offers permessage-deflate (RFC 7692) at the upgrade, reads frames
//! off the TCP socket itself, counting every byte the kernel hands it, and inflates compressed
//! messages. It sends only text frames, masked and never compressed (RFC 7692 lets a client that
//! negotiated the extension send plain frames).
//!
//! Inflating: with `server_no_context_takeover` in the answer (the node's), each message is
//! inflated on its own, by the thread's inflater reset for it; without it the window carries over from one
//! message to the next, as the RFC's default. Frame headers are parsed by tungstenite's own
//! [`FrameHeader::parse`]. What a message means is the viewer's business.

use std::{cell::RefCell, io, net::IpAddr};

use bytes::{Buf, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::{
    client::IntoClientRequest,
    handshake::{client::generate_key, derive_accept_key},
    protocol::frame::{
        coding::{Control, Data, OpCode},
        Frame, FrameHeader,
    },
};

use crate::conn::NodeUrl;

/// What a sync flush ends a deflate block with: RFC 7692 §7.2.1 has the sender drop it and the
/// reader append it again.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest message read, compressed or inflated: past it the connection is given up.
const MAX_MESSAGE: usize = 16 << 20;

/// What the node answered to the extension offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// permessage-deflate is on.
    pub deflate: bool,
    /// The node compresses each message on its own (`server_no_context_takeover`).
    pub no_context: bool,
}

/// Why reading ended.
#[derive(Debug)]
pub enum ReadError {
    /// The node closed with this code (or none).
    Closed(Option<u16>),
    /// The TCP connection ended without a close frame.
    Eof,
    Io(io::Error),
    /// A frame this client cannot take: what was wrong.
    Protocol(&'static str),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// One data message, whole and inflated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub text: bool,
    pub data: Vec<u8>,
    /// It came compressed (RSV1).
    pub compressed: bool,
}

thread_local! {
    /// The inflater of messages compressed on their own, one per thread and reset per message:
    /// its state (tens of KiB) is made once per thread, not per message or per socket.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// An open WebSocket.
pub struct RawWs {
    stream: TcpStream,
    buf: BytesMut,
    pub negotiated: Negotiated,
    /// Bytes read from the TCP socket since the handshake's answer (its leftovers included).
    pub read_bytes: u64,
    /// The window carried over from message to message, when the node keeps its context (else
    /// [`INFLATER`] is used).
    inflater: Option<Decompress>,
    /// A fragmented message so far: whether it is text, compressed, and its bytes.
    partial: Option<(bool, bool, Vec<u8>)>,
}

/// Opens a WebSocket to `node` from the loopback address `source` as `user`, asking for the
/// JSON encoding; with `deflate`, offers permessage-deflate (`client_no_context_takeover`: this
/// client never compresses).
pub async fn open(node: &NodeUrl, source: IpAddr, user: &str, deflate: bool) -> anyhow::Result<RawWs> {
    use anyhow::{bail, Context};
    let mut stream = crate::conn::connect_from(node, source).await?;
    let sep = if node.ws.contains('?') { '&' } else { '?' };
    let req = format!("{}{sep}user={user}", node.ws).into_client_request()?;
    let uri = req.uri();
    let key = generate_key();
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: shardcast.v1.json\r\n{offer}\r\n",
        uri.path_and_query().map_or("/", |p| p.as_str()),
        uri.authority().map_or("localhost", |a| a.as_str()),
    );
    stream.write_all(request.as_bytes()).await.context("handshake")?;
    let mut buf = BytesMut::with_capacity(4096);
    let end = loop {
        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 16 << 10 {
            bail!("handshake: an answer of more than 16 KiB");
        }
        if stream.read_buf(&mut buf).await.context("handshake")? == 0 {
            bail!("handshake: closed");
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let answer = Answer::parse(&head).context("handshake: no HTTP answer")?;
    if answer.status != 101 {
        // Worded as tungstenite words it, so the report counts both clients' failures alike.
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split_once(' '))
            .map_or("", |(_, s)| s);
        bail!("handshake: HTTP error: {status}");
    }
    if answer.header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_str()) {
        bail!("handshake: a wrong Sec-WebSocket-Accept");
    }
    let negotiated = answer.negotiated();
    if negotiated.deflate && !deflate {
        bail!("handshake: an extension that was not offered");
    }
    buf.advance(end);
    Ok(RawWs {
        stream,
        read_bytes: buf.len() as u64,
        buf,
        negotiated,
        inflater: None,
        partial: None,
    })
}

/// An HTTP answer's status and headers.
struct Answer<'a> {
    status: u16,
    headers: Vec<(String, &'a str)>,
}

impl<'a> Answer<'a> {
    fn parse(head: &'a str) -> Option<Answer<'a>> {
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim()))
            .collect();
        Some(Answer { status, headers })
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// What the `Sec-WebSocket-Extensions` of the answer agreed to.
    fn negotiated(&self) -> Negotiated {
        let mut n = Negotiated::default();
        for (_, v) in self.headers.iter().filter(|(k, _)| k == "sec-websocket-extensions") {
            for ext in v.split(',') {
                let mut params = ext.split(';').map(str::trim);
                if params.next() == Some("permessage-deflate") {
                    n.deflate = true;
                    n.no_context = params.any(|p| p == "server_no_context_takeover");
                }
            }
        }
        n
    }
}

impl RawWs {
    /// Sends a text message, masked as a client must.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(Frame::message(text.as_bytes().to_vec(), OpCode::Data(Data::Text), true))
            .await
    }

    async fn send(&mut self, mut frame: Frame) -> io::Result<()> {
        frame.header_mut().mask = Some(rand::random());
        let mut out = Vec::with_capacity(frame.len());
        frame.format(&mut out).map_err(io::Error::other)?;
        self.stream.write_all(&out).await
    }

    /// The next data message, whole; answers pings on the way.
    pub async fn next(&mut self) -> Result<Message, ReadError> {
        loop {
            while let Some((header, payload)) = self.frame()? {
                if let Some(m) = self.on_frame(header, payload).await? {
                    return Ok(m);
                }
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            self.read_bytes += n as u64;
        }
    }

    /// A whole frame off the front of the buffer, if one is there.
    fn frame(&mut self) -> Result<Option<(FrameHeader, BytesMut)>, ReadError> {
        let mut cursor = io::Cursor::new(&self.buf[..]);
        let Some((header, len)) =
            FrameHeader::parse(&mut cursor).map_err(|_| ReadError::Protocol("a bad frame header"))?
        else {
            return Ok(None);
        };
        if len > MAX_MESSAGE as u64 {
            return Err(ReadError::Protocol("a frame too large"));
        }
        let at = cursor.position() as usize;
        if self.buf.len() < at + len as usize {
            self.buf.reserve(at + len as usize - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(at);
        Ok(Some((header, self.buf.split_to(len as usize))))
    }

    /// A frame read: a message when it completes one.
    async fn on_frame(&mut self, header: FrameHeader, payload: BytesMut) -> Result<Option<Message>, ReadError> {
        if header.mask.is_some() {
            return Err(ReadError::Protocol("a masked frame from the node"));
        }
        if (header.rsv1 && !self.negotiated.deflate) || header.rsv2 || header.rsv3 {
            return Err(ReadError::Protocol("a reserved bit not negotiated"));
        }
        let (text, compressed, data) = match header.opcode {
            OpCode::Control(Control::Ping) => {
                self.send(Frame::pong(payload.freeze())).await?;
                return Ok(None);
            }
            OpCode::Control(Control::Pong) => return Ok(None),
            OpCode::Control(Control::Close) => {
                let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return Err(ReadError::Closed(code));
            }
            OpCode::Control(_) => return Err(ReadError::Protocol("a reserved control opcode")),
            OpCode::Data(Data::Continue) => {
                let Some((text, compressed, mut data)) = self.partial.take() else {
                    return Err(ReadError::Protocol("a continuation of nothing"));
                };
                if data.len() + payload.len() > MAX_MESSAGE {
                    return Err(ReadError::Protocol("a message too large"));
                }
                data.extend_from_slice(&payload);
                (text, compressed, data)
            }
            OpCode::Data(d) => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("a new message inside a fragmented one"));
                }
                (d == Data::Text, header.rsv1, payload.to_vec())
            }
        };
        if !header.is_final {
            self.partial = Some((text, compressed, data));
            return Ok(None);
        }
        let data = if compressed {
            let inflated = match &mut self.inflater {
                _ if self.negotiated.no_context => INFLATER.with_borrow_mut(|d| {
                    d.reset(false);
                    inflate(d, &data, MAX_MESSAGE)
                }),
                Some(d) => inflate(d, &data, MAX_MESSAGE),
                slot => inflate(slot.insert(Decompress::new(false)), &data, MAX_MESSAGE),
            };
            inflated.ok_or(ReadError::Protocol("a message that does not inflate"))?
        } else {
            data
        };
        Ok(Some(Message { text, data, compressed }))
    }

    /// Closes with 1000 and waits briefly for the node to end the connection, so TIME_WAIT stays
    /// on its side.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(crate::conn::CLOSE_WAIT, async {
            let close = Frame::close(None);
            if self.send(close).await.is_err() {
                return;
            }
            let mut sink = [0u8; 4096];
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// A message's payload inflated with `d` (raw deflate) after the tail the sender dropped is put
/// back; `None` when it is no deflate stream or inflates past `limit`.
pub fn inflate(d: &mut Decompress, payload: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity((payload.len() * 4).clamp(256, limit));
    for input in [payload, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let read = (d.total_in() - start) as usize;
            if read == input.len() {
                break;
            }
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return None;
                }
                out.reserve(out.capacity().min(limit - out.len()));
            }
            let before = (d.total_in(), d.total_out());
            match d.decompress_vec(&input[read..], &mut out, FlushDecompress::Sync) {
                Ok(Status::StreamEnd) => break,
                Ok(_) if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use flate2::{Compress, Compression, FlushCompress};

    use super::*;

    /// A payload compressed as the node compresses it: on its own, sync-flushed, the tail dropped.
    fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(payload.len() + 64);
        c.compress_vec(payload, &mut out, FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn a_known_frame_inflates_to_its_text() {
        // RFC 7692 §7.2.3.1: "Hello" compressed, as a frame with RSV1 carries it.
        let frame = [0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let mut cursor = io::Cursor::new(&frame[..]);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert!(header.rsv1 && header.is_final && len == 7);
        let payload = &frame[cursor.position() as usize..];
        assert_eq!(inflate(&mut Decompress::new(false), payload, 1024).unwrap(), b"Hello");
        // A message of the node's, inflated on its own.
        let text = br#"{"op":"msg","room":"stadium","from":"lt-p0","data":{"a":[1,2,3],"b":"hello hello hello"}}"#;
        assert_eq!(
            inflate(&mut Decompress::new(false), &deflated(text), 1024).unwrap(),
            text
        );
    }

    #[test]
    fn what_does_not_inflate_or_inflates_too_far_is_refused() {
        assert_eq!(
            inflate(&mut Decompress::new(false), &[0xff, 0xff, 0xff, 0x00], 1024),
            None
        );
        let big = vec![b'a'; 100_000];
        assert_eq!(inflate(&mut Decompress::new(false), &deflated(&big), 10_000), None);
        assert_eq!(
            inflate(&mut Decompress::new(false), &deflated(&big), 200_000)
                .unwrap()
                .len(),
            100_000
        );
    }

    /// A node on loopback that answers the upgrade with `extensions` and, once the client has sent
    /// something, sends `frames` as they are; how many bytes it sent after its answer comes back
    /// once the client closes.
    async fn node(extensions: &'static str, frames: Vec<Vec<u8>>) -> (NodeUrl, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while memchr::memmem::find(&req, b"\r\n\r\n").is_none() {
                let mut chunk = [0u8; 1024];
                let n = s.read(&mut chunk).await.unwrap();
                req.extend_from_slice(&chunk[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            let key = req
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n{extensions}\r\n",
                derive_accept_key(key.as_bytes())
            );
            s.write_all(answer.as_bytes()).await.unwrap();
            // Nothing more until the client speaks: what it reads next comes from reads of its
            // own, not with the answer.
            let _ = s.read(&mut [0u8; 1024]).await;
            let sent: Vec<u8> = frames.concat();
            s.write_all(&sent).await.unwrap();
            // The client's close (or its end), then this end closes.
            let _ = s.read(&mut [0u8; 1024]).await;
            sent.len()
        });
        let node = NodeUrl {
            ws: format!("ws://{addr}/ws"),
            addr,
            publish: String::new(),
        };
        (node, task)
    }

    /// A server frame: FIN, RSV1 if `compressed`, the opcode, the payload unmasked.
    fn frame(opcode: u8, compressed: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode | if compressed { 0x40 } else { 0 }];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn compressed_and_plain_messages_are_read_and_every_byte_counted() {
        let big = br#"{"op":"msg","room":"stadium","data":"the keeper was never going to reach that one, the keeper was never"}"#;
        let frames = vec![
            frame(0x1, true, &deflated(big)),
            frame(0x9, false, b"ping"),
            frame(0x1, false, br#"{"op":"ok","id":1}"#),
            frame(0x1, true, &deflated(b"second")),
        ];
        let ext = "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n";
        let (node, task) = node(ext, frames).await;
        let mut ws = open(&node, "127.0.0.1".parse().unwrap(), "u", true).await.unwrap();
        ws.send_text("go").await.unwrap();
        assert_eq!(
            ws.negotiated,
            Negotiated {
                deflate: true,
                no_context: true
            }
        );
        let m = ws.next().await.unwrap();
        assert_eq!((m.text, m.compressed, &m.data[..]), (true, true, &big[..]));
        let m = ws.next().await.unwrap();
        assert_eq!((m.compressed, &m.data[..]), (false, &br#"{"op":"ok","id":1}"#[..]));
        assert_eq!(ws.next().await.unwrap().data, b"second");
        let read = ws.read_bytes;
        ws.close().await;
        assert_eq!(read, task.await.unwrap() as u64, "every byte after the answer");
    }

    #[tokio::test]
    async fn a_node_that_declines_deflate_sends_plain_frames_and_rsv1_from_it_is_refused() {
        let (node, _task) = node("", vec![frame(0x1, false, b"plain"), frame(0x1, true, b"x")]).await;
        let mut ws = open(&node, "127.0.0.1".parse().unwrap(), "u", true).await.unwrap();
        ws.send_text("go").await.unwrap();
        assert_eq!(ws.negotiated, Negotiated::default());
        assert_eq!(ws.next().await.unwrap().data, b"plain");
        assert!(matches!(ws.next().await, Err(ReadError::Protocol(_))));
    }

    #[test]
    fn the_answer_says_what_was_negotiated() {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n";
        let a = Answer::parse(head).unwrap();
        assert_eq!(a.status, 101);
        assert_eq!(
            a.negotiated(),
            Negotiated {
                deflate: true,
                no_context: true
            }
        );
        let plain = Answer::parse("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert_eq!(plain.negotiated(), Negotiated::default());
        assert_eq!(Answer::parse("HTTP/1.1 503 Busy\r\n\r\n").unwrap().status, 503);
    }
}
