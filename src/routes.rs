//! HTTP and WebSocket on one listener: `/ws`, `/publish`, `/disconnect`, `/rooms/<room>/presence`,
//! `/users/<user>`, `/healthz`, `/readyz`, `/acceptz`, `/metrics`, and `/demo` with `--demo true`.
//! Requests are checked here and turned into hub and bus calls; errors map to the wire here only.

use std::{collections::HashMap, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::{
    accept::Connection,
    auth::Grants,
    bus::BusError,
    close::{code, ErrorCode},
    cmd::Membership,
    encoding::{Encoding, PROTOCOL_JSON, PROTOCOL_MSGPACK},
    envelope::Kind,
    fanout::{gate::Gate, writer::Outbound},
    frame::{data_depth_ok, Data},
    hooks::{
        connect::{self, Verdict},
        publish::Moderated,
    },
    metrics as m,
    node::Node,
    presence::{listed, Presence},
    publish, session,
    throttle::Throttle,
    upgrade::Upgrade,
};

pub fn router(node: Node) -> Router {
    let throttle = Arc::new(Throttle::new(node.config().publish_rate, node.config().publish_burst));
    let router = Router::new()
        .route("/ws", get(upgrade))
        .route("/publish", post(publish_http).layer(Extension(throttle)))
        .route("/disconnect", post(disconnect))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/acceptz", get(acceptz))
        .route("/rooms/{room}/latest", get(room_latest))
        .route("/metrics", get(metrics));
    let router = match node.presence() {
        Some(_) => router
            .route("/rooms/{room}/presence", get(room_presence))
            .route("/users/{user}", get(user_presence)),
        None => router,
    };
    // Off by default: a production node serves no page (404).
    let router = if node.config().demo {
        router.route("/demo", get(crate::demo::page))
    } else {
        router
    };
    router.with_state(node)
}

/// Only `GET /metrics`, for `--metrics-listen`.
pub fn metrics_router(node: Node) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(node)
}

/// An HTTP error with the contract's `code`.
struct ApiError(StatusCode, ErrorCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.1.as_str(), "message": self.2 });
        (self.0, Json(body)).into_response()
    }
}

