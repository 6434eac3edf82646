//! The Redis Cluster bus: sharded pub/sub only (SPUBLISH, SSUBSCRIBE, SUNSUBSCRIBE).
//!
//! Two fred clients per node: one publishes, one subscribes (RESP3, so its connections also answer
//! commands). Each keeps one connection per master, so the node's Redis connections are bounded by
//! the cluster's masters, whatever the number of rooms or shards.
//!
//! fred does not keep sharded subscriptions alive by itself (see the README's operations section):
//! it drops the server's `sunsubscribe` push on a slot move and resubscribes nothing when a master
//! fails over. So this bus tracks every channel by hash slot and owner, and a reconciler re-reads
//! the topology every second (and at once after any reconnect), subscribing again wherever a slot's
//! owner changed or its connection was rebuilt. All subscription changes go through one async lock,
//! so a resubscription never races an unsubscription of the same channel.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use fred::{
    clients::Client,
    interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface},
    prelude::{Builder, Config, ReconnectPolicy, Server, ServerConfig, Value},
    types::{config::ClusterDiscoveryPolicy, RespVersion},
    util::redis_keyslot,
};
use futures_util::future::join_all;
use tokio::sync::{broadcast::error::RecvError, Notify};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{BusError, Dispatch};
use crate::metrics as m;

/// How often the reconciler re-reads the cluster topology.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// Messages fred may buffer for the reader task before it reports them lagged (and lost).
const MESSAGE_BUFFER: usize = 1 << 16;

pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Client,
    subscriber: Client,
    /// Serializes subscribe, unsubscribe and resubscribe.
    ops: tokio::sync::Mutex<()>,
    tracked: Mutex<Tracked>,
    wake: Notify,
}

#[derive(Default)]
struct Tracked {
    by_slot: HashMap<u16, HashSet<String>>,
    /// The master each slot's channels were last subscribed on.
    owner: HashMap<u16, Server>,
    /// Slots to subscribe again (their connection was rebuilt or a command failed).
    stale: HashSet<u16>,
    channels: usize,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn config(urls: &[String], resp3: bool) -> Result<Config, BusError> {
    let mut hosts = Vec::new();
    for url in urls {
        hosts.extend(Config::from_url_clustered(url).map_err(unavailable)?.server.hosts());
    }
    let mut config = Config::from_url_clustered(&urls[0]).map_err(unavailable)?;
    // Discover the topology from every node seen, not only the seeds: a dead seed master must not
    // leave the client unable to find the replica that replaced it.
    config.server = ServerConfig::Clustered {
        hosts,
        policy: ClusterDiscoveryPolicy::UseCache,
    };
    // Redis down when the node starts is not fatal: keep retrying with the reconnect policy.
    config.fail_fast = false;
    if resp3 {
        config.version = RespVersion::RESP3;
    }
    Ok(config)
}

fn build(urls: &[String], resp3: bool, timeout: Duration) -> Result<Client, BusError> {
    Builder::from_config(config(urls, resp3)?)
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
            p.broadcast_channel_capacity = MESSAGE_BUFFER;
        })
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
            c.max_command_attempts = 2;
        })
        // Capped, jittered exponential backoff, forever.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .map_err(unavailable)
}

fn group_by_slot(channels: Vec<String>) -> HashMap<u16, Vec<String>> {
    let mut groups: HashMap<u16, Vec<String>> = HashMap::new();
    for c in channels {
        groups.entry(redis_keyslot(c.as_bytes())).or_default().push(c);
    }
    groups
}

