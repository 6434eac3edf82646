//! The Lua scripts the bus runs on a channel's master, and how a call reaches it.
//!
//! History's two scripts live here: `APPEND` appends a message to its channel's stream and
//! publishes it with its position in one step, `READ` reads where a channel's history stands
//! (the stream's keys and positions are [`crate::history::pos`]'s). Presence keeps its scripts in
//! [`crate::bus::presence`] and calls them through [`RedisBus::call`](super::RedisBus::call).
//!
//! A script is called by its SHA and loaded where a master answers `NOSCRIPT`; a call follows the
//! cluster where the slot moved (`MOVED`), is moving (`ASK`, then `ASKING`) or is split for a
//! moment (`TRYAGAIN`).

use std::{sync::Arc, time::Duration};

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
    bus::{millis, BusError},
    history::pos::{meta_key, parse_entry_id, stream_key, Entry, Keep, Pos, Slice},
};

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

static APPEND_SCRIPT: Script = Script::new(APPEND);
static READ_SCRIPT: Script = Script::new(READ);

impl RedisBus {
    /// Appends to the channel's history and publishes, in one step on its master.
    pub(super) async fn append(&self, channel: String, payload: Bytes, keep: Keep) -> Result<Pos, BusError> {
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

    /// The pipeline of [`RedisBus::publish_in_order`]: per message its answer, or `None` from the
    /// first one Redis refused on (to be published again in turn). With `--publish-replicas` every
    /// append waits for its confirmation, so messages go one at a time instead.
    pub(super) async fn pipelined(
        &self,
        channel: &str,
        items: &[(Bytes, Option<Keep>)],
    ) -> Result<Vec<Option<Result<Option<Pos>, BusError>>>, BusError> {
        let history = items.iter().any(|(_, keep)| keep.is_some());
        let sha = APPEND_SCRIPT.sha.get().cloned();
        if items.len() == 1 || (history && (self.inner.replicas > 0 || sha.is_none())) {
            return Ok(items.iter().map(|_| None).collect());
        }
        let slot = redis_keyslot(channel.as_bytes());
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let link = self
            .inner
            .link_up(|| self.inner.link_for(slot), Via::Publisher, deadline)
            .await?;
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
            let link = self.link_up(find, Via::Publisher, until).await?;
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
            bounded(self.timeout, asking(&link.publisher, &sha, keys, args)).await
        } else {
            bounded(self.timeout, link.publisher.evalsha(sha, keys, args)).await
        }
    }

    /// Loads a script on one master; its SHA is the same everywhere.
    async fn load(&self, link: &Link, script: &Script) -> Result<String, BusError> {
        let sha: String = bounded(self.timeout, link.publisher.script_load(script.source))
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
