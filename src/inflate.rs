//! The client's side of permessage-deflate (RFC 7692): compressed client frames, inflated for
//! tungstenite, which reads no frame with RSV1 set. A socket that negotiated the extension reads
//! its bytes through an [`Inflating`]: it parses the client's frame headers with tungstenite's own
//! parser, hands every frame that is not compressed on unchanged, and replaces each compressed
//! message with the same message uncompressed, in frames of at most [`CHUNK`] bytes, so tungstenite
//! reads it as any other. What tungstenite refuses (RSV1 on a control or continuation frame, an
//! unmasked frame) is left to it, and closed as it closes it (1002).
//!
//! Clients keep their compression context across messages (the node never asks otherwise: old
//! Safari breaks with `client_no_context_takeover`), so a message may refer to any of the last
//! bytes the client sent, as far back as its window: 1 KiB where the client let the node choose
//! (`client_max_window_bits`, which browsers offer: their commands are small), else 32 KiB. The
//! inflater (about 43 KiB) is made when the socket sends a compressed message and dropped when the
//! socket goes quiet; what stays is the window's worth of what it inflated, which primes a fresh
//! inflater as a stored block (read the same by every flate2 backend). Each message is inflated
//! as a stream of its own ending with a final empty block, so a message that does not end on a
//! block boundary (cut short) is seen at once; an empty compressed payload is an empty message.
//!
//! Sizes are checked as bytes come out of the inflater, a bounded chunk at a time: a message that
//! inflates past `--max-frame-bytes` is refused (1009) without inflating the rest, and a stream
//! that is not deflate is refused (1007). Which close each refusal gets is [`Error::reason`]'s.

use std::{
    io::{self, Cursor},
    pin::Pin,
    task::{ready, Context, Poll},
};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::{
    coding::{Data, OpCode},
    FrameHeader,
};

use crate::{close::CloseReason, metrics as m};

/// The most inflated bytes handed to tungstenite in one frame, and so the most inflated at once.
pub const CHUNK: usize = 16 << 10;
/// How far back a deflate stream may refer at most (a 15-bit window): what is kept of a client's
/// inflated bytes when it negotiated no smaller window.
pub const WINDOW_BITS: u8 = 15;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 4 << 10;
/// The longest client frame header: 2 bytes, a 64-bit length and a mask.
const MAX_HEADER: usize = 14;
/// How many compressed bytes are unmasked and inflated at once.
const UNMASK_CHUNK: usize = 1 << 10;
/// Appended to every compressed message: the `00 00 ff ff` a sender's sync flush ends with and
/// RFC 7692 §7.2.2 has the reader put back (the end of an empty stored block), then an empty
/// stored block marked final, so the stream must end on a block boundary here.
const END: [u8; 9] = [0x00, 0x00, 0xff, 0xff, 0x01, 0x00, 0x00, 0xff, 0xff];

/// Why a socket's compressed frames could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A compressed message inflates past `--max-frame-bytes`, or its frame is larger than that.
    #[error("compressed message larger than the frame limit")]
    TooLarge,
    /// The payload is not a deflate stream, or it does not end where its message ends.
    #[error("compressed message is not valid deflate")]
    Corrupt,
    /// A frame header that no client may send (a reserved opcode).
    #[error("invalid frame header")]
    Protocol,
}

impl Error {
    /// The close the session answers this refusal with.
    pub fn reason(self) -> CloseReason {
        match self {
            Error::TooLarge => CloseReason::FrameTooLarge,
            Error::Corrupt => CloseReason::InvalidPayload,
            Error::Protocol => CloseReason::ProtocolError,
        }
    }

