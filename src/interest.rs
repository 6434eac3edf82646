//! Keeps this node's bus subscriptions equal to its local interest: a topic's channels are
//! subscribed when its first local member joins and unsubscribed a short delay after its last one
//! leaves, so a user who leaves and rejoins does not churn the cluster.
//!
//! One task owns every subscription change, so changes to one topic happen in the order they were
//! asked for, and a burst of joins is batched into one round of concurrent SSUBSCRIBEs.

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, time::DelayQueue};

use crate::{
    bus::{Bus, Naming},
    hub::{Hub, Interest, JoinError},
    topic::Topic,
};

/// Requests handled per round; bounds the work between two looks at cancellation.
const BATCH: usize = 4096;
/// How often topics whose subscription failed (the bus was down) are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Runs the manager until cancelled or the hub is gone.
pub async fn run(
    hub: Hub,
    bus: Arc<Bus>,
    naming: Naming,
    mut requests: mpsc::UnboundedReceiver<Interest>,
    delay: Duration,
    cancel: CancellationToken,
) {
    let mut manager = Manager {
        hub,
        bus,
        naming,
        subscribed: HashSet::new(),
    };
    // Topics that lost their last member, each due for a look once the delay has passed.
    let mut due: DelayQueue<Topic> = DelayQueue::new();
    let mut batch = Vec::new();
    let mut round = Round::default();
    let mut retry = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            _ = retry.tick() => round.wants.extend(manager.hub.take_unsubscribed()),
            n = requests.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
                for request in batch.drain(..) {
                    match request {
                        Interest::Want(t) => round.wants.push(t),
                        Interest::Idle(t) => drop(due.insert(t, delay)),
                    }
                }
            }
            Some(expired) = due.next(), if !due.is_empty() => round.checks.push(expired.into_inner()),
            _ = cancel.cancelled() => return,
        }
        // Whatever else came due meanwhile joins this round.
        while let Some(Some(expired)) = due.next().now_or_never() {
            round.checks.push(expired.into_inner());
        }
        manager.run(&mut round).await;
    }
}

/// What one round has to look at.
#[derive(Default)]
struct Round {
    /// Topics that got a first member (or whose subscription is retried).
    wants: Vec<Topic>,
    /// Topics whose delay after their last member left has passed.
    checks: Vec<Topic>,
}

/// What a round does, decided before any bus call.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// Still empty after the delay: drop them and unsubscribe their channels.
    idle: Vec<Topic>,
    /// Wanted and already subscribed: their joiners are answered at once.
    ready: Vec<Topic>,
    /// Wanted and not subscribed: subscribed together in one round.
    new: Vec<Topic>,
}

struct Manager {
    hub: Hub,
    bus: Arc<Bus>,
    naming: Naming,
    /// Topics whose channels this node has subscribed.
    subscribed: HashSet<Topic>,
}

impl Manager {
    async fn run(&mut self, round: &mut Round) {
        let plan = self.plan(round);
        // Unsubscribe before subscribing, so a topic dropped and rejoined ends up subscribed.
        self.unsubscribe(plan.idle).await;
        for t in plan.ready {
            self.hub.subscribed(&t, Ok(()));
        }
        self.subscribe(plan.new).await;
    }

    /// Empties the round into a plan. A topic wanted twice is subscribed once; an idle one that got
    /// a member again in the meantime stays.
    fn plan(&mut self, round: &mut Round) -> Plan {
        let idle = round
            .checks
            .drain(..)
            .filter(|t| self.hub.remove_if_idle(t) && self.subscribed.remove(t))
            .collect();
        let mut seen = HashSet::new();
        let (ready, new) = round
            .wants
            .drain(..)
            .filter(|t| seen.insert(t.clone()) && self.hub.has_topic(t))
            .partition(|t| self.subscribed.contains(t));
        Plan { idle, ready, new }
    }

    async fn unsubscribe(&self, idle: Vec<Topic>) {
        if idle.is_empty() {
            return;
        }
        let channels = idle.iter().flat_map(|t| self.naming.channels(t)).collect();
        if let Err(e) = self.bus.unsubscribe(channels).await {
            tracing::warn!(topics = idle.len(), error = %e, "unsubscribe failed");
        }
    }

