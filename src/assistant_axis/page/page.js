// The drift page: chat with the served model under one setting (or two at once, "compare") and plot each
// reply's mean projection on the Assistant Axis per monitored layer, against the capped setting's tau.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere: the server may be offline.
"use strict";

const COLORS = ["#1f6fb4", "#d0542c"]; // column A, column B
const $ = (id) => document.getElementById(id);
const state = { axis: null, columns: [] }; // a column: {setting, messages: [{role, content}], turns: [...]}

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function say(text) {
  $("status").textContent = text || "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`${response.status}: ${(body.error && body.error.message) || response.statusText}`);
  }
  return response;
}

async function loadAxis() {
  try {
    state.axis = await (await api("/v1/axis")).json();
  } catch (error) {
    say(`${error.message} (an API key?)`);
    return;
  }
  say("");
  $("model").textContent = state.axis.model;
  for (const select of [$("setting"), $("compare")]) {
    for (const name of Object.keys(state.axis.settings)) {
      if (![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
    }
  }
  $("setting").value = state.axis.default;
  reset();
}

// A new conversation under the chosen setting(s); `messages` (loaded from a file) fill both columns.
function reset(messages = []) {
  const settings = [$("setting").value, $("compare").value].filter(Boolean);
  state.columns = settings.map((setting) => ({
    setting,
    messages: messages.map((m) => ({ ...m })),
    turns: messages.filter((m) => m.role === "assistant").map(() => null), // no projection for loaded turns
  }));
  render();
}

function conversation(column) {
  const system = $("system").value.trim();
  const head = system && !column.messages.some((m) => m.role === "system") ? [{ role: "system", content: system }] : [];
  return [...head, ...column.messages];
}

function render() {
  const box = $("columns");
  box.replaceChildren();
  state.columns.forEach((column, c) => {
    const div = document.createElement("div");
    div.className = "column";
    div.dataset.setting = column.setting;
    const title = document.createElement("h2");
    title.textContent = column.setting;
    title.style.color = COLORS[c];
    div.append(title);
    let turn = 0;
    for (const message of conversation(column)) {
      const p = document.createElement("div");
      p.className = `message ${message.role}`;
      p.textContent = message.content;
      div.append(p);
      if (message.role === "assistant") {
        if (column.turns[turn] && column.turns[turn].finish) p.dataset.finish = column.turns[turn].finish;
        const fired = column.turns[turn] && column.turns[turn].fired;
        if (fired) {
          const note = document.createElement("div");
          note.className = "fired";
          const layers = state.axis.layers;
          note.textContent = "cap fired: " + fired.map((f, i) => (f === null ? null : `L${layers[i]} ${(100 * f).toFixed(0)}%`)).filter(Boolean).join(", ");
          div.append(note);
        }
        turn += 1;
      }
    }
    box.append(div);
  });
  plot();
}

// Server-sent events of one streamed reply: calls `onChunk(delta, runningProjection)`, returns the last
// chunk's projection (the reply's telemetry). The column's last message is the reply being written, so
// it is not sent (an assistant message at the end would be continued, not answered).
async function streamReply(column, onChunk) {
  const body = { messages: conversation(column).slice(0, -1), stream: true, capping: column.setting };
  const most = parseInt($("max-tokens").value, 10);
  if (most > 0) body.max_tokens = most;
  const response = await api("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      const choice = chunk.choices[0];
      if (choice.finish_reason) final = { ...chunk.projection, finish: choice.finish_reason };
      else onChunk(choice.delta.content || "", chunk.projection || null);
    }
  }
  return final;
}

async function send(text) {
  document.body.dataset.busy = "true";
  say("");
  try {
    await Promise.all(
      state.columns.map(async (column) => {
        column.messages.push({ role: "user", content: text });
        const reply = { role: "assistant", content: "" };
        column.messages.push(reply);
        const turn = column.turns.length;
        column.turns.push({ values: null, live: null, fired: null });
        render();
        const projection = await streamReply(column, (delta, running) => {
          reply.content += delta;
          if (running && running.values) column.turns[turn].live = running.values;
          render();
        });
        column.turns[turn] = {
          values: projection.values,
          fired: projection.fired || null,
          finish: projection.finish,
          live: null,
        };
      }),
    );
  } catch (error) {
    say(error.message);
  } finally {
    render();
    document.body.dataset.busy = "false";
  }
}

// ----------------------------------------------------------------------------------------------- the plot

function plot() {
  const svg = $("plot");
  svg.replaceChildren();
  if (!state.axis) return;
  const W = 640, H = 360, left = 56, right = 96, top = 16, bottom = 40;
  const layers = state.axis.layers;
  const points = []; // {c, turn, layer index, value, live}
  state.columns.forEach((column, c) =>
    column.turns.forEach((turn, t) => {
      if (!turn) return;
      const values = turn.values || turn.live;
      if (values) values.forEach((v, i) => v !== null && points.push({ c, t, i, v, live: !turn.values }));
    }),
  );
  const taus = [];
  state.columns.forEach((column, c) => (state.axis.settings[column.setting].tau || []).forEach((tau, i) => tau !== null && taus.push({ c, i, tau })));
  const all = [...points.map((p) => p.v), ...taus.map((t) => t.tau)];
  const turns = Math.max(1, ...state.columns.map((column) => column.turns.length));
  let low = Math.min(...all), high = Math.max(...all);
  if (!all.length) [low, high] = [0, 1];
  if (high - low < 1e-6) [low, high] = [low - 1, high + 1];
  const pad = 0.08 * (high - low);
  [low, high] = [low - pad, high + pad];
  const x = (t) => left + (turns === 1 ? (W - left - right) / 2 : (t * (W - left - right)) / (turns - 1));
  const y = (v) => top + ((high - v) * (H - top - bottom)) / (high - low);
  const add = (name, attributes, text) => {
    const element = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [k, v] of Object.entries(attributes)) element.setAttribute(k, v);
    if (text !== undefined) element.textContent = text;
    svg.append(element);
    return element;
  };
  add("rect", { x: 0, y: 0, width: W, height: H, fill: "white" });
  add("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#444" });
  add("line", { x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#444" });
  for (let k = 0; k <= 4; k++) {
    const v = low + ((high - low) * k) / 4;
    add("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11 }, v.toFixed(1));
  }
  for (let t = 0; t < turns; t++) add("text", { x: x(t), y: H - bottom + 16, "text-anchor": "middle", "font-size": 11 }, `${t + 1}`);
  add("text", { x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle", "font-size": 12 }, "assistant turn");
  add("text", { x: 14, y: (top + H - bottom) / 2, "font-size": 12, transform: `rotate(-90 14 ${(top + H - bottom) / 2})`, "text-anchor": "middle" }, "projection");
  const shade = (i) => 0.35 + (0.65 * (i + 1)) / layers.length; // deeper layers darker
  for (const { c, i, tau } of taus) {
    add("line", { class: "tau", "data-setting": state.columns[c].setting, "data-layer": layers[i], "data-value": tau, x1: left, x2: W - right, y1: y(tau), y2: y(tau), stroke: COLORS[c], "stroke-dasharray": "5 4", "stroke-opacity": shade(i) });
  }
  state.columns.forEach((column, c) =>
    layers.forEach((layer, i) => {
      const line = points.filter((p) => p.c === c && p.i === i).sort((a, b) => a.t - b.t);
      if (line.length > 1) add("polyline", { points: line.map((p) => `${x(p.t)},${y(p.v)}`).join(" "), fill: "none", stroke: COLORS[c], "stroke-opacity": shade(i) });
      for (const p of line) {
        add("circle", { class: p.live ? "point live" : "point", "data-setting": column.setting, "data-layer": layer, "data-turn": p.t + 1, "data-value": p.v, cx: x(p.t), cy: y(p.v), r: p.live ? 3 : 4, fill: p.live ? "white" : COLORS[c], stroke: COLORS[c], "fill-opacity": shade(i) });
      }
    }),
  );
  state.columns.forEach((column, c) => add("text", { x: W - right + 8, y: top + 14 + 16 * c, fill: COLORS[c], "font-size": 12 }, column.setting));
  add("text", { x: W - right + 8, y: top + 14 + 16 * state.columns.length, "font-size": 11, fill: "#555" }, `layers ${layers[0]}-${layers[layers.length - 1]}`);
}

// ------------------------------------------------------------------------------------ files: JSON and PNG

function download(name, blob) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function save() {
  state.columns.forEach((column, c) => {
    const name = c === 0 ? "conversation.json" : `conversation-${column.setting}.json`;
    download(name, new Blob([JSON.stringify(conversation(column), null, 2) + "\n"], { type: "application/json" }));
  });
}

async function load(file) {
  try {
    const messages = JSON.parse(await file.text());
    const ok = Array.isArray(messages) && messages.every((m) => m && typeof m.content === "string" && ["system", "user", "assistant"].includes(m.role));
    if (!ok) throw new Error(`${file.name}: not a conversation (a JSON list of {role, content})`);
    const system = messages.find((m) => m.role === "system");
    $("system").value = system ? system.content : "";
    reset(messages.filter((m) => m.role !== "system"));
  } catch (error) {
    say(error.message);
  }
}

function png() {
  const svg = $("plot");
  const text = new XMLSerializer().serializeToString(svg);
  const image = new Image();
  image.onload = () => {
    const canvas = document.createElement("canvas");
    canvas.width = 2 * svg.width.baseVal.value;
    canvas.height = 2 * svg.height.baseVal.value;
    const context = canvas.getContext("2d");
    context.scale(2, 2);
    context.drawImage(image, 0, 0);
    canvas.toBlob((blob) => download("axis-drift.png", blob), "image/png");
  };
  image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
}

// ------------------------------------------------------------------------------------------------ wiring

$("key").addEventListener("change", loadAxis);
$("setting").addEventListener("change", () => reset());
$("compare").addEventListener("change", () => reset());
$("save").addEventListener("click", save);
$("png").addEventListener("click", png);
$("load").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (event) => event.target.files[0] && load(event.target.files[0]));
$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || document.body.dataset.busy === "true" || !state.columns.length) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
loadAxis();
