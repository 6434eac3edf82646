//! The churn scenario: subscribers of one room with history stay complete through reconnects.
//! Publishers publish at a steady rate; at `--churn-per-sec` a subscriber drops its socket (no
//! close frame), connects to the next node and joins with `since`, its last position on each shard,
//! as a client of the contract does. Every subscriber counts each publisher's messages by sequence
//! number, so the report says per client what share of the published messages arrived, the
//! duplicates and order violations per sender, how many resumes the node recovered, and how long a
//! resume took from the drop to the join's `ok`.
//!
//! The pure parts (a client's positions, its tallies, the summary over clients) are apart from the
//! sockets, so they are tested without a node. [`Plan::from_args`] is the `churn` subcommand's
//! plan.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{interval_at, timeout, Instant, Interval, MissedTickBehavior},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    conn::{self, NodeUrl, Phase, Ws, CLOSE_WAIT},
    procfs::{self, Readings},
    report::{counts, Latency, NodeUsage},
    stats::{Latencies, Pending, Stream, Tally},
    wire::{self, Encoding, Inbound, JoinOk, Stamp, Target},
    Args,
};

/// What a churn run is asked to do.
pub struct Plan {
    pub nodes: Vec<NodeUrl>,
    pub source_addrs: u8,
    pub clients: usize,
    pub publishers: usize,
    pub room: String,
    pub prefix: String,
    /// Messages per second, all publishers together.
    pub rate: f64,
    /// Resumes per second, all subscribers together (0: none).
    pub churn_per_sec: f64,
    pub payload_bytes: usize,
    /// Subscriber `i` and publisher `i` use `encodings[i % 2]`.
    pub encodings: [Encoding; 2],
    pub duration: Duration,
    pub drain: Duration,
    pub ramp_per_sec: f64,
    pub connect_timeout: Duration,
    pub pids: Vec<u32>,
}

impl Plan {
    /// The plan the command line asks for, against `nodes`; refused for what churn cannot run.
    pub fn from_args(args: &Args, nodes: Vec<NodeUrl>) -> anyhow::Result<Plan> {
        let rate = args.rate.unwrap_or(200.0);
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("--rate must be positive");
        }
        if args.publish_via == conn::Via::Http {
            bail!("churn publishes with pub frames: give --publish-via ws");
        }
        let positive = |v: f64, name: &str| Duration::try_from_secs_f64(v.max(0.0)).with_context(|| name.to_string());
        Ok(Plan {
            nodes,
            source_addrs: args.source_addrs,
            clients: args.clients().max(1),
            publishers: args.publishers.max(1),
            room: args.room(),
            prefix: args.prefix.clone(),
            rate,
            churn_per_sec: args.churn_per_sec,
            payload_bytes: args.payload_bytes,
            encodings: [args.encoding.of(0), args.encoding.of(1)],
            duration: positive(args.duration, "--duration")?,
            drain: positive(args.drain, "--drain")?,
            ramp_per_sec: args.ramp_per_sec,
            connect_timeout: positive(args.connect_timeout, "--connect-timeout")?,
            pids: args.pids.clone(),
        })
    }
}

/// Tries of one resume (each within the connect timeout) before the client gives up.
const RESUME_TRIES: u32 = 3;
/// The pause between two tries.
const RESUME_PAUSE: Duration = Duration::from_millis(100);
/// Clients listed in the report, the worst first.
const WORST_LISTED: usize = 10;

// ---------------------------------------------------------------------------------------------
// The pure parts.

/// Where a subscriber stands in the room: the position of the last message it got on each shard,
/// starting from the join's `ok`. A resume sends it as `since`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Positions {
    last: Vec<String>,
}

impl Positions {
    /// A message on `shard` at `pos`. False when the room has no such shard (then nothing changes).
    pub fn seen(&mut self, shard: u32, pos: &str) -> bool {
        match self.last.get_mut(shard as usize) {
            Some(last) => {
                // Reuses the string's buffer: this runs for every message.
                last.clear();
                last.push_str(pos);
                true
            }
            None => false,
        }
    }

    /// The `ok` of a join: where each shard stands now, from where the client goes on. After a
    /// recovered resume the replay must have brought every shard up to that position: returns how
    /// many shards it did not (0 otherwise).
    pub fn joined(&mut self, heads: Vec<String>, recovered: bool) -> u64 {
        let off = if !recovered {
            0
        } else if heads.len() != self.last.len() {
            heads.len() as u64
        } else {
            heads.iter().zip(&self.last).filter(|(h, l)| h != l).count() as u64
        };
        self.last = heads;
        off
    }

    /// What a resume sends as `since`; `None` before the first join.
    pub fn since(&self) -> Option<&[String]> {
        (!self.last.is_empty()).then_some(self.last.as_slice())
    }
}

/// What one subscriber saw over the run, across all its connections.
#[derive(Debug, Default, Clone)]
pub struct Client {
    /// Per publisher, by sequence number.
    pub streams: Vec<Stream>,
    pub tally: Tally,
    /// Messages of no publisher of this run.
    pub unexpected: u64,
    /// Messages without a shard and position.
    pub unpositioned: u64,
    /// Messages on a shard the join's `ok` did not list.
    pub off_shard: u64,
    /// Messages received between a resume's `join` and its `ok`.
    pub replayed: u64,
    /// Duplicates among them (the rest came live, after an `ok`).
    pub replayed_duplicates: u64,
    /// Resumes started (by churn or because the node ended the connection).
    pub resumes: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    /// Resumes answered without `recovered`.
    pub unanswered: u64,
    /// Shards a recovered resume's replay did not bring up to the `ok`'s position.
    pub ended_off: u64,
    /// Tries of a resume that failed (connect, handshake, join).
    pub failed_tries: u64,
    /// The node ended a connection (close code, `eof` or `error`): the client resumed.
    pub closed_by_node: BTreeMap<String, u64>,
    /// Why the first connection failed (the client then took no part).
    pub failure: Option<String>,
    /// A resume failed every try: the client stopped there.
    pub gave_up: bool,
}

impl Client {
    pub fn new(publishers: usize) -> Client {
        Client {
            streams: vec![Stream::default(); publishers],
            ..Client::default()
        }
    }

