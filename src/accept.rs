//! The HTTP/1.1 server loop. It stands in for `axum::serve` so that an upgraded connection's I/O
//! is the accepted `TcpStream` itself, which [`crate::upgrade`] takes back for the socket's gate
//! (`axum::serve` wraps every connection in a private type that cannot be taken back).
//!
//! It also keeps HTTP connections from using up the node's file descriptors, which would stop it
//! accepting anything, health checks and WebSockets included:
//! - every connection that is not an upgraded WebSocket holds one of [`Limits::max_connections`]
//!   slots, from accept until it closes or is upgraded (a WebSocket then counts against
//!   `--max-connections` instead);
//! - a client gets [`Limits::header_timeout`] to send a request's headers, which also bounds how
//!   long a keep-alive connection may sit idle; a body is bounded where it is read
//!   (`--http-body-timeout`, see [`crate::routes`]);
//! - at the cap, the connection that has waited longest on its client (for headers, or for a body
//!   that [`Connection::waiting`] marks) is closed to make room, as long as it has waited
//!   [`EVICT_AFTER`]; with none such, the new connection is answered 503 and closed at once. So a
//!   slowloris cannot hold the node: the slow connections make room for new ones, and the listen
//!   backlog keeps moving.
//!
//! A WebSocket handshake's work once its request is in (its token, its inbox's subscription) is
//! bounded apart, by [`crate::upgrade::Handshakes`] (`--max-handshakes`): a connection waiting on
//! its client costs a descriptor, which this loop bounds, not work.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Body, Router};
use hyper::{body::Incoming, server::conn::http1, service::Service, Request, Response};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::metrics as m;

/// Pause after an accept error that is not the client's (out of file descriptors, say), so the
/// loop does not spin while the node is at its limit.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connection must have waited on its client before it may be closed to make room: a
/// new connection's request is usually in its first read, and must get that read.
pub const EVICT_AFTER: Duration = Duration::from_millis(250);
/// What a connection refused at the cap gets, written once without waiting.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 56\r\nconnection: close\r\n\r\n{\"code\":\"unavailable\",\"message\":\"too many connections\"}";

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time for a request's headers, and for an idle connection's next request.
    pub header_timeout: Duration,
    /// Connections held at once that are not upgraded WebSockets.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` completes; then stops accepting, lets each HTTP
/// connection finish its request in flight and returns when all have. Upgraded WebSockets are not
/// waited for: they left the HTTP server when they were upgraded.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let slots = Slots::new(limits.max_connections);
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut stop = pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    _ = &mut stop => break,
                }
            }
        };
        let Some(slot) = slots.open(peer) else {
            // Cheap on purpose: one write that never waits, then the socket is closed.
            let _ = tcp.try_write(SHED_RESPONSE);
            m::http_shed("refused");
            continue;
        };
        // Small frames go out at once rather than waiting on Nagle for the previous one's ACK.
        let _ = tcp.set_nodelay(true);
        let service = Tracked {
            app: TowerToHyperService::new(app.clone()),
            connection: slot.connection.clone(),
        };
        let conn = http.serve_connection(TokioIo::new(tcp), service).with_upgrades();
        let closing = closing.clone();
        connections.spawn(async move {
            let mut conn = pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                // Dropping the connection closes its socket.
                _ = slot.evicted.cancelled() => return,
                _ = closing.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        served = conn.as_mut() => served,
                        _ = slot.evicted.cancelled() => return,
                    }
                }
            };
            match served {
                Err(e) if e.is_timeout() => m::http_timeout("header"),
                Err(e) => tracing::debug!(error = %e, "HTTP connection ended with an error"),
                Ok(()) => {}
            }
            drop(slot);
        });
    }
    drop(listener);
    closing.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The app, keeping the connection's slot informed: waiting on its client between requests,
/// working while a request is handled. Each request carries the [`Connection`].
struct Tracked {
    app: TowerToHyperService<Router>,
    connection: Connection,
}

impl Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.connection.set_waiting(false);
        req.extensions_mut().insert(self.connection.clone());
        let answered = self.app.call(req);
        let connection = self.connection.clone();
        Box::pin(async move {
            let response = answered.await;
            connection.set_waiting(true);
            response
        })
    }
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// One HTTP connection as its requests see it (a request extension).
#[derive(Clone)]
pub struct Connection {
    id: u64,
    peer: SocketAddr,
    slots: Slots,
}

