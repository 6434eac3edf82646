//! The JS client's own suite (`npm test` in `clients/js`) as part of `cargo test`: the SDK against
//! this crate's binary and a real Redis Cluster, the check that the committed demo bundle is a fresh
//! build, and the demo page in headless Chromium across a drain. `clients/js/install` installs what
//! it needs (the README's test command runs it first).

mod common;

use std::process::{Command, Stdio};

use clap::Parser;
use common::{config, Node};
use shardcast::config::Args;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_is_served_only_with_demo_true() {
    let off = Node::start(config(None, "demo-off")).await;
    assert_eq!(common::status(&off.url("/demo")).await, 404, "off by default");
    off.stop().await;

    let mut cfg = config(None, "demo-on");
    cfg.demo = true;
    let on = Node::start(cfg).await;
    let page = reqwest::get(on.url("/demo")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let committed = include_str!("../clients/js/dist/demo.html");
    assert_eq!(page.text().await.unwrap(), committed, "the committed bundle, embedded");
    on.stop().await;

    let parse = |v: &str| Args::try_parse_from(["shardcast", "--demo", v]).unwrap().resolve();
    assert!(parse("true").unwrap().demo);
    let err = parse("yes").unwrap_err().to_string();
    assert!(err.contains("--demo \"yes\": expected true or false"), "{err}");
}

#[test]
fn the_js_client_suite_passes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");
    let out = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(dir)
        .env("SHARDCAST_BIN", env!("CARGO_BIN_EXE_shardcast"))
        .env("SHARDCAST_TEST_OUT", env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null())
        .output()
        .expect("run npm (clients/js/install installs the client's test dependencies)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Each test with its time, the reconnect spread, the bundle size, the screenshot's path (shown
    // with --nocapture, and on failure).
    println!("{text}");
    assert!(
        out.status.success(),
        "npm test in clients/js failed (its output is above)"
    );
}
