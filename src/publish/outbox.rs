//! A connection's publishes in flight: up to `--max-inflight-publishes` `pub` and `dm` commands
//! the socket's reader has taken and not yet answered, so one connection's publish rate is not
//! bound by round trips to Redis.
//!
//! Publishes go out in batches: everything waiting when the last batch was answered, grouped by
//! channel, each channel's messages in one pipeline in the order they came
//! ([`crate::bus::Bus::publish_in_order`]), so one sender's messages keep their order on the bus,
//! retries included. A publish that finally fails fails every publish of its channel the node
//! holds behind it: the rest of its batch, and those read while the batch was on the bus, so no
//! later message of that sender goes out after a gap. The next batch goes out once this one is
//! answered; under load batches grow by themselves (a natural batch: what arrived during one
//! round trip), when quiet each publish goes out alone and at once. Answers come back in the
//! order the publishes were sent, refused ones included. Past the window the reader stops
//! reading (backpressure): nothing is dropped and the outbox never holds more than the window.
//!
//! A publish to a room with a publish hook waits here for the hook's answer, counted in the window
//! like any publish: hook requests go out as the publishes are read, and a batch stops at the
//! first publish still waiting, so every later one waits behind it and the sender's order holds
//! whatever order the answers come in.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::join_all;
use indexmap::IndexMap;

use super::{published, Publish};
use crate::{
    bus::{BusError, Store},
    encoding::Encoding,
    frame::FrameError,
    node::Node,
    wire::encode,
};

/// One publish waiting for its answer.
pub enum Entry {
    Publish(Publish),
    /// Refused before it reached the bus (rate limit, rights, a bad name): answered in its turn.
    Refused(FrameError),
}

/// What a batch comes back with: its answers in order, and the channels a publish failed on.
struct Sent {
    answers: Vec<Bytes>,
    failed: Vec<(String, BusError)>,
}

type Batch = Pin<Box<dyn Future<Output = Sent> + Send>>;

pub struct Outbox {
    max: usize,
    waiting: VecDeque<Entry>,
    /// The batch on the bus, and how many publishes it holds.
    sending: Option<(usize, Batch)>,
}

impl Outbox {
    pub fn new(max: usize) -> Outbox {
        Outbox {
            max: max.max(1),
            waiting: VecDeque::new(),
            sending: None,
        }
    }

    /// The window is full: the reader must wait for answers before it takes another command.
    pub fn is_full(&self) -> bool {
        self.waiting.len() + self.sending.as_ref().map_or(0, |(n, _)| *n) >= self.max
    }

    /// Nothing waits and nothing is on the bus.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.sending.is_none()
    }

    pub fn push(&mut self, entry: Entry) {
        self.waiting.push_back(entry);
    }

    /// The answers of the next batch, in the order its publishes came; sends the waiting ones as a
    /// batch when none is on the bus. Pending while nothing waits (the reader polls again after
    /// it pushes). A poll rather than an async fn, so that the reader's idle state stays small.
    pub fn poll_answers(&mut self, cx: &mut Context<'_>, node: &Node, encoding: Encoding) -> Poll<Vec<Bytes>> {
        self.poll_moderations(cx);
        if self.sending.is_none() {
            // A batch stops at the first publish still waiting for its hook: what came after it
            // waits too, so the sender's order holds.
            let ready = self.waiting.iter().take_while(|e| !e.is_held()).count();
            if ready == 0 {
                return Poll::Pending;
            }
            let batch: Vec<Entry> = self.waiting.drain(..ready).collect();
            self.sending = Some((batch.len(), Box::pin(send(node.clone(), encoding, batch))));
        }
        let (_, batch) = self.sending.as_mut().expect("a batch on the bus");
        let Sent { answers, failed } = std::task::ready!(batch.as_mut().poll(cx));
        self.sending = None;
        // What waits behind a failed publish of the same channel fails with it.
        for entry in &mut self.waiting {
            let Entry::Publish(p) = entry else { continue };
            if let Some((_, e)) = failed.iter().find(|(channel, _)| *channel == p.out.channel) {
                let behind = BusError::Unavailable(format!("an earlier publish to this room failed ({e})"));
                if let Err(refused) = published(p, Err(behind)) {
                    *entry = Entry::Refused(refused);
                }
            }
        }
        Poll::Ready(answers)
    }
}

impl Outbox {
    /// Polls every publish waiting for its hook (each hook request starts at its first poll, so
    /// they are in flight together) and applies the answers that came.
    fn poll_moderations(&mut self, cx: &mut Context<'_>) {
        for entry in &mut self.waiting {
            let Entry::Publish(p) = entry else { continue };
            let Some(moderation) = p.moderation.as_mut() else {
                continue;
            };
            let Poll::Ready(answer) = moderation.as_mut().poll(cx) else {
                continue;
            };
            p.moderation = None;
            match answer {
                Ok(None) => {}
                Ok(Some(out)) => p.out = out,
                Err(refused) => *entry = Entry::Refused(refused),
            }
        }
    }
}

impl Entry {
    /// Waiting for its publish hook's answer.
    fn is_held(&self) -> bool {
        matches!(
            self,
            Entry::Publish(Publish {
                moderation: Some(_),
                ..
            })
        )
    }
}

/// Where a batch's messages for one channel came in it, and the messages.
type Channel = (Vec<usize>, Vec<(Bytes, Store)>);

/// Sends one batch, a pipeline per channel, and answers every entry in order.
async fn send(node: Node, encoding: Encoding, batch: Vec<Entry>) -> Sent {
    let mut channels: IndexMap<&str, Channel> = IndexMap::new();
    for (i, entry) in batch.iter().enumerate() {
        if let Entry::Publish(p) = entry {
            let (places, items) = channels.entry(p.out.channel.as_str()).or_default();
            places.push(i);
            items.push((p.out.envelope.clone(), p.out.store.clone()));
        }
    }
    let bus = node.bus();
    let sent = join_all(channels.into_iter().map(|(channel, (places, items))| async move {
        places.into_iter().zip(bus.publish_in_order(channel, items).await)
    }))
    .await;
    let mut results: Vec<Option<_>> = batch.iter().map(|_| None).collect();
    for (i, result) in sent.into_iter().flatten() {
        results[i] = Some(result);
    }
    // A publish that may have gone out unconfirmed broke no order; one that did not go out did.
    let failed = batch
        .iter()
        .zip(&results)
        .filter_map(|(entry, result)| match (entry, result) {
            (Entry::Publish(p), Some(Err(e @ BusError::Unavailable(_)))) => Some((p.out.channel.clone(), e.clone())),
            _ => None,
        })
        .collect();
    let answers = batch
        .iter()
        .zip(results)
        .filter_map(|(entry, result)| {
            let answer = match entry {
                Entry::Publish(p) => {
                    let result = result.unwrap_or_else(|| Err(BusError::Unavailable("not sent".into())));
                    published(p, result)
                }
                Entry::Refused(e) => Err(e.clone()),
            };
            encode(answer, encoding)
        })
        .collect();
    Sent { answers, failed }
}
