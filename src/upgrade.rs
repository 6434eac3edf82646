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
    /// permessage-deflate as the client's offers allow, if one is acceptable.
    deflate: Option<Deflate>,
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
        let extensions: Vec<&str> = headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let deflate = deflate_answer(&extensions.join(","));
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(NotWebSocket(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Upgrade {
            key,
            offered,
            deflate,
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

    /// permessage-deflate as the client offered it, if with parameters the node can honour.
    pub fn deflate_offered(&self) -> Option<Deflate> {
        self.deflate
    }

    /// Answers 101 (with `protocol`, if any, and `extensions`, the answer to the client's
    /// permessage-deflate offer, if any) and, once the connection is switched, runs `serve` on the
    /// socket and the bytes the client sent after its request (if it did not wait).
    pub fn accept<F, Fut>(self, protocol: Option<&'static str>, extensions: Option<String>, serve: F) -> Response
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
        if let Some(answer) = extensions.and_then(|a| HeaderValue::from_str(&a).ok()) {
            headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, answer);
        }
        response
    }
}

/// permessage-deflate as one client offered it, acceptably: what the node answers, and the window
/// the client compresses its own messages with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The client asked for the node's frames compressed alone (`server_no_context_takeover`).
    alone_asked: bool,
    /// The client asked for the node's window to be 15 bits (`server_max_window_bits=15`).
    window_15: bool,
    /// The client's window as the node answers it, where the client let the node choose.
    client_bits: Option<u8>,
    /// The client's window, in bits: what [`crate::inflate`] keeps of what it sent.
    pub client_window_bits: u8,
}

/// The client's window the node asks for when the client lets it choose: 1 KiB. A client's
/// frames are small commands that gain little from a larger one, and the node keeps the window of
/// every socket that compresses (a 15-bit one would be 32 KiB for each browser in a stadium).
const CLIENT_WINDOW_BITS: u8 = 10;

impl Deflate {
    /// Whether the node may keep its context with this client: it did not ask otherwise.
    pub fn allows_context(&self) -> bool {
        !self.alone_asked
    }

    /// The answer to the offer. Each server frame is compressed on its own
    /// (`server_no_context_takeover`), so one compressed frame serves every socket, unless the node
    /// keeps its context (`context`, which [`Deflate::allows_context`] must allow): then the
    /// client keeps the node's frames in its window and a room's frame may refer to the ones
    /// before it ([`crate::fanout::context`]). The client may keep its own context (old Safari
    /// breaks when told not to), which [`crate::inflate`] follows. An offer that asked for the
    /// window the node compresses with (15 bits) gets it repeated (RFC 7692 §7.1.2.1); one that
    /// offered `client_max_window_bits` is told the client's window.
    pub fn answer(&self, context: bool) -> String {
        let mut answer = String::from("permessage-deflate");
        if !context || self.alone_asked {
            answer.push_str("; server_no_context_takeover");
        }
        if self.window_15 {
            answer.push_str("; server_max_window_bits=15");
        }
        if let Some(bits) = self.client_bits {
            answer.push_str(&format!("; client_max_window_bits={bits}"));
        }
        answer
    }
}

/// The answer to the first acceptable permessage-deflate offer in a `Sec-WebSocket-Extensions`
/// list (RFC 7692 §5, §7), or `None` when none is acceptable. An offer is declined when its
/// parameters are unknown, repeated or malformed, when it asks for a window of fewer than 15 bits
/// for the node's frames (the node compresses with 15), or when a window size is not 8 to 15.
fn deflate_answer(offers: &str) -> Option<Deflate> {
    split_unquoted(offers, ',').find_map(|offer| {
        let mut parts = split_unquoted(offer, ';');
        let name = parts.next()?.trim();
        if !name.eq_ignore_ascii_case("permessage-deflate") {
            return None;
        }
        let mut seen: Vec<String> = Vec::new();
        let mut alone_asked = false;
        let mut window_15 = false;
        // The client's window as the node answers it, where the client let the node choose.
        let mut client_bits = None;
        for param in parts {
            let (key, value) = match param.split_once('=') {
                Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
                None => (param.trim(), None),
            };
            let key = key.to_ascii_lowercase();
            if seen.contains(&key) {
                return None;
            }
            match (key.as_str(), value.as_deref()) {
                ("server_no_context_takeover", None) => alone_asked = true,
                ("client_no_context_takeover", None) => {}
                ("server_max_window_bits", Some(v)) => {
                    // The node's frames are compressed with a 15-bit window; a smaller one cannot
                    // be honoured.
                    if window_bits(v)? != 15 {
                        return None;
                    }
                    window_15 = true;
                }
                // The client lets the node choose its window, up to what it says.
                ("client_max_window_bits", None) => client_bits = Some(CLIENT_WINDOW_BITS),
                ("client_max_window_bits", Some(v)) => {
                    client_bits = Some(window_bits(v)?.min(CLIENT_WINDOW_BITS));
                }
                _ => return None,
            }
            seen.push(key);
        }
        Some(Deflate {
            alone_asked,
            window_15,
            client_bits,
            client_window_bits: client_bits.unwrap_or(crate::inflate::WINDOW_BITS),
        })
    })
}

