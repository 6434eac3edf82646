// The demo page in a real headless Chromium (Debian's /usr/bin/chromium, driven by puppeteer-core):
// two nodes with history and --demo true on a real Redis Cluster, behind a round-robin TCP balancer.
// The page shows the live score, and when the node it is on drains it goes reconnecting, then
// connected on the other node, recovered, with no chat line missing. A screenshot is left in the
// output directory. A page opened mid-match shows the current score at once (its join asks for the
// latest value of each key).

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import puppeteer from "puppeteer-core";
import { connect, hs256, outDir, prefixes, SECRET, startBalancer, startCluster, startNode, until } from "./harness.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

let cluster;
before(async () => {
  cluster = await startCluster();
});
after(() => cluster?.stop());

async function openConnections(node) {
  const text = await (await fetch(`${node.http}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("shardcast_connections_open "));
  return Number(line?.split(" ")[1] ?? 0);
}

/** Flags of a demo node with history in the demo room, on channels of its own. */
function demoArgs() {
  return ["--redis", cluster.url, ...prefixes(), "--demo", "true", "--history", "demo=1000/10m", "--jwt-secret", SECRET, "--drain-jitter", "1s"];
}

/** Headless Chromium on a profile of its own; `close()` removes the profile too. */
async function launch() {
  const profile = mkdtempSync(path.join(os.tmpdir(), "shardcast-chromium-"));
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: profile,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  return {
    browser,
    close: async () => {
      await browser.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

test("the demo page survives the drain of its node: reconnecting, connected elsewhere, recovered, nothing missing", { timeout: 180_000 }, async () => {
  const args = demoArgs();
  const nodes = await Promise.all([startNode(args), startNode(args)]);
  const lb = await startBalancer(nodes.map((n) => n.port));
  const { browser, close } = await launch();
  let feed;
  try {
    const page = await browser.newPage();
    const problems = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()}`));
    await page.setViewport({ width: 1100, height: 700 });
    const text = (selector) => page.$eval(selector, (e) => e.textContent);
    const chat = () => page.$$eval("#chat li", (lis) => lis.map((li) => li.textContent));
    await page.goto(`${lb.http}/demo?token=${hs256({ sub: "viewer", pub: true })}`);
    await page.waitForFunction(() => document.getElementById("state")?.textContent === "connected", { timeout: 30_000 });

    // Which node holds the page's socket; the feed publishes through the other one.
    let on;
    await until("the page's node", async () => {
      const open = await Promise.all(nodes.map(openConnections));
      on = open.indexOf(1);
      return open[0] + open[1] === 1;
    });
    const [pageNode, otherNode] = [nodes[on], nodes[1 - on]];
    feed = connect(otherNode.ws, { token: hs256({ sub: "feed", pub: true }) });
    const room = feed.join("demo");
    await room.ready;
    const LINES = 80;
    const publishLine = async (i) => {
      await room.publish({ type: "chat", text: `line ${i}` });
      if (i % 10 === 0) {
        await room.publish({ type: "score", home: "Lions", away: "Tigers", score: [i / 10, 1], minute: 10 + i }, { key: "score" });
      }
    };
    for (let i = 0; i < 20; i++) await publishLine(i);
    await page.waitForFunction(() => document.getElementById("home-score")?.textContent === "1", { timeout: 20_000 });
    assert.equal(await text("#away-score"), "1");
    await until("20 chat lines on the page", async () => (await chat()).length >= 20);

    // The rest is published while the page's node drains, 25 ms apart.
    const publishing = (async () => {
      for (let i = 20; i < LINES; i++) {
        await publishLine(i);
        await new Promise((r) => setTimeout(r, 25));
      }
    })();
    pageNode.signal("SIGTERM");
    await page.waitForFunction(() => Number(document.getElementById("rate")?.textContent) > 0, { timeout: 20_000 });
    await publishing;
    await page.waitForFunction(() => document.getElementById("recovery")?.textContent === "recovered: true", {
      timeout: 30_000,
    });
    await until(`${LINES} chat lines on the page`, async () => (await chat()).length >= LINES);
    assert.deepEqual(
      await chat(),
      [...Array(LINES).keys()].map((i) => `feed: line ${i}`),
      "every chat line once, in order",
    );
    assert.equal(await text("#home-score"), String((LINES - 10) / 10), "the live score");
    const states = await text("#states");
    assert.match(states, /connecting → connected → reconnecting → connected$/, states);
    assert.equal(await text("#state"), "connected");
    assert.deepEqual(await pageNode.exited, { code: 0, signal: null }, "the drained node exited cleanly");
    assert.equal(await openConnections(otherNode), 2, "the page is on the other node now (beside the feed)");
    const shot = path.join(outDir("sdk-browser"), "demo.png");
    await page.screenshot({ path: shot });
    console.log(`screenshot: ${shot}`);
    // The favicon is the one request a page without assets may make; anything else failing is a bug.
    assert.deepEqual(
      problems.filter((p) => !p.includes("favicon")),
      [],
    );
  } finally {
    feed?.close();
    await close();
    await lb.close();
    await Promise.all(nodes.map((n) => n.stop()));
  }
});