    /// One round for the whole batch: a burst of connections costs one SSUBSCRIBE per slot.
    async fn subscribe(&mut self, new: Vec<Topic>) {
        if new.is_empty() {
            return;
        }
        let channels: Vec<Vec<String>> = new.iter().map(|t| self.naming.channels(t)).collect();
        let results = self.bus.subscribe(&channels).await;
        for ((t, channels), r) in new.into_iter().zip(channels).zip(results) {
            match r {
                Ok(()) => {
                    self.subscribed.insert(t.clone());
                    self.hub.subscribed(&t, Ok(()));
                }
                Err(e) => {
                    tracing::warn!(topic = ?t, error = %e, "subscribe failed; retrying while it has members");
                    // Drop whatever part did subscribe; waiting joiners are told, and members that
                    // did not wait (a socket's own inbox) keep the topic wanted for the next retry.
                    let _ = self.bus.unsubscribe(channels).await;
                    self.hub.subscribed(&t, Err(JoinError::Bus(e.to_string())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use bytes::Bytes;

    use super::*;
    use crate::{
        bus::{memory::MemoryBus, Sink},
        encoding::Encoding,
        fanout::{gate::Gate, lanes::Lanes, writer::Outbound},
    };

    /// What the bus handed over: a payload only reaches it while its channel is subscribed.
    #[derive(Default)]
    struct Heard(Mutex<usize>);

    impl Sink for Heard {
        fn receive(&self, _: Bytes, _: Bytes) {
            *self.0.lock().unwrap() += 1;
        }
    }

    struct Node {
        hub: Hub,
        bus: Arc<Bus>,
        heard: Arc<Heard>,
        cancel: CancellationToken,
    }

    impl Node {
        fn start(delay: Duration) -> Node {
            let (hub, requests) = Hub::new(Lanes::new(1, 1));
            let heard = Arc::new(Heard::default());
            let bus = Arc::new(Bus::Memory(MemoryBus::new(heard.clone())));
            let naming = Naming::new("r:", "u:", 1, HashMap::new());
            let cancel = CancellationToken::new();
            tokio::spawn(run(hub.clone(), bus.clone(), naming, requests, delay, cancel.clone()));
            Node {
                hub,
                bus,
                heard,
                cancel,
            }
        }

        fn member(&self) -> u64 {
            self.hub
                .register(Outbound::new(Arc::new(Gate::new(1 << 20)), Encoding::Json))
        }

        /// Whether the room's channel is subscribed: a publish reaches the bus's sink only then.
        async fn subscribed(&self) -> bool {
            let before = *self.heard.0.lock().unwrap();
            self.bus
                .publish("r:lobby:shard0".into(), Bytes::from_static(b"x"), Default::default())
                .await
                .unwrap();
            *self.heard.0.lock().unwrap() > before
        }
    }

    fn lobby() -> Topic {
        Topic::Room("lobby".into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejoin_within_the_delay_keeps_the_subscription_and_a_leave_ends_it_after() {
        let delay = Duration::from_secs(2);
        let node = Node::start(delay);
        let id = node.member();
        node.hub.join(lobby(), id, delay).await.unwrap();
        assert!(node.subscribed().await);

        node.hub.leave(&lobby(), id);
        tokio::time::sleep(delay / 2).await;
        assert!(node.subscribed().await, "still subscribed within the delay");
        node.hub.join(lobby(), id, delay).await.unwrap();
        tokio::time::sleep(delay * 2).await;
        assert!(
            node.subscribed().await,
            "the rejoin kept it past the first leave's delay"
        );
        assert!(node.hub.has_topic(&lobby()));

        node.hub.leave(&lobby(), id);
        tokio::time::sleep(delay + Duration::from_millis(10)).await;
        assert!(
            !node.subscribed().await,
            "unsubscribed once the delay passed with nobody back"
        );
        assert!(!node.hub.has_topic(&lobby()));
        node.cancel.cancel();
    }

    #[tokio::test]
    async fn a_round_subscribes_each_wanted_topic_once_and_answers_subscribed_ones_at_once() {
        let (hub, _requests) = Hub::new(Lanes::new(1, 1));
        let bus = Arc::new(Bus::Memory(MemoryBus::new(Arc::new(Heard::default()))));
        let mut manager = Manager {
            hub: hub.clone(),
            bus,
            naming: Naming::new("r:", "u:", 1, HashMap::new()),
            subscribed: HashSet::new(),
        };
        let member = hub.register(Outbound::new(Arc::new(Gate::new(1 << 20)), Encoding::Json));
        let room = |n: &str| Topic::Room(n.into());
        for name in ["a", "b", "c", "gone"] {
            hub.join_later(room(name), member).unwrap();
        }
        hub.leave(&room("gone"), member);
        manager.subscribed.insert(room("c"));
        let mut round = Round {
            wants: vec![room("a"), room("b"), room("a"), room("c"), room("gone"), room("never")],
            checks: vec![],
        };
        let plan = manager.plan(&mut round);
        assert_eq!(plan.new, [room("a"), room("b"), room("gone")], "once each, in order");
        assert_eq!(plan.ready, [room("c")]);
        assert!(plan.idle.is_empty());
        assert!(round.wants.is_empty());

        // "gone" is empty and due: dropped and unsubscribed; "a" has its member: kept.
        manager.subscribed.extend([room("a"), room("gone")]);
        let mut round = Round {
            wants: vec![],
            checks: vec![room("gone"), room("a")],
        };
        let plan = manager.plan(&mut round);
        assert_eq!(plan.idle, [room("gone")]);
        assert!(!manager.subscribed.contains(&room("gone")));
        assert!(manager.subscribed.contains(&room("a")));
    }
}