    /// Counts a message by its sender's sequence number; true when it is new to this client.
    pub fn message(&mut self, stamp: Stamp) -> bool {
        let Some(stream) = self.streams.get_mut(stamp.publisher as usize) else {
            self.unexpected += 1;
            return false;
        };
        let seen = stream.observe(stamp.seq);
        self.tally.count(seen);
        !matches!(seen, crate::stats::Seen::Duplicate)
    }

    /// This client's line against what each publisher had accepted (`expected[p]`).
    pub fn line(&self, client: usize, expected: &[u64]) -> Line {
        let missing: u64 = expected
            .iter()
            .enumerate()
            .map(|(p, e)| e.saturating_sub(self.streams.get(p).map_or(0, |s| s.distinct)))
            .sum();
        let expected: u64 = expected.iter().sum();
        Line {
            client,
            delivered: expected - missing,
            expected,
            duplicates: self.tally.duplicates,
            reordered: self.tally.reordered,
            resumes: self.resumes,
            not_recovered: self.not_recovered,
        }
    }
}

/// One subscriber's delivery, as listed in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub client: usize,
    /// Distinct messages received of those published.
    pub delivered: u64,
    pub expected: u64,
    pub duplicates: u64,
    /// Messages that came after a later one of the same sender.
    pub reordered: u64,
    pub resumes: u64,
    pub not_recovered: u64,
}

impl Line {
    pub fn percent(&self) -> f64 {
        if self.expected == 0 {
            100.0
        } else {
            100.0 * self.delivered as f64 / self.expected as f64
        }
    }

    fn perfect(&self) -> bool {
        self.delivered == self.expected && self.duplicates == 0 && self.reordered == 0
    }
}

/// Delivery over every subscriber that took part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub clients: usize,
    /// Clients that got every message once and in order per sender.
    pub perfect: usize,
    pub expected: u64,
    pub delivered: u64,
    pub percent: f64,
    pub lowest_percent: f64,
    pub median_percent: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub clients_with_duplicates: usize,
    pub clients_with_reorders: usize,
    /// Up to ten clients that were not perfect, the lowest share first.
    pub worst: Vec<Line>,
}

pub fn summarize(mut lines: Vec<Line>) -> Delivery {
    let expected = lines.iter().map(|l| l.expected).sum();
    let delivered = lines.iter().map(|l| l.delivered).sum();
    lines.sort_by(|a, b| {
        a.percent()
            .total_cmp(&b.percent())
            .then(b.duplicates.cmp(&a.duplicates))
            .then(b.reordered.cmp(&a.reordered))
            .then(a.client.cmp(&b.client))
    });
    let percent_at = |i: usize| lines.get(i).map_or(100.0, Line::percent);
    Delivery {
        clients: lines.len(),
        perfect: lines.iter().filter(|l| l.perfect()).count(),
        expected,
        delivered,
        percent: if expected == 0 {
            100.0
        } else {
            100.0 * delivered as f64 / expected as f64
        },
        lowest_percent: percent_at(0),
        median_percent: percent_at(lines.len() / 2),
        duplicates: lines.iter().map(|l| l.duplicates).sum(),
        reordered: lines.iter().map(|l| l.reordered).sum(),
        clients_with_duplicates: lines.iter().filter(|l| l.duplicates > 0).count(),
        clients_with_reorders: lines.iter().filter(|l| l.reordered > 0).count(),
        worst: lines
            .iter()
            .filter(|l| !l.perfect())
            .take(WORST_LISTED)
            .cloned()
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

/// State shared by every task of the run.
struct Shared {
    plan: Plan,
    /// Per publisher: messages sent (the next sequence number), answered `ok`, answered `error`.
    sent: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
    refused: Vec<AtomicU64>,
    acked_with_pos: AtomicU64,
    /// Publishers done publishing (stopped by the quiet phase, or ended): the drain counts what
    /// was sent only once every publish in flight has been counted.
    stopped: AtomicUsize,
    /// Messages new to their subscriber, over all subscribers.
    fresh: AtomicU64,
    resumes: AtomicU64,
    /// Connections ready (subscribers joined, publishers connected), subscribers among them.
    ready: AtomicUsize,
    subscribed: AtomicUsize,
    failed: AtomicUsize,
    /// Live messages' end-to-end latency (replayed ones are old by design).
    latency: Latencies,
    /// From dropping the socket to the resume's `ok`.
    recovery: Latencies,
    /// From sending a `pub` to its answer.
    answer: Latencies,
}

impl Shared {
    fn source(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % usize::from(self.plan.source_addrs)) as u8,
        ))
    }
}

/// One subscriber's connection state beside its tallies.
struct Sub {
    i: usize,
    sh: Arc<Shared>,
    node: usize,
    round: usize,
    join_id: i64,
    pos: Positions,
    c: Client,
}

impl Sub {
    fn encoding(&self) -> Encoding {
        self.sh.plan.encodings[self.i % 2]
    }

    /// A message; `replay` while a resume waits for its `ok`.
    fn on_msg(&mut self, stamp: Stamp, at: Option<wire::At<'_>>, replay: bool) {
        match at {
            Some(at) if !self.pos.seen(at.shard, at.pos) => self.c.off_shard += 1,
            Some(_) => {}
            None => self.c.unpositioned += 1,
        }
        if !replay {
            let us = wire::now_us().saturating_sub(stamp.ts_us);
            self.sh.latency.record(self.i, us);
        }
        let new = self.c.message(stamp);
        if new {
            self.sh.fresh.fetch_add(1, Ordering::Relaxed);
        }
        if replay {
            self.c.replayed += 1;
            self.c.replayed_duplicates += u64::from(!new && (stamp.publisher as usize) < self.c.streams.len());
        }
    }

