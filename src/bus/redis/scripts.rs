//! The Lua scripts the bus runs on a channel's master, and how a call reaches it.
//!
//! The scripts of what a channel keeps live here: `STORE` appends a message to its channel's
//! stream and/or stores it as its key's latest value, and publishes it with what they add, in one
//! step; `READ` reads where a channel's history stands (the stream's keys and positions are
//! [`crate::history::pos`]'s); `LATEST` reads the channel's latest values (their keys are
//! [`crate::latest`]'s). Presence keeps its scripts in
//! [`crate::bus::presence`] and calls them through [`RedisBus::call`](super::RedisBus::call).
//!
//! A script is called by its SHA and loaded where a master answers `NOSCRIPT`; a call follows the
//! cluster where the slot moved (`MOVED`), is moving (`ASK`, then `ASKING`) or is split for a
//! moment (`TRYAGAIN`). Scripts go on the link's scripts connection (see [`super::links`]).
//!
//! # Appending once
//! An append (or a keyed publish) whose answer was lost (its connection broke) may have run, or
//! not. It is safe to send again because each carries an id, made once per message by the bus (not part of the
//! envelope: older nodes decode what this one publishes), and the script keeps the ids it
//! appended, with their positions, for a window ([`id_window`]): an id it already has is answered
//! with its position, neither appended nor published again. The ids live in two hashes beside the
//! stream, in the channel's slot, one per window of the node's clock (`{<channel>}:ids:<window>`,
//! [`ids_key`]), each expiring two windows after its last write; a call looks in the window of now
//! and the one before. The node's own clock is enough: only the node that made an id sends it
//! again.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use fred::{
    clients::Client,
    interfaces::{ClientLike, LuaInterface, PubsubInterface},
    prelude::{Server, Value},
    types::CustomCommand,
    util::redis_keyslot,
};

use super::{bounded, links::Link, lock, unavailable, Inner, RedisBus, Via};
use crate::{
    bus::{millis, BusError, Store},
    history::pos::{ids_key, meta_key, parse_entry_id, stream_key, Entry, Keep, Pos, Slice},
    latest::{seq_key, times_key, values_key},
};

