//! One client connection: connect from a chosen loopback source address, join, then read and
//! (for publishers) publish on a timer until told to stop; with a `--feed`, a publisher publishes
//! the feed's values (and records each, for the feed readers to check against). Everything it saw comes back as an
//! [`Outcome`]; a connection the node closes is counted, never a panic. Also the nodes connected
//! to: a `--url`, checked to be a loopback `ws://` node ([`NodeUrl::resolve`]).

use std::{
    net::{IpAddr, SocketAddr},
    ops::Range,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::watch,
    time::{interval_at, timeout, Instant, Interval, MissedTickBehavior},
};
use tokio_tungstenite::{
    client_async_with_config,
    tungstenite::{client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig, Message},
    WebSocketStream,
};

use crate::{
    feeds::{self, Feed, Published},
    keyed, sockopt,
    stats::{Latencies, Pending, Reading, Stream, Tally, WireTally},
    wire::{self, Encoding, Inbound, Stamp, Target},
};

/// Where the run is; every connection task follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and joining.
    Ramp,
    /// Publishing, first ticks counted from this instant.
    Run(Instant),
    /// Publishing stopped; waiting for the last deliveries.
    Quiet,
    /// Close and report.
    Finish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Ws,
    Http,
}

/// One node the load is spread over.
#[derive(Debug, Clone)]
pub struct NodeUrl {
    pub ws: String,
    pub addr: SocketAddr,
    pub publish: String,
}

impl NodeUrl {
    /// The node at `url`: a `ws://` URL whose host resolves to a loopback address.
    pub async fn resolve(url: &str) -> anyhow::Result<NodeUrl> {
        let req = url.into_client_request().with_context(|| format!("bad --url {url}"))?;
        let uri = req.uri();
        if uri.scheme_str() != Some("ws") {
            bail!("--url {url}: only ws:// is supported");
        }
        let host = uri.host().context("no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .with_context(|| format!("{host} does not resolve"))?;
        if !addr.ip().is_loopback() {
            bail!("--url {url}: only loopback nodes may be loaded ({addr})");
        }
        Ok(NodeUrl {
            ws: url.to_string(),
            addr,
            publish: format!("http://{host}:{port}/publish"),
        })
    }

    /// The nodes at `urls`, in order; the first that is not a loopback node is the error.
    pub async fn resolve_all(urls: &[String]) -> anyhow::Result<Vec<NodeUrl>> {
        let mut nodes = Vec::with_capacity(urls.len());
        for u in urls {
            nodes.push(NodeUrl::resolve(u).await?);
        }
        Ok(nodes)
    }
}

/// A connection's publishing role.
#[derive(Debug, Clone)]
pub struct Publisher {
    pub id: u32,
    pub target: Target,
    pub via: Via,
    pub period: Duration,
    /// Delay of the first publish after the run starts, to spread publishers over a period.
    pub offset: Duration,
}

/// One planned connection.
#[derive(Debug, Clone)]
pub struct Spec {
    pub idx: usize,
    pub node: usize,
    pub source: IpAddr,
    pub user: String,
    pub encoding: Encoding,
    /// Whether it holds a WebSocket (an HTTP-only publisher does not).
    pub ws: bool,
    pub join: Option<String>,
    pub publish: Option<Publisher>,
    /// Publishers whose every message this connection must receive.
    pub expect: Range<u32>,
    /// A feed reader's way of reading (`--feed`), read by its own client.
    pub reading: Option<Reading>,
}

#[cfg(test)]
impl Spec {
    /// A WebSocket member of no room from 127.0.0.1 to the first node, expecting `expect`.
    pub fn member(expect: Range<u32>) -> Spec {
        Spec {
            idx: 0,
            node: 0,
            source: "127.0.0.1".parse().unwrap(),
            user: "u".into(),
            encoding: Encoding::Json,
            ws: true,
            join: None,
            publish: None,
            expect,
            reading: None,
        }
    }
}

/// State shared by every connection task.
pub struct Ctx {
    pub nodes: Vec<NodeUrl>,
    pub payload_bytes: usize,
    pub connect_timeout: Duration,
    /// Tries of a connection that fails to connect or join (a refusal, a reset), each after a
    /// pause, all within `connect_timeout`, as a client that reconnects would.
    pub connect_attempts: u32,
    pub latencies: Latencies,
    /// From sending a publish to its answer (`ok`, or the HTTP status).
    pub answers: Latencies,
    pub http: reqwest::Client,
    /// Per publisher: messages accepted so far (the next sequence number).
    pub sent: Vec<AtomicU64>,
    pub publish_errors: AtomicU64,
    pub delivered: AtomicU64,
    pub ready: AtomicUsize,
    pub failed: AtomicUsize,
    pub closed: AtomicUsize,
    /// Publishing connections that publish no more (the run turned quiet, or they ended): what
    /// they sent is final once all have.
    pub stopped: AtomicUsize,
    /// The feed publishers publish (`--feed`), its seed, and every value published.
    pub feed: Option<FeedRun>,
}

/// A run's `--feed`.
pub struct FeedRun {
    pub feed: Feed,
    pub seed: u64,
    pub published: Published,
}

impl Ctx {
    /// Fresh state for connections to `nodes`, with `publishers` publishers counted; a connection
    /// that fails is tried `connect_attempts` times within `connect_timeout`.
    pub fn new(
        nodes: Vec<NodeUrl>,
        payload_bytes: usize,
        (connect_timeout, connect_attempts): (Duration, u32),
        publishers: usize,
    ) -> anyhow::Result<Ctx> {
        Ok(Ctx {
            nodes,
            payload_bytes,
            connect_timeout,
            connect_attempts,
            latencies: Latencies::new(16),
            answers: Latencies::new(16),
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
            sent: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            publish_errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            stopped: AtomicUsize::new(0),
            feed: None,
        })
    }
}

/// What one connection saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub connected: bool,
    /// Why connecting or joining failed.
    pub failure: Option<String>,
    /// Failed tries before it connected (or gave up).
    pub retries: u64,
    /// How the node ended an established connection before the run was over (close code, `eof`
    /// or `error`).
    pub closed: Option<String>,
    pub tally: Tally,
    pub streams: Vec<(u32, Stream)>,
    pub error_frames: u64,
    /// Messages that carried a shard and position (a room with history).
    pub positioned: u64,
    pub reconnects: u64,
    pub unparsed: u64,
    /// A feed reader's bytes on the wire beside its payloads, and how it read.
    pub wire: Option<(Reading, WireTally)>,
}

