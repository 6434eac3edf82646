//! Node configuration: one documented struct, read from flags, `SHARDCAST_*` environment variables
//! and an optional TOML file, in that order of precedence, then checked as a whole.
//!
//! Every setting arrives as text and is parsed in [`Args::resolve`], so a bad configuration is
//! reported with every offending setting named at once, before any port is bound.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::{Deserialize, Serialize};

pub use crate::auth::JwtKey;
use crate::{bus::MAX_SHARDS, history::pos::Keep, hooks::settings as hook_settings, names};

/// Command-line flags. Each has a `SHARDCAST_*` environment variable and a key of the same name
/// (with `_` for `-`) in the `--config` TOML file.
#[derive(Debug, Default, Parser, Deserialize, Serialize)]
#[command(
    name = "shardcast",
    version,
    about = "WebSocket fan-out node over Redis Cluster sharded pub/sub"
)]
#[serde(default, deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment variables win over it).
    #[arg(long, env = "SHARDCAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address for WebSocket and HTTP. [default: 127.0.0.1:8080]
    #[arg(long, env = "SHARDCAST_LISTEN")]
    pub listen: Option<String>,

    /// Extra address serving only GET /metrics (the main listener serves it too). [default: none]
    #[arg(long, env = "SHARDCAST_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Redis Cluster seed URLs, comma-separated (redis://host:port). Unset: embedded in-process bus.
    #[arg(long, env = "SHARDCAST_REDIS", value_delimiter = ',')]
    pub redis: Vec<String>,

    /// This node's id, carried in every envelope it publishes. [default: random 8 hex digits]
    #[arg(long, env = "SHARDCAST_NODE_ID")]
    pub node_id: Option<String>,

    /// Prefix of room channels: `<prefix><room>:shard<N>`. [default: ws:room:]
    #[arg(long, env = "SHARDCAST_CHANNEL_PREFIX")]
    pub channel_prefix: Option<String>,

    /// Prefix of per-user direct-message channels: `<prefix><user>`. [default: ws:user:]
    #[arg(long, env = "SHARDCAST_USER_CHANNEL_PREFIX")]
    pub user_channel_prefix: Option<String>,

    /// Shard channels per room unless the room is named by --hot-room. [default: 1]
    #[arg(long, env = "SHARDCAST_DEFAULT_SHARDS")]
    pub default_shards: Option<String>,

    /// A hot room and its shard count, NAME=N (repeatable; the variable takes a comma list).
    #[arg(long, env = "SHARDCAST_HOT_ROOM", value_delimiter = ',')]
    pub hot_room: Vec<String>,

    /// Outbound bytes a socket may have queued before it is closed with 4008. [default: 1MiB]
    #[arg(long, env = "SHARDCAST_MAX_BUFFERED_BYTES")]
    pub max_buffered_bytes: Option<String>,

    /// Largest client frame accepted; a larger one closes the socket with 1009. [default: 64KiB]
    #[arg(long, env = "SHARDCAST_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<String>,

    /// Rooms one connection may be in at once. [default: 100]
    #[arg(long, env = "SHARDCAST_MAX_ROOMS_PER_CONN")]
    pub max_rooms_per_conn: Option<String>,

    /// Key required as `Authorization: Bearer <key>` by POST /publish. [default: none, open]
    #[arg(long, env = "SHARDCAST_API_KEY")]
    pub api_key: Option<String>,

    /// Delivery workers between the bus and the sockets. [default: number of CPUs]
    #[arg(long, env = "SHARDCAST_WORKERS")]
    pub workers: Option<String>,

    /// Envelopes each delivery worker may have queued; past it the bus reader drops and counts. [default: 16384]
    #[arg(long, env = "SHARDCAST_WORKER_QUEUE")]
    pub worker_queue: Option<String>,

    /// How long a join waits for the room's subscriptions before answering `unavailable`. [default: 5s]
    #[arg(long, env = "SHARDCAST_JOIN_TIMEOUT")]
    pub join_timeout: Option<String>,

    /// How long a room stays subscribed after its last local member left. [default: 1s]
    #[arg(long, env = "SHARDCAST_UNSUBSCRIBE_DELAY")]
    pub unsubscribe_delay: Option<String>,

    /// How long a closing socket may take to accept its close frame before it is cut. [default: 2s]
    #[arg(long, env = "SHARDCAST_CLOSE_GRACE")]
    pub close_grace: Option<String>,

    /// Timeout of one Redis command (publish, subscribe). [default: 2s]
    #[arg(long, env = "SHARDCAST_REDIS_TIMEOUT")]
    pub redis_timeout: Option<String>,

    /// A fixed write window: writes each socket at most once per this period, so one write carries
    /// every frame the socket got meanwhile; a frame waits at most this long. Sockets take turns
    /// over the period, so the writes go out evenly; at most 1s. 0 means adaptive writes (see
    /// --max-write-delay). [default: 0ms]
    #[arg(long, env = "SHARDCAST_WRITE_COALESCE")]
    pub write_coalesce: Option<String>,

    /// Adaptive writes (--write-coalesce 0): a quiet node writes every frame at once; a busy one
    /// gathers each socket's frames into fewer writes, its sockets taking turns, waiting as long
    /// as its load needs and never longer than this. An upper bound, not the usual wait; at most
    /// 1s. [default: 250ms]
    #[arg(long, env = "SHARDCAST_MAX_WRITE_DELAY")]
    pub max_write_delay: Option<String>,

    /// How often the node pings every socket. [default: 20s]
    #[arg(long, env = "SHARDCAST_PING_INTERVAL")]
    pub ping_interval: Option<String>,

    /// A socket silent this long (no frame, no pong) is closed as dead. [default: 60s]
    #[arg(long, env = "SHARDCAST_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,

    /// On shutdown, how long to wait for clients to leave before closing anyway. [default: 10s]
    #[arg(long, env = "SHARDCAST_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,

    /// On shutdown, clients are told to reconnect after a random delay up to this. [default: 5s]
    #[arg(long, env = "SHARDCAST_DRAIN_JITTER")]
    pub drain_jitter: Option<String>,

    /// Most WebSocket connections this node holds; past it, upgrades get 503. [default: 100000]
    #[arg(long, env = "SHARDCAST_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,

    /// WebSocket handshakes answered at once (token checked, inbox subscribed); past it an upgrade
    /// gets 503 with Retry-After at once, so a connect storm cannot starve the open sockets. [default: 64 per CPU]
    #[arg(long, env = "SHARDCAST_MAX_HANDSHAKES")]
    pub max_handshakes: Option<String>,

    /// Commands per second one connection may send, sustained. [default: 100]
    #[arg(long, env = "SHARDCAST_COMMAND_RATE")]
    pub command_rate: Option<String>,

    /// Commands one connection may send in a burst above the rate. [default: 200]
    #[arg(long, env = "SHARDCAST_COMMAND_BURST")]
    pub command_burst: Option<String>,

    /// HS256 secret: WebSocket upgrades then need a JWT (?token= or Authorization: Bearer). [default: none]
    #[arg(long, env = "SHARDCAST_JWT_SECRET")]
    pub jwt_secret: Option<String>,

    /// PEM file of an RSA (RS256) or EC P-256 (ES256) public key, instead of --jwt-secret. [default: none]
    #[arg(long, env = "SHARDCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<String>,

    /// Longest room or user name accepted, in bytes (at most 128). [default: 128]
    #[arg(long, env = "SHARDCAST_MAX_NAME_BYTES")]
    pub max_name_bytes: Option<String>,

    /// Room and user names only of ASCII letters, digits and - _ . : @ (true or false). [default: false]
    #[arg(long, env = "SHARDCAST_ASCII_NAMES")]
    pub ascii_names: Option<String>,

    /// Origins allowed to open a WebSocket from a browser, comma-separated; others get 403. [default: any]
    #[arg(long, env = "SHARDCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Rooms that keep history, NAME_GLOB=SIZE/TTL (repeatable, first match wins; the variable
    /// takes a comma list): the last SIZE messages of each shard, for TTL after the last one. [default: none]
    #[arg(long, env = "SHARDCAST_HISTORY", value_delimiter = ',')]
    pub history: Vec<String>,

    /// History for every room no --history names, SIZE/TTL. [default: off]
    #[arg(long, env = "SHARDCAST_DEFAULT_HISTORY")]
    pub default_history: Option<String>,

    /// Most messages a join with `since` replays from one shard; past it, nothing is replayed and
    /// the join answers `recovered: false`. [default: 1000]
    #[arg(long, env = "SHARDCAST_RECOVER_MAX")]
    pub recover_max: Option<String>,

    /// How long a key's latest value is kept after its last update. [default: 1h]
    #[arg(long, env = "SHARDCAST_LATEST_TTL")]
    pub latest_ttl: Option<String>,

    /// Most keys one room's latest values hold (counted on each of its shards); a publish of a new
    /// key past it is refused with `too_many_keys`. [default: 1000]
    #[arg(long, env = "SHARDCAST_MAX_KEYS_PER_ROOM")]
    pub max_keys_per_room: Option<String>,

    /// Rooms whose keyed messages are conflated for a socket that falls behind, NAME_GLOB
    /// (repeatable; the variable takes a comma list): its queued value of a key is replaced by the
    /// newer one instead of queueing behind it. [default: none]
    #[arg(long, env = "SHARDCAST_CONFLATE", value_delimiter = ',')]
    pub conflate: Vec<String>,

    /// Queued bytes (the node's queue and the kernel's unsent ones) past which a socket in a
    /// --conflate room is conflated. [default: half of --max-buffered-bytes]
    #[arg(long, env = "SHARDCAST_CONFLATE_ABOVE")]
    pub conflate_above: Option<String>,

    /// Negotiate permessage-deflate with clients that offer it (true or false): each frame is
    /// compressed once per node and shared by every socket that negotiated it. [default: true]
    #[arg(long, env = "SHARDCAST_COMPRESS")]
    pub compress: Option<String>,

    /// Frames whose payload is shorter than this go out uncompressed, SIZE. [default: 200]
    #[arg(long, env = "SHARDCAST_COMPRESS_MIN_BYTES")]
    pub compress_min_bytes: Option<String>,

    /// How far back a room's compressed frames may refer, SIZE of its last compressed messages
    /// (at most 32KiB), for sockets whose offer let the node keep its context: such sockets are
    /// answered without server_no_context_takeover and get a room's message compressed after the
    /// messages before it, once per node, where they read those last. 0: every frame compressed
    /// alone, every answer with server_no_context_takeover. [default: 0]
    #[arg(long, env = "SHARDCAST_COMPRESS_CONTEXT")]
    pub compress_context: Option<String>,

    /// For a socket that joined with `delta`: a key's value goes whole at least once every this
    /// many of its messages. [default: 50]
    #[arg(long, env = "SHARDCAST_DELTA_FULL_EVERY")]
    pub delta_full_every: Option<String>,

    /// Replicas that must confirm (WAIT) a publish to a room with history before it is
    /// acknowledged; fewer within --redis-timeout answers `unconfirmed`. Redis Cluster only. [default: 0]
    #[arg(long, env = "SHARDCAST_PUBLISH_REPLICAS")]
    pub publish_replicas: Option<String>,
    /// How long a client may take to send a request's headers; also how long an HTTP connection
    /// may sit idle between requests. [default: 5s]
    #[arg(long, env = "SHARDCAST_HTTP_HEADER_TIMEOUT")]
    pub http_header_timeout: Option<String>,

    /// How long a client may take to send a POST /publish body once its headers are in; past it,
    /// 408 and the connection is closed. [default: 10s]
    #[arg(long, env = "SHARDCAST_HTTP_BODY_TIMEOUT")]
    pub http_body_timeout: Option<String>,

    /// Most connections open at once that are not upgraded WebSockets (HTTP requests, keep-alive
    /// connections, upgrades in progress). At the cap the connection that has waited longest on
    /// its client is closed to make room, or else the new one is. [default: an eighth of the
    /// open-files limit, from 32 to 10000]
    #[arg(long, env = "SHARDCAST_MAX_HTTP_CONNECTIONS")]
    pub max_http_connections: Option<String>,

    /// POST /publish requests per second one client address may make, sustained; past it, 429. [default: 1000]
    #[arg(long, env = "SHARDCAST_PUBLISH_RATE")]
    pub publish_rate: Option<String>,

    /// POST /publish requests one client address may make in a burst above the rate. [default: 2000]
    #[arg(long, env = "SHARDCAST_PUBLISH_BURST")]
    pub publish_burst: Option<String>,

    /// Refuse tokens without an `exp` claim (true or false). [default: false]
    #[arg(long, env = "SHARDCAST_REQUIRE_EXP")]
    pub require_exp: Option<String>,

    /// Deepest nesting of arrays and maps a message's `data` may have (1 to 127); deeper data is
    /// refused with `bad_data`. [default: 64]
    #[arg(long, env = "SHARDCAST_MAX_DATA_DEPTH")]
    pub max_data_depth: Option<String>,

    /// `pub` and `dm` commands one connection may have waiting for the bus; past it the node stops
    /// reading the socket until answers come back (1 to 4096). [default: 64]
    #[arg(long, env = "SHARDCAST_MAX_INFLIGHT_PUBLISHES")]
    pub max_inflight_publishes: Option<String>,

    /// Log lines as `text` (for people) or `json` (one object per line, for log shippers). [default: text]
    #[arg(long, env = "SHARDCAST_LOG_FORMAT")]
    pub log_format: Option<String>,

    /// Presence: live counts and member lists of rooms, and users' online status (true or false). [default: true]
    #[arg(long, env = "SHARDCAST_PRESENCE")]
    pub presence: Option<String>,

    /// How often a node writes the presence that changed and refreshes its cached totals. [default: 1s]
    #[arg(long, env = "SHARDCAST_PRESENCE_TICK")]
    pub presence_tick: Option<String>,

    /// How long a node's presence lasts unless refreshed: a node that dies drops out of presence
    /// within it. At least twice --presence-tick. [default: 3s]
    #[arg(long, env = "SHARDCAST_PRESENCE_TTL")]
    pub presence_ttl: Option<String>,

    /// Rooms with fewer users than this list them (`users`, `joined`/`left` events); larger rooms
    /// are counted only. [default: 1000]
    #[arg(long, env = "SHARDCAST_PRESENCE_LIST_MAX")]
    pub presence_list_max: Option<String>,

    /// Serve the demo page (a scoreboard and a chat built on the JS client) at GET /demo (true or false). [default: false]
    #[arg(long, env = "SHARDCAST_DEMO")]
    pub demo: Option<String>,

    /// Connect hook: an upgrade without a valid token asks this backend (http://…) who the socket
    /// is and what it may do. [default: none]
    #[arg(long, env = "SHARDCAST_HOOK_CONNECT")]
    pub hook_connect: Option<String>,

    /// Join hook for matching rooms, NAME_GLOB=URL (repeatable, first match wins; the variable takes
    /// a comma list). [default: none]
    #[arg(long, env = "SHARDCAST_HOOK_JOIN", value_delimiter = ',')]
    pub hook_join: Vec<String>,

    /// Publish hook for matching rooms, NAME_GLOB=URL (repeatable, first match wins; the variable
    /// takes a comma list): the backend passes, replaces or refuses each message first. [default: none]
    #[arg(long, env = "SHARDCAST_HOOK_PUBLISH", value_delimiter = ',')]
    pub hook_publish: Vec<String>,

    /// Disconnect hook: told of closed sockets, in batches. [default: none]
    #[arg(long, env = "SHARDCAST_HOOK_DISCONNECT")]
    pub hook_disconnect: Option<String>,

    /// How often the disconnect hook is sent the disconnects gathered. [default: 1s]
    #[arg(long, env = "SHARDCAST_HOOK_BATCH")]
    pub hook_batch: Option<String>,

    /// Request headers the connect hook is given, comma-separated (e.g. Cookie,Authorization). [default: none]
    #[arg(long, env = "SHARDCAST_HOOK_FORWARD_HEADERS", value_delimiter = ',')]
    pub hook_forward_headers: Vec<String>,

    /// The longest a hook backend may take to answer, connecting and the whole answer included. [default: 1s]
    #[arg(long, env = "SHARDCAST_HOOK_TIMEOUT")]
    pub hook_timeout: Option<String>,

    /// What a hook's failure means, HOOK=deny|allow for connect, join and publish (repeatable; the
    /// variable takes a comma list). [default: deny for each]
    #[arg(long, env = "SHARDCAST_HOOK_ON_ERROR", value_delimiter = ',')]
    pub hook_on_error: Vec<String>,

    /// Requests one hook backend URL may have in flight; past it a request fails at once. [default: 1000]
    #[arg(long, env = "SHARDCAST_HOOK_MAX_INFLIGHT")]
    pub hook_max_inflight: Option<String>,

    /// How long a join hook's answer holds for its (user, room); 0 asks every time. [default: 0s]
    #[arg(long, env = "SHARDCAST_HOOK_JOIN_CACHE")]
    pub hook_join_cache: Option<String>,

    /// Key of the HMAC-SHA256 signature every hook request carries. [default: none, unsigned]
    #[arg(long, env = "SHARDCAST_HOOK_SECRET")]
    pub hook_secret: Option<String>,

    /// PEM file of certificate authorities trusted for https hook URLs, besides the public ones
    /// (a private CA). [default: none]
    #[arg(long, env = "SHARDCAST_HOOK_CA_FILE")]
    pub hook_ca_file: Option<String>,
}