impl ApiError {
    /// The response, with the connection closed after it: the request's body was not read.
    fn closing(self) -> Response {
        let mut response = self.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// An upgrade refused before the socket opened: an HTTP error, counted by `reason`.
struct Refused {
    status: StatusCode,
    code: ErrorCode,
    reason: &'static str,
    message: String,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        m::upgrade_refused(self.reason);
        ApiError(self.status, self.code, self.message).into_response()
    }
}

fn refuse(status: StatusCode, code: ErrorCode, reason: &'static str, message: String) -> Refused {
    Refused {
        status,
        code,
        reason,
        message,
    }
}

async fn upgrade(
    State(node): State<Node>,
    Query(query): Query<HashMap<String, String>>,
    connection: Option<Extension<Connection>>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Result<Response, Refused> {
    admit(&node, &headers)?;
    // Held until the answer is ready: the token check (or the connect hook) and the inbox's
    // subscription.
    let Some(_handshake) = node.handshakes().start() else {
        return Ok(busy(node.config().max_handshakes));
    };
    let grants = match (node.verifier(), grants(&node, &query, &headers)) {
        // A valid token needs no hook.
        (Some(_), Ok(grants)) => grants,
        (_, result) if !node.hooks().connects() => result?,
        _ => {
            let addr = connection.map(|Extension(c)| c.peer().to_string()).unwrap_or_default();
            connect_hook(&node, &query, &headers, addr).await?
        }
    };
    let protocol = ws.select(&[PROTOCOL_JSON, PROTOCOL_MSGPACK]);
    let encoding = protocol.and_then(Encoding::from_protocol).unwrap_or(Encoding::Json);
    // With `--compress false` no extension is answered, whatever the client offered.
    let deflate = ws.deflate_offered().filter(|_| node.config().compress);
    // With `--compress-context`, a client that let the node keep its context keeps it.
    let context = deflate.is_some_and(|d| d.allows_context()) && node.config().compress_context > 0;
    let (out, membership) = register(&node, grants, encoding, deflate.is_some(), context).await?;
    let client_window_bits = deflate.map_or(0, |d| d.client_window_bits);
    Ok(
        ws.accept(protocol, deflate.map(|d| d.answer(context)), move |tcp, early| {
            session::serve(tcp, early, node, out, membership, client_window_bits)
        }),
    )
}

/// The `Retry-After` of an upgrade refused at `--max-handshakes`, in whole seconds: drawn from this
/// range, so that clients refused together and honouring it as it is do not all come back at once.
const BUSY_RETRY_AFTER_SECS: std::ops::RangeInclusive<u64> = 1..=3;

/// An upgrade refused because `max` handshakes are in progress: 503 with `Retry-After`, at once and
/// before any costly work, so that a connect storm cannot starve the sockets the node has. The
/// connection is closed too: the refused client holds nothing of the node's while it waits.
fn busy(max: usize) -> Response {
    let msg = format!("{max} handshakes in progress (--max-handshakes); retry later");
    let mut response = ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, msg).closing();
    let retry = rand::random_range(BUSY_RETRY_AFTER_SECS);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    response
}

/// Whether the node takes a new socket now: not draining, under its cap, from an allowed origin.
fn admit(node: &Node, headers: &HeaderMap) -> Result<(), Refused> {
    let config = node.config();
    if node.is_draining() {
        let msg = "node is draining".into();
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "draining",
            msg,
        ));
    }
    if node.hub().sessions() >= config.max_connections {
        let msg = format!("node holds its maximum of {} connections", config.max_connections);
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "capacity",
            msg,
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = &config.allowed_origins;
        if !allowed.is_empty() && !allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
            let msg = "origin not allowed".into();
            return Err(refuse(StatusCode::FORBIDDEN, ErrorCode::Forbidden, "origin", msg));
        }
    }
    Ok(())
}

/// What the socket may do: from its token when auth is on, else every right under the name it
/// gave (or an anonymous one).
fn grants(node: &Node, query: &HashMap<String, String>, headers: &HeaderMap) -> Result<Grants, Refused> {
    let names = node.config().names;
    let unauthorized = |msg: String| refuse(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "auth", msg);
    let Some(verifier) = node.verifier() else {
        return open(node, query);
    };
    let token = query.get("token").map(String::as_str).or_else(|| bearer(headers));
    let Some(token) = token else {
        return Err(unauthorized("missing token".into()));
    };
    match verifier.verify(token) {
        Ok(grants) if names.check(&grants.user).is_err() => Err(unauthorized("`sub` breaks the name rules".into())),
        Ok(grants) => Ok(grants),
        Err(e) => Err(unauthorized(e.to_string())),
    }
}

/// Every right under the name the client gave (or an anonymous one): a node without auth.
fn open(node: &Node, query: &HashMap<String, String>) -> Result<Grants, Refused> {
    match query.get("user") {
        Some(user) => match node.config().names.check(user) {
            Ok(()) => Ok(Grants::open(user.as_str().into())),
            Err(e) => Err(refuse(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadUser,
                "bad_user",
                format!("`user` {e}"),
            )),
        },
        None => Ok(Grants::open(format!("anon-{:016x}", rand::random::<u64>()).into())),
    }
}

/// What the connect hook grants an upgrade without a valid token: its grants, its refusal with
/// its status, 503 when the backend failed (unless `--hook-on-error connect=allow`, which admits
/// the socket as a node without auth would).
async fn connect_hook(
    node: &Node,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    addr: String,
) -> Result<Grants, Refused> {
    let upgrade = connect::Upgrade { addr, query, headers };
    match node.hooks().connect(upgrade).await {
        Verdict::Granted(grants) => match node.config().names.check(&grants.user) {
            Ok(()) => Ok(grants),
            Err(e) => Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "unavailable",
                format!("connect hook: user {e}"),
            )),
        },
        Verdict::Rejected { status, reason } => {
            let (status, code) = match status {
                403 => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
                _ => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            };
            Err(refuse(status, code, "auth", reason))
        }
        Verdict::Unavailable(e) => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "unavailable",
            format!("connect hook: {e}"),
        )),
        Verdict::Allowed => open(node, query),
    }
}

