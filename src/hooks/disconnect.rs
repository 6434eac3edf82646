//! The disconnect hook (`--hook-disconnect URL`): fire-and-forget and batched. Every socket that
//! closes is noted as `{"user":U,"code":C,"at_ms":T}` (its close code, 1006 when it was cut without
//! one; milliseconds since the Unix epoch); once per `--hook-batch` everything noted since goes in
//! one POST `{"events":[…]}` (at most [`MAX_EVENTS`] a request), whose answer is not read beyond
//! its status. Noting never waits: past [`QUEUE`] events waiting, more are dropped and counted
//! (`kind="busy"`). A node that stops sends what it noted once more before it ends.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{backend::Backend, Hooks};
use crate::metrics as m;

/// Events that may wait for the next batch.
pub const QUEUE: usize = 65_536;
/// Events one request carries.
pub const MAX_EVENTS: usize = 10_000;

#[derive(Serialize)]
pub struct Event {
    user: String,
    code: u16,
    at_ms: u64,
}

/// The way from the sessions to the batcher, and the batcher's end until it is started.
pub struct Disconnects {
    backend: Arc<Backend>,
    tx: mpsc::Sender<Event>,
    // Taken once, by the task that sends the batches.
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
}

impl Disconnects {
    pub fn new(backend: Arc<Backend>) -> Disconnects {
        let (tx, rx) = mpsc::channel(QUEUE);
        Disconnects {
            backend,
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Hooks {
    /// Notes that a socket of `user` closed with `code`, for the next batch.
    pub fn disconnected(&self, user: &str, code: u16) {
        let Some(d) = &self.inner.disconnects else { return };
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let event = Event {
            user: user.to_owned(),
            code,
            at_ms,
        };
        if d.tx.try_send(event).is_err() {
            m::hook_error("disconnect", "busy");
        }
    }

    /// The task that sends the batches until `stop`, when a disconnect hook is configured; only
    /// the first call gets it.
    pub fn disconnects(
        &self,
        stop: CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let d = self.inner.disconnects.as_ref()?;
        let rx = d.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(batches(
            self.clone(),
            d.backend.clone(),
            rx,
            self.settings().batch,
            stop,
        ))
    }
}

async fn batches(
    hooks: Hooks,
    backend: Arc<Backend>,
    mut rx: mpsc::Receiver<Event>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        loop {
            let mut events = Vec::new();
            while events.len() < MAX_EVENTS {
                match rx.try_recv() {
                    Ok(e) => events.push(e),
                    Err(_) => break,
                }
            }
            if events.is_empty() {
                break;
            }
            #[derive(Serialize)]
            struct Batch {
                events: Vec<Event>,
            }
            let body = serde_json::to_vec(&Batch { events }).unwrap_or_default();
            // Fire and forget: a failure is counted and logged by the backend, and not retried.
            let _ = backend.ask(hooks.client(), "disconnect", body, |_| Ok(())).await;
        }
        if stopping {
            return;
        }
    }
}
