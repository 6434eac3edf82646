//! The Redis Cluster bus: sharded pub/sub only (SPUBLISH, SSUBSCRIBE, SUNSUBSCRIBE).
//!
//! # One link per master
//! The node keeps one `Link` per cluster master: a publishing and a subscribing connection (two
//! fred clients in centralized mode), so its Redis connections are bounded by the number of masters,
//! whatever the number of rooms or shards. The bus routes each channel to its slot's master itself,
//! from `CLUSTER SLOTS` read through any live link.
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
//! every second (and at once after any reconnect or MOVED) and subscribes again wherever a slot's
//! master changed or its connection was rebuilt. Every subscription change goes through one async
//! lock, so a resubscription never races an unsubscription of the same channel.
//!
//! # Liveness
//! A connection can look healthy and deliver nothing. Each link publishes a probe on a channel of
//! its own master whenever its subscriber has been quiet for a second and expects it back within
//! the command timeout; a link that misses it is rebuilt and `/readyz` reports 503 until it is back.

mod confirm;
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
    interfaces::{ClientLike, ClusterInterface, EventInterface, LuaInterface, PubsubInterface},
    prelude::{Builder, Config, ReconnectPolicy, Server, ServerConfig, Value},
    types::{CustomCommand, RespVersion},
    util::redis_keyslot,
};
use futures_util::future::join_all;
use tokio::sync::{broadcast::error::RecvError, Notify};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    in_turn, millis,
    stream::{meta_key, parse_entry_id, stream_key, Entry, Keep, Pos, Slice},
    BusError, Sink,
};
use crate::metrics as m;
use confirm::Confirm;
use tracked::{Tracked, SLOTS};

/// How often the reconciler re-reads the cluster topology; faster while something is broken, so
/// a promoted replica is picked up soon after the cluster elects it.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
const RECONCILE_WHILE_DOWN: Duration = Duration::from_millis(200);
/// A link whose subscriber heard nothing for this long is probed.
const PROBE_WHEN_QUIET: Duration = Duration::from_secs(1);
/// Messages fred may buffer for a link's reader before it reports them lagged (and lost). fred
/// sizes every one of a client's event channels by this and allocates them up front, so only the
/// subscribing client gets a large one.
const MESSAGE_BUFFER: usize = 8192;
const EVENT_BUFFER: usize = 64;

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
    started: Instant,
    links: Mutex<HashMap<Server, Arc<Link>>>,
    routes: RwLock<Routes>,
    /// Serializes subscribe, unsubscribe and resubscribe.
    ops: tokio::sync::Mutex<()>,
    tracked: Mutex<Tracked>,
    wake: Notify,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// The connections to one master.
struct Link {
    server: Server,
    publisher: Client,
    subscriber: Client,
    /// The probe channel (a slot of this master).
    probe: Mutex<Option<String>>,
    /// A probe was sent and has not come back yet.
    probing: AtomicBool,
    /// The last probe came back (or none was needed yet).
    alive: AtomicBool,
    /// Milliseconds since the bus started when the subscriber last received anything.
    heard_ms: AtomicU64,
    /// With `--publish-replicas`: confirmations on a connection of their own.
    confirm: Option<(Client, Arc<Confirm>)>,
    stop: CancellationToken,
}

/// The master of every slot, as last read from the cluster.
#[derive(Debug, PartialEq)]
struct Routes {
    by_slot: Vec<Option<Server>>,
    /// The servers that own slots, each once: what readiness checks, without walking every slot
    /// (`is_ready` runs on every upgrade).
    masters: Vec<Server>,
    /// Every slot has a master.
    complete: bool,
}

impl Routes {
    fn unknown() -> Routes {
        Routes {
            by_slot: vec![None; SLOTS],
            masters: Vec::new(),
            complete: false,
        }
    }
}

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

