// The SDK against the node's real binary and a real Redis Cluster: resume without loss after a
// killed connection, duplicates dropped, a drain's reconnects spread over the node's window, token
// refresh on 4003, no retry after 1008/1009, MessagePack, keyed messages (a join's latest values,
// maxRate, latest asked again on a resume without positions).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { monitorEventLoopDelay } from "node:perf_hooks";
import WebSocket from "ws";
import { connect as connectMsgpack } from "../dist/msgpack.js";
import { json } from "../dist/index.js";
import { connect, freePort, hs256, prefixes, startBalancer, startCluster, startNode, until } from "./harness.mjs";

let cluster;
before(async () => {
  cluster = await startCluster();
});
after(() => cluster?.stop());

/** Flags of a node on the cluster keeping history for `hist*` (`hist-hot` in 4 shards). */
function historyArgs(extra = []) {
  return [
    "--redis",
    cluster.url,
    ...prefixes(),
    "--history",
    "hist*=1000/10m",
    "--hot-room",
    "hist-hot=4",
    "--command-rate",
    "100000",
    "--command-burst",
    "100000",
    ...extra,
  ];
}

/** Two such nodes, sharing their channels. */
async function twoNodes(extra = []) {
  const args = historyArgs(extra);
  return Promise.all([startNode(args), startNode(args)]);
}

/** Records what a client does: states, errors, and per room messages and recoveries. */
function watch(client) {
  const seen = { states: [], errors: [], connectedAt: [] };
  client.on("state", (s) => {
    seen.states.push(s);
    if (s === "connected") seen.connectedAt.push(performance.now());
  });
  client.on("error", (e) => seen.errors.push(e));
  return seen;
}

function record(room) {
  const got = { messages: [], recovered: [] };
  room.on("message", (m) => got.messages.push(m));
  room.on("recovered", (ok) => got.recovered.push(ok));
  return got;
}

/** Publishes `count` numbered messages as `user`, one after another, each acknowledged. */
async function feed(url, user, room, count, pause = () => Promise.resolve()) {
  const client = connect(url, { user });
  const r = client.join(room);
  await r.ready;
  for (let i = 0; i < count; i++) {
    await r.publish({ from: user, i });
    await pause(i);
  }
  client.close();
}

test("a killed TCP connection: the client comes back on the other node, every message once and in order", async () => {
  const nodes = await twoNodes();
  const lb = await startBalancer(nodes.map((n) => n.port));
  const fan = connect(lb.ws, { user: "fan", reconnect: { base: 200, cap: 2000 } });
  try {
    const seen = watch(fan);
    const hot = record(fan.join("hist-hot"));
    const plain = record(fan.join("plain"));
    await Promise.all([fan.join("hist-hot").ready, fan.join("plain").ready]);
    const firstNode = lb.landed[0];
    const PER_FEED = 120;
    let cut = false;
    // Three senders (so several shards), each on a node of its own choosing, 5 ms apart.
    const feeds = ["f0", "f1", "f2"].map((user, k) =>
      feed(nodes[k % 2].ws, user, "hist-hot", PER_FEED, async (i) => {
        if (!cut && k === 0 && i === 30) {
          cut = true;
          lb.cut();
        }
        await new Promise((r) => setTimeout(r, 5));
      }),
    );
    await Promise.all(feeds);
    await until("every message at the fan", () => hot.messages.length >= 3 * PER_FEED).catch((e) => {
      const per = ["f0", "f1", "f2"].map((u) => hot.messages.filter((m) => m.data.from === u).map((m) => m.data.i));
      throw new Error(`${e.message}: got ${per.map((l) => l.length)}; states ${seen.states}; recovered ${hot.recovered}; ${JSON.stringify(per)}`);
    });
    assert.equal(hot.messages.length, 3 * PER_FEED, "no duplicate");
    for (const user of ["f0", "f1", "f2"]) {
      const order = hot.messages.filter((m) => m.data.from === user).map((m) => m.data.i);
      assert.deepEqual(order, [...Array(PER_FEED).keys()], `${user}'s messages once and in order`);
    }
    assert.deepEqual(hot.recovered, [true], "the history room recovered");
    assert.deepEqual(plain.recovered, [false], "a room without history says it could not recover");
    assert.deepEqual(seen.states.slice(0, 4), ["connecting", "connected", "reconnecting", "connected"]);
    assert.notEqual(lb.landed[1], firstNode, "round robin put the reconnect on the other node");
  } finally {
    fan.close();
    await lb.close();
    await Promise.all(nodes.map((n) => n.stop()));
  }
});

