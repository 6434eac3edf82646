// shardcast-client: rooms, direct messages, reconnect with full jitter, and recovery from history
// (docs/protocol.md is the contract this speaks). One runtime dependency, `fossil-delta`, to apply
// the node's deltas: in the browser it uses the global WebSocket; in Node pass `{ WebSocket }` from
// the `ws` package.

import { applyDelta } from "fossil-delta";
import { json, type Codec, type Frame } from "./codec.js";
import { Emitter } from "./emitter.js";

export { json, type Codec, type Frame } from "./codec.js";

export type State = "connecting" | "connected" | "reconnecting" | "closed";

/** A room message as the app gets it; `shard` and `pos` only in rooms with history. */
export interface Message {
  room: string;
  from: string;
  data: unknown;
  shard?: number;
  pos?: string;
  /** The key it was published with: a newer message of the same key replaces it. */
  key?: string;
  /** How many values of `key` before this one this socket never got (`maxRate`, a slow socket). */
  skipped?: number;
  /** Sent on a join with `latest`, before its `ok`: the key's current value, not a new one. */
  latest?: boolean;
}

export interface JoinOptions {
  /** After a reconnect, ask for what was missed (`since`) in rooms with history. Default true. */
  recover?: boolean;
  /**
   * Get the current value of every key of the room before the join's `ok` (a scoreboard opened
   * mid-match shows the score at once). Asked again on every re-join that cannot resume from
   * positions (a room without history, or `recover: false`).
   */
  latest?: boolean;
  /** At most this many messages per second per key to this socket (1 to 1000); the newest wins. */
  maxRate?: number;
  /**
   * Let the node send a key's new value as the difference to its previous one (a scoreboard's
   * few changed bytes instead of the whole state). The app still gets whole values: the client
   * applies each delta. Default false.
   */
  delta?: boolean;
}

export interface DirectMessage {
  from: string;
  data: unknown;
}

/**
 * Every failure the SDK reports. `code` is the server's error code (`forbidden`, `bad_room`, …)
 * or one of the SDK's own: `disconnected` (the connection dropped before the answer came; the
 * command may or may not have been done), `closed`, `timeout`, `token_expired` (close 4003 and no
 * `getToken`), `policy` (close 1008 or 1009: a bug in the app, not retried), `max_attempts`,
 * `token` (`getToken` failed), `bad_frame` (the node sent something that is not a frame),
 * `bad_delta` (a delta that did not apply: the room is joined again and its keys' next values
 * come whole), `bad_url` (the URL cannot be opened).
 */
export class ShardcastError extends Error {
  constructor(
    readonly code: string,
    message: string,
    /** The WebSocket close code, when a close caused it. */
    readonly closeCode?: number,
  ) {
    super(message);
    this.name = "ShardcastError";
  }
}

