//! The processes a multi-process run starts and the probes it makes of them: a child process that
//! is stopped however the run ends ([`Proc`]), a Redis Cluster from `redis-cluster/up`
//! ([`Cluster`]), free loopback ports, and plain HTTP `GET`s of a node's endpoints. The runs
//! themselves (`fleet`, `matchday`) decide what to start and when; this module only starts, signals,
//! waits and stops.

use std::{
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// A started process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    /// Starts `cmd`. The child is killed when this process dies, even by SIGKILL (a test's
    /// timeout), so no node or balancer outlives the run. The signal follows the thread that
    /// spawned the child: spawn from a thread that lives as long as the run (the main thread).
    pub fn spawn(cmd: &mut Command, what: impl Into<String>) -> anyhow::Result<Proc> {
        let what = what.into();
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`libc::SIGTERM`, …) to the process, if it still runs.
    pub fn signal(&mut self, signal: i32) {
        if matches!(self.child.try_wait(), Ok(None)) {
            send(self.child.id(), signal);
        }
    }

    /// Waits for the process to exit, at most until `deadline`; `None` if it still runs then.
    pub fn exited_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit, at most until `deadline`; kills it then.
    pub fn finish(mut self, deadline: Instant) -> anyhow::Result<ExitStatus> {
        match self.exited_by(deadline) {
            Some(status) => Ok(status),
            None => bail!("{} did not end in time", self.what),
        }
    }

    /// Asks the process to stop (SIGTERM), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        self.signal(libc::SIGTERM);
        if self.exited_by(Instant::now() + grace).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `signal` to the process `pid`.
pub fn send(pid: u32, signal: i32) {
    // SAFETY: kill has no memory effects; a pid that is gone gets ESRCH.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// The cluster `redis-cluster/up` started, taken down when dropped.
pub struct Cluster {
    dir: PathBuf,
    pub seed: String,
    /// Every server's port, and its pid at the same index, in the order `up` started them (its
    /// `--cluster create` makes the first three the masters).
    pub ports: Vec<u16>,
    pub pids: Vec<u32>,
    pub masters: usize,
}

impl Cluster {
    /// Three masters with `replicas` replicas each, in `dir`, on free ports; a failover takes
    /// `node_timeout_ms` and a little more to be noticed. Run from the repository.
    pub fn up(dir: &Path, replicas: u32, node_timeout_ms: u32) -> anyhow::Result<Cluster> {
        let out = Command::new("redis-cluster/up")
            .args(["--replicas", &replicas.to_string(), "--masters", "3", "--port", "auto"])
            .args(["--node-timeout", &node_timeout_ms.to_string(), "--dir"])
            .arg(dir)
            .args(["--owner-pid", &std::process::id().to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("redis-cluster/up (run from the repository)")?;
        if !out.status.success() {
            bail!("redis-cluster/up failed");
        }
        let seed = String::from_utf8(out.stdout)?
            .lines()
            .last()
            .context("redis-cluster/up printed no seed")?
            .trim()
            .to_string();
        let numbers = |file: &str| -> anyhow::Result<Vec<u64>> {
            std::fs::read_to_string(dir.join(file))?
                .split_whitespace()
                .map(|n| n.parse().with_context(|| format!("{file}: {n}")))
                .collect()
        };
        Ok(Cluster {
            dir: dir.to_path_buf(),
            seed,
            ports: numbers("ports")?.into_iter().map(|p| p as u16).collect(),
            pids: numbers("pids")?.into_iter().map(|p| p as u32).collect(),
            masters: 3,
        })
    }

    /// Starts the server of `port` again from its configuration after it was killed: it rejoins
    /// the cluster, as a replica of the server that took its slots. Its new pid joins those
    /// `redis-cluster/down` stops. Waits (10 s at most) until it answers.
    pub fn restart(&mut self, port: u16) -> anyhow::Result<u32> {
        let i = self.ports.iter().position(|p| *p == port).context("no such server")?;
        let here = self.dir.join(port.to_string());
        let pidfile = here.join("redis.pid");
        let _ = std::fs::remove_file(&pidfile);
        let started = Command::new("redis-server")
            .arg(here.join("redis.conf"))
            .stdout(Stdio::null())
            .status()
            .context("redis-server")?;
        if !started.success() {
            bail!("redis-server on port {port} did not start");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(pid) = pid.filter(|_| Cluster::cli(port, &["ping"]).trim() == "PONG") {
                let mut pids = std::fs::OpenOptions::new().append(true).open(self.dir.join("pids"))?;
                writeln!(pids, "{pid}")?;
                self.pids[i] = pid;
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                bail!("redis-server on port {port} did not answer in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pids of the servers that were masters at the start.
    pub fn master_pids(&self) -> &[u32] {
        &self.pids[..self.masters.min(self.pids.len())]
    }

    /// What `redis-cli -p port ARGS…` printed, or nothing when it failed.
    pub fn cli(port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("redis-cluster/down").arg("--dir").arg(&self.dir).output();
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A node's answer to `GET path`, whole (status line, headers, body), or empty.
pub fn get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut answer = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let _ = s.read_to_string(&mut answer);
    }
    answer
}

/// Waits until the node on `port` answers `/readyz` with 200, at most until `deadline`.
pub fn ready(port: u16, deadline: Instant) -> anyhow::Result<()> {
    while Instant::now() < deadline {
        if get(port, "/readyz").starts_with("HTTP/1.1 200") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the node on port {port} was not ready in time")
}
