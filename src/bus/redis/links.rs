//! The connections to one master: a publisher, a connection for scripts, a subscriber (and, with
//! `--publish-replicas`, a connection for `WAIT`), the task that reads the subscriber's messages
//! into the sink, the task that reacts to its reconnects and redirects, the task that tells the bus
//! when a connection is up, and the probe that tells a live link from one that only looks
//! connected.
//!
//! # At most once per command
//! fred writes a command again when its connection broke before the answer came, and it breaks a
//! connection itself whenever any answer on it is `CLUSTERDOWN` (which a healthy master gives to
//! every command with keys while another master's slots have none, during a failover). A plain
//! `SPUBLISH` Redis already ran would go out twice, after later ones. So every connection writes a
//! command once: whether to send it again is the bus's decision, made only where that is safe
//! (see [`super::RedisBus::publish_in_order`]). And the commands with keys (history's and
//! presence's scripts) have a connection of their own, so their `CLUSTERDOWN` never breaks the
//! connection plain publishes are on.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    prelude::{Builder, Config, ReconnectPolicy, Server, ServerConfig, Value},
    types::{CustomCommand, RespVersion},
};
use futures_util::future::join_all;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{bounded, bytes_of, confirm::Confirm, lock, unavailable, Inner, Via};
use crate::{bus::BusError, metrics as m};

/// A link whose subscriber heard nothing for this long is probed.
const PROBE_WHEN_QUIET: Duration = Duration::from_secs(1);
/// Messages fred may buffer for a link's reader before it reports them lagged (and lost). fred
/// sizes every one of a client's event channels by this and allocates them up front, so only the
/// subscribing client gets a large one.
const MESSAGE_BUFFER: usize = 8192;
const EVENT_BUFFER: usize = 64;
/// How often a connection fred has announced is looked at until it takes commands: fred announces
/// a (re)connection a moment before it marks it connected.
const UP_POLL: Duration = Duration::from_millis(5);

/// The connections to one master.
pub(super) struct Link {
    pub(super) server: Server,
    /// `SPUBLISH`, the probe, `CLUSTER SLOTS`: commands without keys.
    pub(super) publisher: Client,
    /// Scripts (`EVALSHA`, `SCRIPT LOAD`): commands with keys, which fail with `CLUSTERDOWN` while
    /// some slot has no master.
    pub(super) scripts: Client,
    pub(super) subscriber: Client,
    /// The probe channel (a slot of this master).
    pub(super) probe: Mutex<Option<String>>,
    /// When the probe out was sent (milliseconds since the bus started, at least 1); 0 when none
    /// is out.
    probe_sent_ms: AtomicU64,
    /// The last probe came back (or none was needed yet).
    pub(super) alive: AtomicBool,
    /// Milliseconds since the bus started when the subscriber last received anything.
    heard_ms: AtomicU64,
    /// With `--publish-replicas`: confirmations on a connection of their own.
    pub(super) confirm: Option<(Client, Arc<Confirm>)>,
    stop: CancellationToken,
}

impl Link {
    /// Connects to `server` (retrying in the background while it is down) and starts the link's
    /// reader and watcher.
    pub(super) fn start(bus: &Arc<Inner>, server: Server) -> Result<Arc<Link>, BusError> {
        let publisher = build(&server, false, bus.timeout, true)?;
        let scripts = build(&server, false, bus.timeout, true)?;
        let subscriber = build(&server, true, bus.timeout, true)?;
        let stop = bus.cancel.child_token();
        let confirm = if bus.replicas > 0 {
            // Its commands wait up to a WAIT's timeout: give them longer.
            let client = build(&server, false, bus.timeout * 2, true)?;
            client.connect();
            let confirm = Confirm::start(client.clone(), bus.replicas, bus.timeout, stop.clone());
            Some((client, confirm))
        } else {
            None
        };
        let link = Arc::new(Link {
            server,
            publisher,
            scripts,
            subscriber,
            probe: Mutex::new(None),
            probe_sent_ms: AtomicU64::new(0),
            alive: AtomicBool::new(true),
            heard_ms: AtomicU64::new(bus.now_ms()),
            confirm,
            stop,
        });
        // Listen before connecting so the first events are not missed (fred announces the first
        // connection as it does every later one).
        let messages = link.subscriber.message_rx();
        let reconnects = link.subscriber.reconnect_rx();
        let moves = link.publisher.error_rx();
        let up = (
            link.publisher.reconnect_rx(),
            link.scripts.reconnect_rx(),
            link.subscriber.reconnect_rx(),
        );
        let script_errors = link.scripts.error_rx();
        link.publisher.connect();
        link.scripts.connect();
        link.subscriber.connect();
        bus.tracker.spawn(read_messages(bus.clone(), link.clone(), messages));
        bus.tracker
            .spawn(watch_link(bus.clone(), link.clone(), reconnects, moves, script_errors));
        bus.tracker.spawn(announce_up(bus.clone(), link.clone(), up));
        Ok(link)
    }