/// The validated configuration every part of the node reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub redis: Vec<String>,
    pub node_id: String,
    pub channel_prefix: String,
    pub user_channel_prefix: String,
    pub default_shards: u32,
    pub hot_rooms: HashMap<String, u32>,
    pub max_buffered_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_rooms_per_conn: usize,
    pub api_key: Option<String>,
    pub workers: usize,
    pub worker_queue: usize,
    pub join_timeout: Duration,
    pub unsubscribe_delay: Duration,
    pub close_grace: Duration,
    pub redis_timeout: Duration,
    pub write_coalesce: Duration,
    pub max_write_delay: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_jitter: Duration,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub command_rate: u32,
    pub command_burst: u32,
    pub jwt: Option<JwtKey>,
    pub allowed_origins: Vec<String>,
    pub names: names::Policy,
    /// Rooms with history, first match wins.
    pub history: Vec<(glob::Pattern, Keep)>,
    pub default_history: Option<Keep>,
    pub recover_max: usize,
    /// How long a key's latest value outlives its last update.
    pub latest_ttl: Duration,
    pub max_keys_per_room: u32,
    /// Rooms whose keyed messages are conflated for a socket that falls behind.
    pub conflate: Vec<glob::Pattern>,
    /// `None`: half of `max_buffered_bytes`.
    pub conflate_above: Option<usize>,
    /// Negotiate permessage-deflate.
    pub compress: bool,
    /// Payloads shorter than this are never compressed.
    pub compress_min_bytes: usize,
    /// How many bytes of a room's last compressed messages its frames may refer to, for sockets
    /// that keep the node's context; 0: none (every frame compressed alone).
    pub compress_context: usize,
    /// A key's value goes whole at least once every this many of its messages (`delta` joins).
    pub delta_full_every: u32,
    pub publish_replicas: u32,
    pub http_header_timeout: Duration,
    pub http_body_timeout: Duration,
    /// `None`: derived from the open-files limit when the node starts ([`http_connection_cap`]).
    pub max_http_connections: Option<usize>,
    pub publish_rate: u32,
    pub publish_burst: u32,
    pub require_exp: bool,
    pub max_data_depth: usize,
    pub presence: bool,
    pub presence_tick: Duration,
    pub presence_ttl: Duration,
    pub presence_list_max: usize,
    pub log_format: LogFormat,
    pub max_inflight_publishes: usize,
    /// Serve `GET /demo`.
    pub demo: bool,
    /// The backend hooks, each off unless its URL is set.
    pub hooks: hook_settings::Settings,
}