/** The part of the WHATWG WebSocket the client uses; the browser's and `ws`'s both fit. */
export interface Socket {
  readonly readyState: number;
  binaryType: string;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type SocketConstructor = new (url: string, protocols?: string | string[]) => Socket;

export interface ReconnectOptions {
  /** First backoff ceiling in ms; each attempt doubles it up to `cap`. Default 500. */
  base?: number;
  /** Largest backoff ceiling in ms. Default 20000. */
  cap?: number;
  /** Reconnect attempts in a row before giving up (`error` `max_attempts`, state `closed`). Default unlimited. */
  maxAttempts?: number;
}

export interface ConnectOptions {
  /** A JWT sent as `?token=`. */
  token?: string;
  /** Called before every connection attempt (and so after a 4003); wins over `token`. */
  getToken?: () => string | Promise<string>;
  /** `?user=`, for nodes without auth. */
  user?: string;
  /** `json` (default) or a codec; MessagePack comes from `shardcast-client/msgpack`. */
  encoding?: "json" | Codec;
  reconnect?: ReconnectOptions;
  /** How long a command waits for its `ok` or `error`, in ms. Default 10000. */
  requestTimeout?: number;
  /**
   * Ping period in ms: a connection silent this long gets a `ping`, and one silent twice this long
   * is given up and reconnected (a phone that left the Wi-Fi). Default 20000; 0 turns it off.
   */
  heartbeat?: number;
  /** The WebSocket class; defaults to the global one (browsers, Node 22+). */
  WebSocket?: SocketConstructor;
}

export interface ClientEvents {
  state: State;
  error: ShardcastError;
  dm: DirectMessage;
}

export interface RoomEvents {
  message: Message;
  /** The first join's answer. */
  joined: { pos?: string[] };
  /** After each re-join: true when nothing was missed (or it was replayed), false: refetch. */
  recovered: boolean;
  error: ShardcastError;
}

interface Pending {
  frame: Frame;
  resolve: (f: Frame) => void;
  reject: (e: ShardcastError) => void;
  timer?: ReturnType<typeof setTimeout>;
  /** Sent on the current connection (else it waits for one). */
  sent: boolean;
  /** Joins belong to one connection and are never queued for the next. */
  queued: boolean;
}

const OPEN = 1;
/** Replayed positions remembered per room to drop duplicates (at least --recover-max). */
const SEEN = 4096;

/** Opens a client; it connects at once and keeps reconnecting until `close()`. */
export function connect(url: string, options: ConnectOptions = {}): Client {
  if ((options.encoding as string) === "msgpack") {
    throw new TypeError("encoding 'msgpack' needs: import { connect } from 'shardcast-client/msgpack'");
  }
  return new Client(url, options, options.encoding && options.encoding !== "json" ? options.encoding : json);
}

export class Client extends Emitter<ClientEvents> {
  state: State = "connecting";
  readonly #url: string;
  readonly #options: ConnectOptions;
  readonly #codec: Codec;
  readonly #Socket: SocketConstructor;
  #ws: Socket | null = null;
  /** Bumped on every connection attempt and on close, so stale callbacks know they are stale. */
  #generation = 0;
  #attempt = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #lastHeard = 0;
  /** When the node said to come back (`reconnect` frame), as a `Date.now()` time. */
  #comeBackAt: number | null = null;
  #nextId = 1;
  readonly #pending = new Map<number, Pending>();
  readonly #rooms = new Map<string, Room>();

  constructor(url: string, options: ConnectOptions, codec: Codec) {
    super();
    const Socket = options.WebSocket ?? (globalThis as { WebSocket?: SocketConstructor }).WebSocket;
    if (!Socket) throw new TypeError("no global WebSocket here: pass { WebSocket } from the 'ws' package");
    this.#url = url;
    this.#options = options;
    this.#codec = codec;
    this.#Socket = Socket;
    // After this turn, so the app's listeners are on; unless the app closed it meanwhile.
    queueMicrotask(() => {
      if (this.state === "closed") return;
      this.emit("state", "connecting");
      void this.#open();
    });
  }

