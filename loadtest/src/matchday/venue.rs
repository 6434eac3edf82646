//! The ground the match is played on, and what is done to it: a Redis Cluster of 3 masters and 3
//! replicas (`redis-cluster/up`), node processes on fixed loopback ports, HAProxy in front of
//! them as `deploy/` ships it; a rolling deploy ([`Venue::redeploy`]: a node drained with SIGTERM,
//! started again on its port, back in HAProxy's rotation before the next) and a master killed
//! ([`Venue::kill_master`]: SIGKILL, until one of its replicas holds its slots). Every step has a
//! deadline; whatever is started is stopped when the venue is dropped, however the run ends.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    balancer::Balancer,
    procs::{free_port, ready, send, Cluster, Proc},
};

use super::live::Live;

/// How long a Redis server waits before it takes a silent peer for failed, milliseconds.
pub const NODE_TIMEOUT_MS: u32 = 2000;
/// How long a node may take to be ready, and HAProxy to see it up.
const START: Duration = Duration::from_secs(30);
/// How long a replica may take to be promoted.
const PROMOTION: Duration = Duration::from_secs(30);

/// What the venue is built from.
pub struct Ground {
    pub nodes: usize,
    pub node_bin: PathBuf,
    /// Settings of every node beside its address, Redis and id.
    pub node_args: Vec<String>,
    /// How long a node may take to drain and exit on SIGTERM before it is killed.
    pub drain_deadline: Duration,
    /// Where logs and configuration go.
    pub scratch: PathBuf,
}

/// The running ground. Dropped in field order: the balancer, the nodes, then the cluster.
pub struct Venue {
    pub lb: Balancer,
    nodes: Vec<Proc>,
    ports: Vec<u16>,
    cluster: Cluster,
    ground: Ground,
    /// Every node process started, restarts included.
    pub node_pids: Vec<u32>,
    pub haproxy_pid: u32,
}

impl Venue {
    /// Starts the cluster, the nodes (ready) and HAProxy (every node up in it).
    pub fn open(ground: Ground) -> anyhow::Result<Venue> {
        let cluster = Cluster::up(&ground.scratch.join("cluster"), 1, NODE_TIMEOUT_MS)?;
        let ports = (0..ground.nodes)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            nodes.push(start_node(&ground, &cluster.seed, i, *port)?);
        }
        let deadline = Instant::now() + START;
        for port in &ports {
            ready(*port, deadline)?;
        }
        let shipped = Path::new("deploy/haproxy.cfg");
        let lb = Balancer::start(shipped, &ground.scratch, &ports)?;
        Ok(Venue {
            haproxy_pid: lb.pid(),
            node_pids: nodes.iter().map(Proc::pid).collect(),
            lb,
            nodes,
            ports,
            cluster,
            ground,
        })
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The Redis servers' pids.
    pub fn redis_pids(&self) -> &[u32] {
        &self.cluster.pids
    }