impl Connection {
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Marks the connection as waiting on its client (a request body being read) until the guard
    /// is dropped, so it may be closed to make room for others.
    pub fn waiting(&self) -> Waiting<'_> {
        self.set_waiting(true);
        Waiting(self)
    }

    fn set_waiting(&self, waiting: bool) {
        self.slots.set_waiting(self.id, waiting);
    }
}

/// See [`Connection::waiting`].
pub struct Waiting<'a>(&'a Connection);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.set_waiting(false);
    }
}

/// A connection's hold on its slot, kept by its task: released when the task ends (the connection
/// closed, or was upgraded and handed its socket to the WebSocket session).
struct Slot {
    connection: Connection,
    /// Cancelled when the connection is closed to make room.
    evicted: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connection.slots.close(self.connection.id);
    }
}

/// The open connections of one listener, and which of them wait on their client.
#[derive(Clone)]
struct Slots {
    max: usize,
    // A std Mutex: each use is a few map operations, never held across an await; taken at accept,
    // at close and twice per request, which is not the node's hot path.
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Every connection holding a slot, and since when it has waited on its client (`None`: its
    /// request is being handled).
    open: HashMap<u64, (Option<Instant>, CancellationToken)>,
    /// The waiting ones, longest waiting first.
    waiting: BTreeMap<(Instant, u64), ()>,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection from `peer`, making room if the longest waiting connection has
    /// waited long enough; `None` when there is no room.
    fn open(&self, peer: SocketAddr) -> Option<Slot> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.open.len() >= self.max {
            let &(since, victim) = state.waiting.keys().next()?;
            if now.saturating_duration_since(since) < EVICT_AFTER {
                return None;
            }
            state.waiting.remove(&(since, victim));
            if let Some((_, evicted)) = state.open.remove(&victim) {
                evicted.cancel();
                m::http_connection_closed();
            }
            m::http_shed("evicted");
        }
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        // Waiting from the start: for its first request's headers.
        state.open.insert(id, (Some(now), evicted.clone()));
        state.waiting.insert((now, id), ());
        m::http_connection_opened();
        Some(Slot {
            connection: Connection {
                id,
                peer,
                slots: self.clone(),
            },
            evicted,
        })
    }

    fn set_waiting(&self, id: u64, waiting: bool) {
        let mut state = self.lock();
        let state = &mut *state;
        let Some((since, _)) = state.open.get_mut(&id) else {
            return;
        };
        match (since.is_some(), waiting) {
            (false, true) => {
                let now = Instant::now();
                *since = Some(now);
                state.waiting.insert((now, id), ());
            }
            (true, false) => {
                if let Some(at) = since.take() {
                    state.waiting.remove(&(at, id));
                }
            }
            _ => {}
        }
    }

    fn close(&self, id: u64) {
        let mut state = self.lock();
        if let Some((since, _)) = state.open.remove(&id) {
            if let Some(at) = since {
                state.waiting.remove(&(at, id));
            }
            m::http_connection_closed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_waiting_makes_room() {
        let slots = Slots::new(2);
        let a = slots.open(peer()).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let b = slots.open(peer()).unwrap();
        // Both wait on their clients, but not for long enough yet.
        assert!(slots.open(peer()).is_none());
        tokio::time::advance(EVICT_AFTER).await;
        let c = slots.open(peer()).unwrap();
        assert!(a.evicted.is_cancelled() && !b.evicted.is_cancelled());
        // A connection whose request is being handled is not closed for room.
        b.connection.set_waiting(false);
        c.connection.set_waiting(false);
        tokio::time::advance(EVICT_AFTER * 4).await;
        assert!(slots.open(peer()).is_none());
        // One reading a slow body is.
        let reading = b.connection.waiting();
        tokio::time::advance(EVICT_AFTER).await;
        let d = slots.open(peer()).unwrap();
        assert!(b.evicted.is_cancelled());
        drop(reading);
        // An evicted slot's release does not free a second slot.
        drop(a);
        drop(b);
        assert!(slots.open(peer()).is_none());
        drop(c);
        let _e = slots.open(peer()).unwrap();
        assert_eq!(slots.lock().open.len(), 2);
        drop(d);
        assert_eq!(slots.lock().open.len(), 1);
    }
}
