//! Publishes confirmed by replicas (`--publish-replicas N`): a publish to a room with history is
//! acknowledged only once `WAIT N` says N replicas of its master have it.
//!
//! WAIT cannot run inside the append script, and it blocks the connection it runs on, so each
//! master gets a connection of its own for it. WAIT counts the replicas that have that
//! connection's own last write, so every round first writes something of its own (it renews the
//! TTL of one of the batch's metas, which the appends just set): that write comes after every
//! append the round confirms, and one WAIT covers them all. A round takes the publishes waiting
//! when it starts; those that come meanwhile wait for the next one (group commit), so confirming
//! costs one round trip to the replicas per batch, not per message.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fred::{clients::Client, interfaces::ClientLike, prelude::Value, types::CustomCommand};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// One master's confirmations.
pub struct Confirm {
    client: Client,
    replicas: u32,
    timeout: Duration,
    waiting: Mutex<Vec<Waiter>>,
    wake: Notify,
}

struct Waiter {
    /// A key of the master (the publish's meta) and its TTL, for the round's own write.
    key: String,
    ttl_ms: i64,
    done: oneshot::Sender<bool>,
}

impl Confirm {
    /// Starts the rounds on `client` (connected by the caller), until `stop`.
    pub fn start(client: Client, replicas: u32, timeout: Duration, stop: CancellationToken) -> Arc<Confirm> {
        let confirm = Arc::new(Confirm {
            client,
            replicas,
            timeout,
            waiting: Mutex::new(Vec::new()),
            wake: Notify::new(),
        });
        tokio::spawn(confirm.clone().rounds(stop));
        confirm
    }

    /// Whether `--publish-replicas` replicas have every write made before this call (the
    /// publish's append among them), within the timeout.
    pub async fn confirm(&self, key: String, ttl_ms: i64) -> bool {
        let (done, rx) = oneshot::channel();
        self.lock().push(Waiter { key, ttl_ms, done });
        self.wake.notify_one();
        rx.await.unwrap_or(false)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        // A list: consistent whatever panicked while holding it.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn rounds(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = stop.cancelled() => return,
            }
            loop {
                let batch = std::mem::take(&mut *self.lock());
                let Some(first) = batch.first() else { break };
                let started = Instant::now();
                let confirmed = self.round(&first.key, first.ttl_ms).await;
                m::publish_wait(started.elapsed(), batch.len());
                for waiter in batch {
                    let _ = waiter.done.send(confirmed);
                }
            }
        }
    }

    /// One write of this connection's own, then WAIT for the replicas to have it.
    async fn round(&self, key: &str, ttl_ms: i64) -> bool {
        let bound = self.timeout * 2;
        let touch = self.client.custom::<Value, Value>(
            CustomCommand::new_static("PEXPIRE", None::<u16>, false),
            vec![Value::from(key), Value::Integer(ttl_ms)],
        );
        if !matches!(tokio::time::timeout(bound, touch).await, Ok(Ok(Value::Integer(1)))) {
            return false;
        }
        let wait = self.client.custom::<Value, Value>(
            CustomCommand::new_static("WAIT", None::<u16>, true),
            vec![
                Value::Integer(i64::from(self.replicas)),
                Value::Integer(crate::bus::millis(self.timeout)),
            ],
        );
        match tokio::time::timeout(bound, wait).await {
            Ok(Ok(Value::Integer(n))) => n >= i64::from(self.replicas),
            _ => false,
        }
    }
}
