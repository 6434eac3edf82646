// The demo page: a scoreboard and a chat in one room, on the SDK. Query parameters: `token` (with
// auth on), `user` (without), `room` (default `demo`). Scores are `{type:"score", home, away,
// score:[h,a], minute}` published with the key `score`, chat lines `{type:"chat", text}` (what
// `shardcast-loadtest demo` sends).

import { connect, type Message } from "../src/index.js";

const CHAT_LINES = 200;
const params = new URLSearchParams(location.search);
const roomName = params.get("room") ?? "demo";
const $ = (id: string) => document.getElementById(id)!;

const client = connect(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`, {
  token: params.get("token") ?? undefined,
  user: params.get("token") ? undefined : (params.get("user") ?? `fan-${Math.random().toString(36).slice(2, 8)}`),
});

const history: string[] = ["connecting"];
client.on("state", (state) => {
  $("state").textContent = state;
  $("state").className = `badge ${state}`;
  if (history[history.length - 1] !== state) history.push(state);
  $("states").textContent = history.slice(-8).join(" → ");
});
client.on("error", (e) => ($("said").textContent = `error: ${e.code}: ${e.message}`));

const arrivals: number[] = [];
setInterval(() => {
  const now = performance.now();
  while (arrivals.length && arrivals[0] < now - 1000) arrivals.shift();
  $("rate").textContent = String(arrivals.length);
}, 250);

// `latest`: the score's current value comes before the join's answer, so a page opened mid-match
// (or back after a reconnect without history) shows the score at once, not at the next update.
// `delta`: each new score comes as the few bytes that changed; the client rebuilds it.
const room = client.join(roomName, { latest: true, delta: true });
room.on("message", (m: Message) => {
  arrivals.push(performance.now());
  const d = m.data as { type?: string; [k: string]: unknown };
  if (d?.type === "score") {
    const [h, a] = (d.score as number[]) ?? [0, 0];
    $("home").textContent = String(d.home ?? "home");
    $("away").textContent = String(d.away ?? "away");
    $("home-score").textContent = String(h);
    $("away-score").textContent = String(a);
    $("minute").textContent = `${d.minute ?? "?"}'`;
  } else if (d?.type === "chat") {
    const li = document.createElement("li");
    const who = document.createElement("b");
    who.textContent = m.from;
    li.append(who, `: ${String(d.text)}`);
    const list = $("chat");
    list.append(li);
    while (list.children.length > CHAT_LINES) list.firstElementChild!.remove();
    list.scrollTop = list.scrollHeight;
  }
});
room.on("recovered", (ok) => {
  $("recovery").textContent = ok ? "recovered: true" : "recovered: false (missed messages are not shown)";
});
room.on("error", (e) => ($("said").textContent = `room error: ${e.code}`));

$("say").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("text") as HTMLInputElement;
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  room.publish({ type: "chat", text }).then(
    () => ($("said").textContent = ""),
    (e) => ($("said").textContent = `not sent: ${e.code}`),
  );
});