/// How the node writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            redis: Vec::new(),
            node_id: random_node_id(),
            channel_prefix: "ws:room:".into(),
            user_channel_prefix: "ws:user:".into(),
            default_shards: 1,
            hot_rooms: HashMap::new(),
            max_buffered_bytes: 1 << 20,
            max_frame_bytes: 64 << 10,
            max_rooms_per_conn: 100,
            api_key: None,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            worker_queue: 16_384,
            join_timeout: Duration::from_secs(5),
            unsubscribe_delay: Duration::from_secs(1),
            close_grace: Duration::from_secs(2),
            redis_timeout: Duration::from_secs(2),
            write_coalesce: Duration::ZERO,
            max_write_delay: Duration::from_millis(250),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            drain_jitter: Duration::from_secs(5),
            max_connections: 100_000,
            max_handshakes: HANDSHAKES_PER_CPU * std::thread::available_parallelism().map_or(2, |n| n.get()),
            command_rate: 100,
            command_burst: 200,
            jwt: None,
            allowed_origins: Vec::new(),
            names: names::Policy::default(),
            history: Vec::new(),
            default_history: None,
            recover_max: 1000,
            latest_ttl: Duration::from_secs(3600),
            max_keys_per_room: 1000,
            conflate: Vec::new(),
            conflate_above: None,
            compress: true,
            compress_min_bytes: 200,
            compress_context: 0,
            delta_full_every: 50,
            publish_replicas: 0,
            http_header_timeout: Duration::from_secs(5),
            http_body_timeout: Duration::from_secs(10),
            max_http_connections: None,
            publish_rate: 1000,
            publish_burst: 2000,
            require_exp: false,
            max_data_depth: crate::frame::DEFAULT_DATA_DEPTH,
            presence: true,
            presence_tick: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(3),
            presence_list_max: 1000,
            log_format: LogFormat::Text,
            max_inflight_publishes: 64,
            demo: false,
            hooks: hook_settings::Settings::default(),
        }
    }
}