/// Parses `CLUSTER SLOTS` into the master of every slot.
fn parse_slots(value: Value) -> Option<Routes> {
    let Value::Array(ranges) = value else { return None };
    let mut by_slot = vec![None; SLOTS];
    let mut masters = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else { return None };
        let (start, end) = (fields.first()?.as_i64()?, fields.get(1)?.as_i64()?);
        let Value::Array(master) = fields.get(2)? else {
            return None;
        };
        let host = master.first()?.as_string()?;
        let port = u16::try_from(master.get(1)?.as_i64()?).ok()?;
        let server = Server::new(host, port);
        for slot in start.max(0)..=end.min(SLOTS as i64 - 1) {
            by_slot[slot as usize] = Some(server.clone());
        }
        if !masters.contains(&server) {
            masters.push(server);
        }
    }
    // A later range may have taken every slot of an earlier one's master.
    masters.retain(|m| by_slot.contains(&Some(m.clone())));
    let complete = by_slot.iter().all(Option::is_some);
    Some(Routes {
        by_slot,
        masters,
        complete,
    })
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
        let inner = Arc::new(Inner {
            seeds,
            timeout,
            replicas,
            sink,
            probe_prefix: format!("shardcast:probe:{node_id}:{:08x}:", rand::random::<u32>()),
            started: Instant::now(),
            links: Mutex::new(HashMap::new()),
            routes: RwLock::new(Routes::unknown()),
            ops: tokio::sync::Mutex::new(()),
            tracked: Mutex::new(Tracked::default()),
            wake: Notify::new(),
            tracker: tracker.clone(),
            cancel,
        });
        if tokio::time::timeout(timeout, inner.refresh())
            .await
            .map_or(true, |ok| !ok)
        {
            tracing::warn!(?urls, "Redis Cluster not reachable yet; retrying in the background");
        }
        tracker.spawn(reconcile(inner.clone()));
        let bus = RedisBus { inner };
        m::bus_up(bus.is_ready());
        Ok(bus)
    }

    async fn publish(&self, channel: String, payload: Bytes) -> Result<(), BusError> {
        let slot = redis_keyslot(channel.as_bytes());
        let mut moved_once = false;
        loop {
            let link = self
                .inner
                .link_for(slot)
                .ok_or_else(|| unavailable("no master known for the channel's slot"))?;
            if !link.publisher.is_connected() {
                return Err(unavailable(format!("not connected to {}", link.server)));
            }
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

    /// Subscribes every topic's channels in one round: grouped by slot, one SSUBSCRIBE per slot,
    /// all asked at once (fred sends a connection's SSUBSCRIBEs one reply after another; measured
    /// on a loaded node, rounds of about 150 new inboxes over 3 masters took 25 us per inbox, and
    /// sending them pipelined as plain commands was no faster). One result per topic: a topic
    /// fails when any of its slots did, so a dead master fails only the topics with channels on it.
    pub async fn subscribe(&self, topics: &[Vec<String>]) -> Vec<Result<(), BusError>> {
        let _op = self.inner.ops.lock().await;
        let mut failed: HashMap<u16, BusError> = HashMap::new();
        let mut work = Vec::new();
        for (slot, group) in group_by_slot(topics.iter().flatten().cloned().collect()) {
            match self.inner.link_for(slot) {
                Some(link) => work.push((slot, group, link)),
                None => drop(failed.insert(slot, unavailable("no master known for a channel's slot"))),
            }
        }
        let timeout = self.inner.timeout;
        let results = join_all(work.into_iter().map(|(slot, group, link)| async move {
            let r = bounded(timeout, link.subscriber.ssubscribe(group.clone())).await;
            (slot, group, link.server.clone(), r)
        }))
        .await;
        {
            let mut t = lock(&self.inner.tracked);
            for (slot, group, server, r) in results {
                match r {
                    Ok(()) => t.add(slot, group, &server),
                    Err(e) => drop(failed.insert(slot, unavailable(e))),
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

    pub async fn close(&self) {
        let links: Vec<_> = lock(&self.inner.links).drain().map(|(_, l)| l).collect();
        join_all(links.iter().map(|l| l.quit(self.inner.timeout))).await;
    }
}

/// Appends a message to its channel's stream and publishes it with its position, in one step on
/// the channel's master: nothing is in history without being published, nor published without a
/// position. KEYS: stream, meta, channel. ARGV: envelope, size, ttl in milliseconds. The position
/// is spliced into the envelope as a ninth field (`cmsgpack` packs it as a str), never re-packed.
const APPEND: &str = r#"
local env = ARGV[1]
if string.byte(env, 1) ~= 0x98 then
  return redis.error_reply('ERR the envelope must be a MessagePack array of 8')
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'n', n, 'e', env)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local pos = epoch .. ':' .. n .. ':' .. id
redis.call('SPUBLISH', KEYS[3], string.char(0x99) .. string.sub(env, 2) .. cmsgpack.pack(pos))
return pos
"#;

/// Reads where a channel's history stands and its newest messages after a number, at most a cap
/// of them but at least the newest (for the head's entry id), newest first; makes the epoch when
/// there is none. KEYS: stream, meta. ARGV: after, cap, ttl in milliseconds. Returns epoch, n,
/// entries.
const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'n', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local n = tonumber(redis.call('HGET', KEYS[2], 'n') or '0')
local k = math.min(math.max(n - tonumber(ARGV[1]), 0), tonumber(ARGV[2]))
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', math.max(k, 1))
return {epoch, n, entries}
"#;

/// A Lua script called by its SHA, loaded on a master when it answers NOSCRIPT (a new master, a
/// restart, a failover).
pub(super) struct Script {
    source: &'static str,
    sha: std::sync::OnceLock<String>,
}

impl Script {
    pub(super) const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: std::sync::OnceLock::new(),
        }
    }
}

static APPEND_SCRIPT: Script = Script::new(APPEND);
static READ_SCRIPT: Script = Script::new(READ);

/// How a failed script call goes on.
enum Retry {
    /// Load the script on the link and call again.
    Load,
    /// The slot moved for good: learn the new map and call again.
    Moved,
    /// The slot is moving: call once on this master, after ASKING.
    Ask(Server),
    /// The slot is moving and the call's keys are split between the two masters for a moment
    /// (`TRYAGAIN`): call again shortly, from the slot's owner.
    Again,
}

/// The pause before a call that met `TRYAGAIN` is made again.
const TRY_AGAIN_PAUSE: Duration = Duration::from_millis(10);

fn retry_for(e: &fred::error::Error) -> Option<Retry> {
    let details = e.details();
    if details.starts_with("NOSCRIPT") {
        return Some(Retry::Load);
    }
    if details.starts_with("MOVED") {
        return Some(Retry::Moved);
    }
    if details.starts_with("TRYAGAIN") {
        return Some(Retry::Again);
    }
    // ASK <slot> <host>:<port>
    let target = details.strip_prefix("ASK ")?.split_whitespace().nth(1)?;
    let (host, port) = target.rsplit_once(':')?;
    Some(Retry::Ask(Server::new(host, port.parse::<u16>().ok()?)))
}

pub(super) fn bytes_of(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

/// The READ script's answer as a slice, oldest message first.
fn parse_read(v: Value) -> Option<Slice> {
    let Value::Array(mut parts) = v else { return None };
    if parts.len() != 3 {
        return None;
    }
    let entries = match parts.pop()? {
        Value::Array(entries) => entries,
        Value::Null => Vec::new(),
        _ => return None,
    };
    let n = parts.pop()?.as_u64()?;
    let epoch = std::str::from_utf8(&bytes_of(parts.pop()?)?).ok()?.parse().ok()?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries.into_iter().rev() {
        let Value::Array(mut entry) = entry else { return None };
        let Value::Array(fields) = entry.pop()? else {
            return None;
        };
        let id = parse_entry_id(std::str::from_utf8(&bytes_of(entry.pop()?)?).ok()?).ok()?;
        let (mut number, mut envelope) = (None, None);
        let mut fields = fields.into_iter();
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            match &*bytes_of(k)? {
                b"n" => number = std::str::from_utf8(&bytes_of(v)?).ok()?.parse::<u64>().ok(),
                b"e" => envelope = bytes_of(v),
                _ => {}
            }
        }
        out.push(Entry {
            n: number?,
            id,
            envelope: envelope?,
        });
    }
    // The head's entry id, when the newest entry is the head's message (a stream deleted and
    // begun again under the same count has other numbers).
    let id = out.last().filter(|e| e.n == n).map(|e| e.id);
    Some(Slice {
        head: Pos { epoch, n, id },
        entries: out,
    })
}

impl RedisBus {
    /// Appends to the channel's history and publishes, in one step on its master.
    async fn append(&self, channel: String, payload: Bytes, keep: Keep) -> Result<Pos, BusError> {
        let (keys, args) = append_call(&channel, payload, keep);
        let pos = appended(self.inner.eval(&APPEND_SCRIPT, &channel, keys, args).await?)?;
        if self.inner.replicas == 0 {
            return Ok(pos);
        }
        let confirm = self
            .inner
            .link_for(redis_keyslot(channel.as_bytes()))
            .and_then(|link| link.confirm.as_ref().map(|(_, c)| c.clone()));
        match confirm {
            Some(confirm) if confirm.confirm(meta_key(&channel), millis(keep.ttl)).await => Ok(pos),
            _ => Err(BusError::Unconfirmed(pos)),
        }
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

    /// Publishes several messages to one channel in order, in one round trip: one pipeline of
    /// SPUBLISH (or the append script, for history) on the channel's master. Where an answer is an
    /// error (the slot moved or is moving, the script is not loaded), that message and every one
    /// after it are published again one at a time, each only once the one before it succeeded, and
    /// all after the first that still fails fail too: within the batch, a later message never goes
    /// out while an earlier one of the same channel was lost.
    pub async fn publish_in_order(
        &self,
        channel: &str,
        items: Vec<(Bytes, Option<Keep>)>,
    ) -> Vec<Result<Option<Pos>, BusError>> {
        let pipelined = match self.pipelined(channel, &items).await {
            Ok(results) => results,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter();
        for result in pipelined {
            let (payload, keep) = items.next().expect("one answer per message");
            match result {
                Some(answer) => out.push(answer),
                None => {
                    // The first message the pipeline could not publish: this one and the rest, in turn.
                    let rest = std::iter::once((payload, keep)).chain(items.by_ref());
                    out.extend(in_turn(rest, |payload, keep| self.send(channel.to_string(), payload, keep)).await);
                    break;
                }
            }
        }
        out
    }

    /// Publishes one message, appending to the channel's history first when it keeps one.
    pub async fn send(&self, channel: String, payload: Bytes, keep: Option<Keep>) -> Result<Option<Pos>, BusError> {
        match keep {
            None => self.publish(channel, payload).await.map(|()| None),
            Some(keep) => self.append(channel, payload, keep).await.map(Some),
        }
    }

    /// The pipeline of [`RedisBus::publish_in_order`]: per message its answer, or `None` from the
    /// first one Redis refused on (to be published again in turn). With `--publish-replicas` every
    /// append waits for its confirmation, so messages go one at a time instead.
    async fn pipelined(
        &self,
        channel: &str,
        items: &[(Bytes, Option<Keep>)],
    ) -> Result<Vec<Option<Result<Option<Pos>, BusError>>>, BusError> {
        let history = items.iter().any(|(_, keep)| keep.is_some());
        let sha = APPEND_SCRIPT.sha.get().cloned();
        if items.len() == 1 || (history && (self.inner.replicas > 0 || sha.is_none())) {
            return Ok(items.iter().map(|_| None).collect());
        }
        let link = self
            .inner
            .link_for(redis_keyslot(channel.as_bytes()))
            .ok_or_else(|| unavailable("no master known for the channel's slot"))?;
        if !link.publisher.is_connected() {
            return Err(unavailable(format!("not connected to {}", link.server)));
        }
        let pipeline = link.publisher.pipeline();
        for (payload, keep) in items {
            let queued: Result<(), _> = match (keep, &sha) {
                (Some(keep), Some(sha)) => {
                    let (keys, args) = append_call(channel, payload.clone(), *keep);
                    pipeline
                        .custom(
                            CustomCommand::new_static("EVALSHA", None::<u16>, false),
                            evalsha(sha, keys, args),
                        )
                        .await
                }
                _ => pipeline.spublish(channel.to_string(), payload.clone()).await,
            };
            queued.map_err(unavailable)?;
        }
        let answers: Vec<Result<Value, fred::error::Error>> =
            match tokio::time::timeout(self.inner.timeout, pipeline.try_all::<Value>()).await {
                Ok(answers) => answers,
                Err(_) => return Err(unavailable("no answer from Redis in time")),
            };
        let mut out = Vec::with_capacity(items.len());
        let mut refused = false;
        for ((_, keep), answer) in items.iter().zip(answers) {
            refused |= answer.is_err();
            out.push((!refused).then(|| match (keep, answer) {
                (None, _) => Ok(None),
                (Some(_), Ok(v)) => appended(v).map(Some),
                (Some(_), Err(e)) => Err(unavailable(e)),
            }));
        }
        Ok(out)
    }

    /// Reads the channel's history (see [`crate::bus::Bus::read`]).
    pub async fn read(&self, channel: &str, after: u64, cap: usize, keep: Keep) -> Result<Slice, BusError> {
        let keys = vec![stream_key(channel), meta_key(channel)];
        let args = vec![
            Value::Integer(after.min(i64::MAX as u64) as i64),
            Value::Integer(cap.min(i64::MAX as usize) as i64),
            Value::Integer(millis(keep.ttl)),
        ];
        let v = self.inner.eval(&READ_SCRIPT, channel, keys, args).await?;
        parse_read(v).ok_or_else(|| unavailable("the read script answered something else than a slice"))
    }
}

impl Inner {
    /// Calls a script on the master of `channel`'s slot, loading it where it is missing and
    /// following the cluster where the slot moved (MOVED) or is moving (ASK), once each; while a
    /// moving slot's keys are split (TRYAGAIN), again every few milliseconds for at most the
    /// call's timeout.
    async fn eval(
        self: &Arc<Self>,
        script: &Script,
        channel: &str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, BusError> {
        let slot = redis_keyslot(channel.as_bytes());
        let (mut loaded, mut moved, mut asked) = (false, false, None::<Server>);
        let until = tokio::time::Instant::now() + self.timeout;
        loop {
            let link = match &asked {
                Some(server) => lock(&self.links).get(server).cloned(),
                None => self.link_for(slot),
            }
            .ok_or_else(|| unavailable("no master known for the channel's slot"))?;
            if !link.publisher.is_connected() {
                return Err(unavailable(format!("not connected to {}", link.server)));
            }
            let sha = match script.sha.get() {
                Some(sha) => sha.clone(),
                None => self.load(&link, script).await?,
            };
            let called = if asked.is_some() {
                bounded(self.timeout, asking(&link.publisher, &sha, keys.clone(), args.clone())).await
            } else {
                bounded(
                    self.timeout,
                    link.publisher
                        .evalsha::<Value, _, _, _>(sha, keys.clone(), args.clone()),
                )
                .await
            };
            let e = match called {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            match retry_for(&e) {
                Some(Retry::Load) if !loaded => {
                    loaded = true;
                    self.load(&link, script).await?;
                }
                Some(Retry::Moved) if !moved => {
                    moved = true;
                    asked = None;
                    self.refresh().await;
                    self.wake.notify_one();
                }
                Some(Retry::Ask(server)) if asked.is_none() => asked = Some(server),
                Some(Retry::Again) if tokio::time::Instant::now() + TRY_AGAIN_PAUSE < until => {
                    // From the owner again: it asks again while the slot is still moving.
                    asked = None;
                    tokio::time::sleep(TRY_AGAIN_PAUSE).await;
                }
                _ => return Err(unavailable(e)),
            }
        }
    }

    /// Loads a script on one master; its SHA is the same everywhere.
    async fn load(&self, link: &Link, script: &Script) -> Result<String, BusError> {
        let sha: String = bounded(self.timeout, link.publisher.script_load(script.source))
            .await
            .map_err(unavailable)?;
        Ok(script.sha.get_or_init(|| sha).clone())
    }

    fn link_for(&self, slot: u16) -> Option<Arc<Link>> {
        let server = read(&self.routes).by_slot[slot as usize].clone()?;
        lock(&self.links).get(&server).cloned()
    }

    fn is_ready(&self) -> bool {
        let routes = read(&self.routes);
        if !routes.complete {
            return false;
        }
        let links = lock(&self.links);
        let linked = routes.masters.iter().all(|s| {
            links.get(s).is_some_and(|l| {
                l.publisher.is_connected() && l.subscriber.is_connected() && l.alive.load(Ordering::Relaxed)
            })
        });
        linked && lock(&self.tracked).settled()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Reads the slot map, links every master in it and lets go of the others, and gives each
    /// link a probe channel on its own master. True when the topology was read.
    async fn refresh(self: &Arc<Self>) -> bool {
        let Some(routes) = self.read_routes().await else {
            return false;
        };
        self.relink(&routes.masters);
        self.place_probes(&routes).await;
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
        true
    }

    /// `CLUSTER SLOTS` through any answering link, else through a seed.
    async fn read_routes(&self) -> Option<Routes> {
        let candidates: Vec<Arc<Link>> = lock(&self.links).values().cloned().collect();
        for link in candidates.iter().filter(|l| l.publisher.is_connected()) {
            let read = tokio::time::timeout(self.timeout, link.publisher.cluster_slots::<Value>()).await;
            if let Some(routes) = read.ok().and_then(Result::ok).and_then(parse_slots) {
                return Some(routes);
            }
        }
        for seed in &self.seeds {
            let Ok(client) = build(seed, false, self.timeout, false) else {
                continue;
            };
            client.connect();
            let read = tokio::time::timeout(self.timeout, async {
                client.wait_for_connect().await.ok()?;
                client.cluster_slots::<Value>().await.ok()
            })
            .await;
            let _ = client.quit().await;
            if let Some(routes) = read.ok().flatten().and_then(parse_slots) {
                return Some(routes);
            }
        }
        None
    }

    /// Links every master not linked yet; a server that is no longer a master (failed, or demoted
    /// to replica) is let go.
    fn relink(self: &Arc<Self>, masters: &[Server]) {
        let mut links = lock(&self.links);
        for server in masters {
            if !links.contains_key(server) {
                match Link::start(self, server.clone()) {
                    Ok(link) => drop(links.insert(server.clone(), link)),
                    Err(e) => tracing::warn!(%server, error = %e, "cannot link a master"),
                }
            }
        }
        let gone: Vec<Server> = links.keys().filter(|s| !masters.contains(*s)).cloned().collect();
        for server in gone {
            if let Some(link) = links.remove(&server) {
                tracing::info!(%server, "no longer a master; closing its link");
                let timeout = self.timeout;
                self.tracker.spawn(async move { link.quit(timeout).await });
            }
        }
    }

    /// Each link probes on a channel of a slot its master owns; one whose channel moved away gets
    /// a new one.
    async fn place_probes(&self, routes: &Routes) {
        let links: Vec<Arc<Link>> = lock(&self.links).values().cloned().collect();
        for link in links {
            let owned =
                |c: &String| routes.by_slot[redis_keyslot(c.as_bytes()) as usize].as_ref() == Some(&link.server);
            if lock(&link.probe).as_ref().is_some_and(owned) {
                continue;
            }
            let channel = (0u32..)
                .map(|n| format!("{}{n}", self.probe_prefix))
                .find(owned)
                .expect("every master owns some slot");
            if bounded(self.timeout, link.subscriber.ssubscribe(channel.clone()))
                .await
                .is_ok()
            {
                *lock(&link.probe) = Some(channel);
            }
        }
    }
}

/// `ASKING` then `EVALSHA` on one connection, as Redis wants for a key of a slot being migrated.
/// `EVALSHA`'s arguments: the script's SHA, the number of keys, the keys, the other arguments.
fn evalsha(sha: &str, keys: Vec<String>, args: Vec<Value>) -> Vec<Value> {
    let mut call: Vec<Value> = vec![Value::from(sha), Value::Integer(keys.len() as i64)];
    call.extend(keys.into_iter().map(Value::from));
    call.extend(args);
    call
}

/// The append script's keys and arguments for one message on `channel`.
fn append_call(channel: &str, payload: Bytes, keep: Keep) -> (Vec<String>, Vec<Value>) {
    let keys = vec![stream_key(channel), meta_key(channel), channel.to_string()];
    let args = vec![
        Value::Bytes(payload),
        Value::Integer(i64::from(keep.size)),
        Value::Integer(millis(keep.ttl)),
    ];
    (keys, args)
}

/// The append script's answer: the message's position.
fn appended(v: Value) -> Result<Pos, BusError> {
    bytes_of(v)
        .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
        .ok_or_else(|| unavailable("the append script answered something else than a position"))
}

async fn asking(client: &Client, sha: &str, keys: Vec<String>, args: Vec<Value>) -> Result<Value, fred::error::Error> {
    let pipeline = client.pipeline();
    let _: () = pipeline
        .custom(
            CustomCommand::new_static("ASKING", None::<u16>, false),
            Vec::<Value>::new(),
        )
        .await?;
    let _: () = pipeline
        .custom(
            CustomCommand::new_static("EVALSHA", None::<u16>, false),
            evalsha(sha, keys, args),
        )
        .await?;
    let (_, answer): (Value, Value) = pipeline.all().await?;
    Ok(answer)
}

/// A centralized client to one server; a subscriber speaks RESP3 (so its connection also answers
/// commands) and gets the large message buffer.
fn build(server: &Server, subscriber: bool, timeout: Duration, retry: bool) -> Result<Client, BusError> {
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
            c.max_command_attempts = 2;
        });
    if retry {
        // Capped, jittered exponential backoff, forever.
        builder.set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    }
    builder.build().map_err(unavailable)
}

impl Link {
    /// Stops the link's tasks and closes both connections, each within `timeout`.
    async fn quit(&self, timeout: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(timeout, self.subscriber.quit()).await;
        let _ = tokio::time::timeout(timeout, self.publisher.quit()).await;
        if let Some((client, _)) = &self.confirm {
            let _ = tokio::time::timeout(timeout, client.quit()).await;
        }
    }

    fn start(bus: &Arc<Inner>, server: Server) -> Result<Arc<Link>, BusError> {
        let publisher = build(&server, false, bus.timeout, true)?;
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
            subscriber,
            probe: Mutex::new(None),
            probing: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            heard_ms: AtomicU64::new(bus.now_ms()),
            confirm,
            stop,
        });
        // Listen before connecting so the first events are not missed.
        let messages = link.subscriber.message_rx();
        let reconnects = link.subscriber.reconnect_rx();
        let moves = link.publisher.error_rx();
        link.publisher.connect();
        link.subscriber.connect();
        bus.tracker.spawn(read_messages(bus.clone(), link.clone(), messages));
        bus.tracker
            .spawn(watch_link(bus.clone(), link.clone(), reconnects, moves));
        Ok(link)
    }
}

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
                    link.probing.store(false, Ordering::Relaxed);
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

/// Marks a link's slots for resubscription when its subscriber reconnects, and wakes the
/// reconciler when its publisher is redirected (the topology changed).
async fn watch_link(
    bus: Arc<Inner>,
    link: Arc<Link>,
    mut reconnects: tokio::sync::broadcast::Receiver<Server>,
    mut errors: tokio::sync::broadcast::Receiver<(fred::error::Error, Option<Server>)>,
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
            _ = link.stop.cancelled() => return,
        }
    }
}

/// Keeps the topology fresh, every tracked channel subscribed on its slot's master, and every
/// link probed.
async fn reconcile(bus: Arc<Inner>) {
    let mut was_ready = false;
    loop {
        let every = if was_ready {
            RECONCILE_EVERY
        } else {
            RECONCILE_WHILE_DOWN
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = bus.wake.notified() => {}
            _ = bus.cancel.cancelled() => return,
        }
        bus.refresh().await;
        resubscribe_moved(&bus).await;
        probe(&bus).await;
        let ready = bus.is_ready();
        if ready != was_ready {
            m::bus_up(ready);
            was_ready = ready;
        }
    }
}

async fn resubscribe_moved(bus: &Inner) {
    let _op = bus.ops.lock().await;
    let work: Vec<(u16, Vec<String>, Arc<Link>)> = {
        let work = lock(&bus.tracked).to_resubscribe(&read(&bus.routes).by_slot);
        let links = lock(&bus.links);
        work.into_iter()
            .filter_map(|(slot, channels, server)| Some((slot, channels, links.get(&server)?.clone())))
            .collect()
    };
    if work.is_empty() {
        return;
    }
    let results = join_all(work.into_iter().map(|(slot, channels, link)| async move {
        let n = channels.len();
        let r = bounded(bus.timeout, link.subscriber.ssubscribe(channels)).await;
        (slot, n, link.server.clone(), r)
    }))
    .await;
    let mut t = lock(&bus.tracked);
    for (slot, n, server, r) in results {
        match r {
            Ok(()) => {
                t.resubscribed(slot, &server);
                tracing::info!(slot, %server, channels = n, "resubscribed");
                m::resubscribed(n);
            }
            Err(e) => {
                tracing::warn!(slot, error = %e, "resubscription failed; retrying");
                t.failed(slot);
            }
        }
    }
}

/// Publishes a probe on every link whose subscriber has been quiet; a link whose previous probe
/// never came back is rebuilt.
async fn probe(bus: &Arc<Inner>) {
    let links: Vec<Arc<Link>> = lock(&bus.links).values().cloned().collect();
    let now = bus.now_ms();
    for link in links {
        let quiet = now.saturating_sub(link.heard_ms.load(Ordering::Relaxed)) >= PROBE_WHEN_QUIET.as_millis() as u64;
        if !quiet || !link.subscriber.is_connected() {
            continue;
        }
        let Some(channel) = lock(&link.probe).clone() else {
            continue;
        };
        // Quiet for a whole period since the last probe was sent: it did not come back.
        if link.probing.swap(false, Ordering::Relaxed) {
            tracing::warn!(server = %link.server, "pub/sub probe lost; rebuilding the connection");
            link.alive.store(false, Ordering::Relaxed);
            let subscriber = link.subscriber.clone();
            bus.tracker.spawn(async move { subscriber.force_reconnection().await });
            link.heard_ms.store(now, Ordering::Relaxed);
            continue;
        }
        link.probing.store(true, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: i64) -> Value {
        Value::Array(vec![Value::from("127.0.0.1"), Value::Integer(port), Value::from("id")])
    }

    #[test]
    fn cluster_slots_parse_into_a_full_map() {
        let v = Value::Array(vec![
            Value::Array(vec![Value::Integer(0), Value::Integer(5460), node(7000), node(7003)]),
            Value::Array(vec![Value::Integer(5461), Value::Integer(16383), node(7001)]),
        ]);
        let routes = parse_slots(v).unwrap();
        assert_eq!(routes.by_slot[0], Some(Server::new("127.0.0.1", 7000)));
        assert_eq!(routes.by_slot[5460], Some(Server::new("127.0.0.1", 7000)));
        assert_eq!(routes.by_slot[5461], Some(Server::new("127.0.0.1", 7001)));
        assert_eq!(routes.by_slot[16383], Some(Server::new("127.0.0.1", 7001)));
        assert_eq!(
            routes.masters,
            [Server::new("127.0.0.1", 7000), Server::new("127.0.0.1", 7001)]
        );
        assert!(routes.complete);
        assert!(parse_slots(Value::Integer(1)).is_none());
    }

    #[test]
    fn a_map_with_a_slot_unowned_is_incomplete_and_lists_only_owners() {
        // 7002's range is taken over entirely by 7001's, and slot 16383 has no master.
        let v = Value::Array(vec![
            Value::Array(vec![Value::Integer(0), Value::Integer(99), node(7000)]),
            Value::Array(vec![Value::Integer(100), Value::Integer(199), node(7002)]),
            Value::Array(vec![Value::Integer(100), Value::Integer(16382), node(7001)]),
        ]);
        let routes = parse_slots(v).unwrap();
        assert!(!routes.complete);
        assert_eq!(
            routes.masters,
            [Server::new("127.0.0.1", 7000), Server::new("127.0.0.1", 7001)]
        );
        assert_eq!(routes.by_slot[16383], None);
    }
}
