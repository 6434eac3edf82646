//! The soak scenario: steady publishing with churn (clients leaving, reconnecting and joining other
//! rooms) for a long time, sampling the nodes' RSS and open files. After warm-up both must stay
//! flat: a leak of sockets, subscriptions or queue memory shows as growth. [`Plan::from_args`] is
//! the `soak` subcommand's plan.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::{net::TcpSocket, time::Instant};
use tokio_tungstenite::{client_async, tungstenite::Message};

use crate::{conn::NodeUrl, procfs, sockopt, Args};

/// What a soak run is asked to do.
pub struct Plan {
    pub nodes: Vec<(String, SocketAddr)>,
    pub source_addrs: u8,
    pub clients: usize,
    pub rooms: usize,
    pub rate: f64,
    pub churn_per_sec: f64,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub sample_every: Duration,
    pub pids: Vec<u32>,
    pub prefix: String,
}

impl Plan {
    /// The plan the command line asks for, against `nodes`.
    pub fn from_args(args: &Args, nodes: Vec<NodeUrl>) -> Plan {
        let duration = Duration::from_secs_f64(args.duration.max(1.0));
        Plan {
            nodes: nodes.into_iter().map(|n| (n.ws, n.addr)).collect(),
            source_addrs: args.source_addrs,
            clients: args.clients().max(1),
            rooms: args.rooms().max(1),
            rate: args.rate.unwrap_or(500.0).max(0.001),
            churn_per_sec: args.churn_per_sec.max(0.001),
            payload_bytes: args.payload_bytes,
            duration,
            warmup: args.warmup.map(Duration::from_secs_f64).unwrap_or(duration / 4),
            sample_every: Duration::from_secs_f64(args.sample_every.max(0.1)),
            pids: args.pids.clone(),
            prefix: args.prefix.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Sample {
    pub at_s: f64,
    pub pid: u32,
    pub rss_bytes: u64,
    pub open_files: usize,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub reconnects: u64,
    pub published: u64,
    pub delivered: u64,
    pub failed_connects: u64,
    pub samples: Vec<Sample>,
    /// Per node: (RSS at the end of warm-up, highest RSS after, open files then, highest after).
    pub verdict: Vec<Verdict>,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub pid: u32,
    pub rss_after_warmup: u64,
    pub rss_max_after: u64,
    pub files_after_warmup: usize,
    pub files_max_after: usize,
    /// RSS grew by at most a tenth and files by at most a tenth (plus 16) after warm-up.
    pub flat: bool,
}

#[derive(Default)]
struct Counters {
    reconnects: AtomicU64,
    published: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
}

fn open_files(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("process {pid}"))?
        .count())
}

/// One client slot: connect, join a room, publish at its share of the rate, read everything, and
/// after a random lifetime leave and start again elsewhere, until `end`.
async fn client(plan: Arc<Plan>, i: usize, counters: Arc<Counters>, end: Instant) {
    let lifetime_mean = plan.clients as f64 / plan.churn_per_sec.max(1e-3);
    let every = Duration::from_secs_f64(plan.clients as f64 / plan.rate.max(1e-3));
    let payload = "x".repeat(plan.payload_bytes);
    let mut round = 0usize;
    while Instant::now() < end {
        let (url, addr) = &plan.nodes[(i + round) % plan.nodes.len()];
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + ((i + round) % usize::from(plan.source_addrs)) as u8,
        ));
        let room = format!("{}-r{}", plan.prefix, (i * 7 + round * 13) % plan.rooms.max(1));
        let lifetime = Duration::from_secs_f64(lifetime_mean * (0.5 + rand_unit(i, round)));
        let until = (Instant::now() + lifetime).min(end);
        if session(
            url,
            *addr,
            source,
            &format!("{}-u{i}", plan.prefix),
            &room,
            every,
            &payload,
            until,
            &counters,
        )
        .await
        .is_err()
        {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        counters.reconnects.fetch_add(1, Ordering::Relaxed);
        round += 1;
    }
}