    /// A frame on an established connection; `Err` with the reason when the connection ended.
    fn on_live(&mut self, msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Result<(), String> {
        let inbound = match &msg {
            Some(Ok(Message::Text(t))) => wire::scan_json(t),
            Some(Ok(Message::Binary(b))) => wire::scan_msgpack(b),
            Some(Ok(Message::Close(f))) => {
                return Err(f.as_ref().map_or("close".into(), |f| u16::from(f.code).to_string()))
            }
            Some(Ok(_)) => return Ok(()),
            Some(Err(_)) => return Err("error".into()),
            None => return Err("eof".into()),
        };
        if let Inbound::Msg(stamp, at) = inbound {
            self.on_msg(stamp, at, false);
        }
        Ok(())
    }

    /// Connects to the current node and joins, with `since` for a resume; reads the replay up to
    /// the join's `ok`.
    async fn join(&mut self, since: Option<&[String]>) -> anyhow::Result<Ws> {
        let node = &self.sh.plan.nodes[self.node];
        let source = self.sh.source(self.i + self.round);
        let user = format!("{}-c{}", self.sh.plan.prefix, self.i);
        let mut ws = conn::open(node, source, &user, self.encoding()).await?;
        self.join_id += 1;
        let id = self.join_id;
        ws.send(wire::join_frame(self.encoding(), &self.sh.plan.room, id, since))
            .await?;
        loop {
            let msg = ws.next().await;
            let (inbound, ok) = match &msg {
                Some(Ok(Message::Text(t))) => {
                    let i = wire::scan_json(t);
                    (i, matches!(i, Inbound::Ok(n) if n == id).then(|| wire::join_ok_json(t)))
                }
                Some(Ok(Message::Binary(b))) => {
                    let i = wire::scan_msgpack(b);
                    (
                        i,
                        matches!(i, Inbound::Ok(n) if n == id).then(|| wire::join_ok_msgpack(b)),
                    )
                }
                Some(Ok(Message::Close(_))) | None => anyhow::bail!("closed during join"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => anyhow::bail!("during join: {e}"),
            };
            match (inbound, ok) {
                (_, Some(ok)) => {
                    self.joined(ok.unwrap_or_default(), since.is_some())?;
                    return Ok(ws);
                }
                (Inbound::Msg(stamp, at), _) => self.on_msg(stamp, at, since.is_some()),
                (Inbound::Error(Some(n)), _) if n == id => anyhow::bail!("join refused"),
                _ => {}
            }
        }
    }

    fn joined(&mut self, ok: JoinOk, resume: bool) -> anyhow::Result<()> {
        let Some(heads) = ok.pos else {
            anyhow::bail!("join ok without positions: the room keeps no history (start the nodes with --history)");
        };
        if resume {
            match ok.recovered {
                Some(true) => self.c.recovered += 1,
                Some(false) => self.c.not_recovered += 1,
                None => self.c.unanswered += 1,
            }
        }
        self.c.ended_off += self.pos.joined(heads, resume && ok.recovered == Some(true));
        Ok(())
    }

    /// Drops nothing itself: the old socket is gone. Connects to the next node and joins with
    /// `since`, up to [`RESUME_TRIES`] times; `None` when every try failed.
    async fn resume(&mut self) -> Option<Ws> {
        let started = Instant::now();
        self.c.resumes += 1;
        self.sh.resumes.fetch_add(1, Ordering::Relaxed);
        let since = self.pos.since().map(<[String]>::to_vec);
        for _ in 0..RESUME_TRIES {
            self.node = (self.node + 1) % self.sh.plan.nodes.len();
            self.round += 1;
            match timeout(self.sh.plan.connect_timeout, self.join(since.as_deref())).await {
                Ok(Ok(ws)) => {
                    let us = started.elapsed().as_micros() as u64;
                    self.sh.recovery.record(self.i, us);
                    return Some(ws);
                }
                _ => {
                    self.c.failed_tries += 1;
                    tokio::time::sleep(RESUME_PAUSE).await;
                }
            }
        }
        self.c.gave_up = true;
        None
    }
}

/// When subscriber `i` of `clients` resumes: first `i / per_sec` into the run, then every
/// `clients / per_sec`, so the k-th resume of the run is due at k / per_sec and goes to subscriber
/// k mod N. `None` without churn.
fn churn_schedule(i: usize, clients: usize, per_sec: f64) -> Option<(Duration, Duration)> {
    if !(per_sec > 0.0 && per_sec.is_finite()) {
        return None;
    }
    let first = Duration::try_from_secs_f64(i as f64 / per_sec).ok()?;
    let every = Duration::try_from_secs_f64(clients as f64 / per_sec).ok()?;
    Some((first, every.max(Duration::from_millis(1))))
}

fn churn_timer(start: Instant, i: usize, plan: &Plan) -> Option<Interval> {
    let (first, every) = churn_schedule(i, plan.clients, plan.churn_per_sec)?;
    let mut t = interval_at(start + first, every);
    // A resume slower than the period skips a turn rather than resuming twice at once.
    t.set_missed_tick_behavior(MissedTickBehavior::Skip);
    Some(t)
}

async fn tick(t: &mut Option<Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

enum Event {
    Phase(Option<Phase>),
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Churn,
}

async fn subscriber(i: usize, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) -> Client {
    let publishers = sh.plan.publishers;
    let mut s = Sub {
        i,
        node: i % sh.plan.nodes.len(),
        sh: sh.clone(),
        round: 0,
        join_id: 0,
        pos: Positions::default(),
        c: Client::new(publishers),
    };
    let mut ws = match first(timeout(sh.plan.connect_timeout, s.join(None)).await) {
        Ok(ws) => ws,
        Err(why) => {
            s.c.failure = Some(why);
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return s.c;
        }
    };
    sh.ready.fetch_add(1, Ordering::Relaxed);
    sh.subscribed.fetch_add(1, Ordering::Relaxed);
    let mut timer = match *phase.borrow_and_update() {
        Phase::Run(start) => churn_timer(start, i, &sh.plan),
        _ => None,
    };
    loop {
        let event = tokio::select! {
            biased;
            changed = phase.changed() => Event::Phase(changed.ok().map(|_| *phase.borrow_and_update())),
            msg = ws.next() => Event::Frame(msg),
            _ = tick(&mut timer), if timer.is_some() => Event::Churn,
        };
        match event {
            Event::Phase(Some(Phase::Run(start))) => timer = churn_timer(start, i, &sh.plan),
            Event::Phase(Some(Phase::Quiet)) => timer = None,
            Event::Phase(Some(Phase::Ramp)) => {}
            Event::Phase(Some(Phase::Finish) | None) => break,
            Event::Frame(msg) => {
                if let Err(why) = s.on_live(msg) {
                    *s.c.closed_by_node.entry(why).or_insert(0) += 1;
                    // The old socket is gone; a client of the contract resumes.
                    drop(ws);
                    match s.resume().await {
                        Some(next) => ws = next,
                        None => return s.c,
                    }
                }
            }
            Event::Churn => {
                // Drop the socket without a close frame, as a client losing its network does.
                drop(ws);
                match s.resume().await {
                    Some(next) => ws = next,
                    None => return s.c,
                }
            }
        }
    }
    // Close first and let the node end the TCP connection (TIME_WAIT on its side).
    conn::close(ws).await;
    s.c
}

/// A task's first connection, or why it failed: the error's class, or `timeout`.
fn first(tried: Result<anyhow::Result<Ws>, tokio::time::error::Elapsed>) -> Result<Ws, String> {
    match tried {
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(e)) => Err(conn::class(&e)),
        Err(_) => Err("timeout".into()),
    }
}

/// What a publisher saw.
#[derive(Debug, Default)]
struct PubOutcome {
    failure: Option<String>,
    closed: Option<String>,
    /// `error` frames without the id of a publish.
    other_errors: u64,
}

async fn publisher(j: usize, sh: Arc<Shared>, phase: watch::Receiver<Phase>) -> PubOutcome {
    let mut stopped = false;
    let out = publish(j, &sh, phase, &mut stopped).await;
    if !stopped {
        sh.stopped.fetch_add(1, Ordering::Release);
    }
    out
}

/// Publishes from the run's start until the quiet phase, reading the answers until the end;
/// `stopped` once it publishes no more.
async fn publish(j: usize, sh: &Shared, mut phase: watch::Receiver<Phase>, stopped: &mut bool) -> PubOutcome {
    let mut out = PubOutcome::default();
    let plan = &sh.plan;
    let encoding = plan.encodings[j % 2];
    let node = &plan.nodes[j % plan.nodes.len()];
    let user = format!("{}-p{j}", plan.prefix);
    let mut ws = match first(timeout(plan.connect_timeout, conn::open(node, sh.source(j), &user, encoding)).await) {
        Ok(ws) => ws,
        Err(why) => {
            out.failure = Some(why);
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return out;
        }
    };
    sh.ready.fetch_add(1, Ordering::Relaxed);
    let every = Duration::from_secs_f64(plan.publishers as f64 / plan.rate);
    let ticker = |start: Instant| {
        let offset = every.mul_f64(j as f64 / plan.publishers as f64);
        let mut t = interval_at(start + offset, every);
        // A late tick is caught up at once, so a busy generator still holds the planned rate.
        t.set_missed_tick_behavior(MissedTickBehavior::Burst);
        t
    };
    let mut timer = match *phase.borrow_and_update() {
        Phase::Run(start) => Some(ticker(start)),
        _ => None,
    };
    let target = Target::Room(plan.room.clone());
    let mut waiting = Pending::default();
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => match changed.ok().map(|_| *phase.borrow_and_update()) {
                Some(Phase::Run(start)) => timer = Some(ticker(start)),
                Some(Phase::Quiet) => {
                    // Any publish in flight was sent and counted before this branch ran.
                    timer = None;
                    *stopped = true;
                    sh.stopped.fetch_add(1, Ordering::Release);
                }
                Some(Phase::Ramp) => {}
                Some(Phase::Finish) | None => break,
            },
            msg = ws.next() => {
                let (inbound, raw): (Inbound<'_>, &[u8]) = match &msg {
                    Some(Ok(Message::Text(t))) => (wire::scan_json(t), t.as_bytes()),
                    Some(Ok(Message::Binary(b))) => (wire::scan_msgpack(b), b),
                    Some(Ok(Message::Close(f))) => {
                        out.closed = Some(f.as_ref().map_or("close".into(), |f| u16::from(f.code).to_string()));
                        return out;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        out.closed = Some("eof".into());
                        return out;
                    }
                };
                sh.answered(j, &inbound, raw, &mut waiting, &mut out);
            }
            _ = tick(&mut timer), if timer.is_some() => {
                let seq = sh.sent[j].load(Ordering::Relaxed);
                let stamp = Stamp { publisher: j as u32, seq, ts_us: wire::now_us() };
                // Ids start at 1: the node answers `ok` (with the position) or `error`.
                let frame = wire::publish_frame(encoding, &target, stamp, plan.payload_bytes, Some(seq as i64 + 1));
                waiting.sent(seq as i64 + 1, Instant::now());
                if ws.send(frame).await.is_err() {
                    out.closed = Some("error".into());
                    return out;
                }
                sh.sent[j].store(seq + 1, Ordering::Relaxed);
            }
        }
    }
    conn::close(ws).await;
    out
}

