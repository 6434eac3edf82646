//! What ships in `deploy/`, run as an operator would: HAProxy (Debian's package) with the shipped
//! configuration in front of three node processes while one is drained; the systemd unit's
//! `ExecStart` and the container's entrypoint as plain processes; `/acceptz`; and the logs a node
//! writes to a file.

mod common;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{eventually, free_port, repo, status, Client, Cluster, Process, Reaped, Scratch};
use serde_json::{json, Value};

/// The shipped HAProxy configuration with its addresses replaced by the test's.
fn haproxy_config(listen: u16, nodes: &[&Process]) -> String {
    let shipped = std::fs::read_to_string(repo().join("deploy/haproxy.cfg")).unwrap();
    let mut cfg = shipped.replace("bind 127.0.0.1:8000", &format!("bind 127.0.0.1:{listen}"));
    for (i, node) in nodes.iter().enumerate() {
        let shipped_addr = format!("127.0.0.1:{}", 8081 + i);
        assert!(
            cfg.contains(&shipped_addr),
            "deploy/haproxy.cfg lists node {shipped_addr}"
        );
        cfg = cfg.replace(&shipped_addr, &node.addr.to_string());
    }
    cfg
}

/// A client of the test's balanced deployment: joins `kept` (with history) and `plain` (without)
/// through the balancer, follows `reconnect` and closes back through it, resuming `kept` with
/// `since`. Returns the `i` of every message it got, per room, and what its resumes answered.
struct Seen {
    kept: Vec<i64>,
    plain: Vec<i64>,
    resumes: Vec<Value>,
}