test("a replayed position already delivered is dropped", async () => {
  const node = await startNode(historyArgs());
  const lb = await startBalancer([node.port]);
  const fan = connect(lb.ws, { user: "fan", reconnect: { base: 100, cap: 500 } });
  try {
    const room = fan.join("hist-hot");
    const got = record(room);
    await room.ready;
    const start = [...room.last];
    await feed(node.ws, "f0", "hist-hot", 20);
    await until("20 messages", () => got.messages.length >= 20);
    // Resume from where the room stood at the join: the node replays all 20 again.
    room.last = start;
    lb.cut();
    await until("the resume", () => got.recovered.length === 1);
    await feed(node.ws, "f0", "hist-hot", 5);
    await until("5 more", () => got.messages.length >= 25);
    assert.equal(got.messages.length, 25, "the 20 replayed messages were dropped, not delivered twice");
    assert.equal(new Set(got.messages.map((m) => m.pos)).size, 25);
  } finally {
    fan.close();
    await lb.close();
    await node.stop();
  }
});

/**
 * A WebSocket class that logs, for one client, when the SDK opened each socket and when the node
 * told it to come back (the `reconnect` frame's arrival plus its `after_ms`).
 */
function loggingSocket(log) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      log.opened.push(performance.now());
      // Registered before the SDK's `onmessage`, so it runs first, in the same turn.
      this.addEventListener("message", (ev) => {
        if (typeof ev.data === "string" && ev.data.includes('"reconnect"')) {
          log.due = performance.now() + JSON.parse(ev.data).after_ms;
        }
      });
    }
  };
}

/** Counts per 100 ms from `t0` over `windowMs`, and how many fell after it. */
function histogram(times, t0, windowMs) {
  const buckets = new Array(windowMs / 100).fill(0);
  let late = 0;
  for (const t of times) {
    const b = Math.floor((t - t0) / 100);
    if (b < buckets.length) buckets[b]++;
    else late++;
  }
  return { buckets, late, max: Math.max(...buckets), mean: times.length / buckets.length };
}

test("1,000 clients told to reconnect come back spread over the node's window", async () => {
  const WINDOW_MS = 3000;
  const CLIENTS = 1000;
  const nodes = await twoNodes(["--drain-jitter", `${WINDOW_MS}ms`, "--drain-timeout", "15s"]);
  const [draining, other] = nodes;
  const lb = await startBalancer([draining.port]);
  const clients = [];
  const lag = monitorEventLoopDelay({ resolution: 10 });
  try {
    for (let batch = 0; batch < CLIENTS / 100; batch++) {
      const group = [];
      for (let i = 0; i < 100; i++) {
        const log = { opened: [], due: null };
        const c = connect(lb.ws, { user: `u${batch * 100 + i}`, WebSocket: loggingSocket(log) });
        const seen = watch(c);
        clients.push({ c, seen, log });
        group.push(seen);
      }
      await until(`batch ${batch} connected`, () => group.every((s) => s.connectedAt.length === 1));
    }
    // The balancer takes the draining node out of rotation, as its health check would.
    lb.targets = [other.port];
    const before = lb.acceptedAt.length;
    lag.enable();
    const t0 = performance.now();
    draining.signal("SIGTERM");
    await until(
      "every client back",
      () => clients.every(({ seen }) => seen.connectedAt.length === 2),
      WINDOW_MS + 20_000,
    );
    lag.disable();
    assert.equal(lb.acceptedAt.length - before, CLIENTS, "one attempt each");
    // Every client waited as long as it was told, never less (a storm on the other nodes).
    const early = clients.filter(({ log }) => log.due === null || log.opened[1] < log.due - 2);
    assert.equal(early.length, 0, `${early.length} clients came back before their after_ms`);
    // When the node told them to come back, and when the SDK opened its new socket (asserted).
    const told = histogram(
      clients.map(({ log }) => log.due),
      t0,
      WINDOW_MS,
    );
    const opened = histogram(
      clients.map(({ log }) => log.opened[1]),
      t0,
      WINDOW_MS,
    );
    // What the balancer saw: the same, plus the lag of this test process's accept loop on a loaded
    // machine (1,000 clients and the balancer share one process here, not 1,000 phones): shown only.
    const arrived = histogram(lb.acceptedAt.slice(before), t0, WINDOW_MS);
    const show = (h) => `max ${h.max}, mean ${h.mean.toFixed(1)}, after the window ${h.late}: ${h.buckets.join(" ")}`;
    console.log(`reconnects per 100 ms over the ${WINDOW_MS} ms window, as the SDK opened them: ${show(opened)}`);
    console.log(`  as the node told them (reconnect frame's arrival + after_ms): ${show(told)}`);
    console.log(
      `  as the balancer accepted them: ${show(arrived)}; this process's event loop stalled up to ${(lag.max / 1e6).toFixed(0)} ms`,
    );
    assert.ok(opened.max <= 3 * opened.mean, `max ${opened.max} per 100 ms is over 3x the mean ${opened.mean}`);
    assert.ok(opened.late <= CLIENTS / 10, `${opened.late} came back after the window`);
    assert.deepEqual(await draining.exited, { code: 0, signal: null }, "the drained node exited cleanly");
  } finally {
    lag.disable();
    for (const { c } of clients) c.close();
    await lb.close();
    await Promise.all(nodes.map((n) => n.stop()));
  }
});