    /// Stops the link's tasks and closes both connections, each within `timeout`.
    pub(super) async fn quit(&self, timeout: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(timeout, self.subscriber.quit()).await;
        let _ = tokio::time::timeout(timeout, self.publisher.quit()).await;
        let _ = tokio::time::timeout(timeout, self.scripts.quit()).await;
        if let Some((client, _)) = &self.confirm {
            let _ = tokio::time::timeout(timeout, client.quit()).await;
        }
    }
}

/// A centralized client to one server; a subscriber speaks RESP3 (so its connection also answers
/// commands) and gets the large message buffer.
pub(super) fn build(server: &Server, subscriber: bool, timeout: Duration, retry: bool) -> Result<Client, BusError> {
    let mut config = Config {
        server: ServerConfig::Centralized { server: server.clone() },
        // A master down when the node starts is not fatal: keep retrying with the reconnect policy.
        fail_fast: !retry,
        ..Config::default()
    };
    if subscriber {
        config.version = RespVersion::RESP3;
    }
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
            p.broadcast_channel_capacity = if subscriber { MESSAGE_BUFFER } else { EVENT_BUFFER };
        })
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
            // Written once, never again by fred (see the module's docs).
            c.max_command_attempts = 1;
        });
    if retry {
        // Capped, jittered exponential backoff, forever.
        builder.set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    }
    builder.build().map_err(unavailable)
}

/// Hands every message of the link's subscriber to the sink; a probe coming back marks the link
/// alive instead.
async fn read_messages(
    bus: Arc<Inner>,
    link: Arc<Link>,
    mut rx: tokio::sync::broadcast::Receiver<fred::types::Message>,
) {
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            _ = link.stop.cancelled() => return,
        };
        link.heard_ms.store(bus.now_ms(), Ordering::Relaxed);
        match msg {
            Ok(msg) => {
                if msg.channel.starts_with(bus.probe_prefix.as_str()) {
                    link.probe_sent_ms.store(0, Ordering::Relaxed);
                    link.alive.store(true, Ordering::Relaxed);
                    continue;
                }
                let payload = match msg.value {
                    Value::Bytes(b) => b,
                    Value::String(s) => s.into_inner(),
                    _ => {
                        m::bus_dropped("undecodable", 1);
                        continue;
                    }
                };
                bus.sink.receive(msg.channel.into_inner(), payload);
            }
            // fred's buffer overflowed: these messages are lost; keep reading.
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(server = %link.server, lost = n, "Redis message reader lagged");
                m::bus_dropped("lagged", n);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// A connection's errors, as fred broadcasts them.
type Errors = tokio::sync::broadcast::Receiver<(fred::error::Error, Option<Server>)>;

/// Marks a link's slots for resubscription when its subscriber reconnects, and wakes the
/// reconciler when its publisher or scripts connection meets an error (the topology may have
/// changed).
async fn watch_link(
    bus: Arc<Inner>,
    link: Arc<Link>,
    mut reconnects: tokio::sync::broadcast::Receiver<Server>,
    mut errors: Errors,
    mut script_errors: Errors,
) {
    loop {
        tokio::select! {
            r = reconnects.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    m::bus_reconnect();
                    tracing::info!(server = %link.server, "Redis connection rebuilt; resubscribing its slots");
                    lock(&bus.tracked).mark_stale(&link.server);
                    // Its probe subscription died with the connection too.
                    *lock(&link.probe) = None;
                    bus.wake.notify_one();
                }
                Err(RecvError::Closed) => return,
            },
            e = errors.recv() => match e {
                Ok(_) | Err(RecvError::Lagged(_)) => bus.wake.notify_one(),
                Err(RecvError::Closed) => return,
            },
            e = script_errors.recv() => match e {
                Ok(_) | Err(RecvError::Lagged(_)) => bus.wake.notify_one(),
                Err(RecvError::Closed) => return,
            },
            _ = link.stop.cancelled() => return,
        }
    }
}