impl Config {
    /// How much history a room keeps, if any.
    pub fn keep(&self, room: &str) -> Option<Keep> {
        self.history
            .iter()
            .find(|(pattern, _)| pattern.matches(room))
            .map(|(_, keep)| *keep)
            .or(self.default_history)
    }

    /// Whether a room's keyed messages are conflated for a socket that falls behind.
    pub fn conflates(&self, room: &str) -> bool {
        self.conflate.iter().any(|pattern| pattern.matches(room))
    }

    /// Queued bytes past which a socket in a conflated room is conflated.
    pub fn conflate_above(&self) -> usize {
        self.conflate_above.unwrap_or(self.max_buffered_bytes / 2)
    }
}

/// Every problem found in a configuration, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// A configuration being read: the settings so far (each a default until parsed) and every problem
/// found on the way.
struct Parsing {
    config: Config,
    errors: Vec<String>,
}

impl Parsing {
    /// Parses every item of a list setting and hands each to `add`.
    fn each<T>(
        &mut self,
        flag: &str,
        raws: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
        mut add: impl FnMut(&mut Config, T),
    ) {
        for raw in raws {
            match parse(raw.trim()) {
                Ok(v) => add(&mut self.config, v),
                Err(e) => self.errors.push(bad(flag, raw, e)),
            }
        }
    }
}

/// `set!(p, "flag", raw, parser => field)`: parses a setting when it was given into
/// `p.config.field` (else the field keeps its default), or adds why it cannot to `p.errors`.
macro_rules! set {
    ($p:ident, $flag:literal, $raw:expr, $parse:expr => $($field:tt)+) => {
        if let Some(raw) = &$raw {
            match $parse(raw.trim()) {
                Ok(v) => $p.config.$($field)+ = v,
                Err(e) => $p.errors.push(bad($flag, raw, e)),
            }
        }
    };
}

