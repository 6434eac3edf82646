//! Where presence is kept: each node's own contribution to a room's presence and to its users'
//! online status, each expiring unless the node refreshes it, so a node that dies (even by
//! `kill -9`) drops out within the TTL with nothing to clean up.
//!
//! # Keys (Redis Cluster)
//! For a room `R` (room channel prefix `P`, `ws:room:` by default):
//! - `{PR}:presence`: a sorted set of the nodes contributing to the room, each scored by when its
//!   contribution expires (milliseconds, the master's clock);
//! - `{PR}:presence:<node>`: that node's contribution, a string that expires with it.
//!
//! Both hash to the slot of `PR` (named from the room, not from a shard channel), so one script
//! reads or writes a room's presence on one master in one round trip.
//!
//! For users (user channel prefix `U`, `ws:user:` by default), one pair for the whole cluster:
//! - `{U}presence`: the nodes with connected users, scored by expiry;
//! - `{U}presence:<node>`: a hash, user → that node's connections of the user.
//!
//! A node rewrites only the users whose connections changed since its last write; the expiry of
//! its hash is refreshed in the same call, so keeping a node's users alive costs one call a tick
//! however many there are.
//!
//! Embedded, the same contributions live in this process ([`Memory`]), with the same expiry.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fred::prelude::Value;
use serde::{Deserialize, Serialize};

use super::{
    redis::{bytes_of, RedisBus, Script},
    BusError,
};

/// What one node says of a room: its distinct local users, and their names while the room is
/// small enough to list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    pub count: u64,
    pub users: Option<Vec<String>>,
}

impl Contribution {
    pub fn encode(&self) -> Bytes {
        Bytes::from(rmp_serde::to_vec(self).expect("a contribution always encodes"))
    }

    pub fn decode(bytes: &[u8]) -> Option<Contribution> {
        rmp_serde::from_slice(bytes).ok()
    }
}

/// A room's presence over every live contribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Total {
    /// Distinct users. Exact while every node lists its users; past that, the sum of each node's
    /// distinct users (a user connected to two nodes counts twice).
    pub count: u64,
    /// Who is there, while the room has fewer than `list_max` users and every node lists them.
    pub users: Option<BTreeSet<String>>,
}

impl Total {
    pub fn sum(contributions: impl IntoIterator<Item = Contribution>, list_max: usize) -> Total {
        let mut union = Some(BTreeSet::new());
        let mut count = 0u64;
        for c in contributions {
            count = count.saturating_add(c.count);
            match (&mut union, c.users) {
                (Some(all), Some(users)) => all.extend(users),
                _ => union = None,
            }
        }
        match union {
            Some(all) if all.len() < list_max => Total {
                count: all.len() as u64,
                users: Some(all),
            },
            Some(all) => Total {
                count: all.len() as u64,
                users: None,
            },
            None => Total { count, users: None },
        }
    }
}

/// The master's clock in milliseconds, as `now`: every expiry is on it, whichever node writes.
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// KEYS: room index, this node's key. ARGV: node, ttl ms, contribution ('' withdraws it).
static ROOM_PUT: Script = Script::new(concat!(
    now_ms!(),
    r#"
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#
));

