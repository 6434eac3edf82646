//! One WebSocket connection, in one task: a reader that runs the client's commands, a timer for
//! pings and the token's expiry, and a writer that steps in only when the gate needs it (a socket
//! too full for the gate's non-blocking writes, or a close). The session ends when either side
//! does; its [`Membership`] guard then takes it out of every topic, even if the task panicked or the
//! upgrade never completed.

use std::{
    io,
    pin::{pin, Pin},
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{tcp::OwnedReadHalf, TcpStream},
};
use tokio_tungstenite::{
    tungstenite::{
        protocol::{Role, WebSocketConfig},
        Error as WsError, Message,
    },
    WebSocketStream,
};

use crate::{
    close::{code, CloseReason, ErrorCode},
    cmd::{self, Membership},
    config::Config,
    envelope,
    fanout::writer::{self, Outbound},
    frame::{decode_binary, decode_text, FrameError, Request},
    inflate::{self, Inflating},
    metrics as m,
    node::Node,
    publish::{
        self,
        outbox::{Entry, Outbox},
    },
    wire,
};

/// Tungstenite's read chunk. Its default (128 KiB) suits a few busy sockets; a stadium node holds
/// many mostly idle ones whose frames are pongs and small commands, and tungstenite allocates this
/// per socket up front (and zero-fills its free part on every read). A larger frame still arrives
/// whole: tungstenite reserves its full length and reads it in chunks of this size.
const READ_BUFFER_BYTES: usize = 256;
/// How late the session's timer may fire before the node counts itself too busy to have served
/// the socket meanwhile: a node keeping up fires its timers within milliseconds.
const LATE: Duration = Duration::from_secs(1);

/// The socket as tungstenite sees it: it reads the client's frames from the read half (through an
/// [`Inflating`] when the socket negotiated permessage-deflate, which tungstenite does not read),
/// and what it writes by itself (pongs, the answer to a client's close) goes through the gate, in
/// order with every other frame. The node's own frames never pass through tungstenite (see
/// [`crate::wire`]).
struct Inbound {
    read: OwnedReadHalf,
    /// Boxed: one word in every idle session's state.
    inflating: Option<Box<Inflating>>,
    out: Outbound,
}