test("close 4003 fetches a fresh token and resumes; without getToken it stops and says why", async () => {
  const node = await startNode(["--redis", cluster.url, ...prefixes(), "--jwt-secret", "sdk-test-secret-not-for-production", "--history", "hist*=1000/10m"]);
  const publisher = connect(node.ws, { token: hs256({ sub: "feed", pub: true }) });
  const now = () => Math.floor(Date.now() / 1000);
  let calls = 0;
  const fan = connect(node.ws, {
    getToken: async () => {
      calls++;
      return hs256({ sub: "fan", exp: now() + 2 });
    },
    reconnect: { base: 100, cap: 1000 },
  });
  const stuck = connect(node.ws, { token: hs256({ sub: "stuck", exp: now() + 1 }) });
  try {
    const seen = watch(fan);
    const room = fan.join("hist-a");
    const got = record(room);
    await room.ready;
    const stuckSeen = watch(stuck);
    await until("the 4003 without getToken", () => stuckSeen.errors.length > 0);
    assert.equal(stuckSeen.errors[0].code, "token_expired");
    assert.equal(stuckSeen.errors[0].closeCode, 4003);
    assert.equal(stuck.state, "closed", "no reconnect with the expired token");
    await until("two refreshes after 4003", () => got.recovered.length >= 2, 20_000);
    assert.ok(calls >= 3, `getToken called ${calls} times`);
    assert.ok(got.recovered.every((r) => r === true), "each resume recovered");
    assert.equal(seen.errors.length, 0, `no error surfaced: ${seen.errors.map((e) => e.code)}`);
    await until("the fan connected", () => fan.state === "connected" && room.joined);
    await publisher.join("hist-a").publish("after the refresh");
    await until("a message after the refresh", () => got.messages.some((m) => m.data === "after the refresh"));
  } finally {
    fan.close();
    stuck.close();
    publisher.close();
    await node.stop();
  }
});

test("1009 (a frame too large) is surfaced and not retried; MessagePack clients talk to JSON ones", async () => {
  const node = await startNode(["--redis", cluster.url, ...prefixes(), "--max-frame-bytes", "4KiB"]);
  const json = connect(node.ws, { user: "j" });
  const packed = connectMsgpack(node.ws, { user: "m", WebSocket });
  try {
    const seen = watch(json);
    const room = json.join("mixed");
    const got = record(room);
    await room.ready;
    await packed.join("mixed").publish({ score: [2, 1], bytes: new Uint8Array([1, 2]).length });
    await until("the MessagePack message at the JSON client", () => got.messages.length === 1);
    assert.deepEqual(got.messages[0].data, { score: [2, 1], bytes: 2 });
    await assert.rejects(room.publish("x".repeat(8000)), (e) => ["disconnected", "policy"].includes(e.code));
    await until("the 1009 surfaced", () => seen.errors.length > 0);
    assert.equal(seen.errors[0].code, "policy");
    assert.equal(seen.errors[0].closeCode, 1009);
    assert.equal(json.state, "closed");
    // The app's consent: it reconnects and is in the room again.
    json.reconnect();
    await until("back after consent", () => json.state === "connected" && room.joined);
  } finally {
    json.close();
    packed.close();
    await node.stop();
  }
});

