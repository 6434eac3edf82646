//! A client on a weak link: a phone on a bad network reads its socket slower than the node writes.
//! It is built from two things a node actually meets: a small TCP receive buffer (`SO_RCVBUF`, set
//! before the connect so the window it advertises stays small), and a reader that takes bytes off
//! the socket no faster than a token bucket allows ([`Bucket`], [`Throttled`]). What the client
//! does not read stays first in its kernel's receive buffer, then in the node's send buffer, then
//! in the node's own queue for the socket: the node sees a socket that falls behind, as it would
//! on a real weak link, and conflates or closes it (4008).
//!
//! On loopback the node's kernel sizes the socket's send buffer from loopback's 64 KiB segments (to
//! about 4 MB), where a phone's link would have segments of about 1,400 bytes and a send buffer a
//! tenth of that; [`Link::mss`] announces such a segment size to the node, for runs that want it.
//!
//! The bucket is pure and tested apart; [`open`] is [`crate::conn::open`] with the small buffer,
//! the segment size and the throttled reader.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
    time::{sleep_until, Instant, Sleep},
};
use tokio_tungstenite::{
    client_async_with_config,
    tungstenite::{client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig},
    WebSocketStream,
};

use crate::{conn::NodeUrl, sockopt, wire::Encoding};

/// Bytes a second, taken off the socket in grants of at most `burst` bytes.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `rate` bytes a second; it holds a tenth of a second's bytes (256 at
    /// least), so reads come every 100 ms or so, as a slow link's bytes do, not in one burst a
    /// second.
    pub fn new(rate: f64, now: Instant) -> Bucket {
        let burst = (rate / 10.0).max(256.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * self.rate).min(self.burst);
        self.at = now;
    }

    /// Bytes that may be read now, at most `want`.
    pub fn allowed(&mut self, now: Instant, want: usize) -> usize {
        self.refill(now);
        (self.tokens.floor() as usize).min(want)
    }

    /// Takes `n` bytes read.
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When half the bucket will be there again: the next read, for a reader that found it empty.
    pub fn next_read(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let short = (self.burst / 2.0 - self.tokens).max(0.0);
        now + Duration::from_secs_f64(short / self.rate)
    }
}

/// A stream whose reads a [`Bucket`] paces; writes pass straight through.
pub struct Throttled<S> {
    inner: S,
    bucket: Bucket,
    wait: Option<Pin<Box<Sleep>>>,
}

impl<S> Throttled<S> {
    pub fn new(inner: S, bucket: Bucket) -> Throttled<S> {
        Throttled {
            inner,
            bucket,
            wait: None,
        }
    }
}

/// The most one read takes, whatever the bucket allows.
const READ_CHUNK: usize = 4096;

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(wait) = this.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                this.wait = None;
            }
            let now = Instant::now();
            let allowed = this.bucket.allowed(now, buf.remaining().min(READ_CHUNK));
            if allowed == 0 && buf.remaining() > 0 {
                this.wait = Some(Box::pin(sleep_until(this.bucket.next_read(now))));
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut limited = ReadBuf::new(&mut chunk[..allowed]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            buf.put_slice(limited.filled());
            this.bucket.spend(n);
            return Poll::Ready(Ok(()));
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

pub type WeakWs = WebSocketStream<Throttled<TcpStream>>;

/// The link of a weak client.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// The receive buffer asked for (`SO_RCVBUF`; the kernel doubles it).
    pub rcvbuf: u32,
    /// The segment size announced to the node (`TCP_MAXSEG`); 0 keeps loopback's (~64 KiB).
    pub mss: u32,
    pub bytes_per_sec: f64,
}

/// Asks for segments of at most `mss` bytes on `socket`, before it connects.
fn clamp_mss(socket: &TcpSocket, mss: u32) -> io::Result<()> {
    sockopt::set_int(socket, libc::IPPROTO_TCP, libc::TCP_MAXSEG, mss as libc::c_int)
}

/// Opens a WebSocket to `node` from `source` as `user` over a weak `link`. Also the local address,
/// to find the connection in `ss`.
pub async fn open(node: &NodeUrl, source: IpAddr, user: &str, link: Link) -> anyhow::Result<(WeakWs, SocketAddr)> {
    let socket = TcpSocket::new_v4().context("socket")?;
    socket.set_recv_buffer_size(link.rcvbuf).context("SO_RCVBUF")?;
    if link.mss > 0 {
        clamp_mss(&socket, link.mss).context("TCP_MAXSEG")?;
    }
    sockopt::bind_source(&socket, source).with_context(|| format!("bind {source}"))?;
    let stream = socket.connect(node.addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let sep = if node.ws.contains('?') { '&' } else { '?' };
    let mut req = format!("{}{sep}user={user}", node.ws).into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(Encoding::Json.protocol()),
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4 << 10)
        .write_buffer_size(0);
    let reader = Throttled::new(stream, Bucket::new(link.bytes_per_sec, Instant::now()));
    let (ws, _) = client_async_with_config(req, reader, Some(config))
        .await
        .context("handshake")?;
    Ok((ws, local))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_bucket_grants_its_rate_and_no_more_than_it_holds() {
        let t0 = Instant::now();
        let mut b = Bucket::new(4096.0, t0);
        // Full at the start: a tenth of a second's bytes.
        assert_eq!(b.allowed(t0, 10_000), 409);
        b.spend(409);
        assert_eq!(b.allowed(t0, 10_000), 0);
        // 50 ms later, 204.8 bytes more, beside the 0.6 left over.
        assert_eq!(b.allowed(t0 + Duration::from_millis(50), 10_000), 205);
        // Idle for a minute, it holds no more than its burst.
        assert_eq!(b.allowed(t0 + Duration::from_secs(60), 10_000), 409);
        assert_eq!(
            b.allowed(t0 + Duration::from_secs(60), 100),
            100,
            "at most what is wanted"
        );
    }

    #[test]
    fn an_empty_bucket_is_read_again_when_half_full() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, t0);
        let n = b.allowed(t0, usize::MAX);
        b.spend(n);
        // 256 bytes of burst (the floor), half of it at 1,000 B/s: 128 ms.
        let next = b.next_read(t0);
        assert_eq!(next - t0, Duration::from_millis(128));
        assert_eq!(b.next_read(next), next, "no wait once there");
        // Small rates keep a usable burst; large ones a tenth of a second.
        assert_eq!(Bucket::new(10.0, t0).burst, 256.0);
        assert_eq!(Bucket::new(1e6, t0).burst, 1e5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_reader_takes_bytes_at_its_rate() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&vec![7u8; 64 << 10]).await.unwrap();
        let t0 = Instant::now();
        let mut link = Throttled::new(rx, Bucket::new(8192.0, t0));
        let mut got = vec![0u8; 16 << 10];
        link.read_exact(&mut got).await.unwrap();
        // 16 KiB at 8 KiB/s, less the first full bucket (819 bytes): about 1.9 s, on the paused clock.
        let took = t0.elapsed().as_secs_f64();
        assert!((1.8..2.1).contains(&took), "{took}");
        assert!(got.iter().all(|b| *b == 7));
    }
}