impl Args {
    /// Reads the `--config` file, if any, under the flags and environment variables.
    pub fn with_file(self) -> Result<Args, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(vec![format!("--config {}: {e}", path.display())]))?;
        let file: Args =
            toml::from_str(&text).map_err(|e| ConfigError(vec![format!("--config {}: {e}", path.display())]))?;
        Ok(self.over(file))
    }

    /// Every setting given (by flag, variable or file), as `--flag=value`, secrets redacted: what
    /// the start-up line shows of how this node differs from the defaults.
    pub fn given(&self) -> Vec<String> {
        const SECRETS: [&str; 3] = ["jwt_secret", "api_key", "hook_secret"];
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        fields
            .into_iter()
            .filter_map(|(key, value)| {
                let value = match value {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Array(list) if !list.is_empty() => {
                        list.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(",")
                    }
                    _ => return None,
                };
                let value = if SECRETS.contains(&key.as_str()) {
                    "<redacted>".into()
                } else {
                    value
                };
                Some(format!("--{}={value}", key.replace('_', "-")))
            })
            .collect()
    }

    /// `self` wins over `base` setting by setting.
    fn over(self, base: Args) -> Args {
        fn list(a: Vec<String>, b: Vec<String>) -> Vec<String> {
            if a.is_empty() {
                b
            } else {
                a
            }
        }
        Args {
            config: self.config,
            listen: self.listen.or(base.listen),
            metrics_listen: self.metrics_listen.or(base.metrics_listen),
            redis: list(self.redis, base.redis),
            node_id: self.node_id.or(base.node_id),
            channel_prefix: self.channel_prefix.or(base.channel_prefix),
            user_channel_prefix: self.user_channel_prefix.or(base.user_channel_prefix),
            default_shards: self.default_shards.or(base.default_shards),
            hot_room: list(self.hot_room, base.hot_room),
            max_buffered_bytes: self.max_buffered_bytes.or(base.max_buffered_bytes),
            max_frame_bytes: self.max_frame_bytes.or(base.max_frame_bytes),
            max_rooms_per_conn: self.max_rooms_per_conn.or(base.max_rooms_per_conn),
            api_key: self.api_key.or(base.api_key),
            workers: self.workers.or(base.workers),
            worker_queue: self.worker_queue.or(base.worker_queue),
            join_timeout: self.join_timeout.or(base.join_timeout),
            unsubscribe_delay: self.unsubscribe_delay.or(base.unsubscribe_delay),
            close_grace: self.close_grace.or(base.close_grace),
            redis_timeout: self.redis_timeout.or(base.redis_timeout),
            write_coalesce: self.write_coalesce.or(base.write_coalesce),
            max_write_delay: self.max_write_delay.or(base.max_write_delay),
            ping_interval: self.ping_interval.or(base.ping_interval),
            idle_timeout: self.idle_timeout.or(base.idle_timeout),
            drain_timeout: self.drain_timeout.or(base.drain_timeout),
            drain_jitter: self.drain_jitter.or(base.drain_jitter),
            max_connections: self.max_connections.or(base.max_connections),
            max_handshakes: self.max_handshakes.or(base.max_handshakes),
            command_rate: self.command_rate.or(base.command_rate),
            command_burst: self.command_burst.or(base.command_burst),
            jwt_secret: self.jwt_secret.or(base.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(base.jwt_public_key),
            allowed_origins: list(self.allowed_origins, base.allowed_origins),
            max_name_bytes: self.max_name_bytes.or(base.max_name_bytes),
            ascii_names: self.ascii_names.or(base.ascii_names),
            history: list(self.history, base.history),
            default_history: self.default_history.or(base.default_history),
            recover_max: self.recover_max.or(base.recover_max),
            latest_ttl: self.latest_ttl.or(base.latest_ttl),
            max_keys_per_room: self.max_keys_per_room.or(base.max_keys_per_room),
            conflate: list(self.conflate, base.conflate),
            conflate_above: self.conflate_above.or(base.conflate_above),
            compress: self.compress.or(base.compress),
            compress_min_bytes: self.compress_min_bytes.or(base.compress_min_bytes),
            compress_context: self.compress_context.or(base.compress_context),
            delta_full_every: self.delta_full_every.or(base.delta_full_every),
            publish_replicas: self.publish_replicas.or(base.publish_replicas),
            http_header_timeout: self.http_header_timeout.or(base.http_header_timeout),
            http_body_timeout: self.http_body_timeout.or(base.http_body_timeout),
            max_http_connections: self.max_http_connections.or(base.max_http_connections),
            publish_rate: self.publish_rate.or(base.publish_rate),
            publish_burst: self.publish_burst.or(base.publish_burst),
            require_exp: self.require_exp.or(base.require_exp),
            max_data_depth: self.max_data_depth.or(base.max_data_depth),
            presence: self.presence.or(base.presence),
            presence_tick: self.presence_tick.or(base.presence_tick),
            presence_ttl: self.presence_ttl.or(base.presence_ttl),
            presence_list_max: self.presence_list_max.or(base.presence_list_max),
            log_format: self.log_format.or(base.log_format),
            max_inflight_publishes: self.max_inflight_publishes.or(base.max_inflight_publishes),
            demo: self.demo.or(base.demo),
            hook_connect: self.hook_connect.or(base.hook_connect),
            hook_join: list(self.hook_join, base.hook_join),
            hook_publish: list(self.hook_publish, base.hook_publish),
            hook_disconnect: self.hook_disconnect.or(base.hook_disconnect),
            hook_batch: self.hook_batch.or(base.hook_batch),
            hook_forward_headers: list(self.hook_forward_headers, base.hook_forward_headers),
            hook_timeout: self.hook_timeout.or(base.hook_timeout),
            hook_on_error: list(self.hook_on_error, base.hook_on_error),
            hook_max_inflight: self.hook_max_inflight.or(base.hook_max_inflight),
            hook_join_cache: self.hook_join_cache.or(base.hook_join_cache),
            hook_secret: self.hook_secret.or(base.hook_secret),
            hook_ca_file: self.hook_ca_file.or(base.hook_ca_file),
        }
    }

    /// Parses and checks every setting, reporting all problems at once: each group of settings is
    /// parsed (a setting not given keeps its default), then the settings are checked against each
    /// other.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let mut p = Parsing {
            config: Config::default(),
            errors: Vec::new(),
        };
        self.parse_node(&mut p);
        self.parse_bus(&mut p);
        self.parse_sockets(&mut p);
        self.parse_access(&mut p);
        self.parse_http(&mut p);
        self.parse_history(&mut p);
        self.parse_latest(&mut p);
        self.parse_wire(&mut p);
        self.parse_presence(&mut p);
        self.parse_hooks(&mut p);
        let Parsing { config, mut errors } = p;
        errors.extend(config.validate());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(errors))
        }
    }

    /// This node: where it listens, its id, its delivery workers, its log, its drain and its demo.
    fn parse_node(&self, p: &mut Parsing) {
        set!(p, "listen", self.listen, addr => listen);
        set!(p, "metrics-listen", self.metrics_listen, |s| addr(s).map(Some) => metrics_listen);
        set!(p, "node-id", self.node_id, name => node_id);
        set!(p, "workers", self.workers, count => workers);
        set!(p, "worker-queue", self.worker_queue, count => worker_queue);
        set!(p, "drain-timeout", self.drain_timeout, duration => drain_timeout);
        set!(p, "drain-jitter", self.drain_jitter, duration_or_zero => drain_jitter);
        set!(p, "log-format", self.log_format, log_format => log_format);
        set!(p, "demo", self.demo, boolean => demo);
    }

    /// The bus: Redis, channel names and shards, confirmations by replicas.
    fn parse_bus(&self, p: &mut Parsing) {
        p.each("redis", &self.redis, redis_url, |c, url| c.redis.push(url));
        set!(p, "redis-timeout", self.redis_timeout, duration => redis_timeout);
        set!(p, "channel-prefix", self.channel_prefix, prefix => channel_prefix);
        set!(p, "user-channel-prefix", self.user_channel_prefix, prefix => user_channel_prefix);
        set!(p, "default-shards", self.default_shards, shards => default_shards);
        p.each("hot-room", &self.hot_room, hot_room, |c, (room, n)| {
            c.hot_rooms.insert(room, n);
        });
        set!(p, "publish-replicas", self.publish_replicas, replicas => publish_replicas);
    }

    /// WebSockets: how many, what each may send and have queued, and their timings.
    fn parse_sockets(&self, p: &mut Parsing) {
        set!(p, "max-connections", self.max_connections, count => max_connections);
        set!(p, "max-handshakes", self.max_handshakes, count => max_handshakes);
        set!(p, "max-buffered-bytes", self.max_buffered_bytes, |s| size(s, 1024) => max_buffered_bytes);
        set!(p, "max-frame-bytes", self.max_frame_bytes, |s| size(s, 128) => max_frame_bytes);
        set!(p, "max-rooms-per-conn", self.max_rooms_per_conn, count => max_rooms_per_conn);
        set!(p, "command-rate", self.command_rate, rate => command_rate);
        set!(p, "command-burst", self.command_burst, rate => command_burst);
        set!(p, "max-data-depth", self.max_data_depth, data_depth => max_data_depth);
        set!(p, "max-inflight-publishes", self.max_inflight_publishes, |s| bounded_count(s, 4096) => max_inflight_publishes);
        set!(p, "join-timeout", self.join_timeout, duration => join_timeout);
        set!(p, "unsubscribe-delay", self.unsubscribe_delay, duration_or_zero => unsubscribe_delay);
        set!(p, "close-grace", self.close_grace, duration => close_grace);
        set!(p, "write-coalesce", self.write_coalesce, duration_or_zero => write_coalesce);
        set!(p, "max-write-delay", self.max_write_delay, duration_or_zero => max_write_delay);
        set!(p, "ping-interval", self.ping_interval, duration => ping_interval);
        set!(p, "idle-timeout", self.idle_timeout, duration => idle_timeout);
    }

    /// Who may connect and publish: keys, tokens, origins, names.
    fn parse_access(&self, p: &mut Parsing) {
        set!(p, "api-key", self.api_key, |s| secret(s).map(Some) => api_key);
        set!(p, "jwt-secret", self.jwt_secret, |s| secret(s).map(|s| Some(JwtKey::Secret(s))) => jwt);
        set!(p, "jwt-public-key", self.jwt_public_key, |s| public_key(s).map(Some) => jwt);
        set!(p, "require-exp", self.require_exp, boolean => require_exp);
        p.each("allowed-origins", &self.allowed_origins, origin, |c, o| {
            c.allowed_origins.push(o)
        });
        set!(p, "max-name-bytes", self.max_name_bytes, name_bytes => names.max_bytes);
        set!(p, "ascii-names", self.ascii_names, boolean => names.ascii_only);
    }

    /// Plain HTTP: its timeouts, its connection cap and the publish rate.
    fn parse_http(&self, p: &mut Parsing) {
        set!(p, "http-header-timeout", self.http_header_timeout, duration => http_header_timeout);
        set!(p, "http-body-timeout", self.http_body_timeout, duration => http_body_timeout);
        set!(p, "max-http-connections", self.max_http_connections, |s| count(s).map(Some) => max_http_connections);
        set!(p, "publish-rate", self.publish_rate, rate => publish_rate);
        set!(p, "publish-burst", self.publish_burst, rate => publish_burst);
    }

    /// Which rooms keep history, and how much a join may replay.
    fn parse_history(&self, p: &mut Parsing) {
        p.each("history", &self.history, history_rule, |c, rule| c.history.push(rule));
        set!(p, "default-history", self.default_history, |s| keep(s).map(Some) => default_history);
        set!(p, "recover-max", self.recover_max, |s| bounded_count(s, MAX_RECOVER) => recover_max);
    }

    /// Keyed messages: how long and how many latest values are kept, and which rooms conflate.
    fn parse_latest(&self, p: &mut Parsing) {
        set!(p, "latest-ttl", self.latest_ttl, duration => latest_ttl);
        set!(p, "max-keys-per-room", self.max_keys_per_room, max_keys => max_keys_per_room);
        p.each("conflate", &self.conflate, conflate_rule, |c, rule| {
            c.conflate.push(rule)
        });
        set!(p, "conflate-above", self.conflate_above, |s| size(s, 1024).map(Some) => conflate_above);
    }

    /// Bytes on the wire: compression and deltas.
    fn parse_wire(&self, p: &mut Parsing) {
        set!(p, "compress", self.compress, boolean => compress);
        set!(p, "compress-min-bytes", self.compress_min_bytes, |s| size(s, 0) => compress_min_bytes);
        set!(p, "compress-context", self.compress_context, context_size => compress_context);
        set!(p, "delta-full-every", self.delta_full_every, full_every => delta_full_every);
    }

    /// Presence: whether it is kept, how often it is written, how long it lasts, which rooms list
    /// their users.
    fn parse_presence(&self, p: &mut Parsing) {
        set!(p, "presence", self.presence, boolean => presence);
        set!(p, "presence-tick", self.presence_tick, duration => presence_tick);
        set!(p, "presence-ttl", self.presence_ttl, duration => presence_ttl);
        set!(p, "presence-list-max", self.presence_list_max, |s| bounded_count(s, MAX_PRESENCE_LIST) => presence_list_max);
    }
}