impl RedisBus {
    /// Connects to the cluster and starts the reader and the reconciler. Redis being unreachable is
    /// not an error: the clients keep retrying and `is_ready` stays false until they connect.
    pub async fn connect(
        urls: &[String],
        timeout: Duration,
        dispatch: Dispatch,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<RedisBus, BusError> {
        let publisher = build(urls, false, timeout)?;
        let subscriber = build(urls, true, timeout)?;
        let inner = Arc::new(Inner {
            publisher,
            subscriber,
            ops: tokio::sync::Mutex::new(()),
            tracked: Mutex::new(Tracked::default()),
            wake: Notify::new(),
        });
        // Subscribe to events before connecting so the first ones are not missed.
        let messages = inner.subscriber.message_rx();
        let reconnects = inner.subscriber.reconnect_rx();
        inner.publisher.connect();
        inner.subscriber.connect();
        tracker.spawn(read_messages(messages, dispatch, cancel.clone()));
        tracker.spawn(watch_reconnects(inner.clone(), reconnects, cancel.clone()));
        tracker.spawn(reconcile(inner.clone(), cancel));
        let up = tokio::time::timeout(timeout, async {
            let _ = inner.publisher.wait_for_connect().await;
            let _ = inner.subscriber.wait_for_connect().await;
        })
        .await;
        if up.is_err() {
            tracing::warn!(?urls, "Redis Cluster not reachable yet; retrying in the background");
        }
        let bus = RedisBus { inner };
        m::bus_up(bus.is_ready());
        Ok(bus)
    }

    pub async fn publish(&self, channel: String, payload: Bytes) -> Result<(), BusError> {
        if !self.inner.publisher.is_connected() {
            return Err(BusError::Unavailable("not connected to Redis".into()));
        }
        self.inner
            .publisher
            .spublish::<Value, _, _>(channel, payload)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    pub async fn subscribe(&self, channels: Vec<String>) -> Result<(), BusError> {
        let _op = self.inner.ops.lock().await;
        let groups = group_by_slot(channels);
        let results = join_all(groups.into_iter().map(|(slot, group)| async move {
            let r = self.inner.subscriber.ssubscribe(group.clone()).await;
            (slot, group, r)
        }))
        .await;
        let mut failed = None;
        let owners = self.inner.subscriber.cached_cluster_state();
        let mut t = self.inner.tracked.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, group, r) in results {
            match r {
                Ok(()) => {
                    let set = t.by_slot.entry(slot).or_default();
                    let before = set.len();
                    set.extend(group);
                    let added = set.len() - before;
                    t.channels += added;
                    if let Some(owner) = owners.as_ref().and_then(|o| o.get_server(slot)) {
                        t.owner.insert(slot, owner.clone());
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        m::subscriptions(t.channels);
        match failed {
            None => Ok(()),
            Some(e) => Err(unavailable(e)),
        }
    }

    pub async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), BusError> {
        let _op = self.inner.ops.lock().await;
        let groups = group_by_slot(channels);
        {
            let mut t = self.inner.tracked.lock().unwrap_or_else(|p| p.into_inner());
            for (slot, group) in &groups {
                if let Some(set) = t.by_slot.get_mut(slot) {
                    let before = set.len();
                    for c in group {
                        set.remove(c);
                    }
                    let removed = before - set.len();
                    let empty = set.is_empty();
                    t.channels -= removed;
                    if empty {
                        t.by_slot.remove(slot);
                        t.owner.remove(slot);
                        t.stale.remove(slot);
                    }
                }
            }
            m::subscriptions(t.channels);
        }
        // Untracked first: if the owner is unreachable its subscriptions die with the connection.
        let results = join_all(groups.into_values().map(|g| self.inner.subscriber.sunsubscribe(g))).await;
        results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map(drop)
            .map_err(unavailable)
    }

    /// Connected both ways, and every tracked channel subscribed on its current owner.
    pub fn is_ready(&self) -> bool {
        let i = &self.inner;
        i.publisher.is_connected()
            && i.subscriber.is_connected()
            && i.tracked.lock().unwrap_or_else(|p| p.into_inner()).stale.is_empty()
    }

    pub async fn close(&self) {
        let _ = self.inner.subscriber.quit().await;
        let _ = self.inner.publisher.quit().await;
    }
}

async fn read_messages(
    mut rx: tokio::sync::broadcast::Receiver<fred::types::Message>,
    dispatch: Dispatch,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            _ = cancel.cancelled() => return,
        };
        match msg {
            Ok(msg) => {
                let payload = match msg.value {
                    Value::Bytes(b) => b,
                    Value::String(s) => s.into_inner(),
                    _ => {
                        m::bus_dropped("undecodable", 1);
                        continue;
                    }
                };
                dispatch.dispatch(msg.channel.as_bytes(), payload);
            }
            // fred's buffer overflowed: these messages are lost; keep reading.
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(lost = n, "Redis message reader lagged");
                m::bus_dropped("lagged", n);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn watch_reconnects(
    inner: Arc<Inner>,
    mut rx: tokio::sync::broadcast::Receiver<Server>,
    cancel: CancellationToken,
) {
    loop {
        let server = tokio::select! {
            s = rx.recv() => s,
            _ = cancel.cancelled() => return,
        };
        match server {
            Ok(server) => {
                m::bus_reconnect();
                tracing::info!(%server, "Redis connection rebuilt; resubscribing its slots");
                let mut t = inner.tracked.lock().unwrap_or_else(|p| p.into_inner());
                let slots: Vec<u16> = t.owner.iter().filter(|(_, o)| **o == server).map(|(s, _)| *s).collect();
                t.stale.extend(slots);
                drop(t);
                inner.wake.notify_one();
            }
            // Missed events: treat every slot as suspect.
            Err(RecvError::Lagged(_)) => {
                let mut t = inner.tracked.lock().unwrap_or_else(|p| p.into_inner());
                let slots: Vec<u16> = t.by_slot.keys().copied().collect();
                t.stale.extend(slots);
                drop(t);
                inner.wake.notify_one();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Keeps every tracked channel subscribed on its slot's current owner.
async fn reconcile(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut was_ready = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = inner.wake.notified() => {}
            _ = cancel.cancelled() => return,
        }
        if inner.subscriber.is_connected() {
            if let Err(e) = inner.subscriber.sync_cluster().await {
                tracing::debug!(error = %e, "cluster topology refresh failed");
            }
            resubscribe_moved(&inner).await;
        }
        let ready = inner.publisher.is_connected()
            && inner.subscriber.is_connected()
            && inner.tracked.lock().unwrap_or_else(|p| p.into_inner()).stale.is_empty();
        if ready != was_ready {
            m::bus_up(ready);
            was_ready = ready;
        }
    }
}

async fn resubscribe_moved(inner: &Inner) {
    let _op = inner.ops.lock().await;
    let Some(state) = inner.subscriber.cached_cluster_state() else {
        return;
    };
    let work: Vec<(u16, Vec<String>, Option<Server>)> = {
        let t = inner.tracked.lock().unwrap_or_else(|p| p.into_inner());
        t.by_slot
            .iter()
            .filter_map(|(slot, channels)| {
                let now = state.get_server(*slot).cloned();
                let moved = now.as_ref() != t.owner.get(slot);
                (moved || t.stale.contains(slot)).then(|| (*slot, channels.iter().cloned().collect(), now))
            })
            .collect()
    };
    if work.is_empty() {
        return;
    }
    let results = join_all(work.into_iter().map(|(slot, channels, owner)| async move {
        let n = channels.len();
        let r = inner.subscriber.ssubscribe(channels).await;
        (slot, n, owner, r)
    }))
    .await;
    let mut t = inner.tracked.lock().unwrap_or_else(|p| p.into_inner());
    for (slot, n, owner, r) in results {
        match r {
            Ok(()) => {
                t.stale.remove(&slot);
                if let Some(owner) = owner {
                    tracing::info!(slot, %owner, channels = n, "resubscribed");
                    t.owner.insert(slot, owner);
                }
                m::resubscribed(n);
            }
            Err(e) => {
                tracing::warn!(slot, error = %e, "resubscription failed; retrying");
                t.stale.insert(slot);
            }
        }
    }
}
