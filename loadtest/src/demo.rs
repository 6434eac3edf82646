//! The demo scenario: a match for the demo page (`GET /demo` on nodes run with `--demo true`). A
//! scorer and `--publishers` fans publish into one room at `--rate` messages per second in all, for
//! `--duration`: every tenth message is the score, `{"type":"score","home","away","score":[h,a],
//! "minute"}`, published with the key `score` (so a page joining with `latest` mid-match gets the
//! current score at once), the others chat lines, `{"type":"chat","text"}`, as the page shows them.
//! Every publish carries an id; the report counts the `ok`s and the errors.
//!
//! What the k-th message is ([`message`]) and its `pub` frame ([`pub_frame`]) are pure and tested
//! without a node; [`Plan::from_args`] is the `demo` subcommand's plan.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::time::{interval, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    conn::{self, NodeUrl, CLOSE_WAIT},
    wire::{self, Encoding, Inbound},
    Args,
};

/// What a demo run is asked to do.
pub struct Plan {
    pub nodes: Vec<NodeUrl>,
    pub source: IpAddr,
    pub room: String,
    pub prefix: String,
    /// Chatting fans, beside the scorer.
    pub publishers: usize,
    /// Messages per second, all voices together.
    pub rate: f64,
    pub duration: Duration,
    /// At most this long after the last publish to wait for the answers.
    pub drain: Duration,
}

impl Plan {
    /// The plan the command line asks for, against `nodes`.
    pub fn from_args(args: &Args, nodes: Vec<NodeUrl>) -> anyhow::Result<Plan> {
        let positive = |v: f64, name: &str| Duration::try_from_secs_f64(v.max(0.0)).with_context(|| name.to_string());
        Ok(Plan {
            nodes,
            source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            room: args.room(),
            prefix: args.prefix.clone(),
            publishers: args.publishers.max(1),
            rate: args.rate.unwrap_or(20.0),
            duration: positive(args.duration, "--duration")?,
            drain: positive(args.drain, "--drain")?,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub room: String,
    pub duration_s: f64,
    pub published: u64,
    pub scores: u64,
    pub acknowledged: u64,
    pub refused: u64,
}

impl DemoReport {
    pub fn table(&self) -> String {
        format!(
            "scenario                 demo\nroom                     {}\nduration                 {:.1} s\npublished                {} ({} scores)\nacknowledged             {}\nrefused                  {}\n",
            self.room, self.duration_s, self.published, self.scores, self.acknowledged, self.refused
        )
    }
}

const HOME: &str = "Lions";
const AWAY: &str = "Tigers";
/// A demo is for watching: more than this is the stadium scenario's job.
const MAX_RATE: f64 = 10_000.0;
/// Every this many messages one is the score.
const SCORE_EVERY: u64 = 10;
/// The key the score is published with: each score replaces the one before.
const SCORE_KEY: &str = "score";
const CHANTS: [&str; 6] = [
    "what a save!",
    "offside, surely",
    "come on!",
    "that was a foul",
    "best match this season",
    "ref, are you watching?",
];

/// The `k`-th message of a match `progress` (0 to 1) through: who sends it (0 is the scorer, `1..`
/// the fans), its key (the score's; chat lines have none, each is news) and its data.
pub fn message(k: u64, fans: usize, progress: f64) -> (usize, Option<&'static str>, serde_json::Value) {
    if k.is_multiple_of(SCORE_EVERY) {
        // A goal every seventh score update, the home side every other one.
        let goals = k / SCORE_EVERY / 7;
        let (home, away) = (goals.div_ceil(2), goals / 2);
        let minute = (progress.clamp(0.0, 1.0) * 90.0).round() as u64;
        let data = json!({"type": "score", "home": HOME, "away": AWAY, "score": [home, away], "minute": minute});
        (0, Some(SCORE_KEY), data)
    } else {
        let fan = 1 + (k as usize % fans.max(1));
        let text = format!("{} #{k}", CHANTS[k as usize % CHANTS.len()]);
        (fan, None, json!({"type": "chat", "text": text}))
    }
}

/// The `pub` frame of a message to `room` with the command id `id`, with `key` when it has one.
pub fn pub_frame(room: &str, id: u64, key: Option<&str>, data: serde_json::Value) -> serde_json::Value {
    let mut frame = json!({"op": "pub", "room": room, "data": data, "id": id});
    if let Some(key) = key {
        frame["key"] = key.into();
    }
    frame
}

/// A voice's sending half.
type Sink = futures_util::stream::SplitSink<conn::Ws, Message>;

/// Connects the scorer and the fans, spread over the nodes: each voice's sending half, and a
/// reader per voice counting the answers, `ok` into `acknowledged` and `error` into `refused`.
async fn connect(
    plan: &Plan,
    acknowledged: &Arc<AtomicU64>,
    refused: &Arc<AtomicU64>,
) -> anyhow::Result<(Vec<Sink>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    for v in 0..=plan.publishers.max(1) {
        let user = if v == 0 {
            format!("{}-scorer", plan.prefix)
        } else {
            format!("{}-fan{v}", plan.prefix)
        };
        let node = &plan.nodes[v % plan.nodes.len()];
        let ws = timeout(
            Duration::from_secs(10),
            conn::open(node, plan.source, &user, Encoding::Json),
        )
        .await
        .context("connecting in time")?
        .with_context(|| format!("connecting {user} to {}", node.ws))?;
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let (ok, err) = (acknowledged.clone(), refused.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                if let Message::Text(text) = frame {
                    match wire::scan_json(&text) {
                        Inbound::Ok(_) => drop(ok.fetch_add(1, Ordering::Relaxed)),
                        Inbound::Error(_) => drop(err.fetch_add(1, Ordering::Relaxed)),
                        _ => {}
                    }
                }
            }
        }));
    }
    Ok((sinks, readers))
}