/// A window size parameter's value: 8 to 15, digits only, no leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
        return None;
    }
    v.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter's value as a token or a quoted string (its escapes undone); `None` when it is
/// neither.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        let token = !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        return token.then(|| v.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// `s` split at each `sep` outside a quoted string (a backslash escapes the next character in one).
fn split_unquoted(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_acceptable_deflate_offer_is_answered() {
        const DEFLATE: &str = "permessage-deflate; server_no_context_takeover";
        const CLIENT_10: &str = "permessage-deflate; server_no_context_takeover; client_max_window_bits=10";
        let agreed = |answer: &'static str, client_window_bits: u8| Some((answer.to_string(), client_window_bits));
        for (offers, answer) in [
            ("permessage-deflate", agreed(DEFLATE, 15)),
            // What browsers send: the client's window is the node's to choose.
            ("permessage-deflate; client_max_window_bits", agreed(CLIENT_10, 10)),
            ("permessage-deflate; client_no_context_takeover", agreed(DEFLATE, 15)),
            ("PerMessage-Deflate ; Server_No_Context_Takeover", agreed(DEFLATE, 15)),
            ("permessage-deflate; client_max_window_bits=12", agreed(CLIENT_10, 10)),
            ("permessage-deflate; client_max_window_bits=10", agreed(CLIENT_10, 10)),
            (
                "permessage-deflate; client_max_window_bits=\"9\"",
                agreed("permessage-deflate; server_no_context_takeover; client_max_window_bits=9", 9),
            ),
            (
                "permessage-deflate; server_max_window_bits=15",
                agreed("permessage-deflate; server_no_context_takeover; server_max_window_bits=15", 15),
            ),
            (
                "permessage-deflate; server_max_window_bits=15; client_max_window_bits",
                agreed(
                    "permessage-deflate; server_no_context_takeover; server_max_window_bits=15; client_max_window_bits=10",
                    10,
                ),
            ),
            // Several offers: the first the node can honour wins.
            (
                "permessage-deflate; server_max_window_bits=10, permessage-deflate",
                agreed(DEFLATE, 15),
            ),
            (
                "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
                agreed(CLIENT_10, 10),
            ),
            // A comma inside a quoted value does not split offers.
            ("permessage-deflate; x=\"a,b\", permessage-deflate", agreed(DEFLATE, 15)),
            ("", None),
            ("x-webkit-deflate-frame", None),
            ("permessage-deflate; server_max_window_bits=7", None),
            ("permessage-deflate; server_max_window_bits=16", None),
            ("permessage-deflate; server_max_window_bits=10", None),
            ("permessage-deflate; server_max_window_bits", None),
            ("permessage-deflate; server_max_window_bits=015", None),
            ("permessage-deflate; client_max_window_bits=7", None),
            ("permessage-deflate; client_max_window_bits=", None),
            ("permessage-deflate; client_max_window_bits=abc", None),
            ("permessage-deflate; client_max_window_bits=\"1 5\"", None),
            ("permessage-deflate; unknown_parameter", None),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                None,
            ),
            (
                "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
                None,
            ),
            ("permessage-deflate; server_no_context_takeover=1", None),
            ("permessage-deflate; client_max_window_bits=\"10", None),
        ] {
            let agreed = deflate_answer(offers);
            assert_eq!(agreed.map(|d| (d.answer(false), d.client_window_bits)), answer, "{offers:?}");
        }
    }

    #[test]
    fn an_offer_that_lets_the_node_keep_its_context_is_answered_without_asking_it_not_to() {
        for (offers, context) in [
            ("permessage-deflate", Some("permessage-deflate")),
            (
                "permessage-deflate; client_max_window_bits",
                Some("permessage-deflate; client_max_window_bits=10"),
            ),
            (
                "permessage-deflate; server_max_window_bits=15; client_no_context_takeover",
                Some("permessage-deflate; server_max_window_bits=15"),
            ),
            // The client asked for frames compressed alone: it gets them.
            ("permessage-deflate; server_no_context_takeover", None),
        ] {
            let d = deflate_answer(offers).unwrap();
            assert_eq!(d.allows_context(), context.is_some(), "{offers:?}");
            let answer = context.map_or("permessage-deflate; server_no_context_takeover", |c| c);
            assert_eq!(d.answer(true), answer, "{offers:?}");
        }
    }

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
