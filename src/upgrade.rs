//! The WebSocket opening handshake (RFC 6455 §4.2), answered here rather than by axum's extractor
//! because the node needs the TCP socket itself once the upgrade is done: its write half goes to
//! the socket's gate, which writes frames built once for every socket as they are.
//!
//! Also how many handshakes a node answers at once ([`Handshakes`], `--max-handshakes`). A
//! handshake is the costly part of a connection's life (its token checked, its inbox subscribed,
//! its session set up); in a connect storm, unbounded, they queue ahead of everything the open
//! sockets need (their pings, pongs and frames), which is how members came to be closed as idle.
//! Past the bound an upgrade is answered 503 with `Retry-After` at once, before any of that work.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::metrics as m;

/// The handshakes a node answers at once. Cheap to clone.
///
/// A handshake counts from when its request is routed (its headers are in) until its answer is
/// ready. Time spent waiting on the client, before its headers or after the answer, is not counted:
/// a client that trickles its request (a slowloris) holds an HTTP connection, which
/// [`crate::accept`] bounds and evicts, never one of these.
#[derive(Clone)]
pub struct Handshakes {
    permits: Arc<Semaphore>,
    /// When every place was last taken (a handshake refused), in milliseconds from `since`; 0:
    /// never.
    full_at: Arc<AtomicU64>,
    since: Instant,
}

/// One handshake in progress; the place is given back when it is dropped.
pub struct Handshake {
    _permit: OwnedSemaphorePermit,
}

impl Handshakes {
    pub fn new(max: usize) -> Handshakes {
        Handshakes {
            permits: Arc::new(Semaphore::new(max.max(1))),
            full_at: Arc::new(AtomicU64::new(0)),
            since: Instant::now(),
        }
    }

    /// Whether every place was taken within the last `window`: a connect storm, which may have
    /// held the cores from the node's sockets and from their clients alike.
    pub fn stormed_within(&self, window: Duration) -> bool {
        let at = self.full_at.load(Ordering::Relaxed);
        at != 0 && (self.since.elapsed().as_millis() as u64).saturating_sub(at) <= window.as_millis() as u64
    }

    /// A place for one more handshake, or `None` (counted) when every place is taken.
    pub fn start(&self) -> Option<Handshake> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                m::handshake_started();
                Some(Handshake { _permit: permit })
            }
            Err(_) => {
                m::handshake_refused();
                let now = (self.since.elapsed().as_millis() as u64).max(1);
                self.full_at.store(now, Ordering::Relaxed);
                None
            }
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        m::handshake_ended();
    }
}

/// A valid upgrade request, not answered yet.
pub struct Upgrade {
    key: HeaderValue,
    offered: Option<HeaderValue>,
    on_upgrade: OnUpgrade,
}

/// Why a request to `/ws` is not a WebSocket handshake.
#[derive(Debug)]
pub struct NotWebSocket(StatusCode, &'static str);

impl IntoResponse for NotWebSocket {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// Whether a comma-separated header has `token` among its values, ignoring case.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotWebSocket;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Upgrade, NotWebSocket> {
        let bad = |why| Err(NotWebSocket(StatusCode::BAD_REQUEST, why));
        let headers = &parts.headers;
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return bad("`Connection` header did not include `upgrade`");
        }
        if !has_token(headers, header::UPGRADE, "websocket") {
            return bad("`Upgrade` header did not include `websocket`");
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
            return bad("`Sec-WebSocket-Version` header did not say 13");
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return bad("`Sec-WebSocket-Key` header missing");
        };
        let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(NotWebSocket(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Upgrade {
            key,
            offered,
            on_upgrade,
        })
    }
}

impl Upgrade {
    /// The first subprotocol the client offered that is among `supported`.
    pub fn select(&self, supported: &[&'static str]) -> Option<&'static str> {
        let offered = self.offered.as_ref()?.to_str().ok()?;
        offered
            .split(',')
            .map(str::trim)
            .find_map(|p| supported.iter().copied().find(|s| *s == p))
    }

    /// Answers 101 (with `protocol`, if any) and, once the connection is switched, runs `serve`
    /// on the socket and the bytes the client sent after its request (if it did not wait).
    pub fn accept<F, Fut>(self, protocol: Option<&'static str>, serve: F) -> Response
    where
        F: FnOnce(TcpStream, Bytes) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        tokio::spawn(async move {
            match self.on_upgrade.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
                Ok(Ok(parts)) => serve(parts.io.into_inner(), parts.read_buf).await,
                Ok(Err(_)) => tracing::error!("upgraded connection is not a TCP stream"),
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
            ],
        )
            .into_response();
        let headers = response.headers_mut();
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(p) = protocol {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_handshake_marks_a_storm_for_a_window() {
        let handshakes = Handshakes::new(2);
        assert!(!handshakes.stormed_within(Duration::from_secs(60)), "no storm yet");
        let held = [handshakes.start(), handshakes.start()];
        assert!(held.iter().all(Option::is_some));
        assert!(
            !handshakes.stormed_within(Duration::from_secs(60)),
            "full, none refused yet"
        );
        assert!(handshakes.start().is_none());
        assert!(handshakes.stormed_within(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!handshakes.stormed_within(Duration::from_millis(10)), "past the window");
    }
}
