// fleet's status page: one server-sent event stream (/ui/events), read with fetch so that it can
// carry a key; reconnects after any gap (a restarted gateway) and is then sent everything again.
"use strict";

const KEEP_POINTS = 150, KEEP_ROWS = 100, KEEP_LINES = 500;
const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("fleet-key") || "",
  canAct: false,
  sampleEvery: 2,
  rows: new Map(),      // engine -> {tr, cells}
  points: new Map(),    // engine -> [Point]
  lines: new Map(),     // engine -> [text]
  controller: null,
  retry: 500,
};

// --- formatting -----------------------------------------------------------------------------
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}
const ms = (v) => (v === null || v === undefined ? "–" : v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(2) + " s");
const gib = (b) => (b / 2 ** 30).toFixed(1);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.dataset.kind = kind || "info";
}
function setConnection(which, text) {
  const c = $("connection");
  c.dataset.state = which;
  c.textContent = text || which;
}

// --- sparklines -----------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function sparkline(label) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", "80");
  svg.setAttribute("height", "18");
  svg.setAttribute("viewBox", "0 0 80 18");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label + ", last minutes");
  svg.appendChild(document.createElementNS(SVG, "polyline"));
  return svg;
}
function drawSpark(svg, values) {
  const line = svg.firstChild;
  if (values.length < 2) { line.setAttribute("points", ""); return; }
  const top = Math.max(...values, 1e-9), step = 80 / (KEEP_POINTS - 1), start = 80 - step * (values.length - 1);
  line.setAttribute("points", values.map((v, i) => `${(start + i * step).toFixed(1)},${(17 - (v / top) * 16).toFixed(1)}`).join(" "));
}

// --- engines --------------------------------------------------------------------------------
const COLUMNS = ["model", "engine", "state", "where", "pid", "uptime", "restarts", "inflight", "queued", "tokens", "requests", "errors", "actions"];
const NUMERIC = new Set(["restarts", "inflight", "queued", "tokens", "requests", "errors"]);

function engineRow(name) {
  const tr = el("tr");
  tr.dataset.engine = name;
  const cells = {};
  for (const col of COLUMNS) {
    const td = el(col === "engine" ? "th" : "td", null, NUMERIC.has(col) ? "num" : col === "actions" ? "actions" : "");
    if (col === "engine") td.scope = "row";
    cells[col] = td;
    tr.appendChild(td);
  }
  cells.stateText = el("span", null, "state");
  cells.since = el("span", null, "since");
  cells.state.append(cells.stateText, " ", cells.since);
  cells.tokensValue = el("span");
  cells.tokensSpark = sparkline("tokens per second");
  cells.tokens.append(cells.tokensValue, cells.tokensSpark);
  cells.errorCount = el("span");
  cells.errorRate = el("span", null, "since");
  cells.errors.append(cells.errorCount, " ", cells.errorRate);
  cells.requestsValue = el("span");
  cells.requestsSpark = sparkline("requests per minute");
  cells.requests.append(cells.requestsValue, cells.requestsSpark);
  cells.restart = el("button", "Restart");
  cells.restart.type = "button";
  cells.restart.addEventListener("click", () => act(`/ui/engines/${encodeURIComponent(name)}/restart`, `restart ${name}`));
  cells.drain = el("button", "Drain");
  cells.drain.type = "button";
  cells.drain.addEventListener("click", () => {
    const resume = cells.drain.dataset.draining === "true";
    act(`/ui/engines/${encodeURIComponent(name)}/${resume ? "resume" : "drain"}`, `${resume ? "resume" : "drain"} ${name}`);
  });
  // a model started on demand (or a set's member): put away now, or woken as a request would
  cells.sleep = el("button", "Sleep");
  cells.sleep.type = "button";
  cells.sleep.addEventListener("click", () => {
    const model = cells.sleep.dataset.model, action = cells.sleep.dataset.action;
    act(`/ui/models/${encodeURIComponent(model)}/${action}`, `${action} ${model}`);
  });
  cells.actions.append(cells.restart, cells.drain, cells.sleep);
  return { tr, cells };
}