/// A cheap, deterministic spread in [0, 1) without a random generator per client.
fn rand_unit(i: usize, round: usize) -> f64 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (round as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[allow(clippy::too_many_arguments)]
async fn session(
    url: &str,
    addr: SocketAddr,
    source: IpAddr,
    user: &str,
    room: &str,
    every: Duration,
    payload: &str,
    until: Instant,
    counters: &Counters,
) -> anyhow::Result<()> {
    let socket = TcpSocket::new_v4()?;
    sockopt::bind_source(&socket, source)?;
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr)).await??;
    let (ws, _) = client_async(format!("{url}?user={user}"), stream).await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(serde_json::json!({"op":"join","room":room}).to_string()))
        .await?;
    let mut tick = tokio::time::interval(every);
    let frame = serde_json::json!({"op":"pub","room":room,"data":payload}).to_string();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            _ = tick.tick() => {
                tx.send(Message::text(frame.clone())).await?;
                counters.published.fetch_add(1, Ordering::Relaxed);
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(t))) if t.starts_with("{\"op\":\"msg\"") => {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("closed by the node"),
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.close()).await;
    Ok(())
}

pub async fn run(plan: Plan) -> anyhow::Result<SoakReport> {
    let plan = Arc::new(plan);
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let end = start + plan.duration;
    let mut tasks = Vec::with_capacity(plan.clients);
    for i in 0..plan.clients {
        tasks.push(tokio::spawn(client(plan.clone(), i, counters.clone(), end)));
        // Ramp at 1,000 connections a second.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut samples = Vec::new();
    while Instant::now() < end {
        let at_s = start.elapsed().as_secs_f64();
        for pid in &plan.pids {
            samples.push(Sample {
                at_s,
                pid: *pid,
                rss_bytes: procfs::sample(*pid)?.rss,
                open_files: open_files(*pid)?,
            });
        }
        tokio::time::sleep(plan.sample_every.min(end.saturating_duration_since(Instant::now()))).await;
    }
    for t in tasks {
        // Each client ends its session by `end` plus its close wait.
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    let warm = plan.warmup.as_secs_f64();
    let verdict = plan
        .pids
        .iter()
        .filter_map(|pid| {
            let after: Vec<&Sample> = samples.iter().filter(|s| s.pid == *pid && s.at_s >= warm).collect();
            let first = after.first()?;
            let rss_max_after = after.iter().map(|s| s.rss_bytes).max()?;
            let files_max_after = after.iter().map(|s| s.open_files).max()?;
            Some(Verdict {
                pid: *pid,
                rss_after_warmup: first.rss_bytes,
                rss_max_after,
                files_after_warmup: first.open_files,
                files_max_after,
                flat: rss_max_after <= first.rss_bytes + first.rss_bytes / 10
                    && files_max_after <= first.open_files + first.open_files / 10 + 16,
            })
        })
        .collect();
    Ok(SoakReport {
        duration_s: start.elapsed().as_secs_f64(),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        published: counters.published.load(Ordering::Relaxed),
        delivered: counters.delivered.load(Ordering::Relaxed),
        failed_connects: counters.failed.load(Ordering::Relaxed),
        samples,
        verdict,
    })
}

impl SoakReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "scenario                 soak\nduration                 {:.0} s\nreconnects               {}\npublished                {}\ndelivered                {}\nfailed sessions          {}\n",
            self.duration_s, self.reconnects, self.published, self.delivered, self.failed_connects
        );
        out.push_str("samples                  t (s)  pid  rss (MiB)  open files\n");
        for s in &self.samples {
            out.push_str(&format!(
                "                         {:>5.0}  {}  {:>9.1}  {}\n",
                s.at_s,
                s.pid,
                s.rss_bytes as f64 / 1048576.0,
                s.open_files
            ));
        }
        for v in &self.verdict {
            out.push_str(&format!(
                "node pid {}            rss {:.1} -> max {:.1} MiB, files {} -> max {} after warm-up: {}\n",
                v.pid,
                v.rss_after_warmup as f64 / 1048576.0,
                v.rss_max_after as f64 / 1048576.0,
                v.files_after_warmup,
                v.files_max_after,
                if v.flat { "flat" } else { "GROWING" }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_in_the_unit_interval_and_varies() {
        let xs: Vec<f64> = (0..100).map(|i| rand_unit(i, 3)).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.3..0.7).contains(&mean), "mean {mean}");
    }
}