async fn balanced_client(
    lb: String,
    user: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
    joined: tokio::sync::mpsc::Sender<()>,
) -> Seen {
    let url = format!("{lb}?user={user}");
    let mut seen = Seen {
        kept: Vec::new(),
        plain: Vec::new(),
        resumes: Vec::new(),
    };
    let mut last: Option<Vec<Value>> = None;
    loop {
        let mut c = Client::connect(&url).await;
        let mut cmd = json!({"op":"join","room":"kept"});
        if let Some(last) = &last {
            cmd["since"] = json!(last);
        }
        let ok = c.request(cmd).await;
        assert_eq!(ok["op"], "ok", "{ok}");
        if last.is_some() {
            seen.resumes.push(ok.clone());
        }
        let mut pos = ok["pos"].as_array().expect("pos").clone();
        let ok = c.request(json!({"op":"join","room":"plain"})).await;
        assert_eq!(ok["op"], "ok", "{ok}");
        let _ = joined.send(()).await;
        // Until the node closes this socket (a drain), or the test is over and quiet.
        loop {
            let frame = if *stop.borrow() {
                match tokio::time::timeout(Duration::from_millis(1500), c.recv()).await {
                    Ok(f) => f,
                    Err(_) => return seen,
                }
            } else {
                tokio::select! {
                    f = c.recv() => f,
                    _ = stop.changed() => continue,
                }
            };
            let Some(m) = frame else { break };
            if m["op"] != "msg" {
                continue;
            }
            let i = m["data"]["i"].as_i64().unwrap();
            if m["room"] == "kept" {
                pos[m["shard"].as_u64().unwrap() as usize] = m["pos"].clone();
                seen.kept.push(i);
            } else {
                seen.plain.push(i);
            }
        }
        last = Some(pos);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_moves_a_drained_nodes_clients_to_the_others_and_history_loses_nothing() {
    const CLIENTS: usize = 90;
    let cluster = Cluster::shared();
    let (room_prefix, user_prefix) = common::prefix("deploy-lb");
    let spawn = |id: &str| {
        Process::spawn(&[
            "--redis",
            &cluster.url,
            "--channel-prefix",
            &room_prefix,
            "--user-channel-prefix",
            &user_prefix,
            "--node-id",
            id,
            "--history",
            "kept=10000/10m",
            "--drain-jitter",
            "1s",
        ])
    };
    let nodes = [spawn("lb-1"), spawn("lb-2"), spawn("lb-3")];
    for n in &nodes {
        let ready = n.url("/readyz");
        eventually("node ready", || async { status(&ready).await == 200 }).await;
    }
    let scratch = Scratch::new("haproxy");
    let cfg = scratch.0.join("haproxy.cfg");
    let lb_port = free_port();
    std::fs::write(&cfg, haproxy_config(lb_port, &nodes.iter().collect::<Vec<_>>())).unwrap();
    let _haproxy = Reaped(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (deploy/install-haproxy installs it)"),
    );
    let lb = format!("ws://127.0.0.1:{lb_port}/ws");
    eventually("the balancer answers", || async {
        status(&format!("http://127.0.0.1:{lb_port}/acceptz")).await == 200
    })
    .await;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (joined_tx, mut joined) = tokio::sync::mpsc::channel(CLIENTS * 4);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            tokio::spawn(balanced_client(
                lb.clone(),
                format!("fan{k}"),
                stop.clone(),
                joined_tx.clone(),
            ))
        })
        .collect();
    for _ in 0..CLIENTS {
        joined.recv().await.unwrap();
    }
    // Round robin: a third on each node.
    let open = |n: &Process| {
        let url = n.url("/metrics");
        async move { common::metric(&url, "shardcast_connections_open").await.unwrap_or(0.0) }
    };
    let on_drained = open(&nodes[0]).await;
    assert!(
        on_drained >= (CLIENTS / 3 - 5) as f64,
        "{on_drained} of {CLIENTS} on the first node"
    );

    // A feed straight to a node that stays, 100 messages a second into both rooms.
    let feed_url = nodes[2].url("/publish");
    let http = reqwest::Client::new();
    let feed = tokio::spawn(async move {
        let mut i = 0i64;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(6) {
            for room in ["kept", "plain"] {
                let r = http
                    .post(&feed_url)
                    .json(&json!({"room": room, "data": {"i": i}, "from": "feed"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        i
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes[0].signal("-TERM");
    let drained_at = Instant::now();
    eventually("the drained node refuses new clients", || async {
        status(&nodes[0].url("/acceptz")).await != 200
    })
    .await;
    eprintln!(
        "/acceptz of the drained node was 503 (or gone) {:?} after SIGTERM",
        drained_at.elapsed()
    );
    let published = feed.await.unwrap();
    stop_tx.send(true).unwrap();
    let mut seen = Vec::new();
    for c in clients {
        seen.push(c.await.unwrap());
    }

    let moved: Vec<&Seen> = seen.iter().filter(|s| !s.resumes.is_empty()).collect();
    assert!(
        moved.len() as f64 >= on_drained - 1.0,
        "{} of {on_drained} clients came back",
        moved.len()
    );
    let mut gaps = Vec::new();
    for s in &seen {
        // With history: every message, once, in order, across the move.
        assert_eq!(s.kept, (0..published).collect::<Vec<_>>(), "kept: lost or repeated");
        for r in &s.resumes {
            assert_eq!(r["recovered"], true, "{r}");
        }
        // Without: what the move cost.
        let got: HashSet<i64> = s.plain.iter().copied().collect();
        gaps.push((0..published).filter(|i| !got.contains(i)).count());
    }
    let moved_gaps: Vec<usize> = seen
        .iter()
        .zip(&gaps)
        .filter(|(s, _)| !s.resumes.is_empty())
        .map(|(_, g)| *g)
        .collect();
    let stayed_lost: usize = seen
        .iter()
        .zip(&gaps)
        .filter(|(s, _)| s.resumes.is_empty())
        .map(|(_, g)| g)
        .sum();
    eprintln!(
        "{published} messages a room; {} clients moved through the balancer: with history 0 lost, \
         without history each missed {}..{} (total {})",
        moved.len(),
        moved_gaps.iter().min().unwrap(),
        moved_gaps.iter().max().unwrap(),
        moved_gaps.iter().sum::<usize>()
    );
    assert_eq!(stayed_lost, 0, "clients that stayed lost messages");
    // The move ends no later than the drain's spread and a reconnect: nobody missed everything.
    assert!(moved_gaps.iter().all(|g| (*g as i64) < published / 2), "{moved_gaps:?}");
}

/// A node started with its log in a file; the file's path with it.
fn logged(args: &[&str], dir: &Path) -> (Process, PathBuf) {
    let log = dir.join(format!("node-{:x}.log", rand::random::<u32>()));
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(["--listen", &addr.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Process { child, addr }, log)
}

#[tokio::test]
async fn logs_in_a_file_have_no_colour_and_start_with_the_version_node_bus_and_settings() {
    let scratch = Scratch::new("logs");
    let (node, log) = logged(
        &[
            "--api-key",
            "s3cret-key",
            "--node-id",
            "logs-1",
            "--presence-tick",
            "500ms",
        ],
        &scratch.0,
    );
    eventually("node up", || async { status(&node.url("/healthz")).await == 200 }).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
    let first = text.lines().next().unwrap();
    for want in [
        "starting",
        concat!("version=\"", env!("CARGO_PKG_VERSION"), "\""),
        "node=logs-1",
        "bus=\"embedded\"",
        "--api-key=<redacted>",
        "--presence-tick=500ms",
    ] {
        assert!(first.contains(want), "no {want:?} in {first:?}");
    }
    assert!(!text.contains("s3cret-key"), "a secret in the log: {text}");
    drop(node);

    let (node, log) = logged(&["--log-format", "json", "--jwt-secret", "jwt-s3cret"], &scratch.0);
    eventually("node up", || async { status(&node.url("/healthz")).await == 200 }).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("jwt-s3cret"), "a secret in the log: {text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    for l in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(l[field].is_string(), "no {field} in {l}");
        }
    }
    assert_eq!(lines[0]["message"], "starting");
    assert_eq!(lines[0]["version"], env!("CARGO_PKG_VERSION"));
    assert!(lines[0]["settings"]
        .as_str()
        .unwrap()
        .contains("--jwt-secret=<redacted>"));
}

#[tokio::test]
async fn acceptz_is_503_only_when_the_node_should_get_no_new_clients() {
    // Redis unreachable from the start: the node was never linked, so it takes no clients yet
    // (a node that was linked stays accepting through a Redis blip: tests/resilience.rs).
    let down = format!("redis://127.0.0.1:{}", free_port());
    let node = Process::spawn(&["--max-connections", "2", "--redis", &down, "--drain-jitter", "0s"]);
    eventually("node up", || async { status(&node.url("/healthz")).await == 200 }).await;
    assert_eq!(status(&node.url("/readyz")).await, 503);
    assert_eq!(status(&node.url("/acceptz")).await, 503);
    drop(node);

    let node = Process::spawn(&[
        "--max-connections",
        "2",
        "--drain-jitter",
        "2s",
        "--drain-timeout",
        "5s",
    ]);
    eventually("node up", || async { status(&node.url("/healthz")).await == 200 }).await;
    let a = Client::connect(&node.ws("?user=a")).await;
    let _b = Client::connect(&node.ws("?user=b")).await;
    eventually("full", || async { status(&node.url("/acceptz")).await == 503 }).await;
    drop(a);
    eventually("room again", || async { status(&node.url("/acceptz")).await == 200 }).await;
    node.signal("-TERM");
    eventually("draining", || async { status(&node.url("/acceptz")).await == 503 }).await;
}

/// Splits a systemd command line (no quoting in ours).
fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test]
async fn the_systemd_units_command_and_the_containers_entrypoint_serve() {
    let scratch = Scratch::new("units");
    let bin = env!("CARGO_BIN_EXE_shardcast");

    // systemd: ExecStart with the binary and the settings file where the test has them.
    let unit = std::fs::read_to_string(repo().join("deploy/shardcast.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut argv = words(exec);
    assert_eq!(argv[0], "/usr/local/bin/shardcast");
    let settings = scratch.0.join("node.toml");
    let port = free_port();
    std::fs::write(
        &settings,
        format!("listen = \"127.0.0.1:{port}\"\nnode_id = \"unit-1\"\n"),
    )
    .unwrap();
    let at = argv
        .iter()
        .position(|a| a == "/etc/shardcast/node.toml")
        .expect("the unit's settings file");
    argv[at] = settings.to_string_lossy().into_owned();
    let _unit = Reaped(
        Command::new(bin)
            .args(&argv[1..])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    eventually("the unit's command serves", || async {
        status(&format!("{url}/readyz")).await == 200
    })
    .await;
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let copy = scratch.0.join("shardcast.service");
        std::fs::write(&copy, unit.replace("/usr/local/bin/shardcast", bin)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The container: ENTRYPOINT + CMD with its ENV, listening on loopback instead of every address.
    let file = std::fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    let array = |key: &str| -> Vec<String> {
        let line = file
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}"));
        serde_json::from_str(line.trim()).unwrap()
    };
    let mut argv = array("ENTRYPOINT ");
    argv.extend(array("CMD "));
    assert_eq!(argv[0], "/usr/local/bin/shardcast");
    let port = free_port();
    for a in &mut argv {
        if a == "0.0.0.0:8080" {
            *a = format!("127.0.0.1:{port}");
        }
    }
    let mut cmd = Command::new(bin);
    cmd.args(&argv[1..]);
    for env in file.lines().filter_map(|l| l.strip_prefix("ENV ")) {
        let (k, v) = env.split_once('=').unwrap();
        cmd.env(k, v);
    }
    let log = scratch.0.join("container.log");
    let _container = Reaped(cmd.stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap());
    let url = format!("http://127.0.0.1:{port}");
    eventually("the container's entrypoint serves", || async {
        status(&format!("{url}/readyz")).await == 200
    })
    .await;
    let first = std::fs::read_to_string(&log).unwrap();
    let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(first["message"], "starting", "{first}");
}
