//! The `stadium-100k` run, small: 5,000 members over 5 node processes (the debug build) and a
//! 3-master cluster it starts itself, one step at 5 msg/s. Checks the merged report (every member
//! got every message once) and that the run stopped everything it started.

mod common;

#[test]
fn five_thousand_members_over_five_nodes_get_every_message_and_the_run_cleans_up() {
    let common::Run { stdout, out } = common::scenario(
        "fleet-smoke",
        "stadium-100k --clients 5000 --nodes 5 --rates 5 --duration 4 --json",
    );
    let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let step = &report["steps"][0];
    assert_eq!(step["members_connected"], 5000, "{step}");
    let sent = step["sent"].as_u64().unwrap();
    assert!(sent >= 15, "the feed published: {step}");
    assert_eq!(step["delivered"].as_u64().unwrap(), sent * 5000, "{step}");
    assert_eq!((&step["lost"], &step["duplicates"]), (&0.into(), &0.into()), "{step}");
    // No member ended by a node (idle, slow, or cut), on the nodes' count as on the members'.
    assert_eq!(step["node_closed"], serde_json::json!({}), "{step}");
    assert_eq!(step["closed_by_node"], serde_json::json!({}), "{step}");
    assert!(step["latency_ms"]["count"].as_u64().unwrap() >= sent * 5000);
    assert!(step["node_cpu_us_per_delivery"].as_f64().unwrap() > 0.0);
    assert_eq!(step["master_cores"].as_array().unwrap().len(), 3);
    // Each generator process's own report and log are kept beside the nodes' logs.
    assert!(out.join("run/generator-0.json").exists() && out.join("run/generator-0.log").exists());
    let svg = std::fs::read_to_string(out.join("stadium-100k.svg")).unwrap();
    assert!(svg.contains("polyline"));

    // Nothing left running: the nodes stopped cleanly, the cluster's servers are gone.
    let pids = |key: &str| -> Vec<u64> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect()
    };
    let (nodes, masters) = (pids("node_pids"), pids("master_pids"));
    assert_eq!((nodes.len(), masters.len()), (5, 3));
    for pid in nodes.iter().chain(&masters) {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !alive.contains("shardcast") && !alive.contains("redis-server"),
            "{pid} still runs: {alive}"
        );
    }
    for i in 0..5 {
        let log = std::fs::read_to_string(out.join(format!("run/node-{i}.log"))).unwrap();
        assert!(log.contains("stopped"), "node {i} did not stop cleanly: {log}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