  /**
   * Joins `name` (again after every reconnect, until `leave`); the same room if already joined
   * (its options are the first join's). A `maxRate` that is not an integer from 1 to 1000 throws a
   * `TypeError` at once, rather than failing the join on every connection.
   */
  join(name: string, options: JoinOptions = {}): Room {
    const { maxRate } = options;
    if (maxRate !== undefined && !(Number.isInteger(maxRate) && maxRate >= 1 && maxRate <= 1000)) {
      throw new TypeError(`maxRate must be an integer from 1 to 1000, not ${String(maxRate)}`);
    }
    let room = this.#rooms.get(name);
    if (!room) {
      room = new Room(this, name, options.recover ?? true, options.latest ?? false, maxRate, options.delta ?? false);
      this.#rooms.set(name, room);
      if (this.#connected()) this.#join(room);
    }
    return room;
  }

  /** Sends `data` to every socket of `user`; resolves on `ok`. */
  dm(user: string, data: unknown): Promise<void> {
    return this.request({ op: "dm", to: user, data }).then(() => undefined);
  }

  /** Closes for good: no reconnect; pending commands reject with `closed`. */
  close(): void {
    this.#stop(new ShardcastError("closed", "client closed"));
  }

  /**
   * Connects again after the client closed (the app's consent after a 1008/1009, a fresh start
   * after `max_attempts` or `token_expired`); every room not left is joined again.
   */
  reconnect(): void {
    if (this.state !== "closed") return;
    this.#attempt = 0;
    this.#setState("connecting");
    void this.#open();
  }

  /** Sends a command with an id; resolves with its `ok`, rejects with its `error`'s code. */
  request(frame: Frame): Promise<Frame> {
    return this.#request(frame, true);
  }

  #request(frame: Frame, queued: boolean): Promise<Frame> {
    if (this.state === "closed") {
      return Promise.reject(new ShardcastError("closed", "client closed"));
    }
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      const p: Pending = { frame: { ...frame, id }, resolve, reject, sent: false, queued };
      this.#pending.set(id, p);
      if (this.#connected()) this.#sendPending(id, p);
    });
  }

  #sendPending(id: number, p: Pending): void {
    p.sent = true;
    p.timer = setTimeout(() => {
      this.#pending.delete(id);
      p.reject(new ShardcastError("timeout", `no answer to ${p.frame.op} within the request timeout`));
    }, this.#options.requestTimeout ?? 10_000);
    this.#send(p.frame);
  }