impl Args {
    /// Backend hooks: their URLs, timeout, failure policies, bound, cache and signing key.
    fn parse_hooks(&self, p: &mut Parsing) {
        set!(p, "hook-connect", self.hook_connect, |s| hook_settings::url(s).map(Some) => hooks.connect);
        p.each("hook-join", &self.hook_join, hook_settings::route, |c, r| {
            c.hooks.join.push(r)
        });
        p.each("hook-publish", &self.hook_publish, hook_settings::route, |c, r| {
            c.hooks.publish.push(r)
        });
        set!(p, "hook-disconnect", self.hook_disconnect, |s| hook_settings::url(s).map(Some) => hooks.disconnect);
        set!(p, "hook-batch", self.hook_batch, duration => hooks.batch);
        p.each(
            "hook-forward-headers",
            &self.hook_forward_headers,
            hook_settings::header,
            |c, h| c.hooks.forward_headers.push(h),
        );
        set!(p, "hook-timeout", self.hook_timeout, duration => hooks.timeout);
        p.each(
            "hook-on-error",
            &self.hook_on_error,
            hook_settings::on_error,
            |c, (hook, policy)| c.hooks.on_error.set(hook, policy),
        );
        set!(p, "hook-max-inflight", self.hook_max_inflight, |s| bounded_count(s, 1_000_000) => hooks.max_inflight);
        set!(p, "hook-join-cache", self.hook_join_cache, duration_or_zero => hooks.join_cache);
        set!(p, "hook-secret", self.hook_secret, |s| secret(s).map(Some) => hooks.secret);
        set!(p, "hook-ca-file", self.hook_ca_file, |s| hook_settings::authorities(s).map(Some) => hooks.authorities);
    }
}

impl Config {
    /// The checks of settings against each other (each setting alone was checked as it was
    /// parsed): every problem, one line each.
    fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (flag, wait) in [
            ("write-coalesce", self.write_coalesce),
            ("max-write-delay", self.max_write_delay),
        ] {
            if wait > MAX_WRITE_WAIT {
                errors.push(format!(
                    "--{flag} ({wait:?}) must be at most {MAX_WRITE_WAIT:?}: a frame may wait that long"
                ));
            }
        }
        if self.idle_timeout <= self.ping_interval {
            errors.push(format!(
                "--idle-timeout ({:?}) must be longer than --ping-interval ({:?})",
                self.idle_timeout, self.ping_interval
            ));
        }
        if self.conflate_above.is_some_and(|b| b >= self.max_buffered_bytes) {
            errors.push(format!(
                "--conflate-above must be below --max-buffered-bytes ({} bytes), or a socket would be \
                 dropped before it is conflated",
                self.max_buffered_bytes
            ));
        }
        if self.latest_ttl < Duration::from_secs(1) {
            errors.push("--latest-ttl must be at least 1s".into());
        }
        if self.presence_ttl < self.presence_tick * 2 {
            errors.push(format!(
                "--presence-ttl ({:?}) must be at least twice --presence-tick ({:?}), or presence \
                 would blink out between two refreshes",
                self.presence_ttl, self.presence_tick
            ));
        }
        errors
    }
}

/// `--max-handshakes` per CPU unless set. A handshake spends most of its time waiting for its
/// inbox's subscription (a Redis round trip that a batch of handshakes shares), not on a core: a
/// ramp of 3,000 connections a second kept about 4 in progress (joins waited 1.2 ms on average).
/// The bound is for a node falling behind, whose handshakes pile up: 64 per CPU leaves ordinary
/// bursts alone, and the work so many can queue ahead of an open socket's read (a token check, the
/// socket's registration, its answer: tens of microseconds each) stays a few milliseconds, not the
/// seconds an unbounded storm queued.
pub const HANDSHAKES_PER_CPU: usize = 64;

/// The largest `--presence-list-max`: every node rewrites a listed room's whole list when it
/// changes, and every watcher gets the joins and leaves.
const MAX_PRESENCE_LIST: usize = 10_000;

/// The longest `--write-coalesce` or `--max-write-delay`: it is latency added to messages, and
/// past a second a live feed is no longer live.
const MAX_WRITE_WAIT: Duration = Duration::from_secs(1);

fn bad(flag: &str, raw: &str, e: String) -> String {
    format!("--{flag} {raw:?}: {e}")
}

fn log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{e} (expected HOST:PORT)"))
}

fn name(s: &str) -> Result<String, String> {
    names::check(s).map(|_| s.to_owned()).map_err(|e| e.to_string())
}

fn name_bytes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=names::MAX_NAME_BYTES).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {}", names::MAX_NAME_BYTES)),
    }
}

fn boolean(s: &str) -> Result<bool, String> {
    s.parse().map_err(|_| "expected true or false".to_string())
}

fn secret(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_owned())
}

