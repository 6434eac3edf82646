//! The viewers of the `weak` run. Every viewer joins the room and reads it until told to stop or
//! until the node ends its connection; a healthy one reads everything at once (its score latency
//! is recorded), a weak one over a [`weaklink`] (what it shows, the publish time of its last score,
//! is kept for [`super::ages`] to sample). Both count the scores and chat lines they got and the
//! values their conflated frames skipped.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    time::{timeout, Instant},
};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

use crate::{
    conn::{self, NodeUrl},
    keyed,
    stats::Latencies,
    weaklink,
    wire::{self, Encoding, Inbound},
};

use super::feed::SCORE;

/// What the viewers of one mode share.
pub struct Ctx {
    pub node: NodeUrl,
    pub room: String,
    pub source_addrs: u8,
    pub viewers: usize,
    /// How many are weak ([`super::is_weak`] says which).
    pub weak: usize,
    pub link: weaklink::Link,
    pub connect_timeout: Duration,
    /// Per viewer: the publish time (µs since the epoch) of the last score it got; 0 before one.
    pub last_score: Vec<AtomicU64>,
    /// Per viewer: joined, and not closed since.
    pub open: Vec<AtomicBool>,
    /// Per viewer: its local address (`ip:port`), once connected over a weak link.
    pub local: Vec<OnceLock<String>>,
    pub joined: AtomicUsize,
    /// Healthy viewers' score latency, publish to receipt, µs.
    pub healthy_latency: Latencies,
    /// When the feed started.
    pub feed_start: OnceLock<Instant>,
}

impl Ctx {
    pub fn is_weak(&self, idx: usize) -> bool {
        super::is_weak(idx, self.viewers, self.weak)
    }

    /// The weak viewers' indices.
    pub fn weak_viewers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.viewers).filter(|i| self.is_weak(*i))
    }
}

/// What one viewer saw.
#[derive(Debug, Default)]
pub struct ViewerLog {
    pub weak: bool,
    pub joined: bool,
    /// Why it did not join.
    pub failure: Option<String>,
    /// How the node ended the connection (close code, `eof`, `error`), and when: seconds after
    /// the feed started, as the viewer saw it.
    pub closed: Option<(String, f64)>,
    pub scores: u64,
    pub chats: u64,
    /// Values of the score its conflated frames said it did not get.
    pub skipped: u64,
}

/// One viewer, `idx`, until `stop` or the node closes it.
pub async fn viewer(ctx: Arc<Ctx>, idx: usize, stop: watch::Receiver<bool>) -> ViewerLog {
    let weak = ctx.is_weak(idx);
    let mut log = ViewerLog {
        weak,
        ..ViewerLog::default()
    };
    let source = IpAddr::from([127, 0, 0, 2 + (idx % usize::from(ctx.source_addrs.max(1))) as u8]);
    let user = format!("{}-{idx}", if weak { "lt-weak" } else { "lt-viewer" });
    if weak {
        let opened = timeout(ctx.connect_timeout, weaklink::open(&ctx.node, source, &user, ctx.link)).await;
        match opened {
            Ok(Ok((ws, local))) => {
                let _ = ctx.local[idx].set(local.to_string());
                watch_room(&ctx, idx, ws, stop, &mut log).await;
            }
            Ok(Err(e)) => log.failure = Some(conn::class(&e)),
            Err(_) => log.failure = Some("timeout".into()),
        }
    } else {
        match timeout(
            ctx.connect_timeout,
            conn::open(&ctx.node, source, &user, Encoding::Json),
        )
        .await
        {
            Ok(Ok(ws)) => watch_room(&ctx, idx, ws, stop, &mut log).await,
            Ok(Err(e)) => log.failure = Some(conn::class(&e)),
            Err(_) => log.failure = Some("timeout".into()),
        }
    }
    log
}

/// Joins and reads the room on `ws` until `stop` or the node ends it.
async fn watch_room<S>(
    ctx: &Ctx,
    idx: usize,
    mut ws: WebSocketStream<S>,
    mut stop: watch::Receiver<bool>,
    log: &mut ViewerLog,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match timeout(ctx.connect_timeout, join(&mut ws, &ctx.room)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            log.failure = Some(conn::class(&e));
            return;
        }
        Err(_) => {
            log.failure = Some("join timeout".into());
            return;
        }
    }
    log.joined = true;
    ctx.open[idx].store(true, Ordering::Relaxed);
    ctx.joined.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            msg = ws.next() => {
                if let Some(how) = conn_end(&msg) {
                    ctx.open[idx].store(false, Ordering::Relaxed);
                    let at = ctx.feed_start.get().map_or(0.0, |s| Instant::now().duration_since(*s).as_secs_f64());
                    log.closed = Some((how, at));
                    return;
                }
                if let Some(Ok(Message::Text(text))) = msg {
                    on_text(ctx, idx, &text, log);
                }
            }
        }
    }
    ctx.open[idx].store(false, Ordering::Relaxed);
    // A weak viewer's close handshake would wait behind everything queued for it: a second at
    // most, then the socket is dropped.
    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// Sends the join and waits for its `ok`; an `error` or the end of the connection is the error.
async fn join<S>(ws: &mut WebSocketStream<S>, room: &str) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(keyed::join_frame(room, 1, false)).await?;
    loop {
        let msg = ws.next().await;
        if let Some(how) = conn_end(&msg) {
            bail!("closed during join: {how}");
        }
        if let Some(Ok(Message::Text(text))) = msg {
            match wire::scan_json(&text) {
                Inbound::Ok(1) => return Ok(()),
                Inbound::Error(_) => bail!("join refused: {}", keyed::error_code(&text).unwrap_or_default()),
                _ => {}
            }
        }
    }
}

/// How a frame off the socket says the connection ended; `None` while it goes on.
fn conn_end(msg: &Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<String> {
    match msg {
        Some(Ok(Message::Close(f))) => Some(f.as_ref().map_or("close".into(), |f| u16::from(f.code).to_string())),
        Some(Ok(_)) => None,
        Some(Err(_)) => Some("error".into()),
        None => Some("eof".into()),
    }
}

/// Counts a text frame of the room: a score (its latency or its publish time kept) or a chat line.
fn on_text(ctx: &Ctx, idx: usize, text: &str, log: &mut ViewerLog) {
    let (frame, marks) = keyed::scan(text);
    let Inbound::Msg(stamp, _) = wire::scan_json(&frame) else {
        return;
    };
    if stamp.publisher != SCORE {
        log.chats += 1;
        return;
    }
    log.scores += 1;
    log.skipped += marks.skipped;
    ctx.last_score[idx].fetch_max(stamp.ts_us, Ordering::Relaxed);
    if !log.weak {
        ctx.healthy_latency
            .record(idx, wire::now_us().saturating_sub(stamp.ts_us));
    }
}