/// Registers the socket in the hub and subscribes its inbox. With the bus up, direct messages
/// reach the socket from the moment its upgrade is answered; with it down the socket is still
/// served, and its inbox is subscribed once the bus is back. `deflate`: the socket negotiated
/// permessage-deflate, keeping the node's context or not.
async fn register(
    node: &Node,
    grants: Grants,
    encoding: Encoding,
    deflate: bool,
    context: bool,
) -> Result<(Outbound, Membership), Refused> {
    let config = node.config();
    let above = if config.conflate.is_empty() {
        usize::MAX
    } else {
        config.conflate_above()
    };
    let out = Outbound::new(Arc::new(Gate::conflating(config.max_buffered_bytes, above)), encoding)
        .deflating(deflate)
        .keeping_context(context);
    let id = node.hub().register(out.clone());
    let membership = Membership::new(node, id, grants);
    let joined = if node.bus().is_ready() {
        node.hub()
            .join(membership.user_topic(), id, node.config().join_timeout)
            .await
    } else {
        node.hub().join_later(membership.user_topic(), id)
    };
    match joined {
        Ok(()) => Ok((out, membership)),
        Err(e) => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "unavailable",
            e.to_string(),
        )),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    room: String,
    #[serde(borrow)]
    data: &'a RawValue,
    from: Option<String>,
    key: Option<String>,
}

/// `POST /publish`. Checked in order of cost: the address's rate and the key before a byte of the
/// body is read, the body's size and time while it is read, then what it says.
async fn publish_http(
    State(node): State<Node>,
    Extension(throttle): Extension<Arc<Throttle>>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let config = node.config();
    let connection = parts.extensions.get::<Connection>();
    if let Some(connection) = connection {
        if let Err(wait) = throttle.admit(connection.peer().ip(), std::time::Instant::now()) {
            m::publish_rate_limited();
            let message = format!(
                "more than {} requests per second from this address (burst {})",
                config.publish_rate, config.publish_burst
            );
            let mut response = ApiError(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, message).closing();
            let retry = wait.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            return response;
        }
    }
    if let Err(e) = api_key(config, &parts.headers) {
        return e.closing();
    }
    let limit = config.max_frame_bytes;
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BadFrame,
            format!("body over {limit} bytes"),
        )
        .closing()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let body = {
        // While the body trickles in the connection waits on its client, and may be closed to
        // make room for others at the connection cap.
        let _waiting = connection.map(Connection::waiting);
        match tokio::time::timeout(config.http_body_timeout, read_body(body, limit)).await {
            Ok(Ok(body)) => body,
            Ok(Err(BodyError::TooLarge)) => return too_large(),
            Ok(Err(BodyError::Broken)) => {
                let msg = "the request body broke off".to_string();
                return ApiError(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, msg).closing();
            }
            Err(_) => {
                m::http_timeout("body");
                let msg = format!("body not received within {:?}", config.http_body_timeout);
                return ApiError(StatusCode::REQUEST_TIMEOUT, ErrorCode::BadFrame, msg).closing();
            }
        }
    };
    match publish_body(&node, &body).await {
        // A room with history answers where the message stands in it.
        Ok(Some(pos)) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "pos": pos.to_string() })),
        )
            .into_response(),
        Ok(None) => StatusCode::ACCEPTED.into_response(),
        Err(e) => e,
    }
}

/// With `--api-key`, the request must carry it as `Authorization: Bearer <key>`.
fn api_key(config: &crate::config::Config, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &config.api_key else { return Ok(()) };
    let given = bearer(headers).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        return Ok(());
    }
    metrics::counter!(m::AUTH_FAILURES).increment(1);
    Err(ApiError(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        "missing or wrong API key".into(),
    ))
}

