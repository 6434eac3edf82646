//! The Redis Cluster bus: sharded pub/sub only (SPUBLISH, SSUBSCRIBE, SUNSUBSCRIBE).
//!
//! # One link per master
//! The node keeps one `Link` per cluster master: a publishing, a scripting and a subscribing
//! connection (fred clients in centralized mode), so its Redis connections are bounded by the
//! number of masters, whatever the number of rooms or shards. The bus routes each channel to its
//! slot's master itself, from `CLUSTER SLOTS` read through any live link.
//!
//! Why not one cluster-mode client: fred runs one router task per client, and while it reconnects
//! to a dead master every command and message of that client waits, so a master's death stalled
//! every room for seconds (measured: 3.3 s with a 1 s node timeout). With a link per master, a dead
//! master stalls only the rooms whose shard channels live on it.
//!
//! # Keeping subscriptions alive
//! fred does not keep sharded subscriptions alive by itself: Redis drops them on a slot move (with a
//! `sunsubscribe` push fred discards) and they die with a failed master. So the bus tracks every
//! channel by hash slot and by the master it was subscribed on; a reconciler re-reads the topology
//! every second (and at once after any reconnect or MOVED, or when a link lost subscriptions) and
//! subscribes again wherever a slot's master changed or its connection was rebuilt. Every
//! subscription change goes through one async lock, so a resubscription never races an
//! unsubscription of the same channel.
//!
//! A node that only subscribes never meets a MOVED, and the push that tells of a move is lost: so
//! every 20 ms the bus asks each link's subscriber how many channels Redis still has it subscribed
//! to, and a master that has fewer than the node holds there sends the reconciler to it at once
//! (`links::watch`). A plain room's messages published meanwhile are lost: a slot move costs it
//! about the watch's period and two round trips, not a second.
//!
//! # Links coming up
//! A node serves as soon as it has read the slot map, while its links are still connecting. A
//! command whose master's link is not connected yet (just started, or a master coming back) waits
//! for it within its timeout, rather than failing at once: every link tells the bus when one of its
//! connections comes up ([`Inner::links_up`]), and the waiting commands look again. The same news
//! marks the moment the node has been linked to every master once, which `/acceptz` waits for.
//!
//! # Liveness
//! A connection can look healthy and deliver nothing. Each link publishes a probe on a channel of
//! its own master whenever its subscriber has been quiet for a second and expects it back within
//! the command timeout; a link that misses it is rebuilt and `/readyz` reports 503 until it is back.
//!
//! # Layout
//! - this file: [`RedisBus`], what the rest of the node calls, and the state its parts share;
//! - `links`: the connections to one master, their readers and their probes;
//! - `routes`: the slot map, and the reconciler that keeps links and subscriptions in step with it;
//! - `scripts`: history's Lua scripts (append, read), and how any script's call (presence's too)
//!   follows the cluster;
//! - `tracked`: the subscribed channels by slot; `confirm`: `--publish-replicas`'s `WAIT` rounds.

mod confirm;
mod links;
mod routes;
mod scripts;
mod tracked;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use fred::{
    clients::Client,
    interfaces::{ClientLike, PubsubInterface},
    prelude::{Config, Server, Value},
    util::redis_keyslot,
};
use futures_util::future::join_all;
use tokio::sync::{watch, Notify};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{in_turn, BusError, Sink};
use crate::{
    bus::Store,
    history::pos::{Keep, Pos, Slice},
    metrics as m,
};
use links::Link;
use routes::Routes;
pub(super) use scripts::{bytes_of, Script};
use scripts::{Item, Resend};
use tracked::Tracked;

pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    seeds: Vec<Server>,
    timeout: Duration,
    /// Replicas that must have a publish to a room with history before it is acknowledged.
    replicas: u32,
    sink: Arc<dyn Sink>,
    /// Probe channels start with this; unique per node so nodes never answer each other's probes.
    probe_prefix: String,
    /// What this bus's append ids start with: the node id and a random tag, since a node id can
    /// come back after a restart and count from 0 again.
    append_prefix: String,
    /// Appends given an id so far.
    appends: AtomicU64,
    started: Instant,
    links: Mutex<HashMap<Server, Arc<Link>>>,
    routes: RwLock<Routes>,
    /// Serializes subscribe, unsubscribe and resubscribe.
    ops: tokio::sync::Mutex<()>,
    tracked: Mutex<Tracked>,
    /// Channels unsubscribed so far (`links::watch` allows for those in flight).
    unsubscribed: AtomicU64,
    /// A master that dropped subscriptions the node holds on it: the reconciler reads the slot
    /// map from it first, since it knows where its slots went.
    suspect: Mutex<Option<Server>>,
    wake: Notify,
    /// Sent whenever a link may have come up: one of its connections was (re)made, or the slot map
    /// was read again. A command whose master's link is not connected waits on it (see
    /// [`Inner::link_up`]).
    links_up: watch::Sender<()>,
    /// Every master of the slot map has had both its connections up at once since the node
    /// started: from then on the node takes clients (`/acceptz`), whatever blips follow.
    linked_once: AtomicBool,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Which connection of a link a command goes over.
#[derive(Debug, Clone, Copy)]
enum Via {
    Publisher,
    Scripts,
    Subscriber,
}

impl Via {
    fn of(self, link: &Link) -> &Client {
        match self {
            Via::Publisher => &link.publisher,
            Via::Scripts => &link.scripts,
            Via::Subscriber => &link.subscriber,
        }
    }
}