test("bad input gets a clear error and the client keeps working; a room left before its join's answer is left on the node too", async () => {
  // One room per connection: a room the node still counts shows as `too_many_rooms`.
  const node = await startNode(["--redis", cluster.url, ...prefixes(), "--max-rooms-per-conn", "1"]);
  const bad = connect("not a url", { user: "b" });
  const badSeen = watch(bad);
  const c = connect(node.ws, { user: "c" });
  try {
    // Closed in the turn it was made: it never connects.
    const never = connect(node.ws, { user: "never" });
    const neverSeen = watch(never);
    never.close();
    await until("the bad URL surfaced", () => badSeen.errors.length > 0);
    assert.deepEqual(neverSeen.states, ["closed"]);
    assert.equal(badSeen.errors[0].code, "bad_url");
    assert.equal(bad.state, "closed");

    const wrong = c.join("no{braces}");
    await assert.rejects(wrong.ready, (e) => e.code === "bad_room");
    const room = c.join("fine");
    await room.ready;
    await assert.rejects(room.publish(undefined), (e) => e.code === "bad_field");
    await assert.rejects(room.history(0), (e) => e.code === "bad_field");
    assert.deepEqual(await room.publish("still fine"), {});

    await room.leave();
    const hasty = c.join("hasty");
    await hasty.leave();
    // Two round trips behind the join on the same socket: its answer came, and the leave it called for.
    await c.dm("c", "one");
    await c.dm("c", "two");
    await c.join("after").ready; // too_many_rooms if the node still had the connection in "hasty"
  } finally {
    bad.close();
    c.close();
    await node.stop();
  }
});

/** A WebSocket class that keeps, per socket the SDK opens, the frames it sends (JSON only). */
function framesSent(sockets) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.sentFrames = [];
      sockets.push(this.sentFrames);
    }
    send(data, ...rest) {
      this.sentFrames.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  };
}

/** The join frames among `frames`, by room. */
function joins(frames) {
  return Object.fromEntries(frames.filter((f) => f.op === "join").map((f) => [f.room, f]));
}

test("keyed messages: a keyed publish arrives with its key; a join with latest gets each key's value before its ok, room.latest() keeps it until leave", async () => {
  const node = await startNode(historyArgs());
  const feed = connect(node.ws, { user: "feed" });
  const early = connect(node.ws, { user: "early" });
  const late = connect(node.ws, { user: "late" });
  try {
    // A room without history and one with.
    for (const name of ["board", "hist-board"]) {
      const watching = early.join(name);
      const seen = record(watching);
      await watching.ready;
      const room = feed.join(name);
      await room.ready;
      await room.publish({ score: [1, 0] }, { key: "score" });
      await room.publish("a chat line");
      await room.publish({ score: [2, 0] }, { key: "score" });
      await room.publish(12, { key: "clock" });
      await until(`4 messages in ${name}`, () => seen.messages.length >= 4);
      assert.deepEqual(
        seen.messages.map((m) => [m.key, m.data, m.latest]),
        [
          ["score", { score: [1, 0] }, undefined],
          [undefined, "a chat line", undefined],
          ["score", { score: [2, 0] }, undefined],
          ["clock", 12, undefined],
        ],
        `${name}: live messages carry their key`,
      );
      assert.deepEqual(
        [...watching.latest()].map(([k, m]) => [k, m.data]),
        [
          ["score", { score: [2, 0] }],
          ["clock", 12],
        ],
      );

      const joined = late.join(name, { latest: true });
      const got = record(joined);
      let beforeOk;
      joined.on("joined", () => (beforeOk = got.messages.map((m) => [m.key, m.data, m.latest, m.from])));
      await joined.ready;
      assert.deepEqual(
        beforeOk.sort(),
        [
          ["clock", 12, true, "feed"],
          ["score", { score: [2, 0] }, true, "feed"],
        ],
        `${name}: each key's current value, before the join's ok, and no unkeyed message`,
      );
      const latest = joined.latest();
      assert.deepEqual(latest.get("score").data, { score: [2, 0] });
      assert.equal(latest.get("clock").data, 12);
      latest.delete("score");
      assert.equal(joined.latest().size, 2, "latest() is a copy");

      await room.publish({ score: [3, 0] }, { key: "score" });
      await until(`the live score in ${name}`, () => got.messages.length >= 3);
      assert.equal(got.messages[2].key, "score");
      assert.equal(got.messages[2].latest, undefined, "a live message is not a latest value");
      assert.deepEqual(joined.latest().get("score").data, { score: [3, 0] });
      await joined.leave();
      assert.equal(joined.latest().size, 0, "cleared on leave");
    }
  } finally {
    feed.close();
    early.close();
    late.close();
    await node.stop();
  }
});