/// `GET /rooms/<room>/latest`: `{"room":R,"msgs":[…]}`, the latest message of every key of the
/// room, as a join with `latest` sends them.
async fn room_latest(State(node): State<Node>, Path(room): Path<String>, headers: HeaderMap) -> Response {
    if let Err(e) = api_key(node.config(), &headers) {
        return e.into_response();
    }
    if let Err(e) = node.config().names.check(&room) {
        return ApiError(StatusCode::BAD_REQUEST, ErrorCode::BadRoom, format!("`room` {e}")).into_response();
    }
    match crate::latest::room::read(&node, &room).await {
        Ok(msgs) => (
            [(header::CONTENT_TYPE, "application/json")],
            crate::wire::latest_body(&room, &msgs),
        )
            .into_response(),
        Err(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()).into_response(),
    }
}

/// `GET /rooms/<room>/presence`: `{"count":N,"users":[…]}`, `users` only for a small room.
async fn room_presence(State(node): State<Node>, Path(room): Path<String>, headers: HeaderMap) -> Response {
    let presence = match presence_request(&node, &headers, &room, ErrorCode::BadRoom) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match presence.room(&room).await {
        Ok(total) => {
            let mut body = serde_json::json!({ "count": total.count });
            if let Some(users) = listed(&total.users) {
                body["users"] = serde_json::json!(users);
            }
            Json(body).into_response()
        }
        Err(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()).into_response(),
    }
}

/// `GET /users/<user>`: `{"online":B,"connections":N}` over every node.
async fn user_presence(State(node): State<Node>, Path(user): Path<String>, headers: HeaderMap) -> Response {
    let presence = match presence_request(&node, &headers, &user, ErrorCode::BadUser) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match presence.user(&user).await {
        Ok(online) => Json(serde_json::json!({
            "online": online.connections > 0,
            "connections": online.connections,
        }))
        .into_response(),
        Err(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()).into_response(),
    }
}

/// The checks both presence requests make: the API key, then the name.
fn presence_request<'a>(
    node: &'a Node,
    headers: &HeaderMap,
    name: &str,
    code: ErrorCode,
) -> Result<&'a Arc<Presence>, ApiError> {
    api_key(node.config(), headers)?;
    node.config()
        .names
        .check(name)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, code, e.to_string()))?;
    node.presence()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, ErrorCode::Unavailable, "presence is off".into()))
}

enum BodyError {
    TooLarge,
    Broken,
}

/// The whole body, refused as soon as it passes `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut out = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Broken)?;
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

async fn publish_body(node: &Node, body: &[u8]) -> Result<Option<crate::history::pos::Pos>, Response> {
    let bad = |code: ErrorCode, msg: String| ApiError(StatusCode::BAD_REQUEST, code, msg).into_response();
    let body: PublishBody = serde_json::from_slice(body)
        .map_err(|e| bad(ErrorCode::BadFrame, format!("expected {{\"room\":R,\"data\":D}}: {e}")))?;
    let config = node.config();
    let policy = config.names;
    policy
        .check(&body.room)
        .map_err(|e| bad(ErrorCode::BadRoom, format!("`room` {e}")))?;
    let from = body.from.unwrap_or_else(|| "server".into());
    policy
        .check(&from)
        .map_err(|e| bad(ErrorCode::BadUser, format!("`from` {e}")))?;
    if let Some(key) = &body.key {
        policy
            .check(key)
            .map_err(|e| bad(ErrorCode::BadField, format!("`key` {e}")))?;
    }
    let data = body.data.get().as_bytes();
    if !data_depth_ok(Encoding::Json, data, config.max_data_depth) {
        let msg = format!("data nests deeper than {} levels", config.max_data_depth);
        return Err(bad(ErrorCode::BadData, msg));
    }
    // Without an API key anyone may post here: a publish hook decides, as for a client's `pub`.
    let data = match config.api_key {
        None => moderated(node, &from, &body.room, body.data, body.key.as_deref()).await?,
        Some(_) => Bytes::copy_from_slice(data),
    };
    let data = Data {
        format: Encoding::Json,
        bytes: data,
    };
    let pos = publish::publish(node, Kind::Room, body.room, &from, data, body.key)
        .await
        .map_err(|e| match e {
            BusError::Unconfirmed(pos) => {
                let body = serde_json::json!({
                    "code": ErrorCode::Unconfirmed.as_str(),
                    "message": e.to_string(),
                    "pos": pos.to_string(),
                });
                (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
            }
            e @ BusError::TooManyKeys => {
                ApiError(StatusCode::CONFLICT, ErrorCode::TooManyKeys, e.to_string()).into_response()
            }
            e => ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()).into_response(),
        })?;
    m::published("http");
    Ok(pos)
}