/// The pause between two attempts of an append sent again, and between two looks at whether its
/// master is back.
const RESEND_PAUSE: Duration = Duration::from_millis(25);

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single step, so a panic elsewhere leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Redis command that gives up after `timeout` whatever fred's own retries and reconnects do,
/// so a caller (a publishing client, a join) always gets an answer in bounded time.
async fn bounded<T>(
    timeout: Duration,
    command: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, fred::error::Error> {
    match tokio::time::timeout(timeout, command).await {
        Ok(r) => r,
        Err(_) => Err(fred::error::Error::new(
            fred::error::ErrorKind::Timeout,
            "no answer from Redis in time",
        )),
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn group_by_slot(channels: Vec<String>) -> HashMap<u16, Vec<String>> {
    let mut groups: HashMap<u16, Vec<String>> = HashMap::new();
    for c in channels {
        groups.entry(redis_keyslot(c.as_bytes())).or_default().push(c);
    }
    groups
}

impl RedisBus {
    /// Connects to the cluster and starts the reconciler. Redis being unreachable is not an error:
    /// the links keep retrying and `is_ready` stays false until the cluster answers.
    pub async fn connect(
        urls: &[String],
        node_id: &str,
        timeout: Duration,
        replicas: u32,
        sink: Arc<dyn Sink>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<RedisBus, BusError> {
        let mut seeds = Vec::new();
        for url in urls {
            seeds.extend(Config::from_url_centralized(url).map_err(unavailable)?.server.hosts());
        }
        let tag = format!("{node_id}:{:08x}", rand::random::<u32>());
        let inner = Arc::new(Inner {
            seeds,
            timeout,
            replicas,
            sink,
            probe_prefix: format!("shardcast:probe:{tag}:"),
            append_prefix: tag,
            appends: AtomicU64::new(0),
            started: Instant::now(),
            links: Mutex::new(HashMap::new()),
            routes: RwLock::new(Routes::unknown()),
            ops: tokio::sync::Mutex::new(()),
            tracked: Mutex::new(Tracked::default()),
            unsubscribed: AtomicU64::new(0),
            suspect: Mutex::new(None),
            wake: Notify::new(),
            links_up: watch::Sender::new(()),
            linked_once: AtomicBool::new(false),
            tracker: tracker.clone(),
            // The bus's own: closing it stops its tasks and its waiting commands, not the node's.
            cancel: cancel.child_token(),
        });
        if tokio::time::timeout(timeout, inner.refresh())
            .await
            .map_or(true, |ok| !ok)
        {
            tracing::warn!(?urls, "Redis Cluster not reachable yet; retrying in the background");
        }
        tracker.spawn(routes::reconcile(inner.clone()));
        tracker.spawn(links::watch(inner.clone()));
        let bus = RedisBus { inner };
        m::bus_up(bus.is_ready());
        Ok(bus)
    }

    /// Publishes one message, keeping what `store` says in the same step: a batch of one (see
    /// [`RedisBus::publish_in_order`]).
    pub async fn send(&self, channel: String, payload: Bytes, store: Store) -> Result<Option<Pos>, BusError> {
        let mut results = self.publish_in_order(&channel, vec![(payload, store)]).await;
        results.pop().expect("one answer per message")
    }

    /// Publishes several messages to one channel in order, in one round trip: one pipeline of
    /// SPUBLISH (or the store script, for history and keyed messages) on the channel's master. Where Redis answered
    /// a message without running it (the slot moved or is moving, the script is not loaded), that
    /// message and every one after it are published again one at a time, each only once the one
    /// before it succeeded, and all after the first that still fails fail too: within the batch, a
    /// later message never goes out while an earlier one of the same channel was lost.
    ///
    /// Where a message may have run (its connection broke before the answer came), it is sent
    /// again only if that is harmless. A plain publish is not: it and the rest of the batch fail
    /// with `unavailable`, and the client decides. An append is: it carries an id its script
    /// refuses to append twice, so it goes again with the rest, in turn, each as often as it fails
    /// (a broken connection rebuilt, a failover's new master) within [`Resend::within`] of the
    /// batch's start.
    pub async fn publish_in_order(
        &self,
        channel: &str,
        items: Vec<(Bytes, Store)>,
    ) -> Vec<Result<Option<Pos>, BusError>> {
        // Each store's id is made once, so every attempt of it carries the same.
        let items: Vec<Item> = items
            .into_iter()
            .map(|(payload, store)| self.inner.item(payload, store))
            .collect();
        let resend = Resend::from_now(self.inner.timeout);
        let pipelined = match self.pipelined(channel, &items).await {
            Ok(results) => results,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter();
        for result in pipelined {
            let item = items.next().expect("one answer per message");
            match result {
                Some(answer) => out.push(answer),
                None => {
                    // The first message the pipeline could not publish: this one and the rest, in turn.
                    let rest = std::iter::once(item).chain(items.by_ref());
                    out.extend(in_turn(rest, |item| self.send_again(channel, item, resend)).await);
                    break;
                }
            }
        }
        out
    }

    /// Sends a message of a batch (again, or the first time when the batch goes one at a time). A
    /// plain publish goes once, following its slot once if it moved. An append goes under its id,
    /// and again while it fails and there is time, each time once its slot's master has a scripts
    /// connection up: the same id never appends twice.
    async fn send_again(&self, channel: &str, item: Item, resend: Resend) -> Result<Option<Pos>, BusError> {
        let Some(id) = item.id.as_deref() else {
            resend.check()?;
            return self.publish(channel.to_string(), item.payload).await.map(|()| None);
        };
        loop {
            self.inner.scripts_up(channel, resend).await?;
            match self.store(channel, item.payload.clone(), &item.store, id).await {
                Err(BusError::Unavailable(e)) if resend.check().is_ok() => {
                    tracing::debug!(channel, error = %e, "store failed; sending it again under its id");
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                result => return result,
            }
        }
    }

    /// The channel's latest values (see [`crate::bus::Bus::latest`]).
    pub async fn latest(&self, channel: &str, ttl: Duration) -> Result<Vec<Bytes>, BusError> {
        self.inner.read_latest(channel, ttl).await
    }

    /// Reads the channel's history (see [`crate::bus::Bus::read`]).
    pub async fn read(&self, channel: &str, after: u64, cap: usize, keep: Keep) -> Result<Slice, BusError> {
        self.inner.read_history(channel, after, cap, keep).await
    }

    /// Calls a script on the master of `route`'s slot (a key or channel name; every key the script
    /// touches must hash to that slot), following the cluster as [`Inner::eval`] does.
    pub(super) async fn call(
        &self,
        script: &Script,
        route: &str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, BusError> {
        self.inner.eval(script, route, keys, args).await
    }

    /// Subscribes every topic's channels in one round: grouped by slot, one SSUBSCRIBE per slot,
    /// all asked at once (fred sends a connection's SSUBSCRIBEs one reply after another; measured
    /// on a loaded node, rounds of about 150 new inboxes over 3 masters took 25 us per inbox, and
    /// sending them pipelined as plain commands was no faster). One result per topic: a topic
    /// fails when any of its slots did, so a dead master fails only the topics with channels on it.
    pub async fn subscribe(&self, topics: &[Vec<String>]) -> Vec<Result<(), BusError>> {
        let _op = self.inner.ops.lock().await;
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.timeout;
        let groups = group_by_slot(topics.iter().flatten().cloned().collect());
        let results = join_all(groups.into_iter().map(|(slot, group)| async move {
            let r = match inner.link_up(|| inner.link_for(slot), Via::Subscriber, deadline).await {
                Ok(link) => bounded(inner.timeout, link.subscriber.ssubscribe(group.clone()))
                    .await
                    .map(|()| link.server.clone())
                    .map_err(unavailable),
                Err(e) => Err(e),
            };
            (slot, group, r)
        }))
        .await;
        let mut failed: HashMap<u16, BusError> = HashMap::new();
        {
            let mut t = lock(&inner.tracked);
            for (slot, group, r) in results {
                match r {
                    Ok(server) => t.add(slot, group, &server),
                    Err(e) => drop(failed.insert(slot, e)),
                }
            }
            m::subscriptions(t.len());
        }
        topics
            .iter()
            .map(
                |channels| match channels.iter().find_map(|c| failed.get(&redis_keyslot(c.as_bytes()))) {
                    Some(e) => Err(e.clone()),
                    None => Ok(()),
                },
            )
            .collect()
    }

    pub async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), BusError> {
        let _op = self.inner.ops.lock().await;
        let groups = group_by_slot(channels);
        let mut work = Vec::new();
        {
            let mut t = lock(&self.inner.tracked);
            for (slot, group) in groups {
                if let Some(owner) = t.remove(slot, &group) {
                    work.push((owner, group));
                }
            }
            m::subscriptions(t.len());
        }
        // Counted before they go, so that the watch never takes them for subscriptions lost.
        let n: usize = work.iter().map(|(_, group)| group.len()).sum();
        self.inner.unsubscribed.fetch_add(n as u64, Ordering::SeqCst);
        // Untracked first: if the owner is unreachable its subscriptions die with the connection.
        let links: Vec<_> = work
            .into_iter()
            .filter_map(|(server, group)| Some((lock(&self.inner.links).get(&server)?.clone(), group)))
            .collect();
        let timeout = self.inner.timeout;
        let results = join_all(
            links
                .iter()
                .map(|(link, group)| bounded(timeout, link.subscriber.sunsubscribe(group.clone()))),
        )
        .await;
        results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map(drop)
            .map_err(unavailable)
    }

    /// Every master linked and answering its probe, and every tracked channel subscribed on its
    /// slot's current master.
    pub fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    /// Whether every master has had a connected link since the node started (see
    /// [`Inner::has_linked`]).
    pub fn has_linked(&self) -> bool {
        self.inner.has_linked()
    }

    /// Stops the bus's own tasks and the commands waiting for a link (none will come up now),
    /// then quits every link.
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        let links: Vec<_> = lock(&self.inner.links).drain().map(|(_, l)| l).collect();
        join_all(links.iter().map(|l| l.quit(self.inner.timeout))).await;
    }

    /// Publishes without history: SPUBLISH on the channel's master, following it once if it moved
    /// (Redis did not run it then). Any other failure is final: it may have gone out.
    async fn publish(&self, channel: String, payload: Bytes) -> Result<(), BusError> {
        let slot = redis_keyslot(channel.as_bytes());
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let mut moved_once = false;
        loop {
            let link = self
                .inner
                .link_up(|| self.inner.link_for(slot), Via::Publisher, deadline)
                .await?;
            let sent = bounded(
                self.inner.timeout,
                link.publisher.spublish::<Value, _, _>(channel.clone(), payload.clone()),
            );
            match sent.await {
                Ok(_) => return Ok(()),
                // The slot moved: learn where, and try once more there.
                Err(e) if !moved_once && e.details().starts_with("MOVED") => {
                    moved_once = true;
                    self.inner.refresh().await;
                    self.inner.wake.notify_one();
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
    }
}

/// `link` if there is one and its `via` connection is connected: where a command can go now.
fn connected(link: Option<Arc<Link>>, via: Via) -> Result<Arc<Link>, BusError> {
    let link = link.ok_or_else(|| unavailable("no master known for the channel's slot"))?;
    if !via.of(&link).is_connected() {
        return Err(unavailable(format!("not connected to {}", link.server)));
    }
    Ok(link)
}

impl Inner {
    /// Waits until the master of `channel`'s slot has its scripts connection up, for as long as
    /// `resend` allows; the reason it is not, after that.
    async fn scripts_up(&self, channel: &str, resend: Resend) -> Result<(), BusError> {
        let slot = redis_keyslot(channel.as_bytes());
        loop {
            let down = match connected(self.link_for(slot), Via::Scripts) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if resend.check().is_err() {
                return Err(down);
            }
            tokio::time::sleep(RESEND_PAUSE).await;
        }
    }

    fn link_for(&self, slot: u16) -> Option<Arc<Link>> {
        let server = read(&self.routes).by_slot[slot as usize].clone()?;
        lock(&self.links).get(&server).cloned()
    }

    /// The link `find` names once its `via` connection is up: at once when it is, else as soon as
    /// a link comes up and it is among them; `unavailable` if it is not by `deadline`. Right after
    /// start every link is still connecting, and a master coming back takes a moment: a command
    /// meeting either waits, within its timeout, rather than failing at once.
    async fn link_up(
        &self,
        find: impl Fn() -> Option<Arc<Link>>,
        via: Via,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Link>, BusError> {
        let up = || find().filter(|link| via.of(link).is_connected());
        if let Some(link) = up() {
            return Ok(link);
        }
        // Listening before looking again, so that news sent in between is not missed.
        let mut news = self.links_up.subscribe();
        loop {
            if let Some(link) = up() {
                return Ok(link);
            }
            tokio::select! {
                // The sender lives in `self`: this never fails while a command runs.
                _ = news.changed() => {}
                // Closing: the links are going, none will come up for this command.
                _ = self.cancel.cancelled() => return Err(unavailable("the bus is closing")),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(match find() {
                        Some(link) => unavailable(format!("not connected to {} in time", link.server)),
                        None => unavailable("no master known for the channel's slot"),
                    });
                }
            }
        }
    }

    /// Wakes the commands waiting for a link ([`Inner::link_up`]): a connection of a link came up,
    /// or the slot map was read again.
    fn links_changed(&self) {
        self.has_linked();
        self.links_up.send_replace(());
    }

    /// Whether every master of a complete slot map has had both its connections up at once since
    /// the node started. Latched: after that a blip (a failover, Redis restarting) does not make a
    /// node look new; `/readyz` reports those.
    fn has_linked(&self) -> bool {
        if self.linked_once.load(Ordering::Relaxed) {
            return true;
        }
        let linked = self
            .every_master(|l| l.publisher.is_connected() && l.scripts.is_connected() && l.subscriber.is_connected());
        if linked && !self.linked_once.swap(true, Ordering::Relaxed) {
            tracing::info!("linked to every Redis master");
        }
        linked
    }

    /// Whether the slot map is complete and every master in it has a link for which `ok` holds.
    fn every_master(&self, ok: impl Fn(&Link) -> bool) -> bool {
        let routes = read(&self.routes);
        if !routes.complete {
            return false;
        }
        let links = lock(&self.links);
        routes.masters.iter().all(|s| links.get(s).is_some_and(|l| ok(l)))
    }

    fn is_ready(&self) -> bool {
        let linked = self.every_master(|l| {
            l.publisher.is_connected()
                && l.scripts.is_connected()
                && l.subscriber.is_connected()
                && l.alive.load(Ordering::Relaxed)
        });
        linked && lock(&self.tracked).settled()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A message to publish; one that is kept gets its id (this bus's prefix and a count).
    fn item(&self, payload: Bytes, store: Store) -> Item {
        let id = store.keeps().then(|| {
            format!(
                "{}:{}",
                self.append_prefix,
                self.appends.fetch_add(1, Ordering::Relaxed)
            )
        });
        Item { payload, store, id }
    }
}