fn rate(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number above 0".into()),
    }
}

fn origin(s: &str) -> Result<String, String> {
    if !(s.starts_with("http://") || s.starts_with("https://")) || s.ends_with('/') {
        return Err("expected an origin such as https://example.com".into());
    }
    Ok(s.to_owned())
}

fn public_key(path: &str) -> Result<JwtKey, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    crate::auth::decoding_key(&JwtKey::PublicKeyPem(pem.clone())).map_err(|e| e.to_string())?;
    Ok(JwtKey::PublicKeyPem(pem))
}

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected a duration such as 500ms or 10s)"))
}

fn redis_url(s: &str) -> Result<String, String> {
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err("expected redis://HOST:PORT".into());
    }
    Ok(s.to_owned())
}

fn hot_room(s: &str) -> Result<(String, u32), String> {
    let (room, n) = s.split_once('=').ok_or("expected NAME=N")?;
    names::check(room).map_err(|e| format!("room: {e}"))?;
    Ok((room.to_owned(), shards(n)?))
}

/// The most a join may replay from one shard, and the most a `history` answer holds.
pub const MAX_RECOVER: usize = 100_000;
/// The most messages one shard's history may keep.
const MAX_HISTORY: u32 = 1_000_000;

/// `SIZE/TTL`: messages kept per shard, and for how long after the last one.
fn keep(s: &str) -> Result<Keep, String> {
    let (size, ttl) = s.split_once('/').ok_or("expected SIZE/TTL, such as 1000/10m")?;
    let size = match size.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_HISTORY).contains(&n) => n,
        _ => return Err(format!("SIZE must be a whole number from 1 to {MAX_HISTORY}")),
    };
    let ttl = duration(ttl.trim())?;
    if ttl < Duration::from_secs(1) {
        return Err("TTL must be at least 1s".into());
    }
    Ok(Keep { size, ttl })
}

/// `NAME_GLOB=SIZE/TTL`.
fn history_rule(s: &str) -> Result<(glob::Pattern, Keep), String> {
    let (glob, rest) = s
        .rsplit_once('=')
        .ok_or("expected NAME_GLOB=SIZE/TTL, such as match:*=1000/10m")?;
    let pattern = glob::Pattern::new(glob).map_err(|e| format!("NAME_GLOB: {e}"))?;
    Ok((pattern, keep(rest)?))
}

/// The most keys a room's latest values may be allowed.
const MAX_KEYS: u32 = 100_000;

fn max_keys(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_KEYS).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_KEYS}")),
    }
}

/// The longest run of deltas a key may have between whole values.
const MAX_FULL_EVERY: u32 = 10_000;

fn full_every(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_FULL_EVERY).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_FULL_EVERY}")),
    }
}

fn conflate_rule(s: &str) -> Result<glob::Pattern, String> {
    glob::Pattern::new(s).map_err(|e| format!("NAME_GLOB: {e}"))
}

/// The most replicas a publish may wait for.
const MAX_PUBLISH_REPLICAS: u32 = 16;

fn replicas(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n <= MAX_PUBLISH_REPLICAS => Ok(n),
        _ => Err(format!("expected a whole number from 0 to {MAX_PUBLISH_REPLICAS}")),
    }
}

fn bounded_count(s: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {max}")),
    }
}

fn prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || s.chars().any(|c| c.is_control() || names::is_invisible(c)) {
        return Err("must be 1 to 64 bytes without control or invisible characters".into());
    }
    // Redis Cluster would hash only what is between the braces: every room on one slot.
    if s.contains(['{', '}']) {
        return Err("must not have a brace ({ or }): Redis Cluster would read it as a hash tag and put every channel on one slot".into());
    }
    Ok(s.to_owned())
}

fn data_depth(s: &str) -> Result<usize, String> {
    let most = crate::frame::MAX_DATA_DEPTH;
    match s.parse::<usize>() {
        Ok(n) if (1..=most).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {most}")),
    }
}

fn shards(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_SHARDS).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_SHARDS}")),
    }
}

fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number above 0".into()),
    }
}

/// Bytes, with an optional unit: `65536`, `64KiB`, `1MiB`, `1MB`.
pub fn size(s: &str, min: usize) -> Result<usize, String> {
    let n = s
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("{e} (expected bytes such as 65536, 64KiB or 1MiB)"))?
        .as_u64();
    let n = usize::try_from(n).map_err(|_| "too large".to_string())?;
    if n < min {
        return Err(format!("must be at least {min} bytes"));
    }
    Ok(n)
}

/// `--compress-context`: a size of at most a client's window (32 KiB), which is all a frame can
/// refer back to.
fn context_size(s: &str) -> Result<usize, String> {
    let n = size(s, 0)?;
    if n > MAX_CONTEXT {
        return Err(format!("at most {MAX_CONTEXT} bytes (a client's window is 32KiB)"));
    }
    Ok(n)
}

/// The most `--compress-context` may be: a 15-bit deflate window.
const MAX_CONTEXT: usize = 32 << 10;

/// A duration such as `500ms` or `10s`, above zero.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected a duration such as 500ms or 10s)"))?;
    if d.is_zero() {
        return Err("must be above zero".into());
    }
    Ok(d)
}

/// Descriptors kept for everything that is not a client's connection: listeners, Redis
/// connections, the runtime's own, standard streams, files.
pub const RESERVED_FILES: u64 = 64;

/// `--max-http-connections` unless set: an eighth of the open-files limit, at least 32 and at most
/// 10,000. The other seven eighths (less [`RESERVED_FILES`]) are left for WebSockets, so HTTP
/// connections alone can never run the node out of descriptors, which would stop it accepting
/// anything (health checks included).
pub fn http_connection_cap(open_files: u64) -> usize {
    (open_files / 8).clamp(32, 10_000) as usize
}

