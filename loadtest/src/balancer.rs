//! HAProxy in front of the run's nodes, as `deploy/` ships it: the shipped `deploy/haproxy.cfg`
//! with its listening port and server list replaced by the run's, and a stats socket added so the
//! run can see what HAProxy sees (a server up or down by its `/acceptz` check). Clients of the run
//! connect through its one port, as phones behind a load balancer do.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::procs::{free_port, Proc};

/// The backend the shipped configuration names.
const BACKEND: &str = "shardcast";

/// A running HAProxy, stopped when dropped.
pub struct Balancer {
    proc: Proc,
    pub port: u16,
    socket: PathBuf,
}

/// The shipped configuration with the run's addresses: it listens on `listen`, balances over
/// one server per port of `nodes` (named `node1`, `node2`, … with the shipped servers' options),
/// and answers `show stat` on the unix socket `socket`.
pub fn config(shipped: &str, listen: u16, nodes: &[u16], socket: &Path) -> anyhow::Result<String> {
    const BIND: &str = "bind 127.0.0.1:8000";
    if !shipped.contains(BIND) {
        bail!("the shipped configuration has no `{BIND}`");
    }
    let template = shipped
        .lines()
        .find(|l| l.trim_start().starts_with("server "))
        .context("the shipped configuration lists no server")?;
    let indent = &template[..template.len() - template.trim_start().len()];
    // `server NAME ADDRESS OPTIONS…`: the options are kept for every server of the run.
    let options: Vec<&str> = template.split_whitespace().skip(3).collect();
    let mut out = String::new();
    let mut servers_written = false;
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("server ") {
            if !servers_written {
                for (i, port) in nodes.iter().enumerate() {
                    out += &format!("{indent}server node{} 127.0.0.1:{port} {}\n", i + 1, options.join(" "));
                }
                servers_written = true;
            }
            continue;
        }
        out += &line.replace(BIND, &format!("bind 127.0.0.1:{listen}"));
        out.push('\n');
        if trimmed == "global" {
            out += &format!("    stats socket {} mode 600 level user\n", socket.display());
        }
    }
    Ok(out)
}

impl Balancer {
    /// Starts HAProxy (`haproxy -db`, logging to `dir/haproxy.log`) with the shipped
    /// configuration at `shipped` over `nodes`, and waits (30 s at most) until it sees every
    /// server up.
    pub fn start(shipped: &Path, dir: &Path, nodes: &[u16]) -> anyhow::Result<Balancer> {
        let text = std::fs::read_to_string(shipped).with_context(|| format!("{}", shipped.display()))?;
        let port = free_port()?;
        let socket = dir.join("haproxy.sock");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(&text, port, nodes, &socket)?)?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let proc = Proc::spawn(
            Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&cfg)
                .stdout(log.try_clone()?)
                .stderr(log),
            "haproxy (deploy/install-haproxy installs it)",
        )?;
        let lb = Balancer { proc, port, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..nodes.len() {
            lb.wait_until(i, true, deadline)?;
        }
        Ok(lb)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The WebSocket URL clients connect to.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Each server's status as HAProxy has it (`UP`, `DOWN`, `UP 1/2` going down, `DOWN 1/2`
    /// coming up, …), by server index; empty when the stats socket did not answer.
    fn statuses(&self) -> Vec<(usize, String)> {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return Vec::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut csv = String::new();
        if s.write_all(b"show stat\n").is_err() || s.read_to_string(&mut csv).is_err() {
            return Vec::new();
        }
        statuses(&csv)
    }

    /// Whether HAProxy counts server `i` as up (taking new clients).
    pub fn is_up(&self, i: usize) -> bool {
        self.statuses()
            .iter()
            .any(|(n, status)| *n == i && status.starts_with("UP"))
    }

    /// Waits until HAProxy sees server `i` up (`up`) or down, at most until `deadline`.
    pub fn wait_until(&self, i: usize, up: bool, deadline: Instant) -> anyhow::Result<()> {
        while Instant::now() < deadline {
            if self.is_up(i) == up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "HAProxy did not see node {} {} in time",
            i + 1,
            if up { "up" } else { "down" }
        )
    }
}

/// The servers' statuses in the CSV of `show stat`: `(index, status)` for `node1`… of the backend.
fn statuses(csv: &str) -> Vec<(usize, String)> {
    let mut lines = csv.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
        return Vec::new();
    };
    let column = |name: &str| header.split(',').position(|c| c == name);
    let (Some(px), Some(sv), Some(st)) = (column("pxname"), column("svname"), column("status")) else {
        return Vec::new();
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let n = f.get(sv)?.strip_prefix("node")?.parse::<usize>().ok()?;
            let status = f.get(st)?.to_string();
            (*f.get(px)? == BACKEND && n > 0).then_some((n - 1, status))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_shipped_configuration_gets_the_runs_port_servers_and_socket() {
        let cfg = config(&shipped(), 9100, &[9201, 9202, 9203, 9204], Path::new("/tmp/x.sock")).unwrap();
        assert!(cfg.contains("bind 127.0.0.1:9100") && !cfg.contains(":8000"), "{cfg}");
        for (i, port) in [9201, 9202, 9203, 9204].iter().enumerate() {
            assert!(
                cfg.contains(&format!("server node{} 127.0.0.1:{port} check\n", i + 1)),
                "{cfg}"
            );
        }
        assert!(
            !cfg.contains(":8081") && !cfg.contains(":8083"),
            "the shipped servers are gone"
        );
        assert_eq!(cfg.matches("server node").count(), 4);
        assert!(cfg.contains("global\n    stats socket /tmp/x.sock mode 600 level user\n"));
        // What the shipped file says about checks and retries is kept.
        for kept in [
            "option httpchk GET /acceptz",
            "retry-on conn-failure empty-response 503",
            "balance roundrobin",
        ] {
            assert!(cfg.contains(kept), "{kept}");
        }
        assert!(config("global\n", 1, &[2], Path::new("/s")).is_err());
    }

    #[test]
    fn show_stat_gives_each_servers_status() {
        let csv = "# pxname,svname,qcur,status,weight\n\
                   websocket,FRONTEND,,OPEN,\n\
                   shardcast,node1,0,UP,1\n\
                   shardcast,node2,0,DOWN,1\n\
                   shardcast,node3,0,DOWN 1/2,1\n\
                   other,node1,0,UP,1\n\
                   shardcast,BACKEND,0,UP,3\n";
        assert_eq!(
            statuses(csv),
            vec![(0, "UP".into()), (1, "DOWN".into()), (2, "DOWN 1/2".into())]
        );
        assert!(statuses("").is_empty());
    }
}
