// The mlx-cluster dashboard: follows /v1/cluster/events (one JSON snapshot a second)
// and chats through /v1/chat/completions. Plain browser JavaScript, no dependencies.
"use strict";

const EVENTS_URL = "/v1/cluster/events";
const CHAT_URL = "/v1/chat/completions";
const RECONNECT_MS = 1000;
const KEY_STORAGE = "mlx-cluster-api-key";
const STATUS_WORDS = { ok: "serving", not_loaded: "loading", unavailable: "down" };

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let keyWanted = null; // resolves once the user gives a key
const conversation = [];
let chatAbort = null;

// --- API keys ------------------------------------------------------------------------

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

// Asks for a key (again, when `refused`); resolves once one is given. Closed without
// one (Escape), the dialog opens again from the header's "API key" button.
function askForKey(refused) {
  $("key-error").hidden = !refused;
  $("key-button").hidden = false;
  keyWanted ??= new Promise((resolve) => {
    $("key-form").onsubmit = () => {
      apiKey = $("key-input").value.trim();
      sessionStorage.setItem(KEY_STORAGE, apiKey);
      keyWanted = null;
      resolve();
    };
  });
  if (!$("key-dialog").open) $("key-dialog").showModal();
  return keyWanted;
}

// fetch, asking for a key on a 401 and trying again with it.
async function authorized(url, options = {}) {
  for (;;) {
    const response = await fetch(url, { ...options, headers: headers(options.headers) });
    if (response.status !== 401) return response;
    await askForKey(Boolean(apiKey));
  }
}

// --- the live cluster view -----------------------------------------------------------

async function followCluster() {
  for (;;) {
    try {
      const response = await authorized(EVENTS_URL);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      await readEvents(response.body, (data) => render(JSON.parse(data)));
    } catch (error) {
      console.warn("cluster events:", error);
    }
    showStatus("offline", "coordinator unreachable");
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

// Calls onData with each server-sent event's data until the stream ends.
async function readEvents(body, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onData(data);
    }
  }
}

function showStatus(status, text) {
  const badge = $("cluster-status");
  badge.className = `badge ${status}`;
  badge.textContent = text;
}

function render(snapshot) {
  $("model").textContent = snapshot.model;
  showStatus(snapshot.status, snapshot.status === "ok" ? "serving" : snapshot.status);
  $("depth").textContent =
    `${snapshot.total_layers} layers, ${snapshot.context_tokens} tokens of context`;
  renderDepthBar(snapshot.workers, snapshot.total_layers);
  $("workers").replaceChildren(...snapshot.workers.map(workerCard));
  $("standbys").textContent = snapshot.standby.length
    ? `standby: ${snapshot.standby.map((s) => `${s.name} (${s.address})`).join(", ")}` : "";
  $("transfers").textContent = (snapshot.weight_transfers || [])
    .filter((t) => t.total_bytes > 0)
    .map((t) => `${t.worker}: weights ${megabytes(t.verified_bytes)} of ` +
      `${megabytes(t.total_bytes)} MB ${t.done ? "received" : "arriving"}`)
    .join(" · ");
  renderPerformance(snapshot.performance, snapshot.workers);
}

function megabytes(bytes) {
  return (bytes / 1e6).toFixed(1);
}

function renderDepthBar(workers, total) {
  $("depth-bar").replaceChildren(...workers.map((w) => {
    const [start, end] = w.layers;
    const segment = element("div", `segment ${w.status}`, `${w.name} ${start}–${end}`);
    segment.style.width = `${(100 * (end - start)) / total}%`;
    segment.title = `${w.name}: layers [${start}, ${end})`;
    return segment;
  }));
}

function workerCard(w) {
  const card = element("div", `worker ${w.status}`);
  card.dataset.worker = w.name;
  card.dataset.status = w.status;
  const title = element("div", "title");
  title.append(element("span", "name", w.name),
    element("span", "state", STATUS_WORDS[w.status] || w.status));
  const facts = element("dl");
  const fact = (label, ...values) => facts.append(element("dt", "", label), element("dd", "", ...values));
  fact("layers", `[${w.layers[0]}, ${w.layers[1]})`);
  fact("address", w.address);
  if (w.device) {
    fact("device", `${w.device.kind} ${w.device.name}`);
    const m = w.memory;
    fact("memory", `${size(m.weight_bytes)} weights, ${size(m.available_bytes)} free of ${size(m.total_bytes)}`);
    const kv = w.kv_tokens;
    fact("KV", `${kv.used} / ${kv.capacity} tokens`, meter(kv.used, kv.capacity));
    fact("prefixes", `${size(w.prefix_cache.bytes)} in ${w.prefix_cache.prefixes} ` +
      (w.prefix_cache.prefixes === 1 ? "prefix" : "prefixes"));
    fact("sessions", String(w.sessions_open));
    fact("round trip", w.last_round_trip_ms === null ? "–" : `${w.last_round_trip_ms.toFixed(1)} ms`);
  } else if (w.error) {
    fact("error", w.error);
  }
  card.append(title, facts);
  return card;
}

