// What the SDK's tests run against: a real Redis Cluster started by redis-cluster/up, the node's
// real binary (SHARDCAST_BIN, else target/debug/shardcast), and a TCP balancer in front of nodes.
// Everything listens on 127.0.0.1; every wait has a deadline; everything started is stopped.

import { spawn, execFileSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, mkdirSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { connect as sdkConnect } from "../dist/index.js";

export const REPO = path.resolve(fileURLToPath(new URL("../../..", import.meta.url)));
export const BIN = process.env.SHARDCAST_BIN ?? `${REPO}/target/debug/shardcast`;
/** Where tests leave what a person may want to look at (the screenshot). */
export const OUT = process.env.SHARDCAST_TEST_OUT ?? os.tmpdir();
export const WAIT_MS = 30_000;

/** Polls `check` every 25 ms until it holds; throws naming `what` at the deadline. */
export async function until(what, check, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A client of the SDK over the `ws` package (Node 20 has no global WebSocket). */
export function connect(url, options = {}) {
  return sdkConnect(url, { WebSocket, ...options });
}

/**
 * A Redis Cluster of 3 masters on free loopback ports, stopped with `stop()` or this process. The
 * ports are ones the kernel just handed out, with their cluster-bus port (+10000) free too.
 */
export async function startCluster() {
  let last;
  const start = performance.now();
  for (let i = 0; i < 3; i++) {
    const ports = [];
    while (ports.length < 3) {
      const p = await freePort();
      if (p < 55_000 && !ports.includes(p) && (await canBind(p + 10_000))) ports.push(p);
    }
    const dir = mkdtempSync(path.join(os.tmpdir(), "shardcast-sdk-cluster-"));
    try {
      const out = execFileSync(
        `${REPO}/redis-cluster/up`,
        ["--ports", ports.join(","), "--masters", "3", "--replicas", "0", "--dir", dir, "--owner-pid", String(process.pid)],
        { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
      );
      const url = out.trim().split("\n").pop().trim();
      console.log(`redis cluster up in ${(performance.now() - start).toFixed(0)} ms`);
      return { url, stop: () => execFileSync(`${REPO}/redis-cluster/down`, ["--dir", dir], { stdio: "ignore" }) };
    } catch (e) {
      // A port free a moment ago may have been taken meanwhile: try others.
      last = e;
      console.log(`redis-cluster/up failed, trying other ports: ${e.stderr}`);
    }
  }
  throw new Error(`redis-cluster/up failed: ${last?.stderr ?? last}`);
}

async function canBind(port) {
  const server = net.createServer();
  const ok = await new Promise((r) => {
    server.once("error", () => r(false));
    server.listen(port, "127.0.0.1", () => r(true));
  });
  if (ok) await new Promise((r) => server.close(r));
  return ok;
}

export async function freePort() {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

async function httpStatus(url) {
  try {
    return (await fetch(url, { signal: AbortSignal.timeout(2000) })).status;
  } catch {
    return 0;
  }
}

/** Channel prefixes of their own, so nodes of different tests sharing a cluster never meet. */
export function prefixes() {
  const tag = randomBytes(4).toString("hex");
  return ["--channel-prefix", `t:sdk-${tag}:room:`, "--user-channel-prefix", `t:sdk-${tag}:user:`];
}

/** A node process with `args`, ready (its /readyz 200); `stop()` kills it if still running. */
export async function startNode(args) {
  for (let tries = 0; ; tries++) {
    const port = await freePort();
    const child = spawn(BIN, ["--listen", `127.0.0.1:${port}`, ...args], { stdio: ["ignore", "ignore", "pipe"] });
    let log = "";
    child.stderr.on("data", (b) => (log = (log + b).slice(-4000)));
    const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
    let gone = false;
    exited.then(() => (gone = true));
    const node = {
      port,
      ws: `ws://127.0.0.1:${port}/ws`,
      http: `http://127.0.0.1:${port}`,
      exited,
      log: () => log,
      signal: (sig) => child.kill(sig),
      stop: async () => {
        if (!gone) child.kill("SIGKILL");
        await exited;
      },
    };
    try {
      await until(`node on ${port} ready`, async () => gone || (await httpStatus(`${node.http}/readyz`)) === 200);
    } catch (e) {
      await node.stop();
      throw e;
    }
    if (!gone) return node;
    // The port was taken between the probe and the bind: another one.
    if (tries >= 3) throw new Error(`node exited at start: ${log}`);
  }
}

/**
 * A TCP balancer on 127.0.0.1: each new connection goes to the next target in turn (the next
 * after that if it refuses). `targets` may be changed at any time; `cut()` kills every connection
 * through it (both sides reset, as when a network path dies); `landed` lists the target port each
 * connection reached, `acceptedAt` when each arrived (`performance.now()`).
 */
export async function startBalancer(targets) {
  const pairs = new Set();
  const landed = [];
  const acceptedAt = [];
  let next = 0;
  const balancer = { targets: [...targets], landed, acceptedAt, port: 0 };
  const server = net.createServer((client) => {
    acceptedAt.push(performance.now());
    client.on("error", () => {});
    client.pause();
    const attempt = (tries) => {
      const port = balancer.targets[next++ % balancer.targets.length];
      const upstream = net.connect(port, "127.0.0.1");
      upstream.once("error", () => {
        if (tries + 1 < balancer.targets.length) attempt(tries + 1);
        else client.destroy();
      });
      upstream.once("connect", () => {
        upstream.on("error", () => {});
        landed.push(port);
        const pair = { client, upstream };
        pairs.add(pair);
        const end = () => {
          pairs.delete(pair);
          client.destroy();
          upstream.destroy();
        };
        client.once("close", end);
        upstream.once("close", end);
        client.pipe(upstream);
        upstream.pipe(client);
        client.resume();
      });
    };
    attempt(0);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  balancer.port = server.address().port;
  balancer.ws = `ws://127.0.0.1:${balancer.port}/ws`;
  balancer.http = `http://127.0.0.1:${balancer.port}`;
  balancer.connections = () => pairs.size;
  balancer.cut = () => {
    for (const { client, upstream } of pairs) {
      client.resetAndDestroy();
      upstream.resetAndDestroy();
    }
  };
  balancer.close = async () => {
    balancer.cut();
    await new Promise((r) => server.close(r));
  };
  return balancer;
}

export const SECRET = "sdk-test-secret-not-for-production";

/** An HS256 JWT signed with SECRET. */
export function hs256(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export function outDir(name) {
  const dir = path.join(OUT, name);
  mkdirSync(dir, { recursive: true });
  return dir;
}
