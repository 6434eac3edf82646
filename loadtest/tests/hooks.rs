//! The hooks run, short: 200 members in 20 rooms at 200 msg/s for 8 s, three times, on node
//! processes of the debug build it starts (embedded bus) and a backend it runs. Checks what issue
//! 30 requires that does not depend on the machine: no acknowledged line lost, reordered or
//! repeated, exactly the backend's masked lines masked, and, with the backend stopped, publishes
//! answered `unavailable` within the hook timeout, the breaker open, and publishing back within a
//! cool-down of the backend's return. The latency and CPU figures are printed, not checked (they
//! are the release build's, measured with `shardcast-loadtest hooks`).

use serde_json::Value;

mod common;

#[test]
fn a_short_chat_through_the_publish_hook_survives_its_backends_outage() {
    let common::Run { stdout, out } =
        common::scenario("hooks", "hooks --clients 200 --rooms 20 --rate 200 --duration 8");
    eprintln!("{}", String::from_utf8_lossy(&stdout));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("hooks.json")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let targets = &report["targets"];
    for met in [
        "nothing_lost_or_reordered",
        "masks_right",
        "answered_within_timeout",
        "breaker_opened",
        "resumed_within_cool_down",
    ] {
        assert_eq!(targets[met], true, "{met}: {targets}");
    }
    let runs = report["runs"].as_array().unwrap();
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    for r in runs {
        assert_eq!(n(&r["joined"]), 200, "{}", r["run"]);
        assert!(n(&r["acked"]) > 0, "{}", r["run"]);
    }
    assert!(n(&runs[1]["masked"]) > 0, "the hooks run masked lines");
    assert!(n(&runs[2]["unavailable"]) > 0, "the outage refused publishes");
}