impl AsyncRead for Inbound {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.inflating.as_mut() {
            Some(inflating) => inflating.poll_read(&mut this.read, cx, buf),
            None => Pin::new(&mut this.read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Inbound {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Tungstenite writes whole frames; a gate that is closing or overflowed drops them, which is
        // what the socket needs then.
        self.out.send(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

type Stream = WebSocketStream<Inbound>;

/// A token bucket over one connection's commands.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Commands refused since the bucket last had a token.
    refused: u32,
}

/// What the bucket says about one command.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Yes,
    Refuse,
    /// Refused as often as the burst in a row: close the connection.
    Close,
}

impl RateLimit {
    fn new(rate: u32, burst: u32, now: Instant) -> RateLimit {
        RateLimit {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
            refused: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            Admit::Yes
        } else {
            self.refused += 1;
            if self.refused as f64 > self.burst {
                Admit::Close
            } else {
                Admit::Refuse
            }
        }
    }
}

/// Counts a connection open for as long as it lives: closed with `reason` on every way out of
/// [`serve`], a panic included, so the open-connections gauge cannot drift.
struct Counted {
    reason: CloseReason,
}

impl Counted {
    fn open() -> Counted {
        m::connection_opened();
        // Until the session says why it ended, it ended in error (a panic, say).
        Counted {
            reason: CloseReason::Error,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        m::connection_closed(self.reason);
    }
}

/// Runs a connection until it closes. `early` holds what the client sent right behind its
/// handshake, if it did not wait for the answer.
pub async fn serve(tcp: TcpStream, early: Bytes, node: Node, out: Outbound, mut membership: Membership) {
    let mut counted = Counted::open();
    let mut stream = open(tcp, early, &out, node.config()).await;
    let clock = Clock::new(node.config(), membership.expires());
    let reason = converse(&mut stream, &node, &out, &mut membership, clock).await;
    // The node closed on a policy (rate, frame size) while the client may still be sending: read
    // until its answering close, so it sees our close frame instead of a reset.
    if matches!(
        reason,
        CloseReason::RateLimited
            | CloseReason::FrameTooLarge
            | CloseReason::ProtocolError
            | CloseReason::InvalidPayload
    ) {
        let _ = Box::pin(tokio::time::timeout(
            node.config().close_grace,
            read_until_close(&mut stream),
        ))
        .await;
    }
    counted.reason = reason;
    drop(membership);
}

/// Hands the socket's write half to the gate and reads the client's frames from the read half.
async fn open(tcp: TcpStream, early: Bytes, out: &Outbound, config: &Config) -> Stream {
    let (rx, tx) = tcp.into_split();
    out.attach(tx);
    let limits = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes));
    // Copied and dropped: `early` is a view of hyper's read buffer (kilobytes), which would
    // otherwise stay with the socket for its whole life.
    let mut partial = early.to_vec();
    drop(early);
    // What the client sent early may be compressed already: it is read through the inflater too.
    let inflating = out
        .deflates()
        .then(|| Box::new(Inflating::new(config.max_frame_bytes, std::mem::take(&mut partial))));
    let inbound = Inbound {
        read: rx,
        inflating,
        out: out.clone(),
    };
    // Boxed, like every future below that lives only for a moment: otherwise its state would stay
    // reserved in every idle session's.
    Box::pin(WebSocketStream::from_partially_read(
        inbound,
        partial,
        Role::Server,
        Some(limits),
    ))
    .await
}

/// When the client was last heard from: set by the reader, read by the [`Clock`].
struct Heard {
    started: tokio::time::Instant,
    /// Milliseconds since `started`.
    at_ms: AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            started: tokio::time::Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        self.at_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let at = Duration::from_millis(self.at_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }
}

/// The session's one timer: pings, the idle check, and the token's expiry.
struct Clock {
    ping_interval: Duration,
    idle_timeout: Duration,
    next_ping: tokio::time::Instant,
    expires: Option<tokio::time::Instant>,
}

impl Clock {
    fn new(config: &Config, expires: Option<u64>) -> Clock {
        let now = tokio::time::Instant::now();
        // An expiry too far ahead for the clock to hold is no expiry at all.
        let expires = expires.and_then(|exp| {
            let left = exp.saturating_sub(envelope::now_us() / 1_000_000);
            now.checked_add(Duration::from_secs(left))
        });
        Clock {
            ping_interval: config.ping_interval,
            idle_timeout: config.idle_timeout,
            next_ping: now + config.ping_interval,
            expires,
        }
    }

    fn wake_at(&self) -> tokio::time::Instant {
        self.expires.map_or(self.next_ping, |at| at.min(self.next_ping))
    }