test("maxRate: an integer from 1 to 1000 or a TypeError, nothing sent; a good one goes on the join frame", async () => {
  const node = await startNode(historyArgs());
  const sockets = [];
  const c = connect(node.ws, { user: "c", WebSocket: framesSent(sockets) });
  try {
    for (const bad of [0, 1001, 1.5, -1, NaN, Infinity, "10", null]) {
      assert.throws(() => c.join("rated", { maxRate: bad }), TypeError, `maxRate ${String(bad)}`);
    }
    const slowest = c.join("rated", { maxRate: 1 });
    const fastest = c.join("rated-fast", { maxRate: 1000 });
    await Promise.all([slowest.ready, fastest.ready]);
    const sent = joins(sockets[0]);
    assert.equal(sent.rated.max_rate, 1);
    assert.equal(sent["rated-fast"].max_rate, 1000);
    assert.equal(sockets[0].filter((f) => f.op === "join" && f.room === "rated").length, 1, "the refused joins sent nothing");
  } finally {
    c.close();
    await node.stop();
  }
});

test("maxRate: the node thins a key to it, newest last, and each message says how many it skipped", async () => {
  const node = await startNode(historyArgs());
  const slow = connect(node.ws, { user: "slow" });
  const feed = connect(node.ws, { user: "feed" });
  try {
    const room = slow.join("rated", { maxRate: 1 });
    const got = record(room);
    await room.ready;
    const pub = feed.join("rated");
    await pub.ready;
    const VALUES = 30;
    for (let i = 0; i < VALUES; i++) await pub.publish(i, { key: "tick" });
    await until("the last value", () => got.messages.some((m) => m.data === VALUES - 1));
    const received = got.messages.map((m) => m.data);
    const skipped = got.messages.reduce((n, m) => n + (m.skipped ?? 0), 0);
    assert.ok(received.length < VALUES, `thinned at 1 per second: got ${received}`);
    assert.ok(got.messages.some((m) => m.skipped > 0), "a message says what it replaced");
    assert.equal(received.length + skipped, VALUES, `every value got or counted as skipped: ${JSON.stringify(got.messages)}`);
    assert.deepEqual([...received].sort((a, b) => a - b), received, "in order, the newest last");
    assert.equal(room.latest().get("tick").data, VALUES - 1);
  } finally {
    slow.close();
    feed.close();
    await node.stop();
  }
});

test("a room joined with latest asks for it again on a re-join without positions, one with positions resumes with since; maxRate is asked again", async () => {
  const node = await startNode(historyArgs());
  const lb = await startBalancer([node.port]);
  const sockets = [];
  const fan = connect(lb.ws, { user: "fan", reconnect: { base: 100, cap: 300 }, WebSocket: framesSent(sockets) });
  const feed = connect(node.ws, { user: "feed" });
  try {
    const plain = fan.join("board", { latest: true, maxRate: 50 });
    const hist = fan.join("hist-board", { latest: true });
    const plainGot = record(plain);
    const histGot = record(hist);
    await Promise.all([plain.ready, hist.ready]);
    const pubs = [feed.join("board"), feed.join("hist-board")];
    await Promise.all(pubs.map((r) => r.ready));
    for (const r of pubs) await r.publish(1, { key: "score" });
    await until("the first score", () => plainGot.messages.length === 1 && histGot.messages.length === 1);

    // Cut, and nowhere to reconnect to until the next score is out.
    const dead = await freePort();
    lb.targets = [dead];
    lb.cut();
    await until("the fan disconnected", () => fan.state === "reconnecting");
    for (const r of pubs) await r.publish(2, { key: "score" });
    lb.targets = [node.port];
    let plainAtRecovered;
    plain.on("recovered", () => (plainAtRecovered = plainGot.messages.map((m) => [m.data, m.latest])));
    await until("both rooms back", () => plainGot.recovered.length === 1 && histGot.recovered.length === 1);

    const first = joins(sockets[0]);
    assert.equal(first.board.latest, true);
    assert.equal(first["hist-board"].latest, true);
    const again = joins(sockets[sockets.length - 1]);
    assert.equal(again.board.latest, true, "no positions: latest asked again");
    assert.equal(again.board.since, undefined);
    assert.equal(again.board.max_rate, 50, "the rate is the socket's: asked again");
    assert.ok(Array.isArray(again["hist-board"].since), "positions: resumed with since");
    assert.equal(again["hist-board"].latest, true, "and latest beside since, for a replay that fails");

    assert.deepEqual(plainAtRecovered, [
      [1, undefined],
      [2, true],
    ], "the room without history caught up on the key before its ok");
    assert.deepEqual(plainGot.recovered, [false]);
    assert.equal(plain.latest().get("score").data, 2);
    await until("the replayed score", () => histGot.messages.length === 2);
    assert.deepEqual(histGot.recovered, [true]);
    assert.deepEqual(
      histGot.messages.map((m) => [m.data, m.key, m.latest]),
      [
        [1, "score", undefined],
        [2, "score", undefined],
      ],
      "the room with history replayed what was missed",
    );
  } finally {
    fan.close();
    feed.close();
    await lb.close();
    await node.stop();
  }
});