    /// The refusal an I/O error from [`Inflating::poll_read`] carries, if it carries one.
    pub fn of(e: &io::Error) -> Option<Error> {
        e.get_ref()?.downcast_ref::<Error>().copied()
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum At {
    /// Before a frame's header.
    Header,
    /// Handing on a frame as it is: this many bytes of it (its header included) are left.
    Pass(u64),
    /// Inflating a compressed frame's payload: `left` bytes of it to come, `offset` read so far
    /// (where the mask stands).
    Inflate {
        left: u64,
        offset: u64,
        mask: [u8; 4],
        last: bool,
    },
}

/// The compressed message being read.
#[derive(Debug, Clone, Copy)]
struct Compressed {
    /// Text or binary: the opcode of its first frame as tungstenite gets it.
    opcode: OpCode,
    /// Whether a frame of it went to tungstenite already (those after it are continuations).
    started: bool,
    /// Its bytes inflated so far.
    size: usize,
    /// The deflate stream ended (the final block was read).
    ended: bool,
    /// How much of [`END`] the inflater took.
    end_fed: usize,
    /// Whether its frames carried any payload. None is an empty message: zlib does not repeat a
    /// sync flush with nothing new, so a client's empty message right after another one comes as
    /// an empty payload, which [`END`] would not end (RFC 7692 §7.2.3.6 suggests a single `00`).
    fed: bool,
}

/// Whether a message is being read, and of which kind: continuation frames belong to it.
#[derive(Debug, Clone, Copy)]
enum Message {
    None,
    /// Fragmented and not compressed: its continuations are handed on as they are.
    Plain,
    Compressed(Compressed),
}

/// One socket's reader of compressed frames. Idle, it holds a few words and the window (what the
/// client sent last: at most 1 KiB with the window the node asks browsers for, 32 KiB from a
/// client that could not be asked); its buffers and its inflater exist while it reads.
pub struct Inflating {
    /// `--max-frame-bytes`: the most one message may inflate to.
    limit: usize,
    /// Bytes read from the socket, from `raw_at` on not yet used.
    raw: Vec<u8>,
    raw_at: usize,
    /// A frame built for tungstenite: room for a header, then its payload. From `out_at` on it is
    /// handed over once `ready`.
    out: Vec<u8>,
    out_at: usize,
    ready: bool,
    at: At,
    message: Message,
    inflater: Option<Box<Decompress>>,
    /// The last bytes inflated, the most recent at the end: between the window's size and twice
    /// that while reading, trimmed to its size when the socket goes quiet.
    window: Vec<u8>,
    /// How far back the client's messages may refer: 2 to the window bits it negotiated.
    window_size: u32,
    /// The socket ended, or a refusal was returned: nothing more is read.
    done: bool,
}

/// What one step of the reader did.
enum Step {
    /// Something changed; step again.
    Progress,
    /// Bytes from the socket are needed.
    Input,
}

impl Inflating {
    /// A reader for messages of at most `limit` bytes inflated, compressed with a window of
    /// `window_bits` (8 to 15); `early` is what the client sent behind its handshake, read before
    /// the socket.
    pub fn new(limit: usize, window_bits: u8, early: Vec<u8>) -> Inflating {
        Inflating {
            limit,
            raw: early,
            raw_at: 0,
            out: Vec::new(),
            out_at: 0,
            ready: false,
            at: At::Header,
            message: Message::None,
            inflater: None,
            window: Vec::new(),
            window_size: 1 << window_bits.clamp(8, WINDOW_BITS),
            done: false,
        }
    }

    /// Whether an inflater is held now (between a compressed message's first frame and the
    /// socket's next quiet moment).
    #[cfg(test)]
    fn holds_inflater(&self) -> bool {
        self.inflater.is_some()
    }

    /// How many inflated bytes the reader keeps for the client's next message.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.window.len()
    }

    /// Reads the client's frames from `socket` into `buf` as tungstenite should see them.
    pub fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        socket: &mut R,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.done || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.ready {
                let n = buf.remaining().min(self.out.len() - self.out_at);
                buf.put_slice(&self.out[self.out_at..self.out_at + n]);
                self.out_at += n;
                if self.out_at == self.out.len() {
                    self.out.clear();
                    self.out_at = 0;
                    self.ready = false;
                }
                return Poll::Ready(Ok(()));
            }
            if let At::Pass(left) = self.at {
                let n = (buf.remaining() as u64)
                    .min(left)
                    .min((self.raw.len() - self.raw_at) as u64) as usize;
                if n > 0 {
                    buf.put_slice(&self.raw[self.raw_at..self.raw_at + n]);
                    self.raw_at += n;
                    self.at = match left - n as u64 {
                        0 => At::Header,
                        left => At::Pass(left),
                    };
                    return Poll::Ready(Ok(()));
                }
            }
            match self.step() {
                Ok(Step::Progress) => continue,
                Ok(Step::Input) => {}
                Err(e) => {
                    self.done = true;
                    self.release();
                    return Poll::Ready(Err(e.into()));
                }
            }
            match ready!(self.poll_fill(socket, cx)) {
                Ok(0) => {
                    // The end of the stream: tungstenite sees it as such.
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads more of the socket behind what is kept; when it has nothing, the socket is quiet and
    /// what only reading needs is let go.
    fn poll_fill<R: AsyncRead + Unpin>(&mut self, socket: &mut R, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.raw.drain(..self.raw_at);
        self.raw_at = 0;
        let kept = self.raw.len();
        self.raw.resize(kept + READ_CHUNK, 0);
        let mut read = ReadBuf::new(&mut self.raw[kept..]);
        let polled = Pin::new(socket).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.raw.truncate(kept + n);
        match polled {
            Poll::Pending => {
                self.quiet();
                Poll::Pending
            }
            Poll::Ready(r) => Poll::Ready(r.map(|()| n)),
        }
    }

    /// The socket has nothing more to read now: between messages, the inflater and the buffers
    /// go, and the window is cut to what a stream may refer to.
    fn quiet(&mut self) {
        if self.raw.is_empty() {
            self.raw = Vec::new();
        }
        if matches!(self.message, Message::Compressed(_)) {
            return;
        }
        self.release();
    }

    fn release(&mut self) {
        self.inflater = None;
        if !self.ready {
            self.out = Vec::new();
        }
        if self.window.len() > self.window_size as usize {
            self.window.drain(..self.window.len() - self.window_size as usize);
        }
        self.window.shrink_to_fit();
    }

    /// One step over the bytes at hand.
    fn step(&mut self) -> Result<Step, Error> {
        match self.at {
            At::Header => self.header(),
            At::Pass(_) => Ok(Step::Input),
            At::Inflate {
                left,
                offset,
                mask,
                last,
            } => self.inflate_frame(left, offset, mask, last),
        }
    }

    /// Reads a frame's header, if it is all there, and decides what becomes of the frame.
    fn header(&mut self) -> Result<Step, Error> {
        let mut cursor = Cursor::new(&self.raw[self.raw_at..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(Step::Input),
            Err(_) => return Err(Error::Protocol),
        };
        let header_len = cursor.position() as usize;
        let clean = !header.rsv2 && !header.rsv3;
        let compressed = match (header.opcode, self.message, header.mask) {
            // A compressed message begins.
            (OpCode::Data(Data::Text | Data::Binary), Message::None, Some(mask)) if header.rsv1 && clean => {
                self.message = Message::Compressed(Compressed {
                    opcode: header.opcode,
                    started: false,
                    size: 0,
                    ended: false,
                    end_fed: 0,
                    fed: false,
                });
                self.start_stream();
                Some(mask)
            }
            // The next frame of one.
            (OpCode::Data(Data::Continue), Message::Compressed(_), Some(mask)) if !header.rsv1 && clean => Some(mask),
            _ => None,
        };
        match compressed {
            Some(mask) => {
                if len > self.limit as u64 {
                    return Err(Error::TooLarge);
                }
                self.raw_at += header_len;
                self.at = At::Inflate {
                    left: len,
                    offset: 0,
                    mask,
                    last: header.is_final,
                };
            }
            None => {
                // Handed on as it is; tungstenite judges it. What it starts or ends is followed so
                // that continuations are told apart.
                match (header.opcode, header.is_final) {
                    (OpCode::Data(Data::Text | Data::Binary), false) if matches!(self.message, Message::None) => {
                        self.message = Message::Plain
                    }
                    (OpCode::Data(Data::Continue), true) if matches!(self.message, Message::Plain) => {
                        self.message = Message::None
                    }
                    _ => {}
                }
                self.at = At::Pass(header_len as u64 + len);
            }
        }
        Ok(Step::Progress)
    }

    /// A fresh deflate stream for a message that begins: the inflater made (or reset) and primed
    /// with the window as one stored block, so the message may refer to what came before it.
    fn start_stream(&mut self) {
        let inflater = self.inflater.get_or_insert_with(|| Box::new(Decompress::new(false)));
        inflater.reset(false);
        let start = self.window.len().saturating_sub(self.window_size as usize);
        let window = &self.window[start..];
        if window.is_empty() {
            return;
        }
        // A stored block, not final: BFINAL 0, BTYPE 00, LEN and its complement, the bytes.
        let len = window.len() as u16;
        let mut head = [0u8; 5];
        head[1..3].copy_from_slice(&len.to_le_bytes());
        head[3..5].copy_from_slice(&(!len).to_le_bytes());
        let mut sink = [0u8; 4096];
        for input in [&head[..], window] {
            let mut at = 0;
            // Stored bytes go out as they come in; the inflater takes all of them in rounds.
            while at < input.len() {
                let before = (inflater.total_in(), inflater.total_out());
                let _ = inflater.decompress(&input[at..], &mut sink, FlushDecompress::None);
                if (inflater.total_in(), inflater.total_out()) == before {
                    break;
                }
                at += (inflater.total_in() - before.0) as usize;
            }
        }
        // What the stored block holds may still be in the inflater, to be written out.
        loop {
            let before = inflater.total_out();
            let _ = inflater.decompress(&[], &mut sink, FlushDecompress::None);
            if inflater.total_out() == before {
                break;
            }
        }
    }

    /// Inflates a bounded chunk of a compressed frame's payload, or ends the frame.
    fn inflate_frame(&mut self, left: u64, offset: u64, mask: [u8; 4], last: bool) -> Result<Step, Error> {
        let Message::Compressed(mut msg) = self.message else {
            return Err(Error::Protocol);
        };
        if self.out.len() >= MAX_HEADER + CHUNK {
            self.emit(&mut msg, false);
            self.message = Message::Compressed(msg);
            return Ok(Step::Progress);
        }
        if left > 0 {
            let have = self.raw.len() - self.raw_at;
            if have == 0 {
                return Ok(Step::Input);
            }
            if msg.ended {
                // Bytes after the stream's final block.
                return Err(Error::Corrupt);
            }
            let n = (left as usize).min(have).min(UNMASK_CHUNK);
            let mut plain = [0u8; UNMASK_CHUNK];
            for (i, (p, b)) in plain
                .iter_mut()
                .zip(&self.raw[self.raw_at..self.raw_at + n])
                .enumerate()
            {
                *p = b ^ mask[((offset + i as u64) % 4) as usize];
            }
            let (used, _) = self.inflate(&mut msg, &plain[..n])?;
            msg.fed = true;
            self.raw_at += used;
            self.message = Message::Compressed(msg);
            self.at = At::Inflate {
                left: left - used as u64,
                offset: offset + used as u64,
                mask,
                last,
            };
            return Ok(Step::Progress);
        }
        if !last {
            self.message = Message::Compressed(msg);
            self.at = At::Header;
            return Ok(Step::Progress);
        }
        if !msg.fed {
            msg.ended = true;
        }
        if !msg.ended {
            let room = self.out.len() < MAX_HEADER + CHUNK;
            let fed = msg.end_fed;
            let (used, made) = self.inflate(&mut msg, &END[fed..])?;
            msg.end_fed += used;
            if !msg.ended && msg.end_fed == END.len() && room && used == 0 && made == 0 {
                // All of it taken, room to write, and still no end: the message was cut short.
                return Err(Error::Corrupt);
            }
            self.message = Message::Compressed(msg);
            return Ok(Step::Progress);
        }
        self.emit(&mut msg, true);
        self.message = Message::None;
        self.at = At::Header;
        Ok(Step::Progress)
    }

    /// Feeds `input` to the inflater, its output into the frame being built; how much of `input`
    /// it took, and how much it wrote.
    fn inflate(&mut self, msg: &mut Compressed, input: &[u8]) -> Result<(usize, usize), Error> {
        let Some(inflater) = self.inflater.as_mut() else {
            return Err(Error::Protocol);
        };
        if self.out.is_empty() {
            self.out.reserve_exact(MAX_HEADER + CHUNK);
            self.out.resize(MAX_HEADER, 0);
        }
        let room = MAX_HEADER + CHUNK - self.out.len();
        let (in0, out0) = (inflater.total_in(), inflater.total_out());
        let from = self.out.len();
        self.out.resize(from + room, 0);
        let status = inflater.decompress(input, &mut self.out[from..], FlushDecompress::None);
        let used = (inflater.total_in() - in0) as usize;
        let made = (inflater.total_out() - out0) as usize;
        self.out.truncate(from + made);
        match status {
            Ok(Status::StreamEnd) => msg.ended = true,
            Ok(_) if used == 0 && made == 0 && room > 0 && !input.is_empty() => return Err(Error::Corrupt),
            Ok(_) => {}
            Err(_) => return Err(Error::Corrupt),
        }
        msg.size += made;
        if msg.size > self.limit {
            return Err(Error::TooLarge);
        }
        self.window.extend_from_slice(&self.out[from..]);
        if self.window.len() >= 2 * self.window_size as usize {
            self.window.drain(..self.window.len() - self.window_size as usize);
        }
        Ok((used, made))
    }

    /// Makes the frame built so far ready for tungstenite: the message's first frame carries its
    /// opcode, the rest are continuations. Masked, as a client frame must be, with a zero mask.
    fn emit(&mut self, msg: &mut Compressed, last: bool) {
        if self.out.is_empty() {
            self.out.resize(MAX_HEADER, 0);
        }
        let len = (self.out.len() - MAX_HEADER) as u64;
        m::inflated(len);
        let header = FrameHeader {
            is_final: last,
            opcode: if msg.started {
                OpCode::Data(Data::Continue)
            } else {
                msg.opcode
            },
            mask: Some([0; 4]),
            ..FrameHeader::default()
        };
        msg.started = true;
        let start = MAX_HEADER - header.len(len);
        // Exactly `header.len(len)` bytes: the slice is the right size, so this cannot fail.
        let _ = header.format(len, &mut &mut self.out[start..MAX_HEADER]);
        self.out_at = start;
        self.ready = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};
    use futures_util::StreamExt;
    use tokio_tungstenite::{
        tungstenite::{protocol::Role, Error as WsError, Message as WsMessage},
        WebSocketStream,
    };

    /// A client's compressor with context takeover, as browsers and Node's `ws` keep it.
    struct Client(Compress);

    impl Client {
        fn new() -> Client {
            Client(Compress::new(Compression::default(), false))
        }

        /// One message's payload: deflated with a sync flush, its `00 00 ff ff` dropped. Nothing
        /// for an empty message right after another flush: zlib does not repeat a flush.
        fn deflate(&mut self, data: &[u8]) -> Vec<u8> {
            let mut out = Vec::with_capacity(data.len() + 64);
            let start = self.0.total_in();
            loop {
                let at = (self.0.total_in() - start) as usize;
                out.reserve(1024);
                self.0.compress_vec(&data[at..], &mut out, FlushCompress::Sync).unwrap();
                if (self.0.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
                    break;
                }
            }
            if out.ends_with(&[0, 0, 0xff, 0xff]) {
                out.truncate(out.len() - 4);
            } else {
                assert!(data.is_empty() && out.is_empty(), "a flush ends with 00 00 ff ff");
            }
            out
        }
    }

    /// A masked client frame.
    fn frame(head: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let header = FrameHeader {
            is_final: head & 0x80 != 0,
            rsv1: head & 0x40 != 0,
            opcode: OpCode::from(head & 0x0f),
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// A socket for tests: `Inflating` over in-memory bytes.
    struct Over<'a> {
        bytes: &'a [u8],
        inflating: Inflating,
        writes: Vec<u8>,
    }

    impl AsyncRead for Over<'_> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = &mut *self;
            this.inflating.poll_read(&mut this.bytes, cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Over<'_> {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What tungstenite reads from `wire` through an `Inflating` with `limit`: the messages, then
    /// the error it stopped on, if any.
    async fn read(wire: &[u8], limit: usize) -> (Vec<WsMessage>, Option<WsError>) {
        let wire = [wire, &frame(0x88, &1000u16.to_be_bytes())].concat();
        let over = Over {
            bytes: &wire,
            inflating: Inflating::new(limit, WINDOW_BITS, Vec::new()),
            writes: Vec::new(),
        };
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(256)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let mut ws = WebSocketStream::from_raw_socket(over, Role::Server, Some(config)).await;
        let mut msgs = Vec::new();
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(WsMessage::Close(_)) => break,
                Ok(m) => msgs.push(m),
                Err(e) => return (msgs, Some(e)),
            }
        }
        (msgs, None)
    }

    fn refusal(e: &Option<WsError>) -> Option<Error> {
        match e {
            Some(WsError::Io(e)) => Error::of(e),
            _ => None,
        }
    }

    #[test]
    fn an_idle_reader_is_small() {
        // Every socket that negotiated the extension holds one for its life (docs/design.md).
        let size = std::mem::size_of::<Inflating>();
        assert!(size <= 200, "an Inflating grew to {size} bytes");
    }

    #[tokio::test]
    async fn compressed_messages_read_as_plain_with_the_clients_context() {
        let mut client = Client::new();
        let texts: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    r#"{{"op":"pub","room":"r","data":{{"n":{i},"text":"{}"}}}}"#,
                    "ab".repeat(i * 40)
                )
            })
            .collect();
        let mut wire = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            if i % 3 == 0 {
                // Not every message is compressed (RFC 7692 §6: RSV1 per message).
                wire.extend(frame(0x81, t.as_bytes()));
            } else {
                wire.extend(frame(0xc1, &client.deflate(t.as_bytes())));
            }
            wire.extend(frame(0x89, b"p"));
        }
        let (msgs, err) = read(&wire, 1 << 20).await;
        assert!(err.is_none(), "{err:?}");
        let got: Vec<String> = msgs
            .into_iter()
            .filter_map(|m| match m {
                WsMessage::Text(t) => Some(t.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(got, texts);
    }

    #[tokio::test]
    async fn an_empty_compressed_payload_is_an_empty_message_and_the_context_goes_on() {
        let mut client = Client::new();
        let mut wire = Vec::new();
        let texts = ["the first line, the first line", "", "", "the first line again", ""];
        let mut payloads = Vec::new();
        for t in texts {
            let payload = client.deflate(t.as_bytes());
            wire.extend(frame(0xc1, &payload));
            payloads.push(payload);
        }
        assert!(
            payloads[2].is_empty(),
            "zlib's second flush with nothing new: {payloads:?}"
        );
        let (msgs, err) = read(&wire, 1 << 20).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(msgs, texts.map(WsMessage::text));
    }

    #[tokio::test]
    async fn a_fragmented_compressed_message_with_a_ping_between_reads_whole() {
        let mut client = Client::new();
        let data = vec![7u8; 100_000];
        let payload = client.deflate(&data);
        let (a, b) = payload.split_at(payload.len() / 2);
        let mut wire = frame(0x42, a); // binary, RSV1, not final
        wire.extend(frame(0x89, b"x"));
        wire.extend(frame(0x80, b)); // continuation, final
        let (msgs, err) = read(&wire, 1 << 20).await;
        assert!(err.is_none(), "{err:?}");
        assert!(matches!(&msgs[0], WsMessage::Ping(p) if &p[..] == b"x"), "{msgs:?}");
        assert_eq!(msgs[1], WsMessage::binary(data));
    }

    #[tokio::test]
    async fn a_message_that_inflates_past_the_limit_is_refused_without_inflating_it_all() {
        let mut client = Client::new();
        let bomb = client.deflate(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let (msgs, err) = read(&frame(0xc2, &bomb), 64 << 10).await;
        assert!(msgs.is_empty());
        assert_eq!(refusal(&err), Some(Error::TooLarge), "{err:?}");
        assert_eq!(refusal(&err).unwrap().reason(), CloseReason::FrameTooLarge);
    }

    #[tokio::test]
    async fn corrupt_and_cut_streams_are_refused() {
        // BTYPE 11 is reserved.
        let (_, err) = read(&frame(0xc1, &[0x07, 0x00]), 1 << 20).await;
        assert_eq!(refusal(&err), Some(Error::Corrupt), "{err:?}");
        // A stream cut inside a stored block.
        let (_, err) = read(&frame(0xc1, &[0x00, 0x10, 0x00, 0xef, 0xff, b'a']), 1 << 20).await;
        assert_eq!(refusal(&err), Some(Error::Corrupt), "{err:?}");
        // A real message cut short.
        let mut client = Client::new();
        let text: String = (0..2000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
        let whole = client.deflate(text.as_bytes());
        let (_, err) = read(&frame(0xc1, &whole[..whole.len() / 2]), 1 << 20).await;
        assert_eq!(refusal(&err), Some(Error::Corrupt), "{err:?}");
        assert_eq!(Error::Corrupt.reason(), CloseReason::InvalidPayload);
    }

    #[tokio::test]
    async fn rsv1_where_it_cannot_be_is_left_to_tungstenite() {
        for (wire, what) in [
            (frame(0xc9, b""), "a ping"),
            (
                [frame(0x41, &Client::new().deflate(b"ab")), frame(0xc0, b"")].concat(),
                "a continuation",
            ),
        ] {
            let (_, err) = read(&wire, 1 << 20).await;
            assert!(
                matches!(
                    err,
                    Some(WsError::Protocol(
                        tokio_tungstenite::tungstenite::error::ProtocolError::NonZeroReservedBits
                    ))
                ),
                "{what}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_inflater_goes_when_the_socket_is_quiet_and_the_context_stays() {
        let (mut near, mut far) = tokio::io::duplex(1 << 16);
        let mut inflating = Inflating::new(1 << 20, WINDOW_BITS, Vec::new());
        let mut client = Client::new();
        let read_one = |inflating: &mut Inflating, far: &mut tokio::io::DuplexStream| {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                let mut rb = ReadBuf::new(&mut buf);
                let waker = futures_util::task::noop_waker();
                match inflating.poll_read(far, &mut Context::from_waker(&waker), &mut rb) {
                    Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                    Poll::Pending => return got,
                    Poll::Ready(Err(e)) => panic!("{e}"),
                }
            }
        };
        use tokio::io::AsyncWriteExt;
        let line = b"the same line, over and over, refers back to the last one";
        for i in 0..5 {
            near.write_all(&frame(0xc1, &client.deflate(line))).await.unwrap();
            let got = read_one(&mut inflating, &mut far);
            assert!(got.ends_with(line), "message {i}: {got:?}");
            assert!(!inflating.holds_inflater(), "released once quiet");
        }
        let again = client.deflate(line);
        assert!(again.len() < line.len() / 2, "the client refers back: {again:x?}");
    }

    #[tokio::test]
    async fn a_client_that_negotiated_a_small_window_costs_that_window_when_quiet() {
        let (mut near, mut far) = tokio::io::duplex(1 << 16);
        let mut inflating = Inflating::new(1 << 20, 10, Vec::new());
        // Stored blocks: a client that refers back to nothing.
        let mut client = Client(Compress::new(Compression::none(), false));
        use tokio::io::AsyncWriteExt;
        for i in 0..8u8 {
            let message = vec![b'a' + i; 400];
            near.write_all(&frame(0xc1, &client.deflate(&message))).await.unwrap();
            let mut buf = vec![0u8; 1024];
            let mut got = Vec::new();
            while got.len() < 400 {
                let mut rb = ReadBuf::new(&mut buf);
                let waker = futures_util::task::noop_waker();
                match inflating.poll_read(&mut far, &mut Context::from_waker(&waker), &mut rb) {
                    Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                    other => panic!("message {i}: {other:?}"),
                }
            }
            assert!(got.ends_with(&message), "message {i}");
        }
        let mut buf = [0u8; 64];
        let waker = futures_util::task::noop_waker();
        let quiet = inflating.poll_read(&mut far, &mut Context::from_waker(&waker), &mut ReadBuf::new(&mut buf));
        assert!(quiet.is_pending());
        assert_eq!(inflating.kept(), 1024, "a 10-bit window: 1 KiB kept, not 32");
    }
}