/// `data` as the room's publish hook (if any) makes it, or the error answer: the app's refusal
/// (403 with its own code) or, the backend failing, 503 `unavailable`.
async fn moderated(node: &Node, from: &str, room: &str, data: &RawValue, key: Option<&str>) -> Result<Bytes, Response> {
    match node.hooks().publish(from, room, data, key).await {
        Ok(Moderated::AsIs) => Ok(Bytes::copy_from_slice(data.get().as_bytes())),
        Ok(Moderated::Replaced(bytes)) => match publish::replaced(node, None, &bytes) {
            Ok(()) => Ok(bytes),
            Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.code, e.message).into_response()),
        },
        Err(refusal) => {
            let e = refusal.frame_error(None, "publish");
            let status = match e.code {
                ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let code = e.app_code.as_deref().unwrap_or(e.code.as_str());
            Err((status, Json(serde_json::json!({ "code": code, "message": e.message }))).into_response())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    code: Option<u16>,
    #[serde(default)]
    reason: String,
}

/// `POST /disconnect {"user":U,"code":4010,"reason":R}`, for the app's backend (`--api-key`
/// required): every socket of U, on every node, is closed with 4010, through U's inbox channel.
async fn disconnect(State(node): State<Node>, headers: HeaderMap, body: Bytes) -> Response {
    let config = node.config();
    if config.api_key.is_none() {
        let msg = "POST /disconnect needs --api-key".to_string();
        return ApiError(StatusCode::FORBIDDEN, ErrorCode::Forbidden, msg).into_response();
    }
    if let Err(e) = api_key(config, &headers) {
        return e.closing();
    }
    let bad = |code: ErrorCode, msg: String| ApiError(StatusCode::BAD_REQUEST, code, msg).into_response();
    let body: DisconnectBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return bad(
                ErrorCode::BadFrame,
                format!("expected {{\"user\":U,\"code\":4010}}: {e}"),
            )
        }
    };
    if let Err(e) = config.names.check(&body.user) {
        return bad(ErrorCode::BadUser, format!("`user` {e}"));
    }
    if body.code.is_some_and(|c| c != code::REMOVED) {
        return bad(ErrorCode::BadField, format!("`code` must be {}", code::REMOVED));
    }
    let data = Data {
        format: Encoding::Json,
        bytes: serde_json::json!({ "reason": body.reason }).to_string().into(),
    };
    match publish::publish(&node, Kind::Disconnect, body.user, "server", data, None).await {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()).into_response(),
    }
}

async fn readyz(State(node): State<Node>) -> (StatusCode, &'static str) {
    if node.is_ready() {
        (StatusCode::OK, "ready\n")
    } else if node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "bus unavailable\n")
    }
}

/// For a load balancer's health check: 503 only when this node should get no new clients
/// (draining, at `--max-connections`, or just started and not linked to every Redis master yet).
/// Unlike `/readyz` it stays 200 while Redis blips once the node has been linked, which would
/// otherwise take every node out of rotation at once.
async fn acceptz(State(node): State<Node>) -> (StatusCode, &'static str) {
    if node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if node.hub().sessions() >= node.config().max_connections {
        (StatusCode::SERVICE_UNAVAILABLE, "full\n")
    } else if !node.bus().has_linked() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    } else {
        (StatusCode::OK, "accepting\n")
    }
}

async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.metrics().render(),
    )
}
