//! The match, short: 300 viewers through HAProxy over 3 node processes (the debug build) on a
//! cluster of 3 masters and 3 replicas it starts itself, every phase a few seconds. Checks what
//! the issue requires of the room with history (no acknowledged message lost, none duplicated or
//! reordered, in any phase), no duplicate and no reorder in the chat room, that every viewer is in both rooms at
//! the end, that the deploy and the failover happened, and that the run stopped everything it
//! started; prints the rest (the chat room's losses) with the table.

use serde_json::Value;

mod common;

const VIEWERS: u64 = 300;

#[test]
fn a_short_match_keeps_the_score_room_whole_and_every_viewer_comes_back() {
    let common::Run { stdout, out } = common::scenario(
        "matchday",
        &format!(
            "matchday --clients {VIEWERS} --rate 10 --steady 5 --goal 5 --after-kill 4 --whistle 3 \
             --drain-jitter 1"
        ),
    );
    eprintln!("{}", String::from_utf8_lossy(&stdout));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("matchday.json")).unwrap()).unwrap();
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 6);
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));

    for p in phases {
        let (name, score, chat) = (&p["phase"], &p["score"], &p["chat"]);
        assert_eq!(
            (n(&score["lost"]), n(&score["duplicates"]), n(&score["reordered"])),
            (0, 0, 0),
            "{name}: the score room lost, repeated or reordered: {score}"
        );
        assert_eq!(
            (n(&chat["duplicates"]), n(&chat["reordered"])),
            (0, 0),
            "{name}: the chat room repeated or reordered: {chat}"
        );
        if name != "kickoff" {
            // The feed ran and the books counted viewers in the phase.
            assert!(n(&score["acked"]) > 0 && n(&score["expected"]) > 0, "{name}: {score}");
            assert!(
                n(&chat["acked"]) > 0 && n(&chat["viewers_counted"]) > 0,
                "{name}: {chat}"
            );
        }
    }
    assert_eq!(n(&phases[0]["viewers_connected"]), VIEWERS, "kick-off: {}", phases[0]);
    assert_eq!(
        n(&report["viewers_joined_at_end"]),
        VIEWERS,
        "every viewer back in both rooms"
    );
    assert_eq!(n(&phases[5]["viewers_connected"]), VIEWERS, "{}", phases[5]);
    // The deploy moved viewers (drained with 4001, resumed with `since`); the failover happened.
    let deploy = &phases[3];
    assert!(n(&deploy["closed_by_node"]["4001"]) > 0, "{deploy}");
    assert!(n(&deploy["resumes_recovered"]) > 0, "{deploy}");
    let events: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        events.iter().filter(|e| e.ends_with("SIGTERM")).count(),
        3,
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.contains("promoted")), "{events:?}");
    let svg = std::fs::read_to_string(out.join("matchday.svg")).unwrap();
    assert!(svg.contains("polyline") && svg.contains(">failover<"));

    // Nothing left running: the nodes (restarts included), HAProxy and the cluster's servers.
    let pids = |key: &str| -> Vec<u64> { report[key].as_array().unwrap().iter().map(n).collect() };
    let (nodes, redis) = (pids("node_pids"), pids("redis_pids"));
    assert_eq!(
        (nodes.len(), redis.len()),
        (6, 6),
        "3 nodes started twice, 6 Redis servers"
    );
    for pid in nodes.iter().chain(&redis).chain([&n(&report["haproxy_pid"])]) {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !alive.contains("shardcast") && !alive.contains("redis-server") && !alive.contains("haproxy"),
            "{pid} still runs: {alive}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