function showStatus(status) {
  const tbody = $("engines").tBodies[0];
  const seen = new Set();
  for (const m of status.models) {
    seen.add(m.replica);
    let row = state.rows.get(m.replica);
    if (!row) {
      row = engineRow(m.replica);
      state.rows.set(m.replica, row);
    }
    tbody.appendChild(row.tr); // keeps the server's order; a node moved keeps its focus
    const c = row.cells;
    c.model.textContent = m.model;
    const adapters = Object.entries(m.adapters || {});
    if (adapters.length) {  // its LoRA adapters, with the requests that named each
      const list = el("span", adapters.map(([a, n]) => `${a} ${n}`).join(", "), "since adapters");
      list.title = "LoRA adapters: requests naming each";
      c.model.append(" ", list);
    }
    c.engine.textContent = m.replica;
    c.stateText.textContent = m.state + (m.draining ? " (draining)" : "");
    c.stateText.dataset.state = m.state;
    c.since.textContent = "for " + duration(m.since_s) + (m.reason ? " · " + m.reason : "");
    const gpus = m.gpus.length ? "GPU " + m.gpus.join(",") : "CPU";
    c.where.textContent = m.url ? m.url : `${gpus} · ${m.host}:${m.port}` + (m.node ? ` · ${m.node}` : "");
    c.state.title = "since " + clock(Date.now() / 1000 - m.since_s);
    c.pid.textContent = m.pid ?? "–";
    c.uptime.textContent = duration(m.uptime_s);
    c.restarts.textContent = m.restarts;
    const over = m.taken_over || {};
    if (over.rerun || over.resumed || over.given_up) {  // the model's requests whose engine died under them
      const t = el("span", `resumed ${over.resumed} · re-run ${over.rerun} · lost ${over.given_up}`, "since takeovers");
      t.title = "requests whose engine died under them: continued on another replica, run again there, or failed";
      c.restarts.append(" ", t);
    }
    c.inflight.textContent = m.inflight;
    c.queued.textContent = m.queued;
    c.tokensValue.textContent = m.tokens_per_s.toFixed(1);
    c.errorCount.textContent = m.errors;
    c.restart.disabled = !state.canAct || m.attached;
    c.drain.disabled = !state.canAct;
    c.drain.textContent = m.draining ? "Resume" : "Drain";
    c.drain.dataset.draining = String(m.draining);
    const away = ["idle", "sleeping", "stopped"].includes(m.state);
    c.sleep.hidden = !m.on_demand;
    c.sleep.disabled = !state.canAct;
    c.sleep.textContent = away ? "Wake" : "Sleep";
    c.sleep.dataset.action = away ? "wake" : "sleep";
    c.sleep.dataset.model = m.model;
    describeActions(c, m);
  }
  for (const [name, row] of state.rows) {
    if (!seen.has(name)) { row.tr.remove(); state.rows.delete(name); }
  }
  $("reload").disabled = !state.canAct;
  const select = $("log-engine"), chosen = select.value;
  const names = status.models.map((m) => m.replica);
  if (names.join() !== [...select.options].map((o) => o.value).join()) {
    select.replaceChildren(...names.map((n) => el("option", n)));
    select.value = names.includes(chosen) ? chosen : names[0] || "";
    showLog();
  }
}
function describeActions(c, m) {
  const why = state.canAct ? "" : "read-only: no admin key is configured";
  c.restart.title = m.attached ? "started elsewhere: restart it there" : why;
  c.drain.title = why;
  c.sleep.title = why || (m.swap_set ? `a member of set ${m.swap_set}: waking it may put another away` : "");
}

function drawPoints(name) {
  const row = state.rows.get(name), points = state.points.get(name) || [];
  if (!row) return;
  drawSpark(row.cells.tokensSpark, points.map((p) => p[1]));
  drawSpark(row.cells.requestsSpark, points.map((p) => p[4]));
  const last = points[points.length - 1];
  row.cells.requestsValue.textContent = last ? last[4].toFixed(1) : "0.0";
  // the error rate over the last minute: failed / ended engine requests, weighted by each sample's count
  const minute = points.slice(-Math.round(60 / state.sampleEvery));
  const ended = minute.reduce((n, p) => n + p[4], 0), failed = minute.reduce((n, p) => n + p[4] * p[5], 0);
  row.cells.errorRate.textContent = ended > 0 ? `(${((100 * failed) / ended).toFixed(1)} % last min)` : "";
}

function showGpus(gpus) {
  $("gpus-section").hidden = gpus.length === 0;
  $("gpus").tBodies[0].replaceChildren(...gpus.map((g) => {
    const tr = el("tr");
    tr.append(el("td", g.index, "num"), el("td", g.name),
      el("td", `${gib(g.memory_used)} of ${gib(g.memory_total)} GiB`), el("td", g.utilization + " %", "num"),
      el("td", g.processes, "num"), el("td", g.engines.join(", ") || "–"));
    return tr;
  }));
}

