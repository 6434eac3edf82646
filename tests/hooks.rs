//! Backend hooks against a real backend: a small HTTP server started by each test on a loopback
//! port, answering as the test says and recording what it was asked, and real nodes with real
//! WebSocket clients. What a hook decides (masking, refusal, grants, joins), the order of one
//! sender's messages whatever order the answers come in, and every way a backend can fail: slow,
//! dead, broken answers, a redirect; the breaker and the delivery to joined sockets meanwhile.

mod common;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use common::{config, Client, Node};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use shardcast::{config::Config, hooks::settings};

type Answer = Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// One request the backend got.
#[derive(Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    raw: Bytes,
    body: Value,
}

struct Shared {
    answer: Mutex<Answer>,
    seen: Mutex<Vec<Seen>>,
    inflight: AtomicUsize,
    most: AtomicUsize,
}

/// A hook backend: an HTTP server on a loopback port (or an HTTPS one, its certificate for
/// 127.0.0.1 issued by `tests/keys/hook-test-ca.pem`), stopped on drop.
struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    tls: bool,
}

/// Counts a request in flight while it is answered.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(State(shared): State<Arc<Shared>>, uri: axum::http::Uri, headers: HeaderMap, raw: Bytes) -> Response {
    let now = shared.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    let _counted = InFlight(shared.clone());
    shared.most.fetch_max(now, Ordering::SeqCst);
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    shared.seen.lock().unwrap().push(Seen {
        path: uri.path().to_owned(),
        headers,
        raw,
        body: body.clone(),
    });
    let answer = shared.answer.lock().unwrap().clone();
    answer(body).await
}

impl Backend {
    async fn start(answer: Answer) -> Backend {
        Backend::serve(answer, false).await
    }

    async fn start_tls(answer: Answer) -> Backend {
        Backend::serve(answer, true).await
    }