  #send(frame: Frame): void {
    this.#ws?.send(this.#codec.encode(frame));
  }

  #connected(): boolean {
    return this.state === "connected" && this.#ws?.readyState === OPEN;
  }

  #setState(state: State): void {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  async #open(): Promise<void> {
    const generation = ++this.#generation;
    let token = this.#options.token;
    if (this.#options.getToken) {
      try {
        token = await this.#options.getToken();
      } catch (e) {
        if (generation !== this.#generation) return;
        this.emit("error", new ShardcastError("token", `getToken failed: ${e}`));
        this.#retry(null);
        return;
      }
      if (generation !== this.#generation) return;
    }
    let ws: Socket;
    try {
      const url = new URL(this.#url);
      if (token) url.searchParams.set("token", token);
      if (this.#options.user) url.searchParams.set("user", this.#options.user);
      ws = new this.#Socket(url.toString(), [this.#codec.protocol]);
    } catch (e) {
      this.#stop(new ShardcastError("bad_url", `cannot open ${this.#url}: ${e}`));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.#ws = ws;
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      this.#attempt = 0;
      this.#comeBackAt = null;
      this.#lastHeard = Date.now();
      this.#setState("connected");
      this.#startHeartbeat(ws);
      // Joins first, so a queued publish to a joined room is sent after the join.
      for (const room of this.#rooms.values()) this.#join(room);
      for (const [id, p] of this.#pending) if (!p.sent) this.#sendPending(id, p);
    };
    ws.onmessage = (ev) => {
      if (ws !== this.#ws) return;
      this.#lastHeard = Date.now();
      let frame: Frame;
      try {
        frame = this.#codec.decode(ev.data as string | ArrayBuffer);
      } catch (e) {
        this.emit("error", new ShardcastError("bad_frame", `undecodable frame from the node: ${e}`));
        return;
      }
      this.#onFrame(frame);
    };
    ws.onclose = (ev) => this.#lost(ws, ev.code, ev.reason);
    ws.onerror = () => {
      // A close event always follows; it decides what happens.
    };
  }

  #onFrame(f: Frame): void {
    switch (f.op) {
      case "msg":
        this.#rooms.get(f.room as string)?.deliver(f, this.#codec);
        return;
      case "dm":
        this.emit("dm", { from: f.from as string, data: f.data });
        return;
      case "ok":
      case "error": {
        const p = typeof f.id === "number" ? this.#pending.get(f.id) : undefined;
        if (!p) {
          if (f.op === "error") this.emit("error", new ShardcastError(String(f.code), String(f.message)));
          return;
        }
        this.#pending.delete(f.id as number);
        clearTimeout(p.timer);
        if (f.op === "ok") p.resolve(f);
        else p.reject(new ShardcastError(String(f.code), String(f.message ?? f.code)));
        return;
      }
      case "reconnect": {
        // The node is draining and has spread its clients over its window: come back at T, not
        // sooner (a storm on the other nodes) and not later (the node closes us at T anyway).
        const after = Math.max(0, Number(f.after_ms) || 0);
        this.#comeBackAt = Date.now() + after;
        const ws = this.#ws;
        clearTimeout(this.#timer);
        this.#timer = setTimeout(() => {
          if (ws && ws === this.#ws) this.#lost(ws, 4001, "reconnect");
        }, after);
        return;
      }
      default:
      // `pong`, and ops a newer node may add: nothing to do.
    }
  }

  /** The connection `ws` is gone (closed, failed, silent): decide whether and when to come back. */
  #lost(ws: Socket, code: number, reason: string): void {
    if (ws !== this.#ws) return;
    this.#ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (ws.readyState <= OPEN) ws.close(1000);
    clearInterval(this.#heartbeat);
    for (const room of this.#rooms.values()) room.joined = false;
    for (const [id, p] of this.#pending) {
      if (p.sent || !p.queued) {
        this.#pending.delete(id);
        clearTimeout(p.timer);
        p.reject(new ShardcastError("disconnected", `connection lost before the answer (close ${code})`, code));
      }
    }
    if (this.state === "closed") return;
    if (code === 4003 && !this.#options.getToken) {
      this.#stop(new ShardcastError("token_expired", "token expired (close 4003) and no getToken to renew it", code));
      return;
    }
    if (code === 1008 || code === 1009) {
      this.#stop(new ShardcastError("policy", `closed with ${code} (${reason}): fix the app, then call reconnect()`, code));
      return;
    }
    this.#retry(this.#comeBackAt);
  }

  /** Schedules the next attempt: at the node's time if it gave one, else full-jitter backoff. */
  #retry(at: number | null): void {
    const { base = 500, cap = 20_000, maxAttempts = Infinity } = this.#options.reconnect ?? {};
    if (this.#attempt >= maxAttempts) {
      this.#stop(new ShardcastError("max_attempts", `gave up after ${this.#attempt} reconnect attempts`));
      return;
    }
    const delay = at !== null ? Math.max(0, at - Date.now()) : Math.random() * Math.min(cap, base * 2 ** this.#attempt);
    this.#attempt++;
    this.#comeBackAt = null;
    this.#setState("reconnecting");
    clearTimeout(this.#timer);
    const generation = ++this.#generation;
    this.#timer = setTimeout(() => {
      if (generation === this.#generation) void this.#open();
    }, delay);
  }

  #stop(error: ShardcastError): void {
    if (this.state === "closed") return;
    this.#generation++;
    clearTimeout(this.#timer);
    clearInterval(this.#heartbeat);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      if (ws.readyState <= OPEN) ws.close(1000);
    }
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this.#pending.clear();
    for (const room of this.#rooms.values()) room.joined = false;
    this.#setState("closed");
    if (error.code !== "closed") this.emit("error", error);
  }

  #startHeartbeat(ws: Socket): void {
    const period = this.#options.heartbeat ?? 20_000;
    if (period <= 0) return;
    this.#heartbeat = setInterval(() => {
      const silent = Date.now() - this.#lastHeard;
      if (silent >= 2 * period) this.#lost(ws, 4002, "heartbeat: nothing heard");
      else if (silent >= period) this.#send({ op: "ping" });
    }, period / 2);
  }

  /** Joins `room`; a `resync` join (the room is joined already) only starts its values over. */
  #join(room: Room, resync = false): void {
    const frame: Frame = { op: "join", room: room.name };
    const resuming = room.everJoined;
    if (resuming && room.recover && room.last && !resync) frame.since = room.last;
    // With positions the node replays what was missed, the newer values of keys included; where it
    // cannot (no history, no recovery, or history lost in a failover) the current values catch the
    // room up instead: the node sends them only when the replay does not happen.
    if (room.wantsLatest && !resync) frame.latest = true;
    // The rate is the socket's, so every connection is told again.
    if (room.maxRate !== undefined) frame.max_rate = room.maxRate;
    if (room.delta) {
      frame.delta = true;
      // A new connection's socket has no values yet: deltas start from whole ones.
      if (!room.joined) room.forgetValues();
    }
    this.#request(frame, false).then(
      (ok) => {
        // Left while the join was on its way: leave on the node too.
        if (this.#rooms.get(room.name) !== room) this.request({ op: "leave", room: room.name }).catch(() => {});
        else if (!resync) room.onJoined(ok, resuming);
      },
      (e: ShardcastError) => {
        if (e.code === "disconnected" || e.code === "closed") return;
        if (e.code === "unavailable" || e.code === "timeout") {
          // The node's bus is not ready yet: try the room again on this connection.
          setTimeout(() => {
            if (this.#rooms.get(room.name) === room && this.#connected() && !room.joined) this.#join(room);
          }, Math.random() * 1000);
          return;
        }
        this.#rooms.delete(room.name);
        room.failed(e);
      },
    );
  }

  /**
   * @internal A delta of `room` did not apply: joins it again, which starts the socket's values
   * over on the node (the next value of every key comes whole) without a gap in the room.
   */
  resync(room: Room): void {
    if (this.#rooms.get(room.name) === room && this.#connected() && room.joined) this.#join(room, true);
  }

  /** @internal */
  forget(room: Room): boolean {
    if (this.#rooms.get(room.name) !== room) return false;
    this.#rooms.delete(room.name);
    return this.#connected();
  }
}

export class Room extends Emitter<RoomEvents> {
  /** Joined on the current connection. */
  joined = false;
  /** @internal Joined once at least: later joins are resumes. */
  everJoined = false;
  /** @internal Per shard, the position of the last message seen (history rooms only). */
  last: string[] | null = null;
  readonly #seen = new Set<string>();
  /** The newest message per key, for `latest()`. */
  readonly #latest = new Map<string, Message>();
  /** With `delta`: per key, the bytes of the value a delta of that key applies to. */
  readonly #values = new Map<string, Uint8Array>();
  /** With `delta`: keys whose delta failed; their deltas are skipped until a whole value comes. */
  readonly #broken = new Set<string>();
  readonly #client: Client;
  /** Resolves on the first join's `ok`, rejects with its error. */
  readonly ready: Promise<void>;
  #ready!: { resolve: () => void; reject: (e: ShardcastError) => void };

  /** @internal Use `client.join`. */
  constructor(
    client: Client,
    readonly name: string,
    readonly recover: boolean,
    /** @internal Joins ask for the keys' current values (`join`'s `latest`). */
    readonly wantsLatest: boolean = false,
    /** @internal `join`'s `maxRate`. */
    readonly maxRate?: number,
    /** @internal `join`'s `delta`. */
    readonly delta: boolean = false,
  ) {
    super();
    this.#client = client;
    this.ready = new Promise((resolve, reject) => (this.#ready = { resolve, reject }));
    // An app that never awaits `ready` still hears of a failure through the `error` event.
    this.ready.catch(() => {});
  }

  /**
   * Publishes `data` to the room; resolves with its position in rooms with history. With `key`, it
   * is that key's new value: joins with `latest` get it until a newer one of the key replaces it.
   */
  async publish(data: unknown, options: { key?: string } = {}): Promise<{ pos?: string }> {
    const frame: Frame = { op: "pub", room: this.name, data };
    if (options.key !== undefined) frame.key = options.key;
    const ok = await this.#client.request(frame);
    return typeof ok.pos === "string" ? { pos: ok.pos } : {};
  }

  /** The newest message received per key (keyed messages only), as a copy; empty after `leave`. */
  latest(): Map<string, Message> {
    return new Map(this.#latest);
  }

  /** The newest `limit` (1 to 1000) messages, oldest first; empty in a room without history. */
  async history(limit: number): Promise<Message[]> {
    const ok = await this.#client.request({ op: "history", room: this.name, limit });
    return ((ok.msgs as Frame[]) ?? []).map(message);
  }

  /** Leaves the room: no more messages, no re-join. */
  async leave(): Promise<void> {
    const wasJoined = this.joined;
    this.joined = false;
    this.#latest.clear();
    if (this.#client.forget(this) && wasJoined) {
      await this.#client.request({ op: "leave", room: this.name }).catch((e: ShardcastError) => {
        if (e.code !== "not_joined" && e.code !== "disconnected") throw e;
      });
    }
  }

  /** @internal */
  onJoined(ok: Frame, resuming: boolean): void {
    this.joined = true;
    this.last = Array.isArray(ok.pos) ? [...(ok.pos as string[])] : null;
    if (!resuming) {
      this.everJoined = true;
      this.#ready.resolve();
      this.emit("joined", this.last ? { pos: [...this.last] } : {});
    } else {
      this.emit("recovered", ok.recovered === true);
    }
  }

  /** @internal */
  failed(e: ShardcastError): void {
    this.joined = false;
    this.#ready.reject(e);
    this.emit("error", e);
  }

  /** @internal A new connection: the node sends whole values before any delta. */
  forgetValues(): void {
    this.#values.clear();
    this.#broken.clear();
  }

  /**
   * @internal A keyed frame of a `delta` join (`delta` true or false): the value it carries, whole
   * or rebuilt from the key's previous one; `undefined` when it cannot be (an `error` event once,
   * then the room is joined again and the key's deltas skipped until its next whole value).
   */
  #rebuild(f: Frame, key: string, codec: Codec): { value: unknown } | undefined {
    try {
      const carried = codec.bytesOf(f.data);
      let bytes = carried;
      if (f.delta === true) {
        if (this.#broken.has(key)) return undefined;
        const base = this.#values.get(key);
        if (base === undefined) throw new Error(`no previous value of key ${key}`);
        bytes = applyDelta(base, carried);
      }
      const value = codec.valueOf(bytes);
      this.#values.set(key, bytes);
      this.#broken.delete(key);
      return { value };
    } catch (e) {
      this.#values.delete(key);
      if (!this.#broken.has(key)) {
        this.#broken.add(key);
        this.emit("error", new ShardcastError("bad_delta", `a value of key ${key} in ${this.name} could not be rebuilt: ${e}`));
        this.#client.resync(this);
      }
      return undefined;
    }
  }

  /** @internal A `msg` of this room: dropped when its position was delivered already. */
  deliver(f: Frame, codec: Codec): void {
    if (typeof f.delta === "boolean" && typeof f.key === "string") {
      const rebuilt = this.#rebuild(f, f.key, codec);
      if (rebuilt === undefined) return;
      f = { ...f, data: rebuilt.value };
    }
    const m = message(f);
    if (m.pos !== undefined && m.shard !== undefined) {
      if (this.#seen.has(m.pos)) return;
      this.#seen.add(m.pos);
      if (this.#seen.size > SEEN) this.#seen.delete(this.#seen.values().next().value as string);
      if (this.last && m.shard < this.last.length) this.last[m.shard] = m.pos;
    }
    if (m.key !== undefined) this.#latest.set(m.key, m);
    this.emit("message", m);
  }
}

function message(f: Frame): Message {
  const m: Message = { room: f.room as string, from: f.from as string, data: f.data };
  if (typeof f.shard === "number") m.shard = f.shard;
  if (typeof f.pos === "string") m.pos = f.pos;
  if (typeof f.key === "string") m.key = f.key;
  if (typeof f.skipped === "number") m.skipped = f.skipped;
  if (f.latest === true) m.latest = true;
  return m;
}