fn random_node_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["shardcast"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).unwrap().resolve()
    }

    #[test]
    fn defaults_hold_without_flags() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_buffered_bytes, 1 << 20);
        assert_eq!(c.max_frame_bytes, 64 << 10);
        assert_eq!(c.channel_prefix, "ws:room:");
        assert_eq!(c.default_shards, 1);
        assert!(c.redis.is_empty());
        assert_eq!(c.node_id.len(), 8);
    }

    #[test]
    fn sizes_durations_and_hot_rooms_parse() {
        let c = parse(&[
            "--max-buffered-bytes",
            "2MiB",
            "--max-frame-bytes",
            "4096",
            "--join-timeout",
            "500ms",
            "--hot-room",
            "stadium=16",
            "--hot-room",
            "odds=4",
            "--redis",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        ])
        .unwrap();
        assert_eq!(c.max_buffered_bytes, 2 << 20);
        assert_eq!(c.max_frame_bytes, 4096);
        assert_eq!(c.join_timeout, Duration::from_millis(500));
        assert_eq!(c.hot_rooms.get("stadium"), Some(&16));
        assert_eq!(c.hot_rooms.get("odds"), Some(&4));
        assert_eq!((c.hot_rooms.get("lobby"), c.default_shards), (None, 1));
        assert_eq!(c.redis.len(), 2);
    }

    #[test]
    fn every_bad_setting_is_named_at_once() {
        let err = parse(&[
            "--listen",
            "nowhere",
            "--default-shards",
            "0",
            "--max-buffered-bytes",
            "lots",
            "--hot-room",
            "stadium",
            "--close-grace",
            "0s",
            "--redis",
            "http://x",
            "--write-coalesce",
            "5s",
            "--max-write-delay",
            "2s",
        ])
        .unwrap_err();
        let text = err.to_string();
        for name in [
            "--listen",
            "--default-shards",
            "--max-buffered-bytes",
            "--hot-room",
            "--close-grace",
            "--redis",
            "--write-coalesce",
            "--max-write-delay",
        ] {
            assert!(text.contains(name), "{name} missing from: {text}");
        }
        assert_eq!(err.0.len(), 8, "{text}");
    }

    #[test]
    fn the_compression_context_is_off_by_default_and_at_most_a_window() {
        assert_eq!(parse(&[]).unwrap().compress_context, 0);
        assert_eq!(parse(&["--compress-context", "4KiB"]).unwrap().compress_context, 4096);
        assert_eq!(
            parse(&["--compress-context", "32KiB"]).unwrap().compress_context,
            32 << 10
        );
        let err = parse(&["--compress-context", "33KiB"]).unwrap_err().to_string();
        assert!(err.contains("--compress-context") && err.contains("32KiB"), "{err}");
    }

    #[test]
    fn hardening_settings_parse_with_their_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.http_header_timeout, c.http_body_timeout),
            (Duration::from_secs(5), Duration::from_secs(10))
        );
        assert_eq!(c.max_http_connections, None);
        assert_eq!(
            (c.publish_rate, c.publish_burst, c.require_exp, c.max_data_depth),
            (1000, 2000, false, 64)
        );
        let c = parse(&[
            "--http-header-timeout",
            "2s",
            "--http-body-timeout",
            "3s",
            "--max-http-connections",
            "500",
            "--publish-rate",
            "5",
            "--publish-burst",
            "10",
            "--require-exp",
            "true",
            "--max-data-depth",
            "127",
        ])
        .unwrap();
        assert_eq!(c.http_header_timeout, Duration::from_secs(2));
        assert_eq!(c.http_body_timeout, Duration::from_secs(3));
        assert_eq!(c.max_http_connections, Some(500));
        assert_eq!(
            (c.publish_rate, c.publish_burst, c.require_exp, c.max_data_depth),
            (5, 10, true, 127)
        );
        let err = parse(&[
            "--max-data-depth",
            "128",
            "--max-http-connections",
            "0",
            "--http-body-timeout",
            "0s",
            "--require-exp",
            "yes",
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
    }

    #[test]
    fn max_handshakes_defaults_to_a_few_per_cpu_and_parses() {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(parse(&[]).unwrap().max_handshakes, HANDSHAKES_PER_CPU * cpus);
        assert_eq!(parse(&["--max-handshakes", "2"]).unwrap().max_handshakes, 2);
        let err = parse(&["--max-handshakes", "0"]).unwrap_err().to_string();
        assert!(err.contains("--max-handshakes"), "{err}");
    }

    #[test]
    fn braces_are_refused_in_prefixes_and_hot_rooms() {
        for args in [
            ["--hot-room", "{hot}=4"],
            ["--channel-prefix", "{ws}:room:"],
            ["--user-channel-prefix", "ws:user:{"],
            ["--channel-prefix", "ws:\u{202e}room:"],
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(args[0]), "{err}");
        }
        assert!(parse(&["--hot-room", "{hot}=4"])
            .unwrap_err()
            .to_string()
            .contains("brace"));
    }

    #[test]
    fn presence_settings_are_checked_together() {
        let c = parse(&[
            "--presence",
            "false",
            "--presence-tick",
            "250ms",
            "--presence-list-max",
            "50",
        ])
        .unwrap();
        assert_eq!(
            (c.presence, c.presence_tick, c.presence_ttl, c.presence_list_max),
            (false, Duration::from_millis(250), Duration::from_secs(3), 50)
        );
        let err = parse(&["--presence-tick", "2s"]).unwrap_err().to_string();
        assert!(err.contains("--presence-ttl") && err.contains("twice"), "{err}");
        for args in [
            ["--presence-list-max", "0"],
            ["--presence", "maybe"],
            ["--presence-ttl", "soon"],
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(args[0]), "{err}");
        }
    }

    #[test]
    fn hook_settings_parse_and_a_hook_url_that_is_not_http_fails_at_start() {
        let c = parse(&[
            "--hook-publish",
            "chat:*=http://127.0.0.1:9000/publish",
            "--hook-join",
            "members:*=http://127.0.0.1:9000/join",
            "--hook-on-error",
            "publish=allow",
            "--hook-timeout",
            "250ms",
            "--hook-join-cache",
            "30s",
            "--hook-forward-headers",
            "Cookie,Authorization",
            "--hook-secret",
            "s3cret",
        ])
        .unwrap();
        let h = &c.hooks;
        assert!(h.publish[0].0.matches("chat:1") && h.connect.is_none());
        assert_eq!(h.join[0].1.path(), "/join");
        assert_eq!(h.on_error.publish, hook_settings::OnError::Allow);
        assert_eq!(h.on_error.join, hook_settings::OnError::Deny, "deny unless set");
        assert_eq!(
            (h.timeout, h.join_cache),
            (Duration::from_millis(250), Duration::from_secs(30))
        );
        assert_eq!(h.forward_headers, ["cookie", "authorization"]);
        assert_eq!(h.secret.as_deref(), Some("s3cret"));
        let err = parse(&[
            "--hook-connect",
            "ftp://127.0.0.1/x",
            "--hook-publish",
            "chat:*=redis://127.0.0.1:7000",
            "--hook-disconnect",
            "127.0.0.1:9000",
            "--hook-on-error",
            "everything=allow",
            "--hook-timeout",
            "0s",
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 5, "{err}");
    }

    #[test]
    fn the_http_cap_follows_the_open_files_limit() {
        assert_eq!(http_connection_cap(1024), 128);
        assert_eq!(http_connection_cap(20_000), 2_500);
        assert_eq!(http_connection_cap(100), 32);
        assert_eq!(http_connection_cap(u64::MAX), 10_000);
    }

    #[test]
    fn file_settings_sit_under_flags() {
        let dir = std::env::temp_dir().join(format!("shardcast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nmax_frame_bytes = \"8KiB\"\nhot_room = [\"stadium=8\"]\n",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "shardcast",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9100",
        ])
        .unwrap();
        let c = args.with_file().unwrap().resolve().unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.max_frame_bytes, 8192);
        assert_eq!(c.hot_rooms.get("stadium"), Some(&8));
        std::fs::write(&path, "listn = \"x\"\n").unwrap();
        let args = Args::try_parse_from(["shardcast", "--config", path.to_str().unwrap()]).unwrap();
        assert!(args.with_file().unwrap_err().to_string().contains("listn"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