/// KEYS: room index. Returns every live contribution. Each node's key is the index's name with
/// `:<node>` added, on the same slot.
static ROOM_GET: Script = Script::new(concat!(
    now_ms!(),
    r#"
local out = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local v = redis.call('GET', KEYS[1] .. ':' .. node)
  if v then out[#out + 1] = v end
end
return out
"#
));

/// KEYS: users index, this node's users hash. ARGV: node, ttl ms, '1' to start the hash over,
/// then pairs of user and connections (0 removes the user). Returns 1 when the hash was there
/// before this call.
static USERS_BEAT: Script = Script::new(concat!(
    now_ms!(),
    r#"
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local existed = redis.call('EXISTS', KEYS[2])
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
local set, del = {}, {}
for i = 4, #ARGV - 1, 2 do
  if ARGV[i + 1] == '0' then del[#del + 1] = ARGV[i]
  else set[#set + 1] = ARGV[i]; set[#set + 1] = ARGV[i + 1] end
end
for i = 1, #set, 1000 do redis.call('HSET', KEYS[2], unpack(set, i, math.min(i + 999, #set))) end
for i = 1, #del, 1000 do redis.call('HDEL', KEYS[2], unpack(del, i, math.min(i + 999, #del))) end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return existed
end
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return existed
"#
));

/// KEYS: users index. ARGV: user. Returns the user's connections over every live node.
static USER_GET: Script = Script::new(concat!(
    now_ms!(),
    r#"
local n = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  n = n + tonumber(redis.call('HGET', KEYS[1] .. ':' .. node, ARGV[1]) or '0')
end
return n
"#
));

fn ttl_ms(ttl: Duration) -> Value {
    Value::Integer(super::millis(ttl))
}

fn odd(what: &str) -> BusError {
    BusError::Unavailable(format!("the presence {what} script answered something unexpected"))
}

impl RedisBus {
    pub(super) async fn presence_put(
        &self,
        index: &str,
        node: &str,
        ttl: Duration,
        value: Option<Bytes>,
    ) -> Result<(), BusError> {
        let keys = vec![index.to_string(), format!("{index}:{node}")];
        let args = vec![Value::from(node), ttl_ms(ttl), Value::Bytes(value.unwrap_or_default())];
        self.call(&ROOM_PUT, index, keys, args).await.map(|_| ())
    }

    pub(super) async fn presence_get(&self, index: &str) -> Result<Vec<Bytes>, BusError> {
        match self.call(&ROOM_GET, index, vec![index.to_string()], Vec::new()).await? {
            Value::Array(values) => values
                .into_iter()
                .map(|v| bytes_of(v).ok_or_else(|| odd("read")))
                .collect(),
            Value::Null => Ok(Vec::new()),
            _ => Err(odd("read")),
        }
    }

    pub(super) async fn presence_beat(
        &self,
        index: &str,
        node: &str,
        ttl: Duration,
        full: bool,
        changes: &[(Arc<str>, u32)],
    ) -> Result<bool, BusError> {
        let keys = vec![index.to_string(), format!("{index}:{node}")];
        let mut args = Vec::with_capacity(3 + 2 * changes.len());
        args.extend([
            Value::from(node),
            ttl_ms(ttl),
            Value::from(if full { "1" } else { "0" }),
        ]);
        for (user, n) in changes {
            args.push(Value::from(&**user));
            args.push(Value::Integer(i64::from(*n)));
        }
        let existed = self.call(&USERS_BEAT, index, keys, args).await?;
        existed.as_i64().map(|n| n == 1).ok_or_else(|| odd("beat"))
    }

    pub(super) async fn presence_connections(&self, index: &str, user: &str) -> Result<u64, BusError> {
        let n = self
            .call(&USER_GET, index, vec![index.to_string()], vec![Value::from(user)])
            .await?;
        n.as_u64().ok_or_else(|| odd("user"))
    }
}

/// Embedded presence: the same contributions and expiry, in this process.
#[derive(Default)]
pub struct Memory {
    /// Per room index, each node's contribution.
    rooms: Mutex<HashMap<String, PerNode<Bytes>>>,
    /// Per users index, each node's connections per user.
    users: Mutex<HashMap<String, PerNode<HashMap<String, u32>>>>,
}

/// Each node's value, with when it expires.
type PerNode<T> = HashMap<String, (T, Instant)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single step, so a panic elsewhere leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Memory {
    pub(super) fn put(&self, index: &str, node: &str, ttl: Duration, value: Option<Bytes>) {
        let now = Instant::now();
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(index.to_string()).or_default();
        room.retain(|_, (_, expires)| *expires > now);
        match value {
            Some(v) => {
                room.insert(node.to_string(), (v, now + ttl));
            }
            None => {
                room.remove(node);
            }
        }
        if room.is_empty() {
            rooms.remove(index);
        }
    }

    pub(super) fn get(&self, index: &str) -> Vec<Bytes> {
        let now = Instant::now();
        lock(&self.rooms).get(index).map_or_else(Vec::new, |room| {
            room.values()
                .filter(|(_, expires)| *expires > now)
                .map(|(v, _)| v.clone())
                .collect()
        })
    }

    pub(super) fn beat(&self, index: &str, node: &str, ttl: Duration, full: bool, changes: &[(Arc<str>, u32)]) -> bool {
        let now = Instant::now();
        let mut all = lock(&self.users);
        let nodes = all.entry(index.to_string()).or_default();
        nodes.retain(|_, (_, expires)| *expires > now);
        let existed = nodes.contains_key(node);
        let (users, expires) = nodes.entry(node.to_string()).or_insert_with(|| (HashMap::new(), now));
        if full {
            users.clear();
        }
        for (user, n) in changes {
            match n {
                0 => users.remove(&**user),
                n => users.insert(user.to_string(), *n),
            };
        }
        *expires = now + ttl;
        if users.is_empty() {
            nodes.remove(node);
        }
        existed
    }

    pub(super) fn connections(&self, index: &str, user: &str) -> u64 {
        let now = Instant::now();
        lock(&self.users).get(index).map_or(0, |nodes| {
            nodes
                .values()
                .filter(|(_, expires)| *expires > now)
                .filter_map(|(users, _)| users.get(user))
                .map(|n| u64::from(*n))
                .sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(count: u64, users: &[&str]) -> Contribution {
        Contribution {
            count,
            users: Some(users.iter().map(|u| u.to_string()).collect()),
        }
    }

    #[test]
    fn a_user_on_two_nodes_counts_once_while_listed() {
        let t = Total::sum([listed(2, &["ann", "bob"]), listed(1, &["bob"])], 1000);
        assert_eq!(t.count, 2);
        assert_eq!(t.users.unwrap().into_iter().collect::<Vec<_>>(), ["ann", "bob"]);
    }

    #[test]
    fn a_large_room_is_counted_and_not_listed() {
        let big = Contribution {
            count: 5000,
            users: None,
        };
        let t = Total::sum([big, listed(2, &["ann", "bob"])], 1000);
        assert_eq!(
            t,
            Total {
                count: 5002,
                users: None
            }
        );
        // Listed by every node, but past the list size.
        let t = Total::sum([listed(2, &["a", "b"]), listed(1, &["c"])], 3);
        assert_eq!(t, Total { count: 3, users: None });
        assert_eq!(
            Total::sum([], 3),
            Total {
                count: 0,
                users: Some(BTreeSet::new())
            }
        );
    }

    #[test]
    fn contributions_round_trip_and_bad_bytes_are_refused() {
        let c = listed(1, &["ann"]);
        assert_eq!(Contribution::decode(&c.encode()), Some(c));
        assert_eq!(Contribution::decode(b"\xc1"), None);
    }

    #[test]
    fn memory_contributions_expire_unless_refreshed() {
        let m = Memory::default();
        let ttl = Duration::from_millis(50);
        m.put("r", "a", ttl, Some(Bytes::from_static(b"1")));
        m.put("r", "b", Duration::from_secs(60), Some(Bytes::from_static(b"2")));
        assert_eq!(m.get("r").len(), 2);
        std::thread::sleep(ttl * 2);
        assert_eq!(m.get("r"), vec![Bytes::from_static(b"2")]);
        m.put("r", "b", ttl, None);
        assert!(m.get("r").is_empty());

        assert!(!m.beat("u", "a", ttl, false, &[("ann".into(), 2)]));
        assert!(m.beat("u", "a", ttl, false, &[("bob".into(), 1)]));
        assert_eq!(m.connections("u", "ann"), 2);
        m.beat("u", "a", ttl, false, &[("ann".into(), 0)]);
        assert_eq!(m.connections("u", "ann"), 0);
        std::thread::sleep(ttl * 2);
        assert_eq!(m.connections("u", "bob"), 0);
    }
}