/// Runs the plan: connects the voices, publishes for the duration, waits for the answers.
pub async fn run(plan: Plan) -> anyhow::Result<DemoReport> {
    anyhow::ensure!(!plan.nodes.is_empty(), "no --url");
    anyhow::ensure!(
        plan.rate > 0.0 && plan.rate <= MAX_RATE,
        "--rate must be above 0 and at most {MAX_RATE}"
    );
    let acknowledged = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (mut sinks, readers) = connect(&plan, &acknowledged, &refused).await?;
    let fans = sinks.len() - 1;
    let mut tick = interval(Duration::from_secs_f64(1.0 / plan.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let start = Instant::now();
    let (mut published, mut scores) = (0u64, 0u64);
    while start.elapsed() < plan.duration {
        tick.tick().await;
        let progress = start.elapsed().as_secs_f64() / plan.duration.as_secs_f64();
        let (voice, key, data) = message(published, fans, progress);
        let frame = pub_frame(&plan.room, published, key, data);
        sinks[voice]
            .send(Message::Text(frame.to_string().into()))
            .await
            .context("publishing")?;
        scores += u64::from(voice == 0);
        published += 1;
    }
    let duration_s = start.elapsed().as_secs_f64();
    let answered = || acknowledged.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed);
    let deadline = Instant::now() + plan.drain;
    while answered() < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for mut sink in sinks {
        let _ = timeout(CLOSE_WAIT, sink.close()).await;
    }
    for reader in readers {
        reader.abort();
    }
    Ok(DemoReport {
        room: plan.room,
        duration_s,
        published,
        scores,
        acknowledged: acknowledged.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::of(line)
    }

    #[test]
    fn demo_plan_takes_the_demo_room_and_refuses_what_is_no_duration() {
        let p = Plan::from_args(&args("lt demo --duration 5"), Vec::new()).unwrap();
        assert_eq!((p.room.as_str(), p.rate, p.publishers), ("demo", 20.0, 4));
        assert_eq!(p.duration, Duration::from_secs(5));
        assert_eq!(
            Plan::from_args(&args("lt demo --room match"), Vec::new()).unwrap().room,
            "match"
        );
        assert!(Plan::from_args(&args("lt demo --duration inf"), Vec::new()).is_err());
        assert_eq!(args("lt stadium").room(), "stadium");
    }

    #[test]
    fn every_tenth_message_is_the_score_from_the_scorer_and_the_fans_chat_in_turn() {
        let (voice, key, score) = message(0, 3, 0.0);
        assert_eq!(voice, 0);
        assert_eq!(key, Some("score"));
        assert_eq!(score["type"], "score");
        assert_eq!(score["score"], json!([0, 0]));
        let (_, _, later) = message(70 * 3, 3, 0.5);
        assert_eq!(
            (later["score"].clone(), later["minute"].clone()),
            (json!([2, 1]), json!(45))
        );
        let voices: Vec<usize> = (1..10).map(|k| message(k, 3, 0.0).0).collect();
        assert_eq!(voices, [2, 3, 1, 2, 3, 1, 2, 3, 1]);
        let (_, key, chat) = message(7, 3, 0.0);
        assert_eq!(key, None);
        assert_eq!(chat["type"], "chat");
        assert!(chat["text"].as_str().unwrap().ends_with("#7"));
    }

    #[test]
    fn the_score_is_published_with_its_key_and_a_chat_line_with_none() {
        let (_, key, data) = message(10, 3, 0.2);
        assert_eq!(
            pub_frame("demo", 10, key, data.clone()),
            json!({"op": "pub", "room": "demo", "data": data, "id": 10, "key": "score"})
        );
        let (_, key, chat) = message(11, 3, 0.2);
        let frame = pub_frame("demo", 11, key, chat);
        assert_eq!(frame["op"], "pub");
        assert!(frame.get("key").is_none(), "{frame}");
    }
}