    async fn serve(answer: Answer, tls: bool) -> Backend {
        let shared = Arc::new(Shared {
            answer: Mutex::new(answer),
            seen: Mutex::new(Vec::new()),
            inflight: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/{*path}", post(serve))
            .route(
                "/elsewhere",
                axum::routing::get(|| async { Json(json!({"ok":true})) }).post(|| async { Json(json!({"ok":true})) }),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = if tls {
            tokio::spawn(serve_tls(listener, app))
        } else {
            tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            })
        };
        Backend {
            addr,
            shared,
            task,
            tls,
        }
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    fn answer(&self, answer: Answer) {
        *self.shared.answer.lock().unwrap() = answer;
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    fn most_in_flight(&self) -> usize {
        self.shared.most.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer computed from the request's body.
fn answering<F, Fut>(f: F) -> Answer
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(move |body| Box::pin(f(body)))
}

fn ok() -> Answer {
    answering(|_| async { Json(json!({"ok":true})).into_response() })
}

/// Never answers (within any test's patience).
fn hang() -> Answer {
    answering(|_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        StatusCode::OK.into_response()
    })
}

/// The moderation a chat app does: a slur refused, a line to mask masked, the rest passed.
fn moderate() -> Answer {
    answering(|body| async move {
        let text = body["data"]["text"].as_str().unwrap_or_default().to_owned();
        if text.contains("slur") {
            Json(json!({"error":{"code":"slur","message":"mind your words"}})).into_response()
        } else if text.contains("mask") {
            Json(json!({"data":{"text":"***"}})).into_response()
        } else {
            Json(json!({"ok":true})).into_response()
        }
    })
}

/// Serves `app` over TLS with the test certificate for 127.0.0.1.
async fn serve_tls(listener: tokio::net::TcpListener, app: Router) {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let keys = common::repo().join("tests/keys");
    let certs: Vec<_> = CertificateDer::pem_file_iter(keys.join("hook-test-cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(keys.join("hook-test-key.pem")).unwrap();
    // ring, as the node's client has it (reqwest's rustls-tls); that it has no post-quantum key
    // exchange, for which rustls marks it deprecated, does not matter on loopback.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let service = hyper_util::service::TowerToHyperService::new(app);
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

const SECRET: &str = "hook-secret-for-tests";

fn hooked(test: &str, set: impl FnOnce(&mut settings::Settings)) -> Config {
    let mut c = config(None, test);
    c.hooks.timeout = Duration::from_millis(400);
    c.hooks.secret = Some(SECRET.into());
    set(&mut c.hooks);
    c
}

fn route(spec: &str) -> (glob::Pattern, reqwest::Url) {
    settings::route(spec).unwrap()
}

/// The next `msg` frame, skipping others.
async fn next_msg(c: &mut Client) -> Value {
    loop {
        let v = c.recv().await.expect("open");
        if v["op"] == "msg" {
            return v;
        }
    }
}

/// No `msg` frame arrives within `within`.
async fn no_msg(c: &mut Client, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(v) = tokio::time::timeout_at(deadline, c.recv()).await {
        let v = v.expect("open");
        assert_ne!(v["op"], "msg", "unexpected message {v}");
    }
}

/// Whether a request was signed with [`SECRET`] as docs/protocol.md tells a backend to check.
fn signed(seen: &Seen) -> bool {
    let ts = seen.headers["x-shardcast-timestamp"].to_str().unwrap();
    let age = common::now().abs_diff(ts.parse::<u64>().unwrap());
    let given = seen.headers["x-shardcast-signature"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(&seen.raw);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    age < 60 && given == format!("sha256={want}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_hook_passes_masks_and_refuses_lines_from_sockets_and_http() {
    let backend = Backend::start(moderate()).await;
    let node = Node::start(hooked("moderate", |h| {
        h.publish = vec![route(&format!("chat:*={}", backend.url("/publish")))];
    }))
    .await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("chat:1").await;
    fan.join("lobby").await;
    let mut ann = Client::connect(&node.ws("?user=ann")).await;

    ann.publish("chat:1", json!({"text":"hello"})).await;
    assert_eq!(next_msg(&mut fan).await["data"], json!({"text":"hello"}));
    ann.publish("chat:1", json!({"text":"mask me"})).await;
    assert_eq!(next_msg(&mut fan).await["data"], json!({"text":"***"}), "masked");
    let r = ann
        .request(json!({"op":"pub","room":"chat:1","data":{"text":"a slur"}}))
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str(), r["message"].as_str()),
        (Some("error"), Some("slur"), Some("mind your words")),
        "{r}"
    );
    no_msg(&mut fan, Duration::from_millis(300)).await;
    // A room no hook names goes straight out.
    ann.publish("lobby", json!({"text":"a slur"})).await;
    assert_eq!(next_msg(&mut fan).await["room"], "lobby");
    // A MessagePack publisher's line reaches the backend as JSON.
    let mut packed = Client::connect_with(&node.ws("?user=mp"), Some("shardcast.v1.msgpack")).await;
    packed.publish("chat:1", json!({"text":"mask this too"})).await;
    assert_eq!(next_msg(&mut fan).await["data"], json!({"text":"***"}));

    let seen = backend.seen();
    assert_eq!(seen.len(), 4, "one request per hooked line");
    assert_eq!(seen[3].body["data"], json!({"text":"mask this too"}), "as JSON");
    // Counted (the recorder is the test process's: other tests' requests may be in it too).
    let metrics = node.url("/metrics");
    for name in [
        r#"shardcast_hook_requests_total{hook="publish"}"#,
        r#"shardcast_hook_latency_seconds_count{hook="publish"}"#,
    ] {
        let n = common::metric(&metrics, name).await.unwrap_or(0.0);
        assert!(n >= 4.0, "{name} = {n}");
    }
    assert_eq!(seen[0].path, "/publish");
    assert_eq!(
        seen[0].body,
        json!({"user":"ann","room":"chat:1","data":{"text":"hello"}})
    );
    assert_eq!(seen[0].headers[header::CONTENT_TYPE], "application/json");
    assert!(seen.iter().all(signed), "every request signed");

    // POST /publish without an API key is moderated too.
    let http = reqwest::Client::new();
    let post = |data: Value| {
        http.post(node.url("/publish"))
            .json(&json!({"room":"chat:1","from":"web","data":data}))
            .send()
    };
    let r = post(json!({"text":"slur from the web"})).await.unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "slur");
    assert_eq!(post(json!({"text":"mask this"})).await.unwrap().status(), 202);
    let m = next_msg(&mut fan).await;
    assert_eq!(
        (m["from"].clone(), m["data"].clone()),
        (json!("web"), json!({"text":"***"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_lines_keep_their_order_however_the_answers_come_and_senders_are_not_serialized() {
    const N: u64 = 12;
    // Later lines are answered sooner: the first waits longest.
    let backend = Backend::start(answering(|body| async move {
        let i = body["data"]["i"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(20 * (N - i % N))).await;
        Json(json!({"data":{"i":i,"seen":true}})).into_response()
    }))
    .await;
    let node = Node::start(hooked("order", |h| {
        h.timeout = Duration::from_secs(5);
        h.publish = vec![route(&format!("chat:*={}", backend.url("/publish")))];
    }))
    .await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("chat:1").await;
    let mut ann = Client::connect(&node.ws("?user=ann")).await;
    let mut bob = Client::connect(&node.ws("?user=bob")).await;
    for i in 0..N {
        ann.send(json!({"op":"pub","room":"chat:1","data":{"i":i}})).await;
        bob.send(json!({"op":"pub","room":"chat:1","data":{"i":i + 100}})).await;
    }
    let mut from_ann = Vec::new();
    let mut from_bob = Vec::new();
    while from_ann.len() + from_bob.len() < 2 * N as usize {
        let m = next_msg(&mut fan).await;
        assert_eq!(m["data"]["seen"], true, "every line went through the backend");
        let i = m["data"]["i"].as_u64().unwrap();
        if m["from"] == "ann" {
            from_ann.push(i);
        } else {
            from_bob.push(i - 100);
        }
    }
    let sent: Vec<u64> = (0..N).collect();
    assert_eq!(from_ann, sent, "ann's order");
    assert_eq!(from_bob, sent, "bob's order");
    // Pipelined: one at a time, no more than one request would ever be in flight per sender.
    assert!(backend.most_in_flight() > 2, "requests went one at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_backend_fails_lines_in_time_opens_the_breaker_and_never_stalls_the_joined() {
    let backend = Backend::start(hang()).await;
    let timeout = Duration::from_millis(400);
    let node = Node::start(hooked("hang", |h| {
        h.timeout = timeout;
        h.publish = vec![route(&format!("chat:*={}", backend.url("/publish")))];
    }))
    .await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("chat:1").await;
    fan.join("news").await;
    let mut ann = Client::connect(&node.ws("?user=ann")).await;
    ann.join("news").await;
    let mut feed = Client::connect(&node.ws("?user=feed")).await;

    // While ann's line waits on the backend, the room's other traffic flows to everyone, ann
    // included, and ann's other commands are answered.
    let started = Instant::now();
    let line = ann
        .send_request(json!({"op":"pub","room":"chat:1","data":{"text":"hi"}}))
        .await;
    feed.publish("news", json!(1)).await;
    assert_eq!(next_msg(&mut fan).await["data"], 1);
    let joined = ann.request(json!({"op":"join","room":"other"})).await;
    assert_eq!(joined["op"], "ok", "{joined}");
    assert!(
        ann.inbox.iter().all(|v| v["id"] != json!(line)),
        "ann's join waited for the hook's answer"
    );
    let r = ann.reply(line).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{r}"
    );
    assert!(
        started.elapsed() < timeout + Duration::from_secs(1),
        "answered within the timeout"
    );
    assert_eq!(next_msg(&mut ann).await["data"], 1, "ann got the news meanwhile");

    // Five failures in a row open the breaker: the next line fails at once, without a request.
    for _ in 0..4 {
        let r = ann
            .request(json!({"op":"pub","room":"chat:1","data":{"text":"hi"}}))
            .await;
        assert_eq!(r["code"], "unavailable");
    }
    let asked = backend.seen().len();
    let started = Instant::now();
    let r = ann
        .request(json!({"op":"pub","room":"chat:1","data":{"text":"hi"}}))
        .await;
    assert!(
        started.elapsed() < timeout,
        "waited {:?} on an open breaker",
        started.elapsed()
    );
    assert!(r["message"].as_str().unwrap().contains("circuit open"), "{r}");
    assert_eq!(backend.seen().len(), asked, "an open breaker sends nothing");
    let metrics = node.url("/metrics");
    assert_eq!(
        common::metric(&metrics, "shardcast_hook_breakers_open{hook=\"publish\"}").await,
        Some(1.0)
    );
    no_msg(&mut fan, Duration::from_millis(100)).await;

    // The backend back: within a cool-down (2 s) lines go through again.
    backend.answer(ok());
    let started = Instant::now();
    loop {
        let r = ann
            .request(json!({"op":"pub","room":"chat:1","data":{"text":"back"}}))
            .await;
        if r["op"] == "ok" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(4), "still refused: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_msg(&mut fan).await["data"]["text"], "back");
    assert_eq!(
        common::metric(&metrics, "shardcast_hook_breakers_open{hook=\"publish\"}").await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_allow_a_dead_backend_lets_lines_through() {
    // A port nobody listens on: every request is refused at once.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let node = Node::start(hooked("allow", |h| {
        h.publish = vec![route(&format!("chat:*=http://{dead}/publish"))];
        h.on_error.publish = settings::OnError::Allow;
    }))
    .await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("chat:1").await;
    let mut ann = Client::connect(&node.ws("?user=ann")).await;
    ann.publish("chat:1", json!({"text":"unmoderated"})).await;
    assert_eq!(next_msg(&mut fan).await["data"]["text"], "unmoderated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broken_answer_is_an_error_and_nothing_is_published() {
    let backend = Backend::start(ok()).await;
    let node = Node::start(hooked("broken", |h| {
        h.publish = vec![route(&format!("chat:*={}", backend.url("/publish")))];
    }))
    .await;
    let mut fan = Client::connect(&node.ws("?user=fan")).await;
    fan.join("chat:1").await;
    let mut ann = Client::connect(&node.ws("?user=ann")).await;
    let redirect = backend.url("/elsewhere");
    let large = "a".repeat(300 << 10);
    // Valid JSON, but more than the node takes from a publisher (--max-frame-bytes, 64 KiB).
    let larger_than_a_frame = "b".repeat(100 << 10);
    let cases: Vec<(&str, Answer)> = vec![
        ("over 65536 bytes", {
            let text = larger_than_a_frame.clone();
            answering(move |_| {
                let text = text.clone();
                async move { Json(json!({"data":{"text":text}})).into_response() }
            })
        }),
        ("bad answer", answering(|_| async { "not json".into_response() })),
        (
            "bad answer",
            answering(|_| async { Json(json!({"ok":true,"data":1})).into_response() }),
        ),
        (
            "bad answer",
            answering(|_| async { Json(json!({"allow":"yes"})).into_response() }),
        ),
        (
            "answered 500",
            answering(|_| async { StatusCode::INTERNAL_SERVER_ERROR.into_response() }),
        ),
        (
            "answered 404",
            answering(|_| async { StatusCode::NOT_FOUND.into_response() }),
        ),
        ("redirect", {
            let to = redirect.clone();
            answering(move |_| {
                let to = to.clone();
                async move { (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response() }
            })
        }),
        ("over 262144 bytes", {
            let large = large.clone();
            answering(move |_| {
                let large = large.clone();
                async move { Json(json!({"data":{"text":large}})).into_response() }
            })
        }),
        ("no answer within", hang()),
    ];
    for (why, answer) in cases {
        backend.answer(answer);
        let r = ann
            .request(json!({"op":"pub","room":"chat:1","data":{"text":why}}))
            .await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("unavailable")),
            "{why}: {r}"
        );
        assert!(r["message"].as_str().unwrap().contains(why), "{why}: {r}");
        if why == "redirect" {
            // Only this test's backend redirects.
            let name = r#"shardcast_hook_errors_total{hook="publish",kind="redirect"}"#;
            assert_eq!(common::metric(&node.url("/metrics"), name).await, Some(1.0));
        }
        // A good answer between two bad ones keeps the breaker shut.
        backend.answer(ok());
        ann.publish("chat:1", json!({"text":"fine"})).await;
        assert_eq!(
            next_msg(&mut fan).await["data"]["text"],
            "fine",
            "after {why}: only the good line"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_hook_grants_what_a_token_would_and_rejects_with_its_status() {
    let backend = Backend::start(answering(|body| async move {
        match body["headers"]["cookie"].as_str() {
            Some("session=ann") => Json(json!({"user":"ann","rooms":["members:*"],"pub":true})).into_response(),
            Some("session=banned") => Json(json!({"reject":{"status":403,"reason":"banned"}})).into_response(),
            Some("session=broken") => StatusCode::BAD_GATEWAY.into_response(),
            _ => Json(json!({"reject":{"status":401,"reason":"log in first"}})).into_response(),
        }
    }))
    .await;
    let mut c = hooked("connect", |h| {
        h.connect = Some(settings::url(&backend.url("/connect")).unwrap());
        h.forward_headers = vec!["cookie".into()];
    });
    c.jwt = Some(shardcast::config::JwtKey::Secret(common::SECRET.into()));
    let node = Node::start(c).await;

    let upgrade = |cookie: Option<&'static str>| {
        let url = node.ws("?app=web");
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("user-agent", "tests".parse().unwrap());
            if let Some(cookie) = cookie {
                req.headers_mut().insert("cookie", cookie.parse().unwrap());
            }
            tokio_tungstenite::connect_async(req).await
        }
    };
    let (ws, _) = upgrade(Some("session=ann")).await.expect("granted");
    let mut ann = Client::from_ws(ws);
    ann.join("members:1").await;
    let r = ann.request(json!({"op":"join","room":"lobby"})).await;
    assert_eq!(r["code"], "forbidden", "only the rooms granted: {r}");
    ann.publish("members:1", json!("hi")).await;
    assert_eq!(next_msg(&mut ann).await["from"], "ann", "the user the hook named");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body["query"], json!({"app":"web"}));
    assert_eq!(
        seen[0].body["headers"],
        json!({"cookie":"session=ann"}),
        "only the headers named"
    );
    assert!(seen[0].body["addr"].as_str().unwrap().starts_with("127.0.0.1:"));

    // A backend that fails refuses the upgrade (--hook-on-error connect=deny, the default).
    for (cookie, status) in [
        (Some("session=banned"), 403),
        (None, 401),
        (Some("session=broken"), 503),
    ] {
        match upgrade(cookie).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), status),
            other => panic!("{cookie:?}: {:?}", other.map(|_| ())),
        }
    }
    // A valid token needs no hook.
    let token = common::hs256(json!({"sub":"tok","exp":common::now() + 60}));
    let mut tok = Client::connect(&node.ws(&format!("?token={token}"))).await;
    tok.join("lobby").await;
    assert_eq!(backend.seen().len(), 4, "the token's upgrade did not ask");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_join_hook_forbids_and_its_answers_are_cached_per_user_and_room() {
    let backend = Backend::start(answering(|body| async move {
        if body["user"] == "ann" {
            Json(json!({"ok":true})).into_response()
        } else {
            Json(json!({"error":{"code":"forbidden","message":"members only"}})).into_response()
        }
    }))
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let node = Node::start(hooked("join", |h| {
        h.join = vec![
            route(&format!("members:*={}", backend.url("/join"))),
            route(&format!("vip:*=http://{dead}/join")),
        ];
        h.join_cache = Duration::from_secs(60);
    }))
    .await;
    let mut bob = Client::connect(&node.ws("?user=bob")).await;
    let r = bob.request(json!({"op":"join","room":"members:1"})).await;
    assert_eq!(
        (r["code"].as_str(), r["message"].as_str()),
        (Some("forbidden"), Some("members only"))
    );
    bob.join("lobby").await;
    // A backend that is down refuses the join (--hook-on-error join=deny, the default), and is
    // not kept: the next join asks again.
    for _ in 0..2 {
        let r = bob.request(json!({"op":"join","room":"vip:1"})).await;
        assert_eq!(r["code"], "unavailable", "{r}");
        assert!(r["message"].as_str().unwrap().starts_with("join hook:"), "{r}");
    }
    let mut ann = Client::connect(&node.ws("?user=ann")).await;
    ann.join("members:1").await;
    let r = ann.request(json!({"op":"leave","room":"members:1"})).await;
    assert_eq!(r["op"], "ok");
    ann.join("members:1").await;
    let asked: Vec<Value> = backend.seen().into_iter().map(|s| s.body).collect();
    assert_eq!(
        asked,
        vec![
            json!({"user":"bob","room":"members:1"}),
            json!({"user":"ann","room":"members:1"})
        ],
        "one request per (user, room) within the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_disconnect_closes_every_socket_of_the_user_on_every_node_and_the_hook_hears_of_it() {
    let backend = Backend::start(ok()).await;
    let cluster = common::Cluster::shared();
    let mut base = config(Some(cluster), "disconnect");
    base.api_key = Some("app-key".into());
    base.hooks.disconnect = Some(settings::url(&backend.url("/disconnect")).unwrap());
    base.hooks.batch = Duration::from_millis(200);
    base.hooks.secret = Some(SECRET.into());
    let mut nodes = Vec::new();
    for c in common::fleet(base, "disconnect", 2) {
        nodes.push(Node::start(c).await);
    }
    let mut on_a = Client::connect(&nodes[0].ws("?user=ann")).await;
    let mut on_b = Client::connect(&nodes[1].ws("?user=ann")).await;
    let mut bob = Client::connect(&nodes[1].ws("?user=bob")).await;

    let http = reqwest::Client::new();
    let post = |body: Value, key: &'static str| {
        http.post(nodes[0].url("/disconnect"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    assert_eq!(post(json!({"user":"ann"}), "wrong").await.unwrap().status(), 401);
    assert_eq!(
        post(json!({"user":"ann","code":4000}), "app-key")
            .await
            .unwrap()
            .status(),
        400
    );
    let r = post(json!({"user":"ann","code":4010,"reason":"banned"}), "app-key")
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(on_a.close_code().await, Some(4010), "on the node asked");
    assert_eq!(on_b.close_code().await, Some(4010), "on the other node");
    bob.join("lobby").await;

    common::eventually("the disconnect hook heard of both of ann's sockets", || async {
        let events: Vec<Value> = backend
            .seen()
            .iter()
            .filter(|s| s.path == "/disconnect")
            .flat_map(|s| s.body["events"].as_array().cloned().unwrap_or_default())
            .collect();
        events
            .iter()
            .filter(|e| e["user"] == "ann" && e["code"] == 4010 && e["at_ms"].as_u64().is_some())
            .count()
            == 2
    })
    .await;
    assert!(backend.seen().iter().all(signed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_waiting_for_the_hook_count_in_the_sockets_window_of_publishes() {
    let backend = Backend::start(answering(|_| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Json(json!({"ok":true})).into_response()
    }))
    .await;
    let mut c = hooked("window", |h| {
        h.timeout = Duration::from_secs(5);
        h.publish = vec![route(&format!("chat:*={}", backend.url("/publish")))];
    });
    c.max_inflight_publishes = 2;
    let node = Node::start(c).await;
    let mut ann = Client::connect(&node.ws("?user=ann")).await;
    let started = Instant::now();
    for _ in 0..2 {
        ann.send(json!({"op":"pub","room":"chat:1","data":{"text":"hi"}})).await;
    }
    // The window is full of lines waiting for the backend: the node reads nothing more until
    // their answers come, so the ping is answered after them.
    let pong = ann.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong", "{pong}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "answered after {:?}, beside two pending hook answers",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_is_asked_when_its_authority_is_trusted_and_refused_when_not() {
    let backend = Backend::start_tls(moderate()).await;
    let route_to = format!("chat:*={}", backend.url("/publish"));
    let ca = common::repo().join("tests/keys/hook-test-ca.pem");
    let trusting = Node::start(hooked("https-trusted", |h| {
        h.publish = vec![route(&route_to)];
        h.authorities = Some(settings::authorities(ca.to_str().unwrap()).unwrap());
    }))
    .await;
    let mut c = Client::connect(&trusting.ws("?user=ann")).await;
    c.join("chat:1").await;
    let r = c
        .request(json!({"op":"pub","room":"chat:1","data":{"text":"mask me"}}))
        .await;
    assert_eq!(r["op"], "ok", "{r}");
    assert_eq!(
        next_msg(&mut c).await["data"]["text"],
        "***",
        "the backend was asked over TLS"
    );
    trusting.stop().await;

    // A node that does not trust the backend's authority never sends it the line: the hook fails
    // (publish: deny) and nothing is published.
    let doubting = Node::start(hooked("https-untrusted", |h| h.publish = vec![route(&route_to)])).await;
    let mut c = Client::connect(&doubting.ws("?user=ann")).await;
    c.join("chat:1").await;
    let r = c
        .request(json!({"op":"pub","room":"chat:1","data":{"text":"hello"}}))
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{r}"
    );
    no_msg(&mut c, Duration::from_millis(300)).await;
    assert_eq!(
        backend.shared.seen.lock().unwrap().len(),
        1,
        "only the trusting node's line got through"
    );
    doubting.stop().await;
}
