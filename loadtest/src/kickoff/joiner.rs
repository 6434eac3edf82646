//! One socket of the `kickoff` run: it connects, waits for the joins to start, then makes its
//! share of the joins at their times ([`super::schedule`]), each a `join` with `latest` answered by
//! every key's latest value and then the `ok`, and a `leave` before the next. What each join got
//! comes back as a [`Join`].

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::watch,
    time::{sleep_until, timeout_at, Instant},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    conn::{self, NodeUrl, Ws},
    keyed,
    wire::{self, Encoding, Inbound},
};

/// What the sockets share.
pub struct Ctx {
    pub nodes: Vec<NodeUrl>,
    pub room: String,
    pub keys: usize,
    pub sockets: usize,
    pub joins: usize,
    pub window: Duration,
    pub source_addrs: u8,
    pub connect_timeout: Duration,
    /// How long one join may take to be answered, and a leave.
    pub answer_timeout: Duration,
}

/// How one join ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Answered `ok`.
    Ok,
    /// Answered `error`, with its code.
    Refused(String),
    /// Not answered within the answer timeout.
    Timeout,
    /// The connection ended first: close code, `eof` or `error`.
    Closed(String),
    /// Never sent: the socket did not connect, or was gone.
    NotSent(String),
}

/// One join as its socket saw it.
#[derive(Debug, Clone)]
pub struct Join {
    pub node: usize,
    /// How much after its planned time it was sent (its socket was still busy with the previous
    /// one, or the generator was late).
    pub late: Duration,
    pub end: End,
    /// From sending the join to its answer.
    pub took: Duration,
    /// From sending the join to the last of the latest values before the answer.
    pub last_latest: Option<Duration>,
    /// Distinct keys of the latest values before the answer, and latest frames in all (a key
    /// twice would be a duplicate).
    pub keys: usize,
    pub frames: usize,
    /// Latest frames after the answer (none expected).
    pub after_ok: usize,
}

/// What one socket did.
#[derive(Debug, Default)]
pub struct SocketLog {
    pub connected: bool,
    pub failure: Option<String>,
    pub joins: Vec<Join>,
    /// Leaves not answered `ok` in time.
    pub leaves_unanswered: u64,
}

/// The key number of `odds:N`, when it is one of `keys`.
pub fn key_number(key: &str, keys: usize) -> Option<usize> {
    key.strip_prefix("odds:")?.parse::<usize>().ok().filter(|n| *n < keys)
}

/// Socket `i`: connects at its turn of the ramp (`connect_at`), then makes its joins once `go`
/// gives the joins' start.
pub async fn socket(
    ctx: Arc<Ctx>,
    i: usize,
    connect_at: Instant,
    mut go: watch::Receiver<Option<Instant>>,
) -> SocketLog {
    let mut log = SocketLog::default();
    let node = i % ctx.nodes.len();
    sleep_until(connect_at).await;
    let source = IpAddr::from([127, 0, 0, 2 + (i % usize::from(ctx.source_addrs.max(1))) as u8]);
    let user = format!("lt-kick-{i}");
    let opened = tokio::time::timeout(
        ctx.connect_timeout,
        conn::open(&ctx.nodes[node], source, &user, Encoding::Json),
    )
    .await;
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            log.failure = Some(conn::class(&e));
            return log;
        }
        Err(_) => {
            log.failure = Some("timeout".into());
            return log;
        }
    };
    log.connected = true;
    let Ok(start) = go
        .wait_for(Option::is_some)
        .await
        .map(|s| s.unwrap_or_else(Instant::now))
    else {
        return log;
    };
    let mine: Vec<usize> = super::schedule::joins_of(i, ctx.sockets, ctx.joins).collect();
    let mut id = 1i64;
    let mut gone: Option<String> = None;
    for (n, j) in mine.iter().enumerate() {
        let due = start + super::schedule::due(*j, ctx.joins, ctx.window);
        sleep_until(due).await;
        if let Some(why) = &gone {
            log.joins.push(Join::not_sent(node, why));
            continue;
        }
        let join = join_once(&ctx, &mut ws, node, &mut id, due).await;
        if let End::Closed(why) = &join.end {
            gone = Some(why.clone());
        }
        let answered = join.end == End::Ok;
        log.joins.push(join);
        if answered && n + 1 < mine.len() {
            let (left, late_latest) = leave(&ctx, &mut ws, &mut id).await;
            log.leaves_unanswered += u64::from(!left);
            if let Some(last) = log.joins.last_mut() {
                last.after_ok += late_latest;
            }
        }
    }
    if gone.is_none() {
        conn::close(ws).await;
    }
    log
}