/// Tells the bus each time one of the link's connections is up, so that commands waiting for the
/// link go on at once ([`Inner::link_up`]). A connection fred announced is looked at every
/// [`UP_POLL`] until it takes commands, for at most the command timeout (a connection that fails
/// again meanwhile is announced again when it is rebuilt).
async fn announce_up(
    bus: Arc<Inner>,
    link: Arc<Link>,
    (mut publisher, mut scripts, mut subscriber): (
        tokio::sync::broadcast::Receiver<Server>,
        tokio::sync::broadcast::Receiver<Server>,
        tokio::sync::broadcast::Receiver<Server>,
    ),
) {
    loop {
        let via = tokio::select! {
            r = publisher.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => Via::Publisher,
                Err(RecvError::Closed) => return,
            },
            r = scripts.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => Via::Scripts,
                Err(RecvError::Closed) => return,
            },
            r = subscriber.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => Via::Subscriber,
                Err(RecvError::Closed) => return,
            },
            _ = link.stop.cancelled() => return,
        };
        let until = tokio::time::Instant::now() + bus.timeout;
        while !via.of(&link).is_connected() && tokio::time::Instant::now() < until {
            tokio::select! {
                _ = tokio::time::sleep(UP_POLL) => {}
                _ = link.stop.cancelled() => return,
            }
        }
        bus.links_changed();
    }
}

