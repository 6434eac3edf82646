//! What the machine's kernel alone charges a sender for small frames over loopback TCP: one thread
//! writes `frames per write` frames with one `writev` to each of many sockets, once a window, while
//! this process's runtime reads them on the other end. No WebSocket, no node: the CPU the writing
//! thread spends per write and per frame is the floor under a node's CPU per delivered frame at the
//! same number of frames per write (on loopback the kernel runs the receiving socket's work in the
//! sender's context too, so it is in the floor as it is in the node's figure). [`Plan::from_args`]
//! is the `floor` subcommand's plan.

use std::{
    io::{self, IoSlice, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::Args;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sockets: usize,
    pub frame_bytes: usize,
    pub frames_per_write: Vec<usize>,
    /// Time between two rounds of writes (one write to every socket).
    pub window: Duration,
    /// How long each number of frames per write is measured.
    pub duration: Duration,
}

impl Plan {
    /// The plan the command line asks for.
    pub fn from_args(args: &Args) -> anyhow::Result<Plan> {
        // A zero window is refused by the floor itself; these refuse what is not a duration at all.
        let window = Duration::try_from_secs_f64(args.window_ms / 1e3).context("--window-ms")?;
        let duration = Duration::try_from_secs_f64(args.duration.max(0.1)).context("--duration")?;
        Ok(Plan {
            sockets: args.clients(),
            frame_bytes: args.payload_bytes,
            frames_per_write: args.frames_per_write.clone(),
            window,
            duration,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub sockets: usize,
    pub frame_bytes: usize,
    pub window_ms: f64,
    pub steps: Vec<Step>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub frames_per_write: usize,
    pub seconds: f64,
    pub writes: u64,
    /// Writes the kernel refused because the socket was full (the reader fell behind).
    pub blocked: u64,
    pub frames: u64,
    /// CPU of the writing thread over the step.
    pub cpu_s: f64,
    pub us_per_write: f64,
    pub us_per_frame: f64,
}

/// Frames handed to one `writev` at most (the kernel's limit is 1024).
const MAX_FRAMES: usize = 1024;

/// CPU time of the calling thread, nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write into; the clock id is a constant Linux knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Opens the socket pairs, reads every receiving end on this runtime and measures each step.
pub async fn run(plan: Plan) -> anyhow::Result<FloorReport> {
    anyhow::ensure!(plan.sockets > 0, "--clients must be positive");
    anyhow::ensure!(plan.frame_bytes > 0, "--payload-bytes must be positive");
    anyhow::ensure!(
        plan.frames_per_write.iter().all(|k| (1..=MAX_FRAMES).contains(k)),
        "--frames-per-write takes numbers from 1 to {MAX_FRAMES}"
    );
    anyhow::ensure!(!plan.window.is_zero(), "--window-ms must be positive");
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).context("bind")?;
    let addr = listener.local_addr()?;
    let mut senders = Vec::with_capacity(plan.sockets);
    let mut readers = Vec::with_capacity(plan.sockets);
    for _ in 0..plan.sockets {
        let client = tokio::net::TcpStream::connect(addr).await.context("connect")?;
        let (server, _) = listener.accept().context("accept")?;
        // As a node's sockets are: no Nagle, never blocking the writer.
        server.set_nodelay(true)?;
        server.set_nonblocking(true)?;
        senders.push(server);
        readers.push(tokio::spawn(drain(client)));
    }
    let writing = plan.clone();
    let steps = tokio::task::spawn_blocking(move || write_steps(&writing, &mut senders))
        .await
        .context("the writing thread")??;
    // The senders are closed: every reader sees the end of its stream.
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    Ok(FloorReport {
        sockets: plan.sockets,
        frame_bytes: plan.frame_bytes,
        window_ms: plan.window.as_secs_f64() * 1e3,
        steps,
    })
}

/// Reads and discards until the sender closes.
async fn drain(mut socket: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Runs every step on the calling thread; the sockets are closed when it returns.
fn write_steps(plan: &Plan, senders: &mut [TcpStream]) -> anyhow::Result<Vec<Step>> {
    let frame = vec![b'x'; plan.frame_bytes];
    let mut steps = Vec::new();
    for &k in &plan.frames_per_write {
        let slices = vec![IoSlice::new(&frame); k];
        let (mut writes, mut blocked, mut bytes) = (0u64, 0u64, 0u64);
        let cpu0 = thread_cpu_ns();
        let start = Instant::now();
        let mut round = start;
        while start.elapsed() < plan.duration {
            for s in senders.iter_mut() {
                match s.write_vectored(&slices) {
                    Ok(n) => {
                        writes += 1;
                        bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked += 1,
                    Err(e) => return Err(e).context("writev"),
                }
            }
            round += plan.window;
            if let Some(wait) = round.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let cpu_s = (thread_cpu_ns() - cpu0) as f64 / 1e9;
        let frames = bytes / plan.frame_bytes as u64;
        steps.push(Step {
            frames_per_write: k,
            seconds: start.elapsed().as_secs_f64(),
            writes,
            blocked,
            frames,
            cpu_s,
            us_per_write: cpu_s * 1e6 / writes.max(1) as f64,
            us_per_frame: cpu_s * 1e6 / frames.max(1) as f64,
        });
    }
    Ok(steps)
}

impl FloorReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "scenario                 floor ({} loopback sockets, {}-byte frames, a write to each every {:.1} ms)\n",
            self.sockets, self.frame_bytes, self.window_ms
        );
        out.push_str("frames/write   writes/s   frames/s  cpu (cores)  us/write  us/frame  blocked\n");
        for s in &self.steps {
            out.push_str(&format!(
                "{:>12} {:>10.0} {:>10.0} {:>12.2} {:>9.2} {:>9.3} {:>8}\n",
                s.frames_per_write,
                s.writes as f64 / s.seconds,
                s.frames as f64 / s.seconds,
                s.cpu_s / s.seconds,
                s.us_per_write,
                s.us_per_frame,
                s.blocked
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::of(line)
    }

    #[test]
    fn floor_plan_takes_the_defaults_and_refuses_what_is_no_duration() {
        let p = Plan::from_args(&args("lt floor --duration 2")).unwrap();
        assert_eq!((p.sockets, p.frame_bytes), (1000, 128));
        assert_eq!(p.frames_per_write, vec![1, 2, 4, 8, 16]);
        assert_eq!(
            (p.window, p.duration),
            (Duration::from_millis(20), Duration::from_secs(2))
        );
        assert!(Plan::from_args(&args("lt floor --window-ms=-1")).is_err());
        assert!(Plan::from_args(&args("lt floor --window-ms NaN")).is_err());
        assert!(Plan::from_args(&args("lt floor --duration inf")).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_step_writes_every_socket_each_window_with_its_frames() {
        let plan = Plan {
            sockets: 20,
            frame_bytes: 100,
            frames_per_write: vec![1, 4],
            window: Duration::from_millis(10),
            duration: Duration::from_millis(300),
        };
        let report = run(plan).await.unwrap();
        assert_eq!(report.steps.len(), 2);
        for s in &report.steps {
            assert_eq!(s.blocked, 0, "a reader on the same machine keeps up with 20 sockets");
            assert!(s.writes >= 20, "at least one round: {s:?}");
            assert_eq!(s.writes % 20, 0, "whole rounds only: {s:?}");
            assert_eq!(s.frames, s.writes * s.frames_per_write as u64, "{s:?}");
            // At most a round per window, plus the first one.
            assert!(s.writes <= 20 * (s.seconds * 100.0 + 2.0) as u64, "{s:?}");
            assert!(s.cpu_s > 0.0 && s.us_per_write > 0.0);
        }
        assert!(report.table().contains("frames/write"));
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_measure() {
        let plan = |k: usize, window_ms: u64| Plan {
            sockets: 1,
            frame_bytes: 10,
            frames_per_write: vec![k],
            window: Duration::from_millis(window_ms),
            duration: Duration::from_millis(10),
        };
        assert!(run(plan(0, 10)).await.is_err());
        assert!(run(plan(MAX_FRAMES + 1, 10)).await.is_err());
        assert!(run(plan(1, 0)).await.is_err());
    }
}