    /// What is due now: closes an expired or silent session, or pings it.
    ///
    /// Silence is judged only when the timer fires on time. One that fires late means the node did
    /// not run the session for a while (a connect storm holding the cores): the pings due meanwhile
    /// went out late or not at all, so the client's silence is the node's doing. Nor is it judged
    /// while a connect storm filled `--max-handshakes` within the idle timeout (`stormed`): the
    /// storm may have held the client's side as much as the node's (its pongs late on a congested
    /// link, or on a machine shared with the storm), and a live viewer dropped then comes back into
    /// the storm. The session is pinged then, and judged at a later ping; a dead one is closed
    /// once the storm is an idle timeout past.
    fn fire(&mut self, out: &Outbound, heard: &Heard, stormed: bool) {
        let now = tokio::time::Instant::now();
        let late = now.saturating_duration_since(self.wake_at()) > LATE;
        if self.expires.is_some_and(|at| now >= at) {
            self.expires = None;
            out.close(Some((code::TOKEN_EXPIRED, "token expired")));
        }
        if now >= self.next_ping {
            self.next_ping = now + self.ping_interval;
            if !late && !stormed && heard.silent_for() > self.idle_timeout {
                out.close(Some((code::IDLE, "idle timeout")));
            } else {
                out.send(wire::PING);
            }
        }
    }
}

/// Runs the reader, the writer and the clock until the session ends, and says why it did.
async fn converse(
    stream: &mut Stream,
    node: &Node,
    out: &Outbound,
    membership: &mut Membership,
    mut clock: Clock,
) -> CloseReason {
    let grace = node.config().close_grace;
    let mut writer = pin!(writer::serve(out, grace));
    // Boxed so an idle session's state stays small.
    let mut timer = Box::pin(tokio::time::sleep_until(clock.wake_at()));
    let heard = Heard::new();
    let mut reader = pin!(read(stream, node, out, membership, &heard));
    loop {
        tokio::select! {
            // The reader before the timer: what the client sent is read before its silence is
            // judged, however long the node took to come back to this session.
            biased;
            end = &mut writer => {
                // The close frame is out: let the client answer it before the socket is dropped,
                // so it reads a clean close rather than a reset.
                let _ = Box::pin(tokio::time::timeout(grace, &mut reader)).await;
                return end;
            }
            reason = &mut reader => {
                out.close(reason.frame());
                let _ = Box::pin(tokio::time::timeout(grace, &mut writer)).await;
                return reason;
            }
            _ = &mut timer => {
                let stormed = node.handshakes().stormed_within(clock.idle_timeout);
                clock.fire(out, &heard, stormed);
                timer.as_mut().reset(clock.wake_at());
            }
        }
    }
}

/// Reads and drops the client's frames until its close.
async fn read_until_close(stream: &mut Stream) {
    while let Some(Ok(msg)) = stream.next().await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
    }
}

async fn read(
    stream: &mut Stream,
    node: &Node,
    out: &Outbound,
    membership: &mut Membership,
    heard: &Heard,
) -> CloseReason {
    // Made at the first publish: an idle session's state stays small.
    let mut outbox: Option<Box<Outbox>> = None;
    let reason = Box::pin(commands_of(stream, node, out, membership, heard, &mut outbox)).await;
    // Publishes the node has read go out even when the client is gone or closing: a feed's last
    // message before its close is not lost. Bounded: a batch waits for the bus at most its timeout.
    if let Some(outbox) = outbox.as_mut().filter(|o| !o.is_empty()) {
        let drained = async {
            while !outbox.is_empty() {
                for frame in std::future::poll_fn(|cx| outbox.poll_answers(cx, node, out.encoding())).await {
                    out.send(frame);
                }
            }
        };
        let _ = tokio::time::timeout(node.config().redis_timeout * 2, drained).await;
    }
    reason
}

/// What the client's next frame asks of the session.
enum Step {
    /// A command to admit and run (or its decoding error to answer).
    Command(Result<Request, FrameError>),
    /// Nothing to answer (a pong, or a ping that was within the rate).
    Skip,
    /// The session ends.
    End(CloseReason),
}

/// Reads and runs the client's commands until the socket ends or the session must close;
/// publishes go to `outbox`, whose answers are sent as they come.
async fn commands_of(
    stream: &mut Stream,
    node: &Node,
    out: &Outbound,
    membership: &mut Membership,
    heard: &Heard,
    outbox: &mut Option<Box<Outbox>>,
) -> CloseReason {
    let (rate, burst) = membership.command_limits(node.config());
    let mut limit = RateLimit::new(rate, burst, Instant::now());
    loop {
        let full = outbox.as_ref().is_some_and(|o| o.is_full());
        let msg = tokio::select! {
            answers = std::future::poll_fn(|cx| match outbox.as_mut() {
                Some(o) => o.poll_answers(cx, node, out.encoding()),
                None => std::task::Poll::Pending,
            }) => {
                for frame in answers {
                    out.send(frame);
                }
                continue;
            }
            msg = stream.next(), if !full => msg,
        };
        let Some(msg) = msg else { break };
        heard.now();
        let request = match step(msg, stream, &mut limit, node.config()).await {
            Step::Command(request) => request,
            Step::Skip => continue,
            Step::End(reason) => return reason,
        };
        let admitted = limit.admit(Instant::now());
        if admitted == Admit::Close {
            return CloseReason::RateLimited;
        }
        // Boxed: a command's future lives only while it runs, instead of in every idle session's state.
        let answer = Box::pin(dispatch(request, admitted, node, membership, out, outbox)).await;
        if let Some(frame) = answer {
            out.send(frame);
        }
    }
    CloseReason::Normal
}

/// What one frame from the client is: a command, nothing to answer, or the session's end.
async fn step(msg: Result<Message, WsError>, stream: &mut Stream, limit: &mut RateLimit, config: &Config) -> Step {
    match msg {
        Ok(Message::Text(t)) => Step::Command(decode_text(&t, config.max_data_depth)),
        Ok(Message::Binary(b)) => Step::Command(decode_binary(&b, config.max_data_depth)),
        // Tungstenite has queued the pong already; a ping still costs a write, so it draws on
        // the command budget, and a ping flood is closed like a command flood.
        Ok(Message::Ping(_)) => match limit.admit(Instant::now()) {
            Admit::Yes => Step::Skip,
            Admit::Refuse => {
                m::rate_limited();
                Step::Skip
            }
            Admit::Close => Step::End(CloseReason::RateLimited),
        },
        // A pong only proves the client is alive.
        Ok(Message::Pong(_) | Message::Frame(_)) => Step::Skip,
        Ok(Message::Close(_)) => {
            // Tungstenite has the answering close ready; flushing hands it to the gate.
            let _ = stream.flush().await;
            Step::End(CloseReason::Normal)
        }
        Err(e) => Step::End(classify(e)),
    }
}

/// Hands an admitted command on: a publish to the outbox (answered in the order it came), any
/// other command to [`cmd::run`]; a refused one is answered with its error. The frame to answer
/// with now, if any.
async fn dispatch(
    request: Result<Request, FrameError>,
    admitted: Admit,
    node: &Node,
    membership: &mut Membership,
    out: &Outbound,
    outbox: &mut Option<Box<Outbox>>,
) -> Option<Bytes> {
    let request = match request.map(|r| publish::take(r, node, membership.grants())) {
        Ok(Ok(publish)) => {
            let entry = match admitted {
                Admit::Yes => publish.map_or_else(Entry::Refused, Entry::Publish),
                _ => {
                    let id = publish.as_ref().map_or_else(|e| e.id, |p| p.id);
                    Entry::Refused(rate_limited(id, node, membership))
                }
            };
            outbox
                .get_or_insert_with(|| Box::new(Outbox::new(node.config().max_inflight_publishes)))
                .push(entry);
            return None;
        }
        Ok(Err(request)) => Ok(request),
        Err(e) => Err(e),
    };
    let reply = match (admitted, request) {
        (Admit::Yes, Ok(request)) => cmd::run(request, node, membership, out).await,
        (Admit::Yes, Err(e)) => Err(e),
        (_, request) => Err(rate_limited(request.as_ref().ok().and_then(|r| r.id), node, membership)),
    };
    wire::encode(reply, out.encoding())
}

/// The error a command refused by the rate limit gets.
fn rate_limited(id: Option<i64>, node: &Node, membership: &Membership) -> FrameError {
    m::rate_limited();
    FrameError::new(
        id,
        ErrorCode::RateLimited,
        format!(
            "more than {} commands per second",
            membership.command_limits(node.config()).0
        ),
    )
}

/// Why the reader failed, as the close the node answers with. A connection cut without a close
/// frame (reset, end of stream) is an error, not a protocol violation: there is no one to tell.
fn classify(e: WsError) -> CloseReason {
    use tokio_tungstenite::tungstenite::error::ProtocolError as P;
    match e {
        WsError::Capacity(_) => CloseReason::FrameTooLarge,
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::Normal,
        WsError::Utf8(_) => CloseReason::InvalidPayload,
        // A compressed message the inflater refused.
        WsError::Io(e) => inflate::Error::of(&e).map_or(CloseReason::Error, inflate::Error::reason),
        WsError::Protocol(
            P::NonZeroReservedBits
            | P::UnmaskedFrameFromClient
            | P::FragmentedControlFrame
            | P::ControlFrameTooBig
            | P::UnknownControlFrameType(_)
            | P::UnknownDataFrameType(_)
            | P::UnexpectedContinueFrame
            | P::ExpectedFragment(_)
            | P::InvalidOpcode(_)
            | P::InvalidCloseSequence
            | P::ReceivedAfterClosing,
        ) => CloseReason::ProtocolError,
        _ => CloseReason::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, F>(_: &impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_sessions_state_stays_small() {
        // Every connection's task holds this much for its whole life, and an idle stadium node is
        // mostly idle sessions (docs/performance.md: at most 4 KiB of RSS per connection). What
        // lives only for a moment (a command, a close, a congested write) is boxed instead; the
        // outbox of publishes in flight is made at a connection's first publish. 1,440 bytes
        // measured with it (the reader's wait on its answers took 48).
        let serve = |(a, b, c, d, e)| serve(a, b, c, d, e);
        let size = future_size(&serve);
        assert!(size <= 1_450, "a session's state grew to {size} bytes");
        let read = |(a, b, c, d, e)| read(a, b, c, d, e);
        let write = |(a, b)| writer::serve(a, b);
        assert!(future_size(&read) + future_size(&write) <= 512);
    }

    /// A clock and what it sends to a socket with nothing attached: whether it closed it, and
    /// whether it pinged it.
    fn clock(ping: u64, idle: u64) -> (Clock, Outbound, std::sync::Arc<crate::fanout::gate::Gate>) {
        let config = Config {
            ping_interval: Duration::from_secs(ping),
            idle_timeout: Duration::from_secs(idle),
            ..Config::default()
        };
        let gate = std::sync::Arc::new(crate::fanout::gate::Gate::new(1 << 20));
        let out = Outbound::new(gate.clone(), crate::encoding::Encoding::Json);
        (Clock::new(&config, None), out, gate)
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_judged_on_time_never_after_the_node_was_too_busy_to_run_the_session() {
        // On time: a client silent past the idle timeout is closed at the next ping.
        let (mut on_time, out, gate) = clock(20, 60);
        let heard = Heard::new();
        while !gate.is_closing() {
            tokio::time::sleep_until(on_time.wake_at()).await;
            on_time.fire(&out, &heard, false);
        }
        assert_eq!(heard.silent_for(), Duration::from_secs(80));

        // The node did not run the session for 65 s after its first ping was due: its client was
        // never asked. It is pinged, not closed, and judged on time at the next ping.
        let (mut late, out, gate) = clock(20, 60);
        let heard = Heard::new();
        tokio::time::advance(Duration::from_secs(85)).await;
        late.fire(&out, &heard, false);
        assert!(!gate.is_closing(), "closed as idle after the node's own delay");
        assert!(gate.queued() > 0, "pinged");
        // It answers: heard, then on time at the next ping, not idle.
        heard.now();
        tokio::time::sleep_until(late.wake_at()).await;
        late.fire(&out, &heard, false);
        assert!(!gate.is_closing());
        // A client that stays silent is still closed, on time.
        while !gate.is_closing() {
            tokio::time::sleep_until(late.wake_at()).await;
            late.fire(&out, &heard, false);
        }
        assert!(heard.silent_for() > Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_not_judged_while_a_connect_storm_fills_the_handshakes() {
        let (mut clock, out, gate) = clock(20, 60);
        let heard = Heard::new();
        // Silent past the idle timeout, the timer on time, but a storm within it: pinged, kept.
        for _ in 0..5 {
            tokio::time::sleep_until(clock.wake_at()).await;
            clock.fire(&out, &heard, true);
        }
        assert!(heard.silent_for() > Duration::from_secs(60));
        assert!(!gate.is_closing(), "closed as idle in a connect storm");
        // The storm over: judged at the next ping.
        tokio::time::sleep_until(clock.wake_at()).await;
        clock.fire(&out, &heard, false);
        assert!(gate.is_closing());
    }

    #[test]
    fn rate_limit_admits_a_burst_then_the_rate_then_closes() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(10, 5, t0);
        for _ in 0..5 {
            assert_eq!(l.admit(t0), Admit::Yes);
        }
        assert_eq!(l.admit(t0), Admit::Refuse);
        // 100 ms at 10/s buys one command.
        assert_eq!(l.admit(t0 + Duration::from_millis(100)), Admit::Yes);
        let t1 = t0 + Duration::from_millis(100);
        for _ in 0..5 {
            assert_eq!(l.admit(t1), Admit::Refuse);
        }
        assert_eq!(l.admit(t1), Admit::Close);
        // A full second refills the burst, never beyond it.
        let mut l = RateLimit::new(10, 5, t0);
        assert_eq!(l.admit(t0 + Duration::from_secs(60)), Admit::Yes);
        assert!(l.tokens <= 5.0);
    }
}