impl Shared {
    /// Counts what publisher `j` read (`raw`, scanned as `inbound`): an answer to one of its
    /// publishes (`ok`, with or without the position, or `error`) and how long it took, or an
    /// `error` without a publish's id.
    fn answered(&self, j: usize, inbound: &Inbound<'_>, raw: &[u8], waiting: &mut Pending, out: &mut PubOutcome) {
        if let Inbound::Ok(id) | Inbound::Error(Some(id)) = *inbound {
            if let Some(took) = waiting.answered(id, Instant::now()) {
                self.answer.record(j, took.as_micros() as u64);
            }
        }
        match inbound {
            Inbound::Ok(_) => {
                self.acked[j].fetch_add(1, Ordering::Relaxed);
                if memchr::memmem::find(raw, b"pos").is_some() {
                    self.acked_with_pos.fetch_add(1, Ordering::Relaxed);
                }
            }
            Inbound::Error(Some(_)) => {
                self.refused[j].fetch_add(1, Ordering::Relaxed);
            }
            Inbound::Error(None) => out.other_errors += 1,
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Serialize)]
pub struct ChurnReport {
    pub scenario: &'static str,
    pub urls: Vec<String>,
    pub room: String,
    pub encodings: [Encoding; 2],
    pub payload_bytes: usize,
    pub duration_s: f64,
    /// Publishing window plus the drain, seconds.
    pub measured_s: f64,
    pub subscribers: Subscribers,
    pub publish: Publish,
    pub churn: Churn,
    pub delivery: Delivery,
    /// Messages without a position, on an unknown shard, or of no publisher of this run.
    pub unpositioned: u64,
    pub off_shard: u64,
    pub unexpected: u64,
    /// Live messages' end-to-end latency.
    pub latency_ms: Latency,
    pub nodes: Vec<NodeUsage>,
    pub loadtest_cpu_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Subscribers {
    pub planned: usize,
    pub connected: usize,
    pub failed: BTreeMap<String, u64>,
    pub ramp_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Publish {
    pub publishers: usize,
    pub connected: usize,
    pub target_rate: f64,
    pub sent: u64,
    pub rate: f64,
    pub acked: u64,
    /// `ok` answers carrying the message's position.
    pub acked_with_pos: u64,
    /// Publishes answered `error` (not counted as published).
    pub refused: u64,
    /// Publishes neither acknowledged nor refused by the end.
    pub unanswered: u64,
    pub other_errors: u64,
    /// Publishers whose connection the node ended.
    pub closed: BTreeMap<String, u64>,
    /// From sending a `pub` to its answer: the node handles one socket's commands one after
    /// another, so a publisher falls behind once this passes the time between its publishes.
    pub answer_ms: Latency,
}

#[derive(Debug, Serialize)]
pub struct Churn {
    pub target_per_sec: f64,
    pub resumes: u64,
    pub rate: f64,
    pub recovered: u64,
    pub not_recovered: u64,
    /// Resumes whose `ok` had no `recovered`.
    pub unanswered: u64,
    /// Shards a recovered resume's replay did not bring up to the `ok`'s position.
    pub ended_off: u64,
    pub replayed: u64,
    /// Duplicates that came in a replay (the others came live, after an `ok`).
    pub replayed_duplicates: u64,
    pub failed_tries: u64,
    pub gave_up: usize,
    /// Connections the node ended (the client resumed), by close code.
    pub closed_by_node: BTreeMap<String, u64>,
    /// From dropping the socket to the resume's `ok`.
    pub recovery_ms: Latency,
}

fn latency(l: &Latencies) -> Latency {
    Latency::of(&l.merged())
}

impl ChurnReport {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "{k:<24} {v}");
        };
        let (sub, p, c, d) = (&self.subscribers, &self.publish, &self.churn, &self.delivery);
        row(
            "scenario",
            format!(
                "churn in room {} ({:?}/{:?} encodings, {} B payload)",
                self.room, self.encodings[0], self.encodings[1], self.payload_bytes
            ),
        );
        row("nodes", self.urls.join(" "));
        row(
            "subscribers",
            format!(
                "{} of {} in {:.1} s; failed {}",
                sub.connected,
                sub.planned,
                sub.ramp_s,
                counts(&sub.failed)
            ),
        );
        row(
            "published",
            format!(
                "{} by {} of {} publishers in {:.1} s = {:.0}/s (target {:.0}/s)",
                p.sent, p.connected, p.publishers, self.duration_s, p.rate, p.target_rate
            ),
        );
        row(
            "publish answers",
            format!(
                "ok {} (with pos {}), refused {}, unanswered {}, other errors {}, closed {}",
                p.acked,
                p.acked_with_pos,
                p.refused,
                p.unanswered,
                p.other_errors,
                counts(&p.closed)
            ),
        );
        let a = &p.answer_ms;
        row("publish answer ms", a.brief());
        row(
            "resumes",
            format!(
                "{} = {:.1}/s (target {:.1}/s); recovered true {}, false {}, unanswered {}",
                c.resumes, c.rate, c.target_per_sec, c.recovered, c.not_recovered, c.unanswered
            ),
        );
        row(
            "",
            format!(
                "replayed {} messages; shards off the ok's pos {}; failed tries {}, gave up {}; closed by node {}",
                c.replayed,
                c.ended_off,
                c.failed_tries,
                c.gave_up,
                counts(&c.closed_by_node)
            ),
        );
        let r = &c.recovery_ms;
        row("recovery ms", r.brief());
        row(
            "delivered/published",
            format!(
                "{:.3} % ({} of {}); per client lowest {:.3} %, median {:.3} %",
                d.percent, d.delivered, d.expected, d.lowest_percent, d.median_percent
            ),
        );
        row(
            "per sender",
            format!(
                "duplicates {} ({} clients; {} in replays, the rest live), order violations {} ({} clients); \
                 perfect clients {} of {}",
                d.duplicates,
                d.clients_with_duplicates,
                c.replayed_duplicates,
                d.reordered,
                d.clients_with_reorders,
                d.perfect,
                d.clients
            ),
        );
        row(
            "positions",
            format!(
                "messages without one {}, on an unknown shard {}; of no publisher {}",
                self.unpositioned, self.off_shard, self.unexpected
            ),
        );
        let l = &self.latency_ms;
        row("live latency ms", l.full());
        for n in &self.nodes {
            let (label, figures) = n.row();
            row(&label, figures);
        }
        row("loadtest cpu", format!("{:.2} s", self.loadtest_cpu_s));
        for w in &d.worst {
            row(
                &format!("client {}", w.client),
                format!(
                    "{} of {} ({:.3} %), duplicates {}, reordered {}, resumes {} (not recovered {})",
                    w.delivered,
                    w.expected,
                    w.percent(),
                    w.duplicates,
                    w.reordered,
                    w.resumes,
                    w.not_recovered
                ),
            );
        }
        s
    }
}