test("a page opened mid-match shows the current score at once, with no publish after it opened", { timeout: 120_000 }, async () => {
  const node = await startNode(demoArgs());
  const { browser, close } = await launch();
  const feed = connect(node.ws, { token: hs256({ sub: "feed", pub: true }) });
  try {
    const room = feed.join("demo");
    await room.ready;
    const score = (h, a, minute) => ({ type: "score", home: "Lions", away: "Tigers", score: [h, a], minute });
    await room.publish(score(1, 0, 12), { key: "score" });
    await room.publish({ type: "chat", text: "what a goal" });
    await room.publish(score(3, 2, 67), { key: "score" });
    // Nothing is published from here on: the feed is gone before the page opens.
    feed.close();

    const page = await browser.newPage();
    const problems = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    await page.goto(`http://127.0.0.1:${node.port}/demo?token=${hs256({ sub: "late-viewer" })}`);
    await page.waitForFunction(() => document.getElementById("minute")?.textContent === "67'", { timeout: 20_000 });
    const text = (selector) => page.$eval(selector, (e) => e.textContent);
    assert.deepEqual(
      [await text("#home"), await text("#home-score"), await text("#away-score"), await text("#away")],
      ["Lions", "3", "2", "Tigers"],
      "the newest score, not the first",
    );
    assert.equal(await page.$$eval("#chat li", (lis) => lis.length), 0, "chat lines are not keyed: none replayed");
    assert.equal(await text("#state"), "connected");
    assert.deepEqual(problems, []);
  } finally {
    feed.close();
    await close();
    await node.stop();
  }
});

/** A counter or gauge of the node's `/metrics`, summed over its series that contain `labels`. */
async function metric(node, name, labels = "") {
  const text = await (await fetch(`${node.http}/metrics`)).text();
  return text
    .split("\n")
    .filter((l) => l.startsWith(name) && (l[name.length] === " " || l[name.length] === "{") && l.includes(labels))
    .reduce((sum, l) => sum + Number(l.split(" ").pop()), 0);
}

test("in Chromium the page negotiates permessage-deflate and joins with delta: it shows every score, rebuilt from deltas, and its own compressed frames are read", { timeout: 120_000 }, async () => {
  const node = await startNode(demoArgs());
  const { browser, close } = await launch();
  const feed = connect(node.ws, { token: hs256({ sub: "feed", pub: true }) });
  try {
    const room = feed.join("demo");
    await room.ready;
    const page = await browser.newPage();
    const problems = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    await page.goto(`http://127.0.0.1:${node.port}/demo?token=${hs256({ sub: "viewer", pub: true })}`);
    await page.waitForFunction(() => document.getElementById("state")?.textContent === "connected", { timeout: 20_000 });
    // The match's state, with its line-ups: a few hundred bytes of which each update changes a few.
    const lineup = (side) => Array.from({ length: 11 }, (_, i) => `${side} player number ${i + 1}`);
    const score = (minute) => ({
      type: "score",
      home: "Lions",
      away: "Tigers",
      score: [Math.floor(minute / 30), Math.floor(minute / 40)],
      minute,
      lineups: { home: lineup("Lions"), away: lineup("Tigers") },
    });
    for (let minute = 1; minute <= 30; minute++) {
      await room.publish(score(minute), { key: "score" });
      await page.waitForFunction((m) => document.getElementById("minute")?.textContent === `${m}'`, { timeout: 20_000 }, minute);
    }
    const text = (selector) => page.$eval(selector, (e) => e.textContent);
    assert.deepEqual([await text("#home-score"), await text("#away-score")], ["1", "0"]);
    // Chromium compresses what it sends once the extension is on; the node inflates it.
    const inflatedBefore = await metric(node, "shardcast_inflated_bytes_total");
    await page.type("#text", "a chat line from the stands, long enough to be worth compressing ".repeat(3));
    await page.click("#say button");
    await page.waitForFunction(() => document.querySelectorAll("#chat li").length === 1, { timeout: 20_000 });
    assert.ok((await metric(node, "shardcast_delta_values_total", 'form="delta"')) >= 25, "scores went as deltas");
    const [sent, whole] = [await metric(node, "shardcast_delivered_bytes_total"), await metric(node, "shardcast_delivered_full_bytes_total")];
    assert.ok(sent < whole / 2, `compressed and delta frames: ${sent} of ${whole} bytes`);
    assert.ok((await metric(node, "shardcast_inflated_bytes_total")) > inflatedBefore, "the page's compressed frames were inflated");
    // What Chromium itself was answered at the upgrade.
    const extensions = await page.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          ws.onopen = () => {
            resolve(ws.extensions);
            ws.close();
          };
          ws.onerror = () => reject(new Error("no socket"));
        }),
      `ws://127.0.0.1:${node.port}/ws?token=${hs256({ sub: "probe" })}`,
    );
    assert.equal(extensions, "permessage-deflate; server_no_context_takeover; client_max_window_bits=10");
    assert.deepEqual(problems, []);
    assert.equal(await text("#said"), "", "no error on the page");
  } finally {
    feed.close();
    await close();
    await node.stop();
  }
});