function renderPerformance(perf, workers) {
  const points = perf.points;
  drawChart($("tps-chart"), points.map((p) => p.tokens_per_s), "#2b6cb0");
  drawChart($("ttft-chart"), points.map((p) => p.ttft_ms), "#805ad5");
  const peak = Math.max(0, ...points.map((p) => p.tokens_per_s));
  $("tps-now").textContent = peak ? `(peak ${peak})` : "";
  const ttfts = points.filter((p) => p.ttft_ms !== null);
  $("ttft-now").textContent = ttfts.length ? `(last ${ttfts[ttfts.length - 1].ttft_ms.toFixed(0)})` : "";
  const split = perf.token_split_ms;
  if (!split) return;
  const total = split.compute + split.hop + split.coordinator || 1;
  $("split-bar").replaceChildren(...["compute", "hop", "coordinator"].map((part) => {
    const piece = element("div", part);
    piece.style.width = `${(100 * split[part]) / total}%`;
    piece.title = `${part}: ${split[part].toFixed(2)} ms`;
    return piece;
  }));
  $("split-legend").textContent = `compute ${split.compute.toFixed(2)} ms · hops ` +
    `${split.hop.toFixed(2)} ms · coordinator ${split.coordinator.toFixed(2)} ms`;
  const names = workers.map((w) => w.name);
  $("split-stages").textContent = split.stages.length ? "compute by stage: " + split.stages
    .map((ms, i) => `${names[i] ?? `stage ${i}`} ${ms.toFixed(2)} ms`).join(" · ") : "";
}

function drawChart(canvas, values, color) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  const known = values.filter((v) => v !== null);
  const top = Math.max(1, ...known) * 1.1;
  g.fillStyle = "#6b6b70";
  g.font = "11px sans-serif";
  g.fillText(top.toFixed(top < 10 ? 1 : 0), 4, 12);
  g.strokeStyle = color;
  g.lineWidth = 2;
  g.beginPath();
  let drawing = false;
  values.forEach((v, i) => {
    if (v === null) { drawing = false; return; }
    const x = (i / Math.max(values.length - 1, 1)) * width;
    const y = height - (v / top) * (height - 4) - 2;
    if (drawing) g.lineTo(x, y); else g.moveTo(x, y);
    drawing = true;
  });
  g.stroke();
  g.fillStyle = color;
  values.forEach((v, i) => { // a dot a point, so that a lone one shows too
    if (v === null || v === 0) return;
    const x = (i / Math.max(values.length - 1, 1)) * width;
    g.beginPath();
    g.arc(Math.min(x, width - 3), height - (v / top) * (height - 4) - 2, 2.5, 0, 2 * Math.PI);
    g.fill();
  });
}

// --- chat ----------------------------------------------------------------------------

function samplingSettings() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  return {
    temperature: number("temperature"),
    top_p: number("top-p"),
    max_tokens: number("max-tokens"),
    seed: number("seed"),
  };
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  $("messages").append(element("div", "message user", text));
  const answer = element("div", "message assistant");
  const body = element("span", "text");
  const figures = element("div", "figures", "waiting for the first token…");
  answer.append(body, figures);
  $("messages").append(answer);
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  chatAbort = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstTokenMs = null;
  let tokens = 0;
  let serverFigures = null;
  try {
    const response = await authorized(CHAT_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages, stream: true, ...samplingSettings() }),
      signal: chatAbort.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error?.message || `HTTP ${response.status}`);
    }
    await readEvents(response.body, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices?.[0]?.delta?.content || "";
      if (piece) {
        if (firstTokenMs === null) firstTokenMs = performance.now() - started;
        tokens += 1;
        body.textContent += piece;
        figures.textContent = `${tokens} pieces…`;
      }
      if (chunk.performance) serverFigures = chunk.performance;
    });
    figures.textContent = describe(serverFigures, firstTokenMs, tokens, started);
  } catch (error) {
    if (error.name === "AbortError") {
      figures.textContent = `stopped · ${describe(null, firstTokenMs, tokens, started)}`;
    } else {
      answer.classList.add("failed");
      figures.textContent = `failed: ${error.message}`;
    }
  } finally {
    conversation.push({ role: "assistant", content: body.textContent });
    chatAbort = null;
    setBusy(false);
  }
}

// The figures under an answer: the server's when it sent them, else measured here.
function describe(server, firstTokenMs, pieces, started) {
  if (server && server.ttft_ms != null) {
    return `TTFT ${server.ttft_ms.toFixed(0)} ms · ${server.tokens_per_second.toFixed(1)} tokens/s · ` +
      `${server.total_ms.toFixed(0)} ms in all`;
  }
  if (firstTokenMs === null) return "no token";
  const seconds = (performance.now() - started - firstTokenMs) / 1000;
  const rate = pieces > 1 && seconds > 0 ? ((pieces - 1) / seconds).toFixed(1) : "–";
  return `TTFT ${firstTokenMs.toFixed(0)} ms · ${rate} pieces/s`;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// --- helpers and start ---------------------------------------------------------------

function element(tag, className = "", ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

function meter(used, capacity) {
  const outer = element("div", "meter");
  const inner = element("div");
  inner.style.width = `${capacity ? Math.min(100, (100 * used) / capacity) : 0}%`;
  outer.append(inner);
  return outer;
}

function size(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let unit = 0;
  while (bytes >= 1000 && unit < units.length - 1) { bytes /= 1000; unit += 1; }
  return `${bytes.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chatAbort) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chatAbort?.abort());
  $("clear").addEventListener("click", () => {
    conversation.length = 0;
    $("messages").replaceChildren();
  });
  $("key-button").addEventListener("click", () => askForKey(false));
  followCluster();
});
