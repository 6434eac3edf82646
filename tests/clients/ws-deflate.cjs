// Node's `ws` with permessage-deflate against a node: compresses everything it sends (threshold 0,
// with its context kept across messages) and reads the node's compressed frames. Joins a room,
// publishes COUNT messages of mixed sizes in bursts with pauses between them (long enough for the
// node to let its inflater go), and checks every payload it receives, in order. With ROOM2 it joins
// that room too and publishes every fifth message there: each room's messages come in order, the
// two rooms' interleaved as the node writes them. Prints one JSON line.
// Usage: node ws-deflate.cjs URL ROOM COUNT [ROOM2]   (NODE_PATH names the folder that holds `ws`)
'use strict';
const WebSocket = require('ws');

const [url, room, countArg, room2] = process.argv.slice(2);
const count = Number(countArg);
/// The room message `i` goes to.
const roomOf = (i) => (room2 && i % 5 === 4 ? room2 : room);

/// The payload of message `i`: some under 200 bytes, some several kilobytes.
function data(i) {
  const size = i % 3 === 0 ? 20 + (i % 50) : 2000 + ((i * 37) % 6000);
  let pad = '';
  while (pad.length < size) pad += `line ${i % 17} of the match, minute ${pad.length % 90}; `;
  return { i, pad: pad.slice(0, size) };
}

const ws = new WebSocket(url, { perMessageDeflate: { threshold: 0 } });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let received = 0;
let bad = 0;
let firstBad = null;
const joins = room2 ? 2 : 1;
let oks = 0;
let joined;
const joinedP = new Promise((r) => (joined = r));
/// Per room, the number of the next message it should bring.
const next = new Map();
let done;
const doneP = new Promise((r) => (done = r));

ws.on('message', (raw) => {
  const v = JSON.parse(raw.toString());
  if (v.op === 'ok' && v.id <= joins && ++oks === joins) joined();
  if (v.op === 'error') {
    bad++;
    firstBad = firstBad || v;
  }
  if (v.op !== 'msg') return;
  // The message this room brings next.
  let i = next.get(v.room) ?? 0;
  while (i < count && roomOf(i) !== v.room) i++;
  next.set(v.room, i + 1);
  const want = data(i);
  if (JSON.stringify(v.data) !== JSON.stringify(want)) {
    bad++;
    firstBad = firstBad || { got: JSON.stringify(v.data).slice(0, 200), want: i };
  }
  received++;
  if (received === count) done();
});
ws.on('close', (code) => {
  console.log(JSON.stringify({ closed: code, received, bad }));
  process.exit(1);
});
ws.on('error', (e) => {
  console.log(JSON.stringify({ error: String(e) }));
  process.exit(1);
});

ws.on('open', async () => {
  ws.send(JSON.stringify({ op: 'join', room, id: 1 }));
  if (room2) ws.send(JSON.stringify({ op: 'join', room: room2, id: 2 }));
  await joinedP;
  for (let i = 0; i < count; i++) {
    ws.send(JSON.stringify({ op: 'pub', room: roomOf(i), data: data(i), id: i + 3 }));
    // Bursts and pauses: the node's reader goes quiet between bursts and keeps only the window.
    if (i % 25 === 24) await sleep(15);
  }
  const timeout = setTimeout(() => done(), 60000);
  await doneP;
  clearTimeout(timeout);
  console.log(JSON.stringify({ extensions: ws.extensions, received, bad, firstBad }));
  ws.removeAllListeners('close');
  ws.close(1000);
  setTimeout(() => process.exit(0), 100);
});