impl Outcome {
    /// A message of `stamp` received by connection `idx`: its latency, its place in its
    /// publisher's stream, and the run's count of deliveries.
    pub fn delivered(&mut self, ctx: &Ctx, idx: usize, stamp: Stamp) {
        ctx.latencies.record(idx, wire::now_us().saturating_sub(stamp.ts_us));
        let streams = &mut self.streams;
        let i = match streams.iter().position(|(p, _)| *p == stamp.publisher) {
            Some(i) => i,
            None => {
                streams.push((stamp.publisher, Stream::default()));
                streams.len() - 1
            }
        };
        self.tally.count(streams[i].1.observe(stamp.seq));
        ctx.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

pub type Ws = WebSocketStream<TcpStream>;

/// The pause before try `attempt + 1` after `error`: what a node that refused the upgrade in a
/// connect storm asked for (503 with `Retry-After`, whole seconds), then [`retry_pause`]'s spread
/// on top, as a client that honours it with jitter would.
pub fn pause_after(error: &anyhow::Error, idx: usize, attempt: u32) -> Duration {
    let asked = error
        .chain()
        .find_map(|e| match e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            Some(tokio_tungstenite::tungstenite::Error::Http(answer)) if answer.status() == 503 => {
                answer.headers().get("retry-after")?.to_str().ok()?.parse::<u64>().ok()
            }
            _ => None,
        })
        .map_or(Duration::ZERO, |secs| Duration::from_secs(secs.min(30)));
    asked + retry_pause(idx, attempt)
}

/// The pause before try `attempt + 1`: 250 ms to 1 s, spread over the connections so that those
/// refused together do not come back together.
pub fn retry_pause(idx: usize, attempt: u32) -> Duration {
    let spread = (idx as u64)
        .wrapping_mul(7919)
        .wrapping_add(u64::from(attempt) * 104_729)
        % 750;
    Duration::from_millis(250 + spread)
}

/// How many of `total` clients a ramp of `per_sec` a second has due `elapsed` after its start: the
/// first at once.
pub fn ramp_due(elapsed: Duration, per_sec: f64, total: usize) -> usize {
    ((elapsed.as_secs_f64() * per_sec) as usize + 1).min(total)
}

/// How long the final close handshake may take.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);

fn ws_config() -> WebSocketConfig {
    // Small buffers: thousands of connections share this process, and frames are small
    // (tungstenite also zero-fills the read buffer's free part on every read).
    WebSocketConfig::default()
        .read_buffer_size(4 << 10)
        .write_buffer_size(0)
}

async fn connect(spec: &Spec, ctx: &Ctx) -> anyhow::Result<Ws> {
    open(&ctx.nodes[spec.node], spec.source, &spec.user, spec.encoding).await
}

/// Opens a WebSocket to `node` from the loopback address `source` as `user`.
pub async fn open(node: &NodeUrl, source: IpAddr, user: &str, encoding: Encoding) -> anyhow::Result<Ws> {
    let stream = connect_from(node, source).await?;
    let sep = if node.ws.contains('?') { '&' } else { '?' };
    let mut req = format!("{}{sep}user={user}", node.ws).into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(encoding.protocol()));
    let (ws, _) = client_async_with_config(req, stream, Some(ws_config()))
        .await
        .context("handshake")?;
    Ok(ws)
}