/// Publishes a probe on every link whose subscriber has been quiet; a link whose probe did not
/// come back within the command timeout, nothing else heard meanwhile, is rebuilt.
pub(super) async fn probe(bus: &Arc<Inner>) {
    let links: Vec<Arc<Link>> = lock(&bus.links).values().cloned().collect();
    let now = bus.now_ms();
    for link in links {
        if !link.subscriber.is_connected() {
            continue;
        }
        let Some(channel) = lock(&link.probe).clone() else {
            continue;
        };
        let heard = link.heard_ms.load(Ordering::Relaxed);
        let sent = link.probe_sent_ms.load(Ordering::Relaxed);
        match verdict(now, heard, sent, bus.timeout) {
            Probe::None | Probe::Out => continue,
            Probe::Lost => {
                tracing::warn!(server = %link.server, "pub/sub probe lost; rebuilding the connection");
                link.probe_sent_ms.store(0, Ordering::Relaxed);
                link.alive.store(false, Ordering::Relaxed);
                let subscriber = link.subscriber.clone();
                bus.tracker.spawn(async move { subscriber.force_reconnection().await });
                link.heard_ms.store(now, Ordering::Relaxed);
            }
            Probe::Send => {
                link.probe_sent_ms.store(now.max(1), Ordering::Relaxed);
                let sent = bounded(
                    bus.timeout,
                    link.publisher
                        .spublish::<Value, _, _>(channel, Bytes::from_static(b"probe")),
                );
                if sent.await.is_err() {
                    link.alive.store(false, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What a link's probe calls for.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// The subscriber heard something within [`PROBE_WHEN_QUIET`]: it is alive.
    None,
    /// A probe is out, sent less than the command timeout ago: wait for it.
    Out,
    /// A probe went out at least the command timeout ago and nothing came back since.
    Lost,
    /// Quiet, and no probe out (or something was heard since the last): send one.
    Send,
}

/// The verdict on a link at `now`, its subscriber last heard at `heard` and its probe sent at
/// `sent` (0: none), in milliseconds. Judged by the time the probe has been out, not by how many
/// rounds of the reconciler passed: rounds come early when something wakes the reconciler (a
/// thousand sockets leaving at once), and a probe judged at the next round was judged after a few
/// milliseconds, on a node too busy to have read it yet; the link was rebuilt for nothing, and a
/// plain room lost what was published meanwhile.
fn verdict(now: u64, heard: u64, sent: u64, timeout: Duration) -> Probe {
    let out = sent != 0 && heard < sent;
    if out {
        return if now.saturating_sub(sent) >= timeout.as_millis() as u64 {
            Probe::Lost
        } else {
            Probe::Out
        };
    }
    if now.saturating_sub(heard) < PROBE_WHEN_QUIET.as_millis() as u64 {
        Probe::None
    } else {
        Probe::Send
    }
}

/// How often each link's subscriber is asked how many channels it is subscribed to.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// The longest the watch waits before waking the reconciler again for a link still short of
/// subscriptions (it waits the watch's period, then twice as long each time, up to this).
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long the watch waits for a subscriber's count: a master that takes longer is skipped this
/// round (a frozen one is the probe's to find), and the others are not held up.
const WATCH_ANSWER_WITHIN: Duration = Duration::from_millis(250);

/// Notices that a master dropped subscriptions the node holds on it (Redis drops a slot's
/// subscriptions when the slot moves away, and fred drops the push that says so), within
/// [`WATCH_EVERY`] and a round trip: every link holding tracked channels is asked `CLIENT INFO`
/// on its subscriber, and one whose `ssub` is below what the node subscribed there sends the
/// reconciler to its master at once. Cheap: a command per master every 20 ms, and none for a
/// master the node holds nothing on.
pub(super) async fn watch(bus: Arc<Inner>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per master still short: when the reconciler may be woken for it again, and the wait after.
    let mut short: HashMap<Server, (tokio::time::Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = bus.cancel.cancelled() => return,
        }
        let links: Vec<Arc<Link>> = lock(&bus.links).values().cloned().collect();
        let checks = links.into_iter().map(|link| {
            let bus = bus.clone();
            async move {
                let lost = lost(&bus, &link).await;
                (link.server.clone(), lost)
            }
        });
        let now = tokio::time::Instant::now();
        for (server, lost) in join_all(checks).await {
            let Some(lost) = lost.filter(|n| *n > 0) else {
                short.remove(&server);
                continue;
            };
            let (next, wait) = short.entry(server.clone()).or_insert((now, WATCH_EVERY));
            if now < *next {
                continue;
            }
            if *wait == WATCH_EVERY {
                tracing::info!(%server, lost, "a master dropped subscriptions; resubscribing");
            }
            *next = now + *wait;
            *wait = (*wait * 2).min(WATCH_BACKOFF_MAX);
            *lock(&bus.suspect) = Some(server);
            bus.wake.notify_one();
        }
    }
}

/// How many of the channels the node subscribed on `link` Redis no longer has there; `None` when
/// it holds none there or the link cannot say now.
async fn lost(bus: &Inner, link: &Link) -> Option<u64> {
    if !link.subscriber.is_connected() {
        return None;
    }
    // Unsubscriptions under way when Redis counts would look like losses: allow for them.
    let unsubscribed = bus.unsubscribed.load(Ordering::SeqCst);
    let held = u64::from(lock(&bus.tracked).count_on(&link.server));
    if held == 0 {
        return None;
    }
    let probe = u64::from(lock(&link.probe).is_some());
    let info = bounded(
        WATCH_ANSWER_WITHIN,
        link.subscriber
            .custom::<Value, _>(CustomCommand::new_static("CLIENT", None::<u16>, false), vec!["INFO"]),
    )
    .await
    .ok()?;
    let during = bus.unsubscribed.load(Ordering::SeqCst) - unsubscribed;
    let subscribed: u64 = std::str::from_utf8(&bytes_of(info)?)
        .ok()?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ssub="))?
        .parse()
        .ok()?;
    Some((held + probe).saturating_sub(subscribed + during))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[test]
    fn a_probe_is_judged_by_how_long_it_has_been_out_not_by_the_rounds_that_passed() {
        // Heard at 0 ms: alive for a second, then quiet, and a probe goes out.
        assert_eq!(verdict(500, 0, 0, TIMEOUT), Probe::None);
        assert_eq!(verdict(1_000, 0, 0, TIMEOUT), Probe::Send);
        // Sent at 1,000 ms: a round woken 5 ms later, or 1.9 s later, waits for it.
        assert_eq!(verdict(1_005, 0, 1_000, TIMEOUT), Probe::Out);
        assert_eq!(verdict(2_900, 0, 1_000, TIMEOUT), Probe::Out);
        // The command timeout passed with nothing heard: lost.
        assert_eq!(verdict(3_000, 0, 1_000, TIMEOUT), Probe::Lost);
        // Anything heard since it was sent (the probe or a message) answers it; quiet again, a
        // new probe goes out.
        assert_eq!(verdict(1_200, 1_100, 1_000, TIMEOUT), Probe::None);
        assert_eq!(verdict(2_100, 1_100, 1_000, TIMEOUT), Probe::Send);
    }
}