/// Runs the plan: ramp, publish and churn for the duration, drain, finish, report.
pub async fn run(plan: Plan) -> anyhow::Result<ChurnReport> {
    let sh = Arc::new(Shared::new(plan));
    let before = procfs::samples(&sh.plan.pids)?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Ramp);
    let ramped = ramp(&sh, &phase_rx).await;
    let window = churn(&sh, &phase_tx).await?;
    let drained = drain(&sh, &window).await?;
    let ramp_s = ramped.ramp_s;
    let (clients, publishers) = finish(&sh, &phase_tx, ramped).await;
    let clock = Clock {
        ramp_s,
        duration_s: window.duration_s,
        measured_s: drained.measured_s,
    };
    let usage = Usage {
        before: &before,
        start: &window.start,
        end: &drained.end,
    };
    Ok(report(&sh, &clock, &usage, &clients, &publishers))
}

impl Shared {
    fn new(plan: Plan) -> Shared {
        let counters = || (0..plan.publishers).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Shared {
            sent: counters(),
            acked: counters(),
            refused: counters(),
            acked_with_pos: AtomicU64::new(0),
            stopped: AtomicUsize::new(0),
            fresh: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            subscribed: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            latency: Latencies::new(16),
            recovery: Latencies::new(16),
            answer: Latencies::new(16),
            plan,
        }
    }
}