/// A TCP connection to `node` from the loopback address `source` (each with its own ephemeral
/// ports), without Nagle's delay.
pub async fn connect_from(node: &NodeUrl, source: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("socket")?;
    sockopt::bind_source(&socket, source).with_context(|| format!("bind {source}"))?;
    let stream = socket.connect(node.addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An error without its details in parentheses (OS error numbers, addresses), as a failure class:
/// `connect: Connection refused`, `handshake: HTTP error: 503 Service Unavailable`.
pub fn class(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let s = s.split('(').next().unwrap_or_default().trim();
    s.chars().take(80).collect()
}

struct Conn<'a> {
    spec: &'a Spec,
    ctx: &'a Ctx,
    out: Outcome,
    /// Publishes sent over the socket and not answered yet.
    waiting: Pending,
    /// A feed publisher's values to come.
    source: Option<feeds::Source>,
}

/// The id of a publish: its sequence number past the join's id (1).
fn publish_id(seq: u64) -> i64 {
    seq as i64 + 2
}

impl Conn<'_> {
    /// Connects and joins, trying again after a pause (at most `connect_attempts` tries) when a
    /// try fails; each failed try is counted in `retries`.
    async fn establish(&mut self) -> anyhow::Result<Ws> {
        let (spec, ctx) = (self.spec, self.ctx);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tried = async {
                let mut ws = connect(spec, ctx).await?;
                if let Some(room) = &spec.join {
                    self.join(&mut ws, room).await?;
                }
                anyhow::Ok(ws)
            }
            .await;
            match tried {
                Err(e) if attempt < ctx.connect_attempts => {
                    self.out.retries += 1;
                    tokio::time::sleep(pause_after(&e, spec.idx, attempt)).await;
                }
                done => break done,
            }
        }
    }

    fn on_frame(&mut self, inbound: Inbound) -> Option<i64> {
        match inbound {
            Inbound::Msg(stamp, at) => {
                self.out.positioned += u64::from(at.is_some());
                self.out.delivered(self.ctx, self.spec.idx, stamp);
            }
            Inbound::Ok(id) => {
                self.answered(id);
                return Some(id);
            }
            Inbound::Error(id) => {
                self.out.error_frames += 1;
                if let Some(id) = id {
                    self.answered(id);
                }
            }
            Inbound::Reconnect(_) => self.out.reconnects += 1,
            Inbound::Other => self.out.unparsed += 1,
        }
        None
    }

    /// Records the answer time of the publish with this id.
    fn answered(&mut self, id: i64) {
        if let Some(took) = self.waiting.answered(id, Instant::now()) {
            self.ctx.answers.record(self.spec.idx, took.as_micros() as u64);
        }
    }

    /// Handles what the socket yielded; `Err` with the reason when the connection ended.
    fn on_message(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<Option<i64>, String> {
        match msg {
            Some(Ok(Message::Text(t))) => Ok(self.on_frame(wire::scan_json(&t))),
            Some(Ok(Message::Binary(b))) => Ok(self.on_frame(wire::scan_msgpack(&b))),
            Some(Ok(Message::Close(frame))) => Err(frame.map_or("close".into(), |f| u16::from(f.code).to_string())),
            Some(Ok(_)) => Ok(None),
            Some(Err(e)) => Err(ended_by(&e)),
            None => Err("eof".into()),
        }
    }

    async fn join(&mut self, ws: &mut Ws, room: &str) -> anyhow::Result<()> {
        ws.send(wire::join_frame(self.spec.encoding, room, 1, None)).await?;
        let errors = self.out.error_frames;
        loop {
            match self.on_message(ws.next().await) {
                Ok(Some(1)) => return Ok(()),
                Ok(_) if self.out.error_frames > errors => anyhow::bail!("join refused"),
                Ok(_) => {}
                Err(why) => anyhow::bail!("closed during join: {why}"),
            }
        }
    }

    /// Publishes the next message, counting it as sent once accepted (a WebSocket send that
    /// went out, or a 202); `Err` when the socket failed.
    async fn publish(&mut self, ws: Option<&mut Ws>, p: &Publisher) -> Result<(), String> {
        let seq = self.ctx.sent[p.id as usize].load(Ordering::Relaxed);
        let stamp = Stamp {
            publisher: p.id,
            seq,
            ts_us: wire::now_us(),
        };
        let size = self.ctx.payload_bytes;
        let accepted = match (p.via, ws) {
            (Via::Ws, Some(ws)) => {
                let id = publish_id(seq);
                let frame = match (&self.ctx.feed, &mut self.source, &p.target) {
                    (Some(run), Some(source), Target::Room(room)) => {
                        let value = source.next(stamp);
                        let frame = match source.key() {
                            Some(key) => keyed::pub_frame(room, key, id, &value),
                            None => Message::Text(
                                format!(r#"{{"op":"pub","room":"{room}","id":{id},"data":{value}}}"#).into(),
                            ),
                        };
                        run.published.record(p.id, seq, value.into());
                        frame
                    }
                    _ => wire::publish_frame(self.spec.encoding, &p.target, stamp, size, Some(id)),
                };
                self.waiting.sent(id, Instant::now());
                ws.send(frame).await.map_err(|_| "error".to_string())?;
                true
            }
            _ => {
                let Target::Room(room) = &p.target else {
                    unreachable!("plans only publish to rooms over HTTP")
                };
                let body = wire::http_body(room, &self.spec.user, stamp, size);
                let url = &self.ctx.nodes[self.spec.node].publish;
                let asked = Instant::now();
                let sent = self
                    .ctx
                    .http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                self.ctx
                    .answers
                    .record(self.spec.idx, asked.elapsed().as_micros() as u64);
                matches!(sent, Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED)
            }
        };
        if accepted {
            self.ctx.sent[p.id as usize].store(seq + 1, Ordering::Relaxed);
        } else {
            self.ctx.publish_errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// How a connection that ended without a close frame ended, for its count: `error: ` and the
/// kind of the failure (`ConnectionReset`, a protocol error's words), few and fixed.
pub fn ended_by(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(io) => format!("error: {:?}", io.kind()),
        Error::Protocol(p) => format!("error: {p}"),
        Error::Capacity(_) => "error: capacity".into(),
        Error::ConnectionClosed | Error::AlreadyClosed => "error: closed".into(),
        _ => "error".into(),
    }
}

async fn tick(t: &mut Option<Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn ticker(phase: Phase, p: Option<&Publisher>) -> Option<Interval> {
    let (Phase::Run(start), Some(p)) = (phase, p) else {
        return None;
    };
    let mut t = interval_at(start + p.offset, p.period);
    // A late tick is caught up at once, so a busy generator still holds the planned rate.
    t.set_missed_tick_behavior(MissedTickBehavior::Burst);
    Some(t)
}

/// Runs one planned connection until [`Phase::Finish`] or until the node ends it.
pub async fn run(spec: Spec, ctx: Arc<Ctx>, phase: watch::Receiver<Phase>) -> Outcome {
    let mut stopped = false;
    let out = serve(&spec, &ctx, phase, &mut stopped).await;
    if spec.publish.is_some() && !stopped {
        ctx.stopped.fetch_add(1, Ordering::Release);
    }
    out
}

/// [`run`]; `stopped` once a publisher publishes no more.
async fn serve(spec: &Spec, ctx: &Ctx, mut phase: watch::Receiver<Phase>, stopped: &mut bool) -> Outcome {
    let mut c = Conn {
        spec,
        ctx,
        out: Outcome::default(),
        waiting: Pending::default(),
        source: ctx
            .feed
            .as_ref()
            .zip(spec.publish.as_ref())
            .map(|(run, p)| run.feed.source(run.seed, p.id)),
    };
    let mut ws = None;
    if spec.ws {
        match timeout(ctx.connect_timeout, c.establish()).await {
            Ok(Ok(s)) => ws = Some(s),
            Ok(Err(e)) => c.out.failure = Some(class(&e)),
            Err(_) => c.out.failure = Some("timeout".into()),
        }
        if c.out.failure.is_some() {
            ctx.failed.fetch_add(1, Ordering::Relaxed);
            return c.out;
        }
    }
    // A member that joined once the run had started missed what was published before it: it took
    // no part in the run, and what it lacks is no loss of the node's.
    if ws.is_some() && !matches!(*phase.borrow(), Phase::Ramp) {
        c.out.failure = Some("joined after the run started".into());
        ctx.failed.fetch_add(1, Ordering::Relaxed);
        return c.out;
    }
    c.out.connected = true;
    ctx.ready.fetch_add(1, Ordering::Relaxed);
    if let Err(why) = c.follow(&mut ws, &mut phase, stopped).await {
        c.out.closed = Some(why);
        ctx.closed.fetch_add(1, Ordering::Relaxed);
        return c.out;
    }
    if let Some(ws) = ws {
        close(ws).await;
    }
    c.out
}

impl Conn<'_> {
    /// Reads the socket (if any) and publishes on the publisher's timer, following the run's
    /// phases until it finishes; `stopped` once a publisher publishes no more. How the node ended
    /// the connection is the error.
    async fn follow(
        &mut self,
        ws: &mut Option<Ws>,
        phase: &mut watch::Receiver<Phase>,
        stopped: &mut bool,
    ) -> Result<(), String> {
        let publisher = self.spec.publish.clone();
        let mut timer = ticker(*phase.borrow_and_update(), publisher.as_ref());
        loop {
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    let now = *phase.borrow_and_update();
                    match now {
                        _ if changed.is_err() => break,
                        Phase::Run(_) => timer = ticker(now, publisher.as_ref()),
                        Phase::Quiet => {
                            // A publish in flight was sent and counted before this branch ran.
                            timer = None;
                            if publisher.is_some() {
                                *stopped = true;
                                self.ctx.stopped.fetch_add(1, Ordering::Release);
                            }
                        }
                        Phase::Finish => break,
                        Phase::Ramp => {}
                    }
                }
                msg = async {
                    match ws.as_mut() {
                        Some(ws) => ws.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.on_message(msg)?;
                }
                _ = tick(&mut timer), if timer.is_some() => {
                    let p = publisher.as_ref().expect("a timer only with a publisher");
                    self.publish(ws.as_mut(), p).await?;
                }
            }
        }
        Ok(())
    }
}

/// Closes first and lets the node end the TCP connection, so TIME_WAIT stays on its side and the
/// next run can reuse this source address's ports; waits [`CLOSE_WAIT`] at most.
pub async fn close(mut ws: Ws) {
    let _ = timeout(CLOSE_WAIT, async {
        let _ = ws.close(None).await;
        while ws.next().await.is_some() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

    use super::*;

    #[test]
    fn a_connection_ended_without_a_close_frame_is_counted_by_how() {
        use tokio_tungstenite::tungstenite::{error::ProtocolError, Error};
        let reset = Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(ended_by(&reset), "error: ConnectionReset");
        let cut = Error::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert_eq!(ended_by(&cut), "error: Connection reset without closing handshake");
    }

    #[test]
    fn a_refusal_in_a_storm_is_retried_after_its_retry_after_with_jitter() {
        use tokio_tungstenite::tungstenite::{http::Response, Error};
        let refused = |status: u16| {
            let answer = Response::builder()
                .status(status)
                .header("Retry-After", "2")
                .body(None)
                .unwrap();
            anyhow::Error::new(Error::Http(Box::new(answer))).context("handshake")
        };
        for idx in 0..50 {
            let pause = pause_after(&refused(503), idx, 1);
            assert!(
                pause >= Duration::from_millis(2250) && pause < Duration::from_secs(3),
                "{pause:?}"
            );
            assert!(
                pause_after(&refused(500), idx, 1) < Duration::from_secs(1),
                "no storm: no wait asked"
            );
        }
        assert!(pause_after(&anyhow::anyhow!("connect: refused"), 0, 1) < Duration::from_secs(1));
    }

    /// A WebSocket server on loopback that closes its first `refuse` connections unanswered.
    // The handshake callback's error type is tungstenite's, whatever its size.
    #[allow(clippy::result_large_err)]
    async fn flaky_node(refuse: usize) -> NodeUrl {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for seen in 1.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                if seen <= refuse {
                    continue;
                }
                tokio::spawn(async move {
                    let answer = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                        if let Some(p) = req.headers().get("Sec-WebSocket-Protocol") {
                            resp.headers_mut().insert("Sec-WebSocket-Protocol", p.clone());
                        }
                        Ok(resp)
                    };
                    if let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, answer).await {
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                });
            }
        });
        NodeUrl {
            ws: format!("ws://{addr}/ws"),
            addr,
            publish: String::new(),
        }
    }

    async fn try_connect(refuse: usize, attempts: u32) -> Outcome {
        connect_in(Phase::Ramp, refuse, attempts).await
    }

    /// A member connecting to a node that refuses its first `refuse` connections, in `phase`.
    async fn connect_in(phase: Phase, refuse: usize, attempts: u32) -> Outcome {
        let node = flaky_node(refuse).await;
        let ctx = Arc::new(Ctx::new(vec![node], 16, (Duration::from_secs(10), attempts), 0).unwrap());
        let spec = Spec::member(0..0);
        let (phase, rx) = watch::channel(phase);
        let task = tokio::spawn(run(spec, ctx.clone(), rx));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctx.ready.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "neither connected nor failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A connection that failed has ended already.
        let _ = phase.send(Phase::Finish);
        task.await.unwrap()
    }

    #[tokio::test]
    async fn a_connection_closed_during_its_handshake_is_tried_again_when_allowed() {
        let once = try_connect(2, 1).await;
        assert!(!once.connected && once.failure.as_deref().is_some_and(|f| f.starts_with("handshake")));
        let again = try_connect(2, 3).await;
        assert!(again.connected, "{:?}", again.failure);
        assert_eq!(again.retries, 2);
        let short = try_connect(5, 3).await;
        assert_eq!((short.connected, short.retries), (false, 2), "gives up after its tries");
    }

    #[tokio::test]
    async fn a_member_that_joins_after_the_run_started_is_not_counted_as_connected() {
        let late = connect_in(Phase::Run(Instant::now()), 0, 1).await;
        assert!(!late.connected);
        assert_eq!(late.failure.as_deref(), Some("joined after the run started"));
        assert!(connect_in(Phase::Ramp, 0, 1).await.connected, "in time, it is");
    }

    #[test]
    fn pauses_between_tries_are_bounded_and_spread() {
        let pauses: Vec<_> = (0..50).map(|i| retry_pause(i, 1)).collect();
        assert!(pauses
            .iter()
            .all(|p| *p >= Duration::from_millis(250) && *p < Duration::from_secs(1)));
        let distinct: std::collections::BTreeSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 40, "spread: {}", distinct.len());
    }
}