/** Chat line `i` of the context test: 100–400 B of text, every sixth a short one (sent plain). */
function chatLine(i) {
  const words = ["what", "a", "pass", "from", "midfield", "the", "keeper", "never", "reached", "it", "referee", "needs", "glasses", "come", "on", "lads"];
  const size = i % 6 === 5 ? 20 + (i % 30) : 100 + ((i * 37) % 300);
  let text = "";
  for (let k = 0; text.length < size; k++) text += `${words[(i * 7 + k * 13) % words.length]} `;
  return { i, user: `fan${i % 9}`, text: text.slice(0, size) };
}

test("in Chromium a page that lets the node keep its compression context reads every line of two rooms, most of them compressed after the lines before", { timeout: 120_000 }, async () => {
  const node = await startNode(["--compress-context", "8KiB"]);
  const { browser, close } = await launch();
  try {
    const page = await browser.newPage();
    const count = 600;
    const roomOf = (i) => (i % 5 === 4 ? "side" : "chat");
    // The browser's own WebSocket and permessage-deflate: it keeps the node's frames in its window.
    const read = page.evaluate(
      (url, count) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          const got = [];
          let oks = 0;
          ws.onopen = () => {
            ws.send(JSON.stringify({ op: "join", room: "chat", id: 1 }));
            ws.send(JSON.stringify({ op: "join", room: "side", id: 2 }));
          };
          ws.onmessage = (e) => {
            let v;
            try {
              v = JSON.parse(e.data);
            } catch {
              reject(new Error(`an unreadable frame after ${got.length} lines: ${String(e.data).slice(0, 80)}`));
              return;
            }
            if (v.op === "ok" && ++oks === 2) window.joined = true;
            if (v.op !== "msg") return;
            got.push([v.room, v.data]);
            if (got.length === count) {
              resolve({ extensions: ws.extensions, got });
              ws.close();
            }
          };
          ws.onclose = (e) => reject(new Error(`closed ${e.code} after ${got.length}`));
        }),
      `${node.ws}?user=page`,
      count,
    );
    await page.waitForFunction(() => window.joined === true, { timeout: 20_000 });
    for (let i = 0; i < count; i++) {
      const res = await fetch(`${node.http}/publish`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ room: roomOf(i), data: chatLine(i) }),
      });
      assert.equal(res.status, 202);
    }
    const { extensions, got } = await Promise.race([
      read,
      new Promise((_, reject) => setTimeout(() => reject(new Error("the page did not read every line in 30 s")), 30_000).unref()),
    ]);
    assert.equal(extensions, "permessage-deflate; client_max_window_bits=10", "no server_no_context_takeover");
    for (const room of ["chat", "side"]) {
      const want = Array.from({ length: count }, (_, i) => i).filter((i) => roomOf(i) === room).map(chatLine);
      assert.deepEqual(got.filter(([r]) => r === room).map(([, d]) => d), want, `every line of ${room}, in order`);
    }
    const linked = await metric(node, "shardcast_linked_frames_total");
    assert.ok(linked > 200, `${linked} lines went compressed after the lines before`);
  } finally {
    await close();
    await node.stop();
  }
});
