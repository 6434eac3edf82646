//! What the match's viewers and publishers share: their settings ([`Ctx`]), how a connection is
//! opened through the balancer and opened again after a loss ([`Line`], with the JS client's
//! [`Backoff`]), and what happened to a client's connections in each phase ([`Counts`]).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use tokio::{
    sync::watch,
    time::{sleep, timeout, Instant},
};
use tokio_tungstenite::tungstenite::{self, http::header::RETRY_AFTER, Message};

use crate::{
    conn::{self, NodeUrl, Ws},
    wire::Encoding,
};

use super::{
    backoff::{Backoff, Hint},
    live::{Live, PHASES},
};

/// The settings every client of the match shares.
pub struct Ctx {
    /// The balancer: the one address every client connects to.
    pub lb: NodeUrl,
    pub score_room: String,
    pub chat_room: String,
    /// Publishers of the run: the score's (0), then the chat's.
    pub publishers: usize,
    pub payload_bytes: usize,
    /// Client `i` uses `encodings[i % 2]`.
    pub encodings: [Encoding; 2],
    pub source_addrs: u8,
    /// Full jitter's first ceiling and its cap.
    pub backoff: (Duration, Duration),
    pub connect_timeout: Duration,
    pub live: Arc<Live>,
}

/// How long a command may wait for its answer before a client asks again (the JS client's
/// `requestTimeout`).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened to one client's connections in one phase.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Connections the node (or the balancer) ended: close code, `eof` or `error`.
    pub closed: BTreeMap<String, u64>,
    /// Connections the client ended itself at the time a `reconnect` frame gave (the node had
    /// not closed them by then).
    pub left_on_time: u64,
    /// Tries that did not open a connection, by why.
    pub failed: BTreeMap<String, u64>,
    /// Joins answered with an error, by code.
    pub refused: BTreeMap<String, u64>,
    /// Joins of the score room with `since`, by their `recovered`.
    pub recovered: u64,
    pub not_recovered: u64,
    /// Connections back in both rooms after a loss.
    pub rejoined: u64,
}

impl Counts {
    pub fn per_phase() -> Vec<Counts> {
        vec![Counts::default(); PHASES.len()]
    }

    pub fn add(&mut self, other: &Counts) {
        for (into, from) in [
            (&mut self.closed, &other.closed),
            (&mut self.failed, &other.failed),
            (&mut self.refused, &other.refused),
        ] {
            for (k, v) in from {
                *into.entry(k.clone()).or_insert(0) += v;
            }
        }
        self.left_on_time += other.left_on_time;
        self.recovered += other.recovered;
        self.not_recovered += other.not_recovered;
        self.rejoined += other.rejoined;
    }
}

/// One client's line to the balancer: who it is, and when it tries again.
pub struct Line {
    pub ctx: Arc<Ctx>,
    pub idx: usize,
    pub user: String,
    backoff: Backoff,
    /// Connections opened, to spread them over the source addresses.
    round: usize,
    pub counts: Vec<Counts>,
}

/// Why a connection ended.
pub enum End {
    /// The run told the client to stop.
    Stop,
    /// The connection is gone: how (a close code, `eof`, `error`, or `on time` when the client
    /// left at the node's `reconnect` time), and what it said about coming back.
    Lost(String, Hint),
}

impl Line {
    pub fn new(ctx: Arc<Ctx>, idx: usize, user: String) -> Line {
        let (base, cap) = ctx.backoff;
        Line {
            ctx,
            idx,
            user,
            backoff: Backoff::new(base, cap),
            round: 0,
            counts: Counts::per_phase(),
        }
    }

    pub fn encoding(&self) -> Encoding {
        self.ctx.encodings[self.idx % 2]
    }

    fn source(&self) -> IpAddr {
        let k = (self.idx + self.round) % usize::from(self.ctx.source_addrs.max(1));
        IpAddr::from([127, 0, 0, 2 + k as u8])
    }

    fn phase(&self) -> usize {
        self.ctx.live.phase().index()
    }