/// Publishes a message that is kept, in one step on the channel's master: appended to the
/// channel's stream (a room with history) and/or stored as its key's latest value (a keyed
/// message), and published with what the stores add. Nothing is kept without being published, nor
/// published without it. KEYS: channel, the ids of this window and of the one before, stream,
/// meta, latest values, their update times, the key's update counter. ARGV: envelope, the
/// publish's id, how long the ids are kept in milliseconds, history size ('' without history),
/// history ttl in milliseconds, key ('' without one), the key's packed length, the latest values'
/// ttl in milliseconds, the most keys. The position and the key's update number are spliced into
/// the envelope in place (`cmsgpack` packs them), the rest never re-packed. An id published
/// already gets its position back ('' without history), and nothing else happens. A new key past
/// the most keys is refused (`TOOMANYKEYS`) before anything is written.
const STORE: &str = r#"
local env = ARGV[1]
local keyed = ARGV[6] ~= ''
local head
if keyed then
  local kl = tonumber(ARGV[7])
  if string.byte(env, 1) ~= 0x9b or string.byte(env, #env) ~= 0xc0 or string.byte(env, #env - kl - 1) ~= 0xc0 then
    return redis.error_reply('ERR a keyed envelope must be a MessagePack array of 11')
  end
  head = string.sub(env, 2, #env - kl - 2)
elseif string.byte(env, 1) ~= 0x98 then
  return redis.error_reply('ERR the envelope must be a MessagePack array of 8')
end
local seen = redis.call('HGET', KEYS[2], ARGV[2]) or redis.call('HGET', KEYS[3], ARGV[2])
if seen then
  return seen
end
local now
if keyed then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now - tonumber(ARGV[8]), 'LIMIT', 0, 256)
  for _, k in ipairs(gone) do
    redis.call('HDEL', KEYS[6], k)
    redis.call('ZREM', KEYS[7], k)
  end
  if redis.call('HEXISTS', KEYS[6], ARGV[6]) == 0 and redis.call('HLEN', KEYS[6]) >= tonumber(ARGV[9]) then
    return redis.error_reply('TOOMANYKEYS the room holds ' .. ARGV[9] .. ' keys')
  end
end
local pos = ''
if ARGV[4] ~= '' then
  local epoch = redis.call('HGET', KEYS[5], 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('HSET', KEYS[5], 'epoch', epoch)
  end
  local n = redis.call('HINCRBY', KEYS[5], 'n', 1)
  local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'n', n, 'e', env)
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
  redis.call('PEXPIRE', KEYS[5], ARGV[5])
  pos = epoch .. ':' .. n .. ':' .. id
end
local out = env
if keyed then
  local seq = redis.call('INCR', KEYS[8])
  local p = string.char(0xc0)
  if pos ~= '' then
    p = cmsgpack.pack(pos)
  end
  out = string.char(0x9b) .. head .. p .. string.sub(env, #env - tonumber(ARGV[7]), #env - 1) .. cmsgpack.pack(seq)
  redis.call('HSET', KEYS[6], ARGV[6], out)
  redis.call('ZADD', KEYS[7], now, ARGV[6])
  redis.call('PEXPIRE', KEYS[6], ARGV[8])
  redis.call('PEXPIRE', KEYS[7], ARGV[8])
  redis.call('PEXPIRE', KEYS[8], ARGV[8])
elseif pos ~= '' then
  out = string.char(0x99) .. string.sub(env, 2) .. cmsgpack.pack(pos)
end
redis.call('SPUBLISH', KEYS[1], out)
redis.call('HSET', KEYS[2], ARGV[2], pos)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return pos
"#;

/// The latest values of a channel's keys, those updated within the ttl. KEYS: latest values, their
/// update times. ARGV: the ttl in milliseconds.
const LATEST: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keys = redis.call('ZRANGEBYSCORE', KEYS[2], now - tonumber(ARGV[1]), '+inf')
local out = {}
for i = 1, #keys, 1000 do
  local values = redis.call('HMGET', KEYS[1], unpack(keys, i, math.min(i + 999, #keys)))
  for _, v in ipairs(values) do
    if v then
      out[#out + 1] = v
    end
  end
end
return out
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
pub(in crate::bus) struct Script {
    source: &'static str,
    sha: std::sync::OnceLock<String>,
}

impl Script {
    pub(in crate::bus) const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: std::sync::OnceLock::new(),
        }
    }
}

static STORE_SCRIPT: Script = Script::new(STORE);
static LATEST_SCRIPT: Script = Script::new(LATEST);
static READ_SCRIPT: Script = Script::new(READ);

/// One message of a batch: its envelope, what its channel keeps of it, and (where it keeps
/// anything) the id every attempt of its store carries.
pub(super) struct Item {
    pub(super) payload: Bytes,
    pub(super) store: Store,
    pub(super) id: Option<String>,
}

/// How long the ids of appends are kept (at least this, at most twice): more than the longest an
/// append can take from its first attempt to the last run of its script. A batch's appends are
/// sent again only within [`Resend::within`] of its start (two timeouts), and an attempt's calls
/// take a few timeouts at worst (following a move, then a migration). A command a frozen master
/// holds for longer than this could still run after an attempt sent again ran: nothing bounds
/// that.
pub(super) fn id_window(timeout: Duration) -> Duration {
    (timeout * 5).max(Duration::from_secs(10))
}

/// Until when the messages of a batch may be sent again.
#[derive(Clone, Copy)]
pub(super) struct Resend {
    until: tokio::time::Instant,
}

impl Resend {
    /// Twice the timeout: room for the pipeline's answer and a few attempts after it.
    pub(super) fn within(timeout: Duration) -> Duration {
        timeout * 2
    }

    pub(super) fn from_now(timeout: Duration) -> Resend {
        Resend {
            until: tokio::time::Instant::now() + Resend::within(timeout),
        }
    }

    /// Whether there is time left to send a message again.
    pub(super) fn check(self) -> Result<(), BusError> {
        if tokio::time::Instant::now() < self.until {
            Ok(())
        } else {
            Err(unavailable("no time left to publish it again"))
        }
    }
}

impl RedisBus {
    /// Keeps a message (its history, its key's latest value) and publishes it, in one step on its
    /// master; `id` makes it happen once however many times it is sent. The position where the
    /// channel keeps history.
    pub(super) async fn store(
        &self,
        channel: &str,
        payload: Bytes,
        store: &Store,
        id: &str,
    ) -> Result<Option<Pos>, BusError> {
        let (keys, args) = store_call(channel, payload, store, id, self.inner.timeout);
        let pos = stored(self.inner.eval(&STORE_SCRIPT, channel, keys, args).await?)?;
        let (Some(pos), Some(keep)) = (pos, store.keep) else {
            return Ok(pos);
        };
        if self.inner.replicas == 0 {
            return Ok(Some(pos));
        }
        let confirm = self
            .inner
            .link_for(redis_keyslot(channel.as_bytes()))
            .and_then(|link| link.confirm.as_ref().map(|(_, c)| c.clone()));
        match confirm {
            Some(confirm) if confirm.confirm(meta_key(channel), millis(keep.ttl)).await => Ok(Some(pos)),
            _ => Err(BusError::Unconfirmed(pos)),
        }
    }

    /// The pipeline of [`RedisBus::publish_in_order`]: per message its answer, or `None` from the
    /// first one to be published again in turn: the first Redis answered without running it, or,
    /// where it is kept, the first whose answer was lost (its store goes again under its id). A plain
    /// publish whose answer was lost may have gone out: it and the rest fail. With
    /// `--publish-replicas` every append waits for its confirmation, so messages go one at a time
    /// instead.
    pub(super) async fn pipelined(
        &self,
        channel: &str,
        items: &[Item],
    ) -> Result<Vec<Option<Result<Option<Pos>, BusError>>>, BusError> {
        let kept = items.iter().any(|item| item.id.is_some());
        let sha = STORE_SCRIPT.sha.get().cloned();
        if items.len() == 1 || (kept && (self.inner.replicas > 0 || sha.is_none())) {
            return Ok(items.iter().map(|_| None).collect());
        }
        let slot = redis_keyslot(channel.as_bytes());
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        // What is kept goes over the scripts' connection, plain publishes over the publisher's.
        let via = if kept { Via::Scripts } else { Via::Publisher };
        let link = self.inner.link_up(|| self.inner.link_for(slot), via, deadline).await?;
        let pipeline = via.of(&link).pipeline();
        for item in items {
            let queued: Result<(), _> = match (&item.id, &sha) {
                (Some(id), Some(sha)) => {
                    let (keys, args) = store_call(channel, item.payload.clone(), &item.store, id, self.inner.timeout);
                    pipeline
                        .custom(
                            CustomCommand::new_static("EVALSHA", None::<u16>, false),
                            evalsha(sha, keys, args),
                        )
                        .await
                }
                _ => pipeline.spublish(channel.to_string(), item.payload.clone()).await,
            };
            queued.map_err(unavailable)?;
        }
        let mut answers: Vec<Result<Value, fred::error::Error>> =
            match tokio::time::timeout(self.inner.timeout, pipeline.try_all::<Value>()).await {
                Ok(answers) => answers,
                Err(_) => return Err(unavailable("no answer from Redis in time")),
            };
        // A pipeline whose connection broke is answered with one error for all of it.
        if answers.len() != items.len() {
            let e = match answers.pop() {
                Some(Err(e)) => e,
                _ => fred::error::Error::new(fred::error::ErrorKind::Unknown, "a pipeline answered in part"),
            };
            answers = items.iter().map(|_| Err(e.clone())).collect();
        }
        let mut out = Vec::with_capacity(items.len());
        let (mut again, mut failed) = (false, None::<BusError>);
        for (item, answer) in items.iter().zip(answers) {
            if let Some(e) = &failed {
                out.push(Some(Err(e.clone())));
                continue;
            }
            again |= match &answer {
                Ok(_) => false,
                Err(e) => item.id.is_some() || retry_for(e).is_some(),
            };
            out.push(match (again, &item.id, answer) {
                (true, _, _) => None,
                (false, None, Ok(_)) => Some(Ok(None)),
                (false, Some(_), Ok(v)) => Some(stored(v)),
                (false, _, Err(e)) => {
                    let e = unavailable(e);
                    failed = Some(e.clone());
                    Some(Err(e))
                }
            });
        }
        Ok(out)
    }
}

impl Inner {
    /// Reads the channel's history (see [`crate::bus::Bus::read`]).
    pub(super) async fn read_history(
        self: &Arc<Self>,
        channel: &str,
        after: u64,
        cap: usize,
        keep: Keep,
    ) -> Result<Slice, BusError> {
        let keys = vec![stream_key(channel), meta_key(channel)];
        let args = vec![
            Value::Integer(after.min(i64::MAX as u64) as i64),
            Value::Integer(cap.min(i64::MAX as usize) as i64),
            Value::Integer(millis(keep.ttl)),
        ];
        let v = self.eval(&READ_SCRIPT, channel, keys, args).await?;
        parse_read(v).ok_or_else(|| unavailable("the read script answered something else than a slice"))
    }

    /// Reads the channel's latest values (see [`crate::bus::Bus::latest`]).
    pub(super) async fn read_latest(self: &Arc<Self>, channel: &str, ttl: Duration) -> Result<Vec<Bytes>, BusError> {
        let keys = vec![values_key(channel), times_key(channel)];
        let v = self
            .eval(&LATEST_SCRIPT, channel, keys, vec![Value::Integer(millis(ttl))])
            .await?;
        match v {
            Value::Array(values) => Ok(values.into_iter().filter_map(bytes_of).collect()),
            Value::Null => Ok(Vec::new()),
            _ => Err(unavailable("the latest script answered something else than a list")),
        }
    }

    /// Calls a script on the master of `channel`'s slot, loading it where it is missing and
    /// following the cluster where the slot moved (MOVED) or is moving (ASK), once each; while a
    /// moving slot's keys are split (TRYAGAIN), again every few milliseconds for at most the
    /// call's timeout.
    pub(super) async fn eval(
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
            let find = || match &asked {
                Some(server) => lock(&self.links).get(server).cloned(),
                None => self.link_for(slot),
            };
            let link = self.link_up(find, Via::Scripts, until).await?;
            let sha = match script.sha.get() {
                Some(sha) => sha.clone(),
                None => self.load(&link, script).await?,
            };
            let e = match self.evalsha_on(&link, sha, asked.is_some(), &keys, &args).await {
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
                _ if e.details().starts_with("TOOMANYKEYS") => return Err(BusError::TooManyKeys),
                _ => return Err(unavailable(e)),
            }
        }
    }

    /// One `EVALSHA` on `link`, within the timeout; after `ASKING` when the slot's owner sent the
    /// call there.
    async fn evalsha_on(
        &self,
        link: &Link,
        sha: String,
        asked: bool,
        keys: &[String],
        args: &[Value],
    ) -> Result<Value, fred::error::Error> {
        let (keys, args) = (keys.to_vec(), args.to_vec());
        if asked {
            bounded(self.timeout, asking(&link.scripts, &sha, keys, args)).await
        } else {
            bounded(self.timeout, link.scripts.evalsha(sha, keys, args)).await
        }
    }

    /// Loads a script on one master; its SHA is the same everywhere.
    async fn load(&self, link: &Link, script: &Script) -> Result<String, BusError> {
        let sha: String = bounded(self.timeout, link.scripts.script_load(script.source))
            .await
            .map_err(unavailable)?;
        Ok(script.sha.get_or_init(|| sha).clone())
    }
}

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

/// `EVALSHA`'s arguments: the script's SHA, the number of keys, the keys, the other arguments.
fn evalsha(sha: &str, keys: Vec<String>, args: Vec<Value>) -> Vec<Value> {
    let mut call: Vec<Value> = vec![Value::from(sha), Value::Integer(keys.len() as i64)];
    call.extend(keys.into_iter().map(Value::from));
    call.extend(args);
    call
}

/// The store script's keys and arguments for one message on `channel`, with its id: the ids of
/// the window now (on this node's clock) and of the one before, each kept two windows.
fn store_call(channel: &str, payload: Bytes, store: &Store, id: &str, timeout: Duration) -> (Vec<String>, Vec<Value>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    store_call_at(now, channel, payload, store, id, timeout)
}

/// [`store_call`] at `now` (since the Unix epoch).
fn store_call_at(
    now: Duration,
    channel: &str,
    payload: Bytes,
    store: &Store,
    id: &str,
    timeout: Duration,
) -> (Vec<String>, Vec<Value>) {
    let window = id_window(timeout);
    let this = (now.as_millis() / window.as_millis()) as u64;
    let keys = vec![
        channel.to_string(),
        ids_key(channel, this),
        ids_key(channel, this.saturating_sub(1)),
        stream_key(channel),
        meta_key(channel),
        values_key(channel),
        times_key(channel),
        seq_key(channel),
    ];
    let (size, history_ttl) = match store.keep {
        Some(keep) => (Value::Integer(i64::from(keep.size)), millis(keep.ttl)),
        None => (Value::from(""), 1),
    };
    let (key, key_len, latest_ttl, max_keys) = match &store.latest {
        Some(latest) => (
            Value::from(latest.key.as_str()),
            crate::latest::packed_len(&latest.key) as i64,
            millis(latest.ttl),
            i64::from(latest.max_keys),
        ),
        None => (Value::from(""), 0, 1, 0),
    };
    let args = vec![
        Value::Bytes(payload),
        Value::from(id),
        Value::Integer(millis(window * 2)),
        size,
        Value::Integer(history_ttl),
        key,
        Value::Integer(key_len),
        Value::Integer(latest_ttl),
        Value::Integer(max_keys),
    ];
    (keys, args)
}

/// The store script's answer: the message's position, none ('') without history.
fn stored(v: Value) -> Result<Option<Pos>, BusError> {
    let b = bytes_of(v).ok_or_else(|| unavailable("the store script answered something else than a position"))?;
    if b.is_empty() {
        return Ok(None);
    }
    std::str::from_utf8(&b)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| unavailable("the store script answered something else than a position"))
}

/// `ASKING` then `EVALSHA` on one connection, as Redis wants for a key of a slot being migrated.
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

/// A bulk string's bytes, however the connection's protocol typed it.
pub(in crate::bus) fn bytes_of(v: Value) -> Option<Bytes> {
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

#[cfg(test)]
mod tests {
    use fred::{
        interfaces::EventInterface,
        prelude::{Builder, Config},
    };

    use super::*;

    /// A standalone redis-server on a free port, for the scripts alone; stopped on drop.
    struct Standalone(std::process::Child, u16);

    impl Standalone {
        fn start() -> Standalone {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (redis-cluster/install-redis installs it)");
            Standalone(child, port)
        }

        async fn client(&self, resp3: bool) -> Client {
            let mut config = Config::from_url(&format!("redis://127.0.0.1:{}", self.1)).unwrap();
            if resp3 {
                config.version = fred::types::RespVersion::RESP3;
            }
            let client = Builder::from_config(config).build().unwrap();
            for _ in 0..100 {
                client.connect();
                if client.wait_for_connect().await.is_ok() {
                    return client;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server on port {} did not start", self.1);
        }
    }

    impl Drop for Standalone {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn envelope(data: &'static [u8]) -> Bytes {
        crate::envelope::Envelope::to_room("r", Bytes::from_static(data)).encode()
    }

    #[tokio::test]
    async fn an_append_sent_again_gets_its_position_and_is_neither_appended_nor_published_twice() {
        const T: Duration = Duration::from_secs(2);
        let redis = Standalone::start();
        let client = redis.client(false).await;
        let subscriber = redis.client(true).await;
        let mut messages = subscriber.message_rx();
        let channel = "ws:room:r:shard0";
        subscriber.ssubscribe(channel).await.unwrap();
        let sha: String = client.script_load(STORE).await.unwrap();
        let keep = Keep {
            size: 100,
            ttl: Duration::from_secs(60),
        };
        let now = Duration::from_secs(1_700_000_000);
        let window = id_window(T);
        let append = |at: Duration, id: &'static str, data: &'static [u8]| {
            let (client, sha) = (client.clone(), sha.clone());
            async move {
                let store = Store {
                    keep: Some(keep),
                    latest: None,
                };
                let (keys, args) = store_call_at(at, channel, envelope(data), &store, id, T);
                stored(client.evalsha::<Value, _, _, _>(sha, keys, args).await.unwrap())
                    .unwrap()
                    .unwrap()
            }
        };
        let first = append(now, "n:1", b"1").await;
        // Sent again (its answer lost): the same position, in the same window and in the next.
        assert_eq!(append(now, "n:1", b"1").await, first);
        assert_eq!(append(now + window, "n:1", b"1").await, first);
        let second = append(now, "n:2", b"2").await;
        assert_eq!(second.n, first.n + 1);
        let len: u64 = client
            .custom(
                CustomCommand::new_static("XLEN", None::<u16>, false),
                vec![stream_key(channel)],
            )
            .await
            .unwrap();
        assert_eq!(len, 2, "each id appended once");
        let mut published = Vec::new();
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), messages.recv()).await {
            let envelope = crate::envelope::Envelope::decode(&bytes_of(m.value).unwrap()).unwrap();
            published.push(envelope.pos.unwrap());
        }
        assert_eq!(published, [first, second], "each id published once");
        // Two windows on, the id is forgotten: the window bounds what the ids cost.
        assert_eq!(append(now + window * 2, "n:1", b"1").await.n, second.n + 1);
    }
}
