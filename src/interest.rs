//! Keeps this node's bus subscriptions equal to its local interest: a topic's channels are
//! subscribed when its first local member joins and unsubscribed a short delay after its last one
//! leaves, so a user who leaves and rejoins does not churn the cluster.
//!
//! One task owns every subscription change, so changes to one topic happen in the order they were
//! asked for, and a burst of joins is batched into one round of concurrent SSUBSCRIBEs.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{Bus, Naming},
    hub::{Hub, Interest, JoinError},
    topic::Topic,
};

/// Requests handled per round; bounds the work between two looks at cancellation.
const BATCH: usize = 4096;
/// How often topics whose subscription failed (the bus was down) are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

pub async fn run(
    hub: Hub,
    bus: Arc<Bus>,
    naming: Naming,
    mut requests: mpsc::UnboundedReceiver<Interest>,
    delay: Duration,
    cancel: CancellationToken,
) {
    let (due_tx, mut due) = mpsc::unbounded_channel::<Topic>();
    let mut subscribed: HashSet<Topic> = HashSet::new();
    let mut wants: Vec<Topic> = Vec::new();
    let mut checks: Vec<Topic> = Vec::new();
    let mut retry = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            _ = retry.tick() => wants.extend(hub.take_unsubscribed()),
            n = async {
                let mut batch = Vec::new();
                let n = requests.recv_many(&mut batch, BATCH).await;
                for r in batch {
                    match r {
                        Interest::Want(t) => wants.push(t),
                        Interest::Idle(t) => {
                            let due_tx = due_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = due_tx.send(t);
                            });
                        }
                    }
                }
                n
            } => if n == 0 { return },
            n = due.recv_many(&mut checks, BATCH) => if n == 0 { return },
            _ = cancel.cancelled() => return,
        }
        while let Ok(t) = due.try_recv() {
            checks.push(t);
        }

        // Unsubscribe before subscribing, so a topic dropped and rejoined ends up subscribed.
        let idle: Vec<Topic> = checks
            .drain(..)
            .filter(|t| hub.remove_if_idle(t) && subscribed.remove(t))
            .collect();
        if !idle.is_empty() {
            if let Err(e) = bus
                .unsubscribe(idle.iter().flat_map(|t| naming.channels(t)).collect())
                .await
            {
                tracing::warn!(topics = idle.len(), error = %e, "unsubscribe failed");
            }
        }

        let mut seen = HashSet::new();
        let todo: Vec<Topic> = wants
            .drain(..)
            .filter(|t| seen.insert(t.clone()) && hub.has_topic(t))
            .collect();
        let (ready, new): (Vec<Topic>, Vec<Topic>) = todo.into_iter().partition(|t| subscribed.contains(t));
        for t in ready {
            hub.subscribed(&t, Ok(()));
        }
        if new.is_empty() {
            continue;
        }
        // One round for the whole batch: a burst of connections costs one SSUBSCRIBE per slot.
        let channels: Vec<Vec<String>> = new.iter().map(|t| naming.channels(t)).collect();
        let results = bus.subscribe(&channels).await;
        for ((t, channels), r) in new.into_iter().zip(channels).zip(results) {
            match r {
                Ok(()) => {
                    subscribed.insert(t.clone());
                    hub.subscribed(&t, Ok(()));
                }
                Err(e) => {
                    tracing::warn!(topic = ?t, error = %e, "subscribe failed; retrying while it has members");
                    // Drop whatever part did subscribe; waiting joiners are told, and members that
                    // did not wait (a socket's own inbox) keep the topic wanted for the next retry.
                    let _ = bus.unsubscribe(channels).await;
                    hub.subscribed(&t, Err(JoinError::Bus(e.to_string())));
                }
            }
        }
    }
}
