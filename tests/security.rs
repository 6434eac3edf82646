//! Who may connect, join and publish, and the limits against abuse, against a real node.

mod common;

use common::{config, hs256, now, Client, Node, SECRET};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use shardcast::config::JwtKey;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

/// The HTTP status an upgrade was refused with.
async fn refused(req: impl IntoClientRequest + Unpin) -> u16 {
    match tokio_tungstenite::connect_async(req).await {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("upgrade was accepted"),
    }
}

async fn jwt_node() -> Node {
    let mut cfg = config(None, "jwt");
    cfg.jwt = Some(JwtKey::Secret(SECRET.into()));
    Node::start(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_need_a_valid_token() {
    let node = jwt_node().await;
    assert_eq!(refused(node.ws("?user=mallory")).await, 401, "no token");
    assert_eq!(refused(node.ws("?token=garbage")).await, 401, "malformed");
    let expired = hs256(json!({"sub":"ann","exp":now() - 60}));
    assert_eq!(refused(node.ws(&format!("?token={expired}"))).await, 401, "expired");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"ann","exp":now() + 600}),
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap();
    assert_eq!(
        refused(node.ws(&format!("?token={forged}"))).await,
        401,
        "wrong signature"
    );

    // A valid token by query or header; `sub` names the user and `?user=` is ignored.
    let ann = hs256(json!({"sub":"ann","exp":now() + 600,"pub":true}));
    let mut a = Client::connect(&node.ws(&format!("?token={ann}&user=mallory"))).await;
    let mut req = node.ws("").into_client_request().unwrap();
    let bob = hs256(json!({"sub":"bob","exp":now() + 600}));
    req.headers_mut()
        .insert("Authorization", format!("Bearer {bob}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut b = Client::from_ws(ws);
    assert_eq!(a.request(json!({"op":"dm","to":"bob","data":1})).await["op"], "ok");
    assert_eq!(b.recv().await.unwrap(), json!({"op":"dm","from":"ann","data":1}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_limit_rooms_and_publishing() {
    let node = jwt_node().await;
    let viewer = hs256(json!({"sub":"viewer","exp":now() + 600,"rooms":["match:*"]}));
    let mut v = Client::connect(&node.ws(&format!("?token={viewer}"))).await;
    v.join("match:42").await;
    let r = v.request(json!({"op":"join","room":"backstage"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = v.request(json!({"op":"pub","room":"match:42","data":"spam"})).await;
    assert_eq!(r["code"], "forbidden", "no pub claim: {r}");
    let r = v.request(json!({"op":"dm","to":"anyone","data":"spam"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let caster = hs256(json!({"sub":"caster","exp":now() + 600,"pub":true}));
    let mut c = Client::connect(&node.ws(&format!("?token={caster}"))).await;
    c.publish("match:42", json!({"goal":true})).await;
    // The viewer got the caster's message, and nothing from its own refused publish.
    assert_eq!(
        v.recv().await.unwrap(),
        json!({"op":"msg","room":"match:42","from":"caster","data":{"goal":true}})
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_closed_when_its_token_expires() {
    let node = jwt_node().await;
    let short = hs256(json!({"sub":"brief","exp":now() + 2}));
    let mut c = Client::connect(&node.ws(&format!("?token={short}"))).await;
    c.join("r").await;
    assert_eq!(c.close_code().await, Some(4003));
    node.stop().await;
}

/// A node verifying with `<name>-test-public.pem`, and a token for user `sub` signed by its private key.
async fn public_key_node(name: &str, alg: Algorithm, sub: &str) -> (Node, String) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    let mut cfg = config(None, name);
    cfg.jwt = Some(JwtKey::PublicKeyPem(
        std::fs::read_to_string(dir.join(format!("{name}-test-public.pem"))).unwrap(),
    ));
    let node = Node::start(cfg).await;
    let private = std::fs::read(dir.join(format!("{name}-test-private.pem"))).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
        _ => EncodingKey::from_ec_pem(&private).unwrap(),
    };
    let token = encode(&Header::new(alg), &json!({"sub":sub,"exp":now() + 600}), &key).unwrap();
    (node, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_and_rs256_public_keys_are_accepted() {
    for (name, alg) in [("es256", Algorithm::ES256), ("rs256", Algorithm::RS256)] {
        let (node, token) = public_key_node(name, alg, "pk").await;
        let mut c = Client::connect(&node.ws(&format!("?token={token}"))).await;
        assert_eq!(c.request(json!({"op":"ping"})).await["op"], "pong", "{name}");
        // An HS256 token signed with the public key's text is refused (no algorithm confusion).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
        let pem = std::fs::read(dir.join(format!("{name}-test-public.pem"))).unwrap();
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"x","exp":now() + 600}),
            &EncodingKey::from_secret(&pem),
        )
        .unwrap();
        assert_eq!(refused(node.ws(&format!("?token={confused}"))).await, 401, "{name}");
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_are_checked() {
    let mut cfg = config(None, "origin");
    cfg.allowed_origins = vec!["https://stadium.example".into()];
    let node = Node::start(cfg).await;
    let with_origin = |origin: &str| {
        let mut req = node.ws("?user=o").into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        req
    };
    assert_eq!(refused(with_origin("https://evil.example")).await, 403);
    let (ws, _) = tokio_tungstenite::connect_async(with_origin("https://stadium.example"))
        .await
        .unwrap();
    drop(ws);
    // Non-browser clients send no Origin and are not refused for it.
    Client::connect(&node.ws("?user=cli")).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_command_rate_are_enforced() {
    let mut cfg = config(None, "limits");
    cfg.max_connections = 2;
    cfg.command_rate = 5;
    cfg.command_burst = 5;
    let node = Node::start(cfg).await;
    let mut a = Client::connect(&node.ws("?user=a")).await;
    let _b = Client::connect(&node.ws("?user=b")).await;
    assert_eq!(refused(node.ws("?user=c")).await, 503, "third connection over the cap");

    // A burst passes, then commands are refused with rate_limited, then the flood is cut with 1008.
    let mut codes = Vec::new();
    for i in 0..5 {
        a.send(json!({"op":"ping","id":i})).await;
    }
    for _ in 0..5 {
        codes.push(a.recv().await.unwrap()["op"].as_str().unwrap().to_string());
    }
    assert!(codes.iter().all(|c| c == "pong"), "{codes:?}");
    for i in 0..20 {
        // The node may already have closed the socket: stop flooding then, and read what came.
        let ping = Message::Text(json!({"op":"ping","id":100 + i}).to_string().into());
        if futures_util::SinkExt::send(&mut a.ws, ping).await.is_err() {
            break;
        }
    }
    let mut limited = 0;
    while let Some(v) = a.recv().await {
        if v["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited >= 1, "no rate_limited error before the close");
    assert_eq!(a.closed_with, Some(1008));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_length_and_alphabet_can_be_narrowed() {
    let mut cfg = config(None, "names");
    cfg.names = shardcast::names::Policy {
        max_bytes: 12,
        ascii_only: true,
    };
    let node = Node::start(cfg).await;
    assert_eq!(refused(node.ws("?user=%C3%BCber")).await, 400, "non-ASCII user");
    assert_eq!(refused(node.ws("?user=thirteen-char")).await, 400, "user over 12 bytes");
    let mut c = Client::connect(&node.ws("?user=fan@home")).await;
    c.join("match:42").await;
    for (frame, code) in [
        (json!({"op":"join","room":"über"}), "bad_room"),
        (json!({"op":"join","room":"a room"}), "bad_room"),
        (json!({"op":"pub","room":"x".repeat(13),"data":1}), "bad_room"),
        (json!({"op":"dm","to":"dü","data":1}), "bad_user"),
    ] {
        let r = c.request(frame.clone()).await;
        assert_eq!(r["code"], code, "{frame}: {r}");
    }
    let http = reqwest::Client::new();
    let r = http
        .post(node.url("/publish"))
        .json(&json!({"room":"über","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_limits_claim_raises_the_rate_for_that_connection_only() {
    let mut cfg = config(None, "token-limits");
    cfg.jwt = Some(JwtKey::Secret(SECRET.into()));
    cfg.command_rate = 5;
    cfg.command_burst = 5;
    let node = Node::start(cfg).await;
    let feed = hs256(json!({"sub":"feed","pub":true,"limits":{"rate":100000,"burst":100000}}));
    let fan = hs256(json!({"sub":"fan","pub":true}));
    let mut feed = Client::connect(&node.ws(&format!("?token={feed}"))).await;
    let mut fan = Client::connect(&node.ws(&format!("?token={fan}"))).await;

    // 1,000 publishes back to back from the feed: every one answered `ok`.
    for i in 0..1000 {
        feed.send(json!({"op":"pub","room":"scores","data":i,"id":i})).await;
    }
    for i in 0..1000 {
        let r = feed.reply(i).await;
        assert_eq!(r["op"], "ok", "publish {i}: {r}");
    }
    // The other connection keeps the node's 5 a second, burst 5.
    for i in 0..10 {
        fan.send(json!({"op":"ping","id":i})).await;
    }
    let mut ops = Vec::new();
    for _ in 0..10 {
        let v = fan.recv().await.unwrap();
        ops.push(v["code"].as_str().unwrap_or(v["op"].as_str().unwrap()).to_string());
    }
    assert!(ops.iter().filter(|o| *o == "rate_limited").count() >= 4, "{ops:?}");

    // A bad claim is refused before the upgrade.
    for bad in [
        json!({"rate":0,"burst":10}),
        json!({"rate":"many","burst":10}),
        json!({"rate":10}),
        json!([10, 10]),
    ] {
        let token = hs256(json!({"sub":"feed","limits":bad}));
        assert_eq!(refused(node.ws(&format!("?token={token}"))).await, 401, "{bad}");
    }
    node.stop().await;
}