/** A match's state: each update changes a few bytes of it. */
function matchState(i) {
  return { home: "Arsenal", away: "Chelsea", minute: i, score: [Math.floor(i / 7), Math.floor(i / 11)], events: ["kick-off", "a long description of what happened so far"] };
}

test("delta: the app gets whole values in JSON and MessagePack while the node sends deltas; a value that cannot be rebuilt is an error, the room is joined again and its values come whole", async () => {
  const node = await startNode(historyArgs(["--delta-full-every", "1000"]));
  // Codecs that count the delta frames the node sent; the spoiling one corrupts the bytes of one
  // value it carries, as a bad delta would: that value cannot be rebuilt.
  let deltas = 0;
  let calls = 0;
  const counting = (codec, spoil) => ({
    ...codec,
    decode: (data) => {
      const f = codec.decode(data);
      if (f.delta === true) deltas++;
      return f;
    },
    bytesOf: (data) => {
      const bytes = codec.bytesOf(data);
      if (spoil && ++calls === 10) return bytes.map((b) => b ^ 0x5a);
      return bytes;
    },
  });
  const feed = connect(node.ws, { user: "feed" });
  const viewer = connect(node.ws, { user: "viewer", encoding: counting(json, false) });
  const packed = connectMsgpack(node.ws, { user: "packed", WebSocket });
  const spoiled = connect(node.ws, { user: "spoiled", encoding: counting(json, true) });
  const spoiledSeen = watch(spoiled);
  try {
    const rooms = [viewer, packed, spoiled].map((c) => c.join("board", { delta: true }));
    const got = rooms.map(record);
    const roomErrors = [];
    rooms[2].on("error", (e) => roomErrors.push(e));
    await Promise.all(rooms.map((r) => r.ready));
    const room = feed.join("board");
    await room.ready;
    const N = 30;
    for (let i = 1; i <= N; i++) await room.publish(matchState(i), { key: "state" });
    await until("every value on the JSON and MessagePack sockets", () => got[0].messages.length >= N && got[1].messages.length >= N);
    for (const g of got.slice(0, 2)) {
      assert.deepEqual(
        g.messages.map((m) => m.data),
        Array.from({ length: N }, (_, i) => matchState(i + 1)),
        "every value whole, as published",
      );
    }
    assert.ok(deltas >= N / 2, `the node sent deltas: ${deltas}`);
    await until("the spoiled socket's last value", () => got[2].messages.at(-1)?.data.minute === N);
    assert.deepEqual(roomErrors.map((e) => e.code), ["bad_delta"], "one error for the value that could not be rebuilt");
    const minutes = got[2].messages.map((m) => m.data.minute);
    assert.ok(minutes.length < N && minutes.length >= N - 4, `all but the unrebuildable values: ${minutes}`);
    for (const m of got[2].messages) assert.deepEqual(m.data, matchState(m.data.minute), "never a wrong value");
    assert.ok(minutes.every((v, i) => i === 0 || v > minutes[i - 1]), "in order");
    assert.deepEqual(spoiledSeen.errors, [], "no client-level error");
    // After the re-join the socket is back on deltas.
    const before = deltas;
    for (let i = N + 1; i <= N + 3; i++) await room.publish(matchState(i), { key: "state" });
    await until("the next values", () => got[2].messages.at(-1)?.data.minute === N + 3 && got[0].messages.length >= N + 3);
    assert.ok(deltas > before, "deltas again");
  } finally {
    feed.close();
    viewer.close();
    packed.close();
    spoiled.close();
    await node.stop();
  }
});