/// The values of per-publisher counters.
fn load(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

/// Per publisher: messages sent, answered `ok` and answered `error`, read once.
struct Answers {
    sent: Vec<u64>,
    acked: Vec<u64>,
    refused: Vec<u64>,
}

impl Answers {
    fn load(sh: &Shared) -> Answers {
        Answers {
            sent: load(&sh.sent),
            acked: load(&sh.acked),
            refused: load(&sh.refused),
        }
    }
}

/// The tasks the ramp started, and how long it took.
struct Ramped {
    subs: Vec<JoinHandle<Client>>,
    pubs: Vec<JoinHandle<PubOutcome>>,
    ramp_s: f64,
}

/// Ramp: subscribers at the set rate, then the publishers; wait until each is ready or failed.
async fn ramp(sh: &Arc<Shared>, phase_rx: &watch::Receiver<Phase>) -> Ramped {
    let plan = &sh.plan;
    let (clients, publishers) = (plan.clients, plan.publishers);
    let ramp_start = Instant::now();
    let ramp_deadline =
        ramp_start + Duration::from_secs_f64(clients as f64 / plan.ramp_per_sec.max(1.0) + 5.0) + plan.connect_timeout;
    let mut subs = Vec::with_capacity(clients);
    while subs.len() < clients {
        let due = conn::ramp_due(ramp_start.elapsed(), plan.ramp_per_sec, clients);
        while subs.len() < due {
            subs.push(tokio::spawn(subscriber(subs.len(), sh.clone(), phase_rx.clone())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pubs: Vec<_> = (0..publishers)
        .map(|j| tokio::spawn(publisher(j, sh.clone(), phase_rx.clone())))
        .collect();
    let total = clients + publishers;
    while sh.ready.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < total && Instant::now() < ramp_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ramped {
        subs,
        pubs,
        ramp_s: ramp_start.elapsed().as_secs_f64(),
    }
}

/// The publishing window: when it started, how long it lasted, the readings at its start, and
/// its progress bar, which the drain goes on with.
struct Window {
    run_start: Instant,
    duration_s: f64,
    start: Readings,
    progress: ProgressBar,
}

/// Run: publish and churn for the duration; not at all when no subscriber joined (the report
/// then says why).
async fn churn(sh: &Shared, phase_tx: &watch::Sender<Phase>) -> anyhow::Result<Window> {
    let duration = if sh.subscribed.load(Ordering::Relaxed) == 0 {
        Duration::ZERO
    } else {
        sh.plan.duration
    };
    let start = Readings::take(&sh.plan.pids, &[])?;
    let run_start = Instant::now();
    let _ = phase_tx.send(Phase::Run(run_start));
    let progress = crate::progress::bar(duration.as_secs(), "{prefix:>8} [{bar:30}] {pos}/{len} s {msg}");
    progress.set_prefix("churn");
    while run_start.elapsed() < duration {
        let left = duration.saturating_sub(run_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        progress.set_position(run_start.elapsed().as_secs());
        progress.set_message(format!(
            "delivered {}, resumes {}",
            sh.fresh.load(Ordering::Relaxed),
            sh.resumes.load(Ordering::Relaxed)
        ));
    }
    let _ = phase_tx.send(Phase::Quiet);
    Ok(Window {
        run_start,
        duration_s: run_start.elapsed().as_secs_f64(),
        start,
        progress,
    })
}

/// The readings at the end of the measured window, and its length.
struct Drained {
    end: Readings,
    measured_s: f64,
}

/// Drain: every publisher stopped, every publish answered and every accepted one delivered to
/// every subscriber that took part, for a bounded time.
async fn drain(sh: &Shared, window: &Window) -> anyhow::Result<Drained> {
    let drain_deadline = Instant::now() + sh.plan.drain;
    window.progress.set_prefix("drain");
    loop {
        // Read first: what a stopped publisher sent is then visible below.
        let all_stopped = sh.stopped.load(Ordering::Acquire) >= sh.plan.publishers;
        let Answers { sent, acked, refused } = Answers::load(sh);
        let answered = acked.iter().sum::<u64>() + refused.iter().sum::<u64>();
        let published = sent.iter().sum::<u64>() - refused.iter().sum::<u64>();
        let expected = published * sh.subscribed.load(Ordering::Relaxed) as u64;
        let done = all_stopped && answered >= sent.iter().sum::<u64>() && sh.fresh.load(Ordering::Relaxed) >= expected;
        if done || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = Readings::take(&sh.plan.pids, &[])?;
    let measured_s = window.run_start.elapsed().as_secs_f64();
    window.progress.finish_and_clear();
    Ok(Drained { end, measured_s })
}

/// Finish: close everything and gather what each task saw, subscribers then publishers.
async fn finish(sh: &Shared, phase_tx: &watch::Sender<Phase>, ramped: Ramped) -> (Vec<Client>, Vec<PubOutcome>) {
    let _ = phase_tx.send(Phase::Finish);
    // A task ends within a resume's tries or its close wait after Finish.
    let bound = (sh.plan.connect_timeout + RESUME_PAUSE) * RESUME_TRIES + CLOSE_WAIT + Duration::from_secs(1);
    let mut clients = Vec::with_capacity(ramped.subs.len());
    for h in ramped.subs {
        clients.push(
            timeout(bound, h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_else(|| Client {
                    failure: Some("task did not end".into()),
                    ..Client::default()
                }),
        );
    }
    let mut publishers = Vec::with_capacity(ramped.pubs.len());
    for h in ramped.pubs {
        publishers.push(timeout(bound, h).await.ok().and_then(Result::ok).unwrap_or_default());
    }
    (clients, publishers)
}

/// The run's phases, seconds: the ramp, publishing, and publishing plus the drain.
struct Clock {
    ramp_s: f64,
    duration_s: f64,
    measured_s: f64,
}

/// The nodes' readings before the first connection, and all readings at the start of publishing
/// and at the end of the drain.
struct Usage<'a> {
    before: &'a [procfs::Sample],
    start: &'a Readings,
    end: &'a Readings,
}

impl Usage<'_> {
    /// Each node of `pids`.
    fn nodes(&self, pids: &[u32]) -> Vec<NodeUsage> {
        let (before, start, end) = (self.before, &self.start.nodes, &self.end.nodes);
        pids.iter()
            .enumerate()
            .map(|(i, pid)| NodeUsage::of(*pid, &before[i], &start[i], &end[i]))
            .collect()
    }

    /// This process's CPU over the measured window, seconds.
    fn own_cpu_s(&self) -> f64 {
        self.end.own.cpu_ns.saturating_sub(self.start.own.cpu_ns) as f64 / 1e9
    }
}

/// The subscribers' outcomes summed: a line per subscriber that took part, the resumes, what
/// was off, and why the others failed.
struct Subscribed {
    failed: BTreeMap<String, u64>,
    lines: Vec<Line>,
    churn: Churn,
    unpositioned: u64,
    off_shard: u64,
    unexpected: u64,
}

impl Subscribed {
    /// The sum over `clients`, each against `expected` per publisher.
    fn of(sh: &Shared, clients: &[Client], expected: &[u64], duration_s: f64) -> Subscribed {
        let mut sum = Subscribed {
            failed: BTreeMap::new(),
            lines: Vec::new(),
            churn: Churn {
                target_per_sec: sh.plan.churn_per_sec,
                resumes: 0,
                rate: 0.0,
                recovered: 0,
                not_recovered: 0,
                unanswered: 0,
                ended_off: 0,
                replayed: 0,
                replayed_duplicates: 0,
                failed_tries: 0,
                gave_up: 0,
                closed_by_node: BTreeMap::new(),
                recovery_ms: latency(&sh.recovery),
            },
            unpositioned: 0,
            off_shard: 0,
            unexpected: 0,
        };
        for (i, c) in clients.iter().enumerate() {
            sum.add(i, c, expected);
        }
        sum.churn.rate = sum.churn.resumes as f64 / duration_s;
        sum
    }

    fn add(&mut self, i: usize, c: &Client, expected: &[u64]) {
        if let Some(f) = &c.failure {
            *self.failed.entry(f.clone()).or_insert(0) += 1;
            return;
        }
        self.lines.push(c.line(i, expected));
        let churn = &mut self.churn;
        churn.resumes += c.resumes;
        churn.recovered += c.recovered;
        churn.not_recovered += c.not_recovered;
        churn.unanswered += c.unanswered;
        churn.ended_off += c.ended_off;
        churn.replayed += c.replayed;
        churn.replayed_duplicates += c.replayed_duplicates;
        churn.failed_tries += c.failed_tries;
        churn.gave_up += usize::from(c.gave_up);
        for (why, n) in &c.closed_by_node {
            *churn.closed_by_node.entry(why.clone()).or_insert(0) += n;
        }
        self.unpositioned += c.unpositioned;
        self.off_shard += c.off_shard;
        self.unexpected += c.unexpected;
    }
}

fn report(sh: &Shared, clock: &Clock, usage: &Usage<'_>, clients: &[Client], publishers: &[PubOutcome]) -> ChurnReport {
    let plan = &sh.plan;
    let answers = Answers::load(sh);
    let expected: Vec<u64> = answers.sent.iter().zip(&answers.refused).map(|(s, r)| s - r).collect();
    let mut subs = Subscribed::of(sh, clients, &expected, clock.duration_s);
    let publish = publishing(sh, clock, &answers, publishers, &mut subs.failed);
    ChurnReport {
        scenario: "churn",
        urls: plan.nodes.iter().map(|n| n.ws.clone()).collect(),
        room: plan.room.clone(),
        encodings: plan.encodings,
        payload_bytes: plan.payload_bytes,
        duration_s: clock.duration_s,
        measured_s: clock.measured_s,
        subscribers: Subscribers {
            planned: plan.clients,
            connected: subs.lines.len(),
            failed: subs.failed,
            ramp_s: clock.ramp_s,
        },
        publish,
        churn: subs.churn,
        delivery: summarize(subs.lines),
        unpositioned: subs.unpositioned,
        off_shard: subs.off_shard,
        unexpected: subs.unexpected,
        latency_ms: latency(&sh.latency),
        nodes: usage.nodes(&plan.pids),
        loadtest_cpu_s: usage.own_cpu_s(),
    }
}

/// The publishers' figures from their `outcomes` and `answers`; the publishers that failed are
/// added to `failed` (`publisher: …`).
fn publishing(
    sh: &Shared,
    clock: &Clock,
    answers: &Answers,
    outcomes: &[PubOutcome],
    failed: &mut BTreeMap<String, u64>,
) -> Publish {
    let (sent, acked, refused) = (&answers.sent, &answers.acked, &answers.refused);
    let mut closed = BTreeMap::new();
    let mut connected = 0;
    let mut other_errors = 0;
    for o in outcomes {
        match &o.failure {
            Some(f) => *failed.entry(format!("publisher: {f}")).or_insert(0) += 1,
            None => connected += 1,
        }
        if let Some(why) = &o.closed {
            *closed.entry(why.clone()).or_insert(0) += 1;
        }
        other_errors += o.other_errors;
    }
    let sent_total: u64 = sent.iter().sum();
    let answered: u64 = acked.iter().sum::<u64>() + refused.iter().sum::<u64>();
    Publish {
        publishers: sh.plan.publishers,
        connected,
        target_rate: sh.plan.rate,
        sent: sent_total,
        rate: sent_total as f64 / clock.duration_s,
        acked: acked.iter().sum(),
        acked_with_pos: sh.acked_with_pos.load(Ordering::Relaxed),
        refused: refused.iter().sum(),
        unanswered: sent_total.saturating_sub(answered),
        other_errors,
        closed,
        answer_ms: latency(&sh.answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::of(line)
    }

    #[test]
    fn churn_plan_takes_the_defaults_and_refuses_what_it_cannot_run() {
        let p = Plan::from_args(
            &args("lt churn --room room --churn-per-sec 40 --encoding mixed"),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            (p.clients, p.publishers, p.rate, p.churn_per_sec),
            (1000, 4, 200.0, 40.0)
        );
        assert_eq!(p.room, "room");
        assert_eq!(p.encodings, [Encoding::Json, Encoding::Msgpack]);
        assert_eq!((p.duration, p.drain), (Duration::from_secs(20), Duration::from_secs(5)));
        assert!(Plan::from_args(&args("lt churn --publish-via http"), Vec::new()).is_err());
        assert!(Plan::from_args(&args("lt churn --rate 0"), Vec::new()).is_err());
        assert!(Plan::from_args(&args("lt churn --duration inf"), Vec::new()).is_err());
        assert!(
            crate::traffic::plan(&args("lt churn"), 2).is_err(),
            "churn has its own runner"
        );
    }

    fn stamp(publisher: u32, seq: u64) -> Stamp {
        Stamp {
            publisher,
            seq,
            ts_us: 0,
        }
    }

    fn heads(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn positions_start_from_the_join_and_follow_each_shard() {
        let mut p = Positions::default();
        assert_eq!(p.since(), None, "nothing to resume from before the first join");
        assert!(!p.seen(0, "5:1"), "no shard before the join");
        assert_eq!(p.joined(heads(&["5:0", "5:7", "6:2"]), false), 0);
        assert!(p.seen(1, "5:8"));
        assert!(p.seen(1, "5:9"));
        assert!(p.seen(2, "6:3"));
        assert!(!p.seen(3, "6:3"), "the room has three shards");
        assert_eq!(p.since(), Some(&heads(&["5:0", "5:9", "6:3"])[..]));
    }

    #[test]
    fn a_recovered_resume_must_end_at_the_oks_positions() {
        let mut p = Positions::default();
        p.joined(heads(&["5:0", "5:7"]), false);
        p.seen(1, "5:8");
        // The replay brought shard 1 to 5:9; the ok says so: nothing off.
        p.seen(1, "5:9");
        assert_eq!(p.joined(heads(&["5:0", "5:9"]), true), 0);
        // The ok says shard 0 moved to 5:2 but nothing was replayed there.
        assert_eq!(p.joined(heads(&["5:2", "5:9"]), true), 1);
        assert_eq!(
            p.since(),
            Some(&heads(&["5:2", "5:9"])[..]),
            "the ok's positions are taken"
        );
        // Not recovered: the client starts again from the ok, nothing is off.
        assert_eq!(p.joined(heads(&["7:0", "7:0"]), false), 0);
        // Another shard count after a recovered resume: every shard is off.
        assert_eq!(p.joined(heads(&["7:0", "7:0", "7:0"]), true), 3);
    }

    #[test]
    fn a_clients_tally_counts_per_sender_duplicates_order_and_loss() {
        let mut c = Client::new(2);
        for (p, q) in [(0, 0), (1, 0), (0, 1), (0, 1), (1, 2), (1, 1), (0, 3), (7, 0)] {
            c.message(stamp(p, q));
        }
        assert_eq!(c.unexpected, 1);
        assert_eq!((c.tally.duplicates, c.tally.reordered), (1, 1));
        c.resumes = 2;
        c.not_recovered = 1;
        // Publisher 0 sent 5 (one refused: 4 expected), publisher 1 sent 3.
        let line = c.line(4, &[4, 3]);
        assert_eq!(
            line,
            Line {
                client: 4,
                delivered: 3 + 3,
                expected: 7,
                duplicates: 1,
                reordered: 1,
                resumes: 2,
                not_recovered: 1,
            }
        );
        assert!((line.percent() - 600.0 / 7.0).abs() < 1e-9);
        assert!(!c.message(stamp(1, 2)), "a repeat is not new");
        assert!(c.message(stamp(1, 3)));
    }

    fn line(client: usize, delivered: u64, duplicates: u64, reordered: u64) -> Line {
        Line {
            client,
            delivered,
            expected: 100,
            duplicates,
            reordered,
            resumes: 1,
            not_recovered: 0,
        }
    }

    #[test]
    fn the_summary_has_the_share_the_median_and_the_worst_first() {
        let d = summarize(vec![
            line(0, 100, 0, 0),
            line(1, 97, 0, 0),
            line(2, 100, 2, 0),
            line(3, 100, 0, 0),
            line(4, 99, 0, 3),
            line(5, 97, 4, 0),
        ]);
        assert_eq!((d.clients, d.perfect), (6, 2));
        assert_eq!((d.delivered, d.expected), (593, 600));
        assert!((d.percent - 593.0 / 6.0).abs() < 1e-9);
        assert_eq!((d.lowest_percent, d.median_percent), (97.0, 100.0));
        assert_eq!((d.duplicates, d.reordered), (6, 3));
        assert_eq!((d.clients_with_duplicates, d.clients_with_reorders), (2, 1));
        let worst: Vec<usize> = d.worst.iter().map(|l| l.client).collect();
        assert_eq!(worst, vec![5, 1, 4, 2], "lowest share first, then the most duplicates");
        let empty = summarize(Vec::new());
        assert_eq!(
            (empty.percent, empty.lowest_percent, empty.worst.len()),
            (100.0, 100.0, 0)
        );
        let many = summarize((0..30).map(|i| line(i, 50, 0, 0)).collect());
        assert_eq!(many.worst.len(), WORST_LISTED);
    }

    #[test]
    fn churn_is_spread_over_the_clients_in_turn() {
        let ms = Duration::from_millis;
        // 100 clients, 50 resumes a second: client 10 has the 10th resume (0.2 s), then one every 2 s.
        assert_eq!(churn_schedule(10, 100, 50.0), Some((ms(200), ms(2000))));
        assert_eq!(churn_schedule(0, 100, 50.0), Some((ms(0), ms(2000))));
        assert_eq!(
            churn_schedule(0, 1, 1e6),
            Some((ms(0), ms(1))),
            "at least a millisecond apart"
        );
        for none in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(churn_schedule(1, 100, none), None, "{none}");
        }
    }
}
