//! The JS client's own suite (`npm test` in `clients/js`) as part of `cargo test`: the SDK against
//! this crate's binary and a real Redis Cluster, the check that the committed demo bundle is a fresh
//! build, and the demo page in headless Chromium across a drain. `clients/js/install` installs what
//! it needs (the README's test command runs it first).

use std::process::{Command, Stdio};

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
    // Shown with --nocapture: the reconnect spread, the bundle size, the screenshot's path.
    for line in text
        .lines()
        .filter(|l| l.starts_with("# ") && !l.starts_with("# Subtest"))
    {
        println!("{line}");
    }
    assert!(out.status.success(), "npm test in clients/js failed:\n{text}");
}