    /// Drains node `i` with SIGTERM, waits for it to exit (killed past the drain's deadline),
    /// starts it again on its port and waits until HAProxy has it back in rotation.
    pub fn redeploy(&mut self, i: usize, live: &Live) -> anyhow::Result<()> {
        let n = i + 1;
        live.event(format!("node {n}: SIGTERM"));
        let began = Instant::now();
        self.nodes[i].signal(libc::SIGTERM);
        match self.nodes[i].exited_by(began + self.ground.drain_deadline) {
            Some(status) => live.event(format!(
                "node {n}: exited ({status}) after {:.1} s",
                began.elapsed().as_secs_f64()
            )),
            None => {
                self.nodes[i].stop(Duration::ZERO);
                live.event(format!(
                    "node {n}: still draining after {:?}, killed",
                    self.ground.drain_deadline
                ));
            }
        }
        let restarted = Instant::now();
        self.nodes[i] = start_node(&self.ground, &self.cluster.seed, i, self.ports[i])?;
        self.node_pids.push(self.nodes[i].pid());
        ready(self.ports[i], restarted + START)?;
        live.event(format!(
            "node {n}: started again, ready after {:.1} s",
            restarted.elapsed().as_secs_f64()
        ));
        self.lb.wait_until(i, true, restarted + START)?;
        live.event(format!(
            "node {n}: up in HAProxy {:.1} s after its restart",
            restarted.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// A name for a room whose channel is served by the same master as `room`'s: `base`, or
    /// `base-2`, `base-3`, … So the master the failover kills carries both rooms of the match.
    pub fn room_beside(&self, room: &str, base: &str) -> anyhow::Result<String> {
        let master = self.master_of(room).context("no master serves the room")?;
        (1..200)
            .map(|k| {
                if k == 1 {
                    base.to_string()
                } else {
                    format!("{base}-{k}")
                }
            })
            .find(|name| self.master_of(name) == Some(master))
            .context("no room name found beside the score room")
    }

    /// The port of the master serving the slot of `room`'s channel (the contract's
    /// `<channel-prefix><room>:shard<N>`, with the nodes' default prefix and the one shard of a
    /// room that is not hot).
    fn master_of(&self, room: &str) -> Option<u16> {
        let masters = self.role_ports("master");
        let any = *masters.first()?;
        let channel = format!("ws:room:{room}:shard0");
        let slot: u16 = Cluster::cli(any, &["cluster", "keyslot", &channel])
            .trim()
            .parse()
            .ok()?;
        masters
            .into_iter()
            .find(|p| serves(&Cluster::cli(*p, &["cluster", "nodes"]), slot))
    }

    /// Kills (SIGKILL) the master serving `room` (its channel, and its history), waits until one
    /// of its replicas is a master, then starts the killed server again, as an operator would:
    /// it comes back as the new master's replica, and the run waits until it is in sync (until
    /// then the new master has no replica, and a publish that waits for one is `unconfirmed`).
    pub fn kill_master(&mut self, room: &str, live: &Live) -> anyhow::Result<()> {
        let victim = self.master_of(room).context("no master serves the score room")?;
        let replicas: Vec<u16> = self
            .role_ports("slave")
            .into_iter()
            .filter(|p| Cluster::cli(*p, &["info", "replication"]).contains(&format!("master_port:{victim}")))
            .collect();
        let pid = self
            .cluster
            .ports
            .iter()
            .position(|p| *p == victim)
            .map(|i| self.cluster.pids[i])
            .context("the master's pid")?;
        let keys = Cluster::cli(victim, &["dbsize"]).trim().to_string();
        live.event(format!(
            "Redis master :{victim} ({keys} keys; the rooms' channels): SIGKILL"
        ));
        let killed = Instant::now();
        send(pid, libc::SIGKILL);
        while killed.elapsed() < PROMOTION {
            if let Some(p) = replicas
                .iter()
                .find(|p| Cluster::cli(**p, &["role"]).lines().next() == Some("master"))
            {
                live.event(format!(
                    "Redis replica :{p} promoted {:.1} s after the kill",
                    killed.elapsed().as_secs_f64()
                ));
                return self.rejoin(victim, live);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("no replica of :{victim} ({replicas:?}) was promoted within {PROMOTION:?}")
    }

    /// Starts the killed server of `port` again and waits until it is a replica in sync.
    fn rejoin(&mut self, port: u16, live: &Live) -> anyhow::Result<()> {
        let started = Instant::now();
        let pid = self.cluster.restart(port)?;
        live.event(format!("Redis :{port} started again (pid {pid})"));
        while started.elapsed() < PROMOTION {
            let info = Cluster::cli(port, &["info", "replication"]);
            if info.contains("role:slave") && info.contains("master_link_status:up") {
                live.event(format!(
                    "Redis :{port} is a replica in sync {:.1} s after its restart",
                    started.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("Redis :{port} was not a replica in sync within {PROMOTION:?}")
    }

    /// The ports of the servers whose `ROLE` is `role` (`master`, `slave`).
    fn role_ports(&self, role: &str) -> Vec<u16> {
        self.cluster
            .ports
            .iter()
            .copied()
            .filter(|p| Cluster::cli(*p, &["role"]).lines().next() == Some(role))
            .collect()
    }

    /// Stops every node (SIGTERM: each drains its remaining clients), HAProxy and the cluster.
    pub fn close(mut self) {
        for node in &mut self.nodes {
            node.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + self.ground.drain_deadline;
        for node in &mut self.nodes {
            if node.exited_by(deadline).is_none() {
                node.stop(Duration::ZERO);
            }
        }
    }
}

/// Starts node `i` on `port` against the cluster at `seed`, its log appended to `scratch`.
fn start_node(ground: &Ground, seed: &str, i: usize, port: u16) -> anyhow::Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ground.scratch.join(format!("node-{}.log", i + 1)))?;
    Proc::spawn(
        Command::new(&ground.node_bin)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--redis", seed])
            .args(["--node-id", &format!("match-{}", i + 1)])
            .args(&ground.node_args)
            .stdout(Stdio::null())
            .stderr(log),
        format!("node {}", i + 1),
    )
}

/// Whether the `myself` line of `CLUSTER NODES` (`nodes`) lists `slot` among its ranges.
fn serves(nodes: &str, slot: u16) -> bool {
    let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
        return false;
    };
    // id addr flags master ping pong epoch link slot-ranges…; `[…]` entries are migrations.
    me.split_whitespace().skip(8).any(|range| {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_masters_slots_are_read_from_its_own_line() {
        let nodes = "07c3 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922\n\
                     e7d1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 12000 [93->-292f]\n";
        assert!(serves(nodes, 0) && serves(nodes, 5460) && serves(nodes, 12000));
        assert!(!serves(nodes, 5461) && !serves(nodes, 11999));
        assert!(!serves("", 1));
    }
}