    /// Opens a connection through the balancer, trying again after the backoff's pause until
    /// one opens; `None` once `stop` is set.
    pub async fn open(&mut self, stop: &mut watch::Receiver<bool>) -> Option<Ws> {
        loop {
            if *stop.borrow() {
                return None;
            }
            self.round += 1;
            let tried = timeout(
                self.ctx.connect_timeout,
                conn::open(&self.ctx.lb, self.source(), &self.user, self.encoding()),
            )
            .await;
            let (why, hint) = match tried {
                Ok(Ok(ws)) => {
                    self.backoff.opened();
                    return Some(ws);
                }
                Ok(Err(e)) => (conn::class(&e), retry_after(&e).map_or(Hint::None, Hint::RetryAfter)),
                Err(_) => ("timeout".to_string(), Hint::None),
            };
            self.ctx
                .live
                .failed_tries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let phase = self.phase();
            *self.counts[phase].failed.entry(why).or_insert(0) += 1;
            if !self.pause(hint, stop).await {
                return None;
            }
        }
    }

    /// Counts how a connection ended (a close of the node's, or leaving on the node's time).
    pub fn lost(&mut self, how: &str) {
        let phase = self.phase();
        if how == ON_TIME {
            self.counts[phase].left_on_time += 1;
        } else {
            *self.counts[phase].closed.entry(how.to_string()).or_insert(0) += 1;
        }
    }

    /// Waits before the next try as the backoff says; false when `stop` was set meanwhile.
    pub async fn pause(&mut self, hint: Hint, stop: &mut watch::Receiver<bool>) -> bool {
        let wait = self.backoff.next(hint, rand::random::<f64>());
        let slept = tokio::select! {
            _ = sleep(wait) => true,
            _ = stop.wait_for(|s| *s) => false,
        };
        slept && !*stop.borrow()
    }
}

/// How a connection the client left at the node's `reconnect` time is named.
pub const ON_TIME: &str = "on time";

/// What a frame off a socket says ended the connection: its close code, `eof` or `error`;
/// `None` while it goes on.
pub fn ended(msg: &Option<Result<Message, tungstenite::Error>>) -> Option<String> {
    match msg {
        Some(Ok(Message::Close(f))) => Some(f.as_ref().map_or("close".into(), |f| u16::from(f.code).to_string())),
        Some(Ok(_)) => None,
        Some(Err(_)) => Some("error".into()),
        None => Some("eof".into()),
    }
}

/// The hint of a `reconnect` frame received at `at` with `after_ms`, as seen `now`.
pub fn come_back(at: Instant, after_ms: Option<u64>, now: Instant) -> Hint {
    let due = at + Duration::from_millis(after_ms.unwrap_or(0));
    Hint::ComeBackIn(due.saturating_duration_since(now))
}

/// The `Retry-After` of a 503 answer to the upgrade, in seconds.
fn retry_after(e: &anyhow::Error) -> Option<Duration> {
    let tungstenite::Error::Http(response) = e.downcast_ref::<tungstenite::Error>()? else {
        return None;
    };
    if response.status() != 503 {
        return None;
    }
    let secs = response
        .headers()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::http::Response;

    use super::*;

    #[test]
    fn a_503s_retry_after_is_read_through_the_errors_context() {
        let answer = |status: u16, retry: Option<&str>| {
            let mut r = Response::builder().status(status);
            if let Some(v) = retry {
                r = r.header("Retry-After", v);
            }
            anyhow::Error::from(tungstenite::Error::Http(Box::new(r.body(None).unwrap()))).context("handshake")
        };
        assert_eq!(retry_after(&answer(503, Some("3"))), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&answer(503, None)), None);
        assert_eq!(retry_after(&answer(429, Some("3"))), None, "only a 503's");
        assert_eq!(retry_after(&anyhow::anyhow!("connect: refused")), None);
    }

    #[test]
    fn counts_of_two_clients_add_up() {
        let mut a = Counts::default();
        a.closed.insert("4001".into(), 2);
        a.recovered = 1;
        let mut b = a.clone();
        b.failed.insert("timeout".into(), 1);
        b.left_on_time = 3;
        a.add(&b);
        assert_eq!(
            (a.closed["4001"], a.failed["timeout"], a.recovered, a.left_on_time),
            (4, 1, 2, 3)
        );
    }
}