impl Join {
    fn not_sent(node: usize, why: &str) -> Join {
        Join {
            node,
            late: Duration::ZERO,
            end: End::NotSent(why.to_string()),
            took: Duration::ZERO,
            last_latest: None,
            keys: 0,
            frames: 0,
            after_ok: 0,
        }
    }
}

/// One join with `latest`, timed from its send to its answer.
async fn join_once(ctx: &Ctx, ws: &mut Ws, node: usize, id: &mut i64, due: Instant) -> Join {
    *id += 1;
    let my_id = *id;
    let mut seen = vec![false; ctx.keys];
    let mut j = Join::not_sent(node, "");
    let sent = Instant::now();
    j.late = sent.saturating_duration_since(due);
    if ws.send(keyed::join_frame(&ctx.room, my_id, true)).await.is_err() {
        j.end = End::Closed("error".into());
        return j;
    }
    let deadline = sent + ctx.answer_timeout;
    j.end = loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Ok(msg) => msg,
            Err(_) => break End::Timeout,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                break End::Closed(f.map_or("close".into(), |f| u16::from(f.code).to_string()))
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) => break End::Closed("error".into()),
            None => break End::Closed("eof".into()),
        };
        let (frame, marks) = keyed::scan(&text);
        match wire::scan_json(&frame) {
            Inbound::Ok(n) if n == my_id => break End::Ok,
            Inbound::Error(Some(n)) if n == my_id => {
                break End::Refused(keyed::error_code(&text).unwrap_or_else(|| "?".into()))
            }
            _ if marks.latest => {
                j.frames += 1;
                j.last_latest = Some(sent.elapsed());
                if let Some(k) = marks.key.and_then(|k| key_number(k, ctx.keys)) {
                    seen[k] = true;
                }
            }
            _ => {}
        }
    };
    j.took = sent.elapsed();
    j.keys = seen.iter().filter(|s| **s).count();
    j
}

/// Leaves the room and waits for the answer: whether it came in time, and the latest values that
/// arrived meanwhile, after the join's `ok` (none expected: the node sends them all before it).
async fn leave(ctx: &Ctx, ws: &mut Ws, id: &mut i64) -> (bool, usize) {
    *id += 1;
    let my_id = *id;
    if ws.send(keyed::leave_frame(&ctx.room, my_id)).await.is_err() {
        return (false, 0);
    }
    let deadline = Instant::now() + ctx.answer_timeout;
    let mut late_latest = 0;
    loop {
        match timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let (frame, marks) = keyed::scan(&t);
                match wire::scan_json(&frame) {
                    Inbound::Ok(n) | Inbound::Error(Some(n)) if n == my_id => return (true, late_latest),
                    _ => late_latest += usize::from(marks.latest),
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return (false, late_latest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_runs_keys_are_counted() {
        assert_eq!(key_number("odds:0", 100), Some(0));
        assert_eq!(key_number("odds:99", 100), Some(99));
        assert_eq!(key_number("odds:100", 100), None);
        assert_eq!(key_number("score", 100), None);
        assert_eq!(key_number("odds:-1", 100), None);
    }
}