// --- lists ----------------------------------------------------------------------------------
function prepend(tbody, rows) {
  for (const tr of rows) tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.rows.length > KEEP_ROWS) tbody.deleteRow(-1);
}
function showChanges(changes) {
  prepend($("changes").tBodies[0], changes.map((ch) => {
    const tr = el("tr");
    tr.dataset.engine = ch.engine;
    tr.dataset.to = ch.new;
    tr.append(el("td", clock(ch.at)), el("td", ch.engine), el("td", ch.old), el("td", ch.new, "state"), el("td", ch.reason || ""));
    tr.cells[3].dataset.state = ch.new;
    return tr;
  }));
}
function showRequests(traces) {
  prepend($("requests").tBodies[0], traces.map((t) => {
    const tr = el("tr");
    tr.dataset.model = t.model;
    tr.append(el("td", clock(t.at)), el("td", t.model), el("td", t.replica || "–"), el("td", t.route),
      el("td", t.status, "num"), el("td", t.prompt_tokens, "num"), el("td", t.completion_tokens, "num"),
      el("td", ms(t.ttft_ms), "num"), el("td", ms(t.duration_ms), "num"), el("td", t.prompt ?? "", "prompt"));
    return tr;
  }));
}

// --- logs -----------------------------------------------------------------------------------
function addLines(lines) {
  const chosen = $("log-engine").value, shown = [];
  for (const [seq, engine, at, text] of lines) {
    let kept = state.lines.get(engine);
    if (!kept) state.lines.set(engine, (kept = []));
    kept.push(text);
    if (kept.length > KEEP_LINES) kept.splice(0, kept.length - KEEP_LINES);
    if (engine === chosen) shown.push(text);
  }
  if (shown.length) {
    const log = $("log");
    if (log.childNodes.length > 200) showLog(); // now and then, from the kept lines only
    else { log.append(shown.join("\n") + "\n"); follow(); }
  }
}
function showLog() {
  const kept = state.lines.get($("log-engine").value) || [];
  $("log").textContent = kept.length ? kept.join("\n") + "\n" : "";
  follow();
}
function follow() {
  if ($("follow").checked) { const log = $("log"); log.scrollTop = log.scrollHeight; }
}

// --- actions --------------------------------------------------------------------------------
async function act(path, what) {
  say(`${what}…`);
  try {
    const r = await fetch(path, { method: "POST", headers: state.key ? { Authorization: "Bearer " + state.key } : {} });
    const body = await r.json().catch(() => ({}));
    if (r.ok) say(`${what}: done`);
    else say(`${what}: refused (${r.status}): ${body.error ? body.error.message : r.statusText}`, "error");
  } catch (e) {
    say(`${what}: the gateway did not answer (${e})`, "error");
  }
}

// --- the stream -----------------------------------------------------------------------------
const HANDLERS = {
  hello(h) {
    state.canAct = h.can_act;
    state.sampleEvery = h.sample_every;
    $("where").textContent = `gateway ${h.gateway.host}:${h.gateway.port} · pid ${h.gateway.pid} · since ${clock(h.gateway.started)}`;
    $("config").textContent = h.config;
    // everything comes again after a reconnect: start the lists over
    for (const id of ["changes", "requests"]) $(id).tBodies[0].replaceChildren();
    state.lines.clear();
    state.points.clear();
    $("requests").classList.toggle("no-prompts", !h.show_prompts);
  },
  status: showStatus,
  history(points) {
    for (const [name, list] of Object.entries(points)) { state.points.set(name, list); drawPoints(name); }
  },
  sample(s) {
    for (const [name, point] of Object.entries(s.points)) {
      const list = state.points.get(name) || [];
      list.push(point);
      if (list.length > KEEP_POINTS) list.shift();
      state.points.set(name, list);
      drawPoints(name);
    }
    showGpus(s.gpus);
  },
  changes: showChanges,
  logs(lines) { addLines(lines); },
  requests: showRequests,
  config(text) { $("config").textContent = text; },
};

function dispatch(block) {
  let name = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) name = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  const handler = HANDLERS[name];
  if (handler && data) handler(JSON.parse(data));
  if (name === "logs" && !$("log").textContent) showLog();
}

async function connect() {
  state.controller = new AbortController();
  const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
  let reason = "the gateway went away";
  try {
    const r = await fetch("/ui/events", { headers, cache: "no-store", signal: state.controller.signal });
    if (r.status === 401 || r.status === 403) {
      const body = await r.json().catch(() => ({}));
      setConnection("needs-key", "needs a key");
      say((body.error && body.error.message) || "this fleet needs a key", "error");
      $("key").focus();
      return; // until a key is given
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    setConnection("live");
    state.retry = 500;
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return; // a new key: connect() was called again
    reason = String(e.message || e);
  }
  setConnection("reconnecting", `reconnecting (${reason})`);
  setTimeout(connect, state.retry);
  state.retry = Math.min(state.retry * 2, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = state.key;
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem("fleet-key", state.key);
    say(state.key ? "key in use" : "no key");
    if (state.controller) state.controller.abort();
    connect();
  });
  $("reload").addEventListener("click", () => act("/ui/reload", "reload"));
  $("log-engine").addEventListener("change", showLog);
  $("follow").addEventListener("change", follow);
  connect();
});
