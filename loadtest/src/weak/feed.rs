//! The publishers of the `weak` run, one connection each: the score feed (publisher 0), keyed
//! messages of key `score` whose data carries their publish time, and the chat (publisher 1),
//! unkeyed lines. Each publishes at its rate with ids until its deadline and counts the answers,
//! `ok`, or `error` by code.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{interval, sleep, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    conn::{self, NodeUrl, CLOSE_WAIT},
    keyed,
    wire::{self, Encoding, Inbound, Stamp, Target},
};

/// The score feed's publisher number in the stamps; the chat's is [`CHAT`].
pub const SCORE: u32 = 0;
pub const CHAT: u32 = 1;
/// The score's key.
pub const KEY: &str = "score";

/// One publisher's part.
#[derive(Debug, Clone)]
pub struct Part {
    pub publisher: u32,
    pub room: String,
    pub rate: f64,
    /// Bytes of each message's data.
    pub size: usize,
    /// Seconds of publishing.
    pub duration: Duration,
}

/// What one publisher did.
#[derive(Debug, Default, Clone)]
pub struct PubLog {
    pub sent: u64,
    pub acked: u64,
    pub refused: BTreeMap<String, u64>,
}

/// How long the answers to the last publishes may take.
const ANSWERS: Duration = Duration::from_secs(3);

/// Publishes `part` from its own connection to `node`; waits for the last answers.
pub async fn publisher(node: NodeUrl, part: Part) -> anyhow::Result<PubLog> {
    let user = if part.publisher == SCORE { "lt-score" } else { "lt-chat" };
    let ws = timeout(
        Duration::from_secs(10),
        conn::open(&node, IpAddr::V4(Ipv4Addr::LOCALHOST), user, Encoding::Json),
    )
    .await
    .context("the publisher's connect timed out")??;
    let (mut sink, mut stream) = ws.split();
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let reader = {
        let (acked, refused) = (acked.clone(), refused.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                match wire::scan_json(&text) {
                    Inbound::Ok(_) => drop(acked.fetch_add(1, Ordering::Relaxed)),
                    Inbound::Error(_) => {
                        let code = keyed::error_code(&text).unwrap_or_else(|| "?".into());
                        *refused
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(code)
                            .or_insert(0) += 1;
                    }
                    _ => {}
                }
            }
        })
    };
    let mut tick = interval(Duration::from_secs_f64(1.0 / part.rate));
    // A late tick is caught up at once: the feed holds its rate on a busy machine.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let end = Instant::now() + part.duration;
    let mut sent = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let stamp = Stamp {
            publisher: part.publisher,
            seq: sent,
            ts_us: wire::now_us(),
        };
        let id = sent as i64 + 2;
        let frame = if part.publisher == SCORE {
            keyed::stamped_pub(&part.room, KEY, id, stamp, part.size)
        } else {
            wire::publish_frame(
                Encoding::Json,
                &Target::Room(part.room.clone()),
                stamp,
                part.size,
                Some(id),
            )
        };
        sink.send(frame).await.context("publishing")?;
        sent += 1;
    }
    let answered = || acked.load(Ordering::Relaxed) + refused.lock().map_or(0, |r| r.values().sum());
    let deadline = Instant::now() + ANSWERS;
    while answered() < sent && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    let _ = timeout(CLOSE_WAIT, sink.close()).await;
    reader.abort();
    let refused = refused.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(PubLog {
        sent,
        acked: acked.load(Ordering::Relaxed),
        refused,
    })
}
