// herd dashboard, the shell: helpers, tabs, the live /dashboard/events stream, and the tabs
// that need little code (overview, models, apps, health, recommendations, settings). Other
// scripts (instruments.js, ...) add their tabs by setting loaders.<tab> = async () => {...}
// (and statusListeners for the live stream); the page starts once every script has loaded.
"use strict";

const $ = sel => document.querySelector(sel);
const esc = v => String(v ?? "").replace(/[&<>"']/g, c =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const GiB = 1024 ** 3;
const gib = b => ((b || 0) / GiB).toFixed(1);
const num = v => v == null ? "–" : (Math.round(v * 10) / 10).toLocaleString();
const pct = v => v == null ? "–" : (v * 100).toFixed(1) + "%";
const when = ts => ts ? new Date(ts * 1000).toLocaleString() : "–";
const MiB = 1024 ** 2;
const ms = v => v == null ? "–" : v >= 10000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`;
const kTokens = n => !n ? "" : n >= 1024 ? `${Math.round(n / 1024)}k` : String(n);
function duration(seconds) {
  if (seconds == null) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const join = (a, ua, b, ub) => b ? `${a} ${ua} ${b} ${ub}` : `${a} ${ua}`;
  if (s < 3600) return join(Math.floor(s / 60), "min", s % 60, "s");
  return join(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "min");
}
const badge = (text, cls) => `<span class="badge ${cls}">${esc(text)}</span>`;

// With API keys configured on the router, the dashboard asks for one once and keeps it here.
const keyHeader = () => {
  const key = localStorage.getItem("herd-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
};

// Ask for the key after a 401 made with `tried` (the key then stored, or null). If another
// caller has stored a new key meanwhile, that one is tried first instead of asking again.
// Returns the key to try next, or null if the user gave none.
function askForKey(tried) {
  const stored = localStorage.getItem("herd-key");
  if (stored && stored !== tried) return stored;
  const key = prompt("This herd router needs an API key:");
  if (!key) return null;
  localStorage.setItem("herd-key", key);
  return key;
}

async function api(path, options = {}) {
  const tried = localStorage.getItem("herd-key");
  let response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...keyHeader() } });
  if (response.status === 401 && askForKey(tried)) {
    response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...keyHeader() } });
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error;
    throw new Error(typeof error === "string" ? error : error?.message || response.statusText);
  }
  return body;
}

function table(columns, rows, onClick) {
  if (!rows.length) return "";
  const head = columns.map(c => `<th class="${c.num ? "num" : ""}">${esc(c.title)}</th>`).join("");
  const body = rows.map((r, i) => `<tr ${onClick ? `class="click" data-row="${i}"` : ""}>` +
    columns.map(c => `<td class="${c.num ? "num" : ""}">${c.html ? c.html(r) : esc(c.get(r))}</td>`).join("") +
    "</tr>").join("");
  return `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

function bindRows(container, rows, onClick) {
  container.querySelectorAll("tr.click").forEach(tr =>
    tr.addEventListener("click", () => onClick(rows[Number(tr.dataset.row)])));
}

function emptyState(title, text) {
  return `<div class="empty"><strong>${esc(title)}</strong>${text}</div>`;
}

// ---------------------------------------------------------------- theme & tabs
const theme = localStorage.getItem("herd-theme") ||
  (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
document.documentElement.dataset.theme = theme;
$("#theme").addEventListener("click", () => {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  document.documentElement.dataset.theme = next;
  localStorage.setItem("herd-theme", next);
});

const loaders = {};
function showTab() {
  const name = (location.hash || "#overview").slice(1);
  const tab = loaders[name] ? name : "overview";
  document.querySelectorAll(".tab").forEach(s => { s.hidden = s.id !== `tab-${tab}`; });
  document.querySelectorAll(".tabs a").forEach(a => a.classList.toggle("active", a.dataset.tab === tab));
  loaders[tab]().catch(err => console.error(err));
}
window.addEventListener("hashchange", showTab);

// ---------------------------------------------------------------- fleet overview (live)
// A bar of `used` out of `total`; a resource meter turns amber then red as it fills, a
// progress bar (`progress`) doesn't.
function meter(label, used, total, text, progress = false) {
  const share = total > 0 ? Math.min(1, used / total) : 0;
  const cls = progress ? "" : share > 0.92 ? "crit" : share > 0.8 ? "warn" : "";
  return `<div class="meter"><div class="label"><span>${label}</span><span>${text}</span></div>` +
    `<div class="track"><div class="fill ${cls}" style="width:${(share * 100).toFixed(1)}%"></div></div></div>`;
}

// The memory models run in on a GPU node (VRAM, or a Mac's GPU working set); none on CPU nodes.
function acceleratorMeter(acc) {
  if (!acc || acc.kind === "ram" || !(acc.total_bytes > 0)) return "";
  const used = acc.total_bytes - acc.free_bytes;
  return meter(acc.kind === "vram" ? "VRAM" : "GPU working set", used, acc.total_bytes,
    `${gib(used)} / ${gib(acc.total_bytes)} GiB`);
}

// What a node card shows beyond the basics. Badges follow the node's status; sections come
// after the memory and CPU meters. Other views add theirs here, each a function of the node's
// /fleet/status entry and the whole status, returning HTML ("" for nothing).
const nodeBadges = [
  n => n.draining ? badge("draining", "sev-warning") : "",
  n => n.capacity && n.capacity.paused ? badge("paused", "sev-warning") : "",
  n => n.models_loaded.some(m => m.spilled) ? badge("spilled", "sev-warning spilled") : "",
];
const nodeSections = [];

function nodeCard(n, status) {
  const mem = n.memory, used = mem.total_bytes - mem.available_bytes;
  const hot = new Set(n.models_loaded.map(m => m.name));
  const spill = m => m.spilled
    ? ` <span class="badge sev-warning spill">${Math.round(m.offload * 100)}% CPU</span>` : "";
  const chips = n.models_loaded.map(m =>
    `<span class="chip hot" title="loaded, context window ${m.context_length || "?"} tokens` +
    `${m.spilled ? ", spilled out of VRAM: part of it runs on the CPU" : ""}">${esc(m.name)}` +
    (m.context_length ? ` <small>${kTokens(m.context_length)} ctx</small>` : "") + spill(m) + "</span>").join("") +
    n.models_available.filter(m => !hot.has(m.name)).map(m =>
      `<span class="chip" title="on disk">${esc(m.name)}</span>`).join("");
  const backend = n.backend.healthy ? `${esc(n.backend.kind)} ${esc(n.backend.version)}`
    : `<span class="s-offline">backend down</span>`;
  const flow = (status.throughput || {})[n.node_id];
  const throughput = flow
    ? `<b>${num(flow.tokens_per_second)}</b> tok/s · <b>${num(flow.requests_per_minute)}</b> req/min`
    : `<span class="hint">idle</span>`;
  const span = flow ? duration(flow.seconds) : "5 min";
  return `<div class="card node" data-node="${esc(n.node_id)}">` +
    `<h3>${esc(n.node_id)} ${badge(n.status, `s-${esc(n.status)}`)}` +
    nodeBadges.map(f => f(n, status)).filter(Boolean).join(" ") + `</h3>` +
    `<div class="sub">${esc(n.host)} · ${backend}</div>` +
    `<div class="figures">` +
    `<div class="figure throughput" title="over the last ${span}"><span class="k">throughput</span>${throughput}</div>` +
    `<div class="figure queue"><span class="k">queue</span><b>${n.requests_in_flight}</b> / ${n.parallel_slots} slots busy` +
    (n.requests_pending ? ` · <b>${n.requests_pending}</b> waiting` : "") + `</div></div>` +
    meter("memory", used, mem.total_bytes, `${gib(used)} / ${gib(mem.total_bytes)} GiB`) +
    acceleratorMeter(n.accelerator) +
    meter("cpu", n.cpu.percent, 100, `${num(n.cpu.percent)}%`) +
    nodeSections.map(f => f(n, status)).join("") +
    `<div class="models">${chips || '<span class="hint">no models</span>'}</div></div>`;
}

function pullProgress(r) {
  if (!r.total_bytes) return esc(r.error || (r.status === "pulling" ? "starting…" : ""));
  const parts = [`${gib(r.completed_bytes)} / ${gib(r.total_bytes)} GiB`];
  if (r.rate_bytes_per_second != null) parts.push(`${(r.rate_bytes_per_second / MiB).toFixed(1)} MiB/s`);
  if (r.eta_seconds != null) parts.push(`${duration(r.eta_seconds)} left`);
  return meter(r.percent != null ? `${r.percent}%` : "", r.completed_bytes, r.total_bytes, parts.join(" · "), true) +
    (r.error ? `<div class="hint">${esc(r.error)}</div>` : "");
}

function renderPulls(pulls) {
  const sev = { failed: "sev-critical", done: "sev-ok", cancelled: "sev-warning" };
  $("#pulls").innerHTML = pulls.length ? table([
    { title: "model", get: r => r.model },
    { title: "node", get: r => r.node },
    { title: "by", get: r => r.origin },
    { title: "status", html: r => badge(r.status, sev[r.status] || "sev-info") },
    { title: "progress", html: pullProgress },
    { title: "", html: r => r.status === "pulling"
      ? `<button class="cancel-pull" data-model="${esc(r.model)}" data-node="${esc(r.node)}">Cancel</button>` : "" },
  ], pulls) : `<p class="hint">No pulls yet. Pull a model above, or from Recommendations.</p>`;
}

function renderFleet(status) {
  const f = status.fleet;
  $("#warnings").innerHTML = (status.warnings || []).map(w => `<div class="warning">${esc(w)}</div>`).join("");
  $("#fleet-summary").innerHTML = [
    ["nodes online", `${f.nodes_online} / ${f.nodes_total}`],
    ["models loaded", f.models_loaded],
    ["requests active", f.requests_active],
    ["pending", f.requests_pending],
  ].map(([k, v]) => `<div class="stat"><div class="v">${esc(v)}</div><div class="k">${k}</div></div>`).join("");
  const cards = $("#node-cards");
  if (!status.nodes.length) {
    cards.innerHTML = emptyState("No nodes yet",
      `On each machine with Ollama, run <code>herd-node --router-url ${esc(location.origin)}</code>.`);
  } else {
    cards.innerHTML = status.nodes.map(n => nodeCard(n, status)).join("");
  }
  renderPulls(status.pulls || []);
  const select = $("#pull-node"), chosen = select.value;
  select.innerHTML = `<option value="">best node</option>` + status.nodes.map(n =>
    `<option value="${esc(n.node_id)}">${esc(n.node_id)}</option>`).join("");
  select.value = status.nodes.some(n => n.node_id === chosen) ? chosen : "";
  const queues = Object.entries(status.queues);
  $("#queues").innerHTML = queues.length ? table([
    { title: "class", html: r => `<span class="kind">[${esc(String(r[1].kind).toUpperCase())}]</span>` },
    { title: "node:model", get: r => r[0] },
    { title: "pending", num: true, get: r => r[1].pending },
    { title: "in flight", num: true, get: r => r[1].in_flight },
    { title: "done", num: true, get: r => r[1].done },
    { title: "failed", num: true, get: r => r[1].failed },
  ], queues) : emptyState("No requests yet",
    `Point a client at <code>${esc(location.origin)}</code> (Ollama API) or <code>${esc(location.origin)}/v1</code> (OpenAI).`);
}

const postJSON = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

// Pulls: started here or from Recommendations, owned by the router (a closed page doesn't
// stop them), cancelled from their row.
$("#pulls").addEventListener("click", async event => {
  const button = event.target.closest("button.cancel-pull");
  if (!button) return;
  button.disabled = true;
  try {
    await postJSON("/dashboard/api/pulls/cancel", { model: button.dataset.model, node_id: button.dataset.node });
  } catch (err) {
    $("#pull-status").textContent = err.message;
  }
});
$("#pull-form").addEventListener("submit", async event => {
  event.preventDefault();
  const model = $("#pull-model").value.trim(), node = $("#pull-node").value;
  try {
    const job = await postJSON("/dashboard/api/pulls", { model, ...(node ? { node_id: node } : {}) });
    $("#pull-status").textContent = `pulling ${job.model} onto ${job.node}`;
  } catch (err) {
    $("#pull-status").textContent = err.message;
  }
});

// Follow a router-owned pull (started at `started` onto `node`) until it ends; `onProgress`
// gets its view as it goes. Returns the final view.
async function followPull(model, node, started, onProgress) {
  for (;;) {
    const { pulls } = await api("/dashboard/api/pulls");
    const job = pulls.find(p => p.model === model && p.node === node && p.started_at >= started);
    if (job) {
      onProgress(job);
      if (job.status !== "pulling") return job;
    }
    await new Promise(resolve => setTimeout(resolve, 1000));
  }
}

let lastStatus = null;
// Called with every status the live stream brings (after the overview has rendered it).
const statusListeners = [];
// The live stream. EventSource retries a dropped connection by itself, but an HTTP error
// (a 401 when the router wants an API key) closes it for good and says nothing of the status:
// then ask the router once what the matter is, ask for the key on a 401, and connect again.
function connectEvents() {
  const live = $("#live");
  const key = localStorage.getItem("herd-key");
  const source = new EventSource("/dashboard/events" + (key ? `?key=${encodeURIComponent(key)}` : ""));
  source.addEventListener("fleet", event => {
    lastStatus = JSON.parse(event.data);
    live.textContent = "live"; live.className = "live on";
    renderFleet(lastStatus);
    statusListeners.forEach(listener => listener(lastStatus));
  });
  source.onerror = () => {
    live.textContent = "reconnecting…"; live.className = "live off";
    if (source.readyState === EventSource.CLOSED) eventsRefused(key);
  };
}

async function eventsRefused(tried) {
  let status = 0;
  const stop = new AbortController();
  try {
    // The answer's status is all we need: the body (a stream, when allowed) is not read.
    const response = await fetch("/dashboard/events", { headers: keyHeader(), signal: stop.signal });
    status = response.status;
  } catch (err) {
    // the router is unreachable: try again below
  } finally {
    stop.abort();
  }
  if (status === 401) {
    if (askForKey(tried)) connectEvents();
    else { $("#live").textContent = "API key needed: reload to enter it"; }
    return;
  }
  setTimeout(connectEvents, 3000);
}
loaders.overview = async () => { if (lastStatus) renderFleet(lastStatus); };

// ---------------------------------------------------------------- model insights
const statColumns = [
  { title: "requests", num: true, get: r => r.requests },
  { title: "avg latency ms", num: true, get: r => num(r.avg_latency_ms) },
  { title: "avg TTFT ms", num: true, get: r => num(r.avg_ttft_ms) },
  { title: "prompt tok", num: true, get: r => num(r.prompt_tokens) },
  { title: "completion tok", num: true, get: r => num(r.completion_tokens) },
  { title: "failed", num: true, get: r => r.failed + r.incomplete },
];
loaders.models = async () => {
  const data = await api("/dashboard/api/models");
  const box = $("#models-table");
  if (!data.models.length) {
    box.innerHTML = emptyState("No requests yet", "Model statistics appear after the first request.");
    return;
  }
  box.innerHTML = table([{ title: "model", get: r => r.model },
    { title: "tokens/s", num: true, get: r => num(r.tokens_per_second) }, ...statColumns], data.models, true);
  bindRows(box, data.models, async row => {
    const daily = await api(`/dashboard/api/models?model=${encodeURIComponent(row.model)}&hours=168`);
    $("#model-detail").innerHTML = `<h2>${esc(row.model)}: last 7 days</h2>` +
      table([{ title: "day", get: r => r.day }, ...statColumns], daily.days);
  });
};

// ---------------------------------------------------------------- apps
loaders.apps = async () => {
  const data = await api("/dashboard/api/apps");
  const box = $("#apps-table");
  if (!data.apps.length) {
    box.innerHTML = emptyState("No tagged requests yet", "Tagged requests are grouped here per app.");
    return;
  }
  box.innerHTML = table([{ title: "tag", get: r => r.tag },
    { title: "error rate", num: true, get: r => pct(r.error_rate) }, ...statColumns], data.apps, true);
  bindRows(box, data.apps, async row => {
    const daily = await api(`/dashboard/api/apps/daily?hours=168&tag=${encodeURIComponent(row.tag)}`);
    $("#app-detail").innerHTML = `<h2>${esc(row.tag)}: last 7 days</h2>` +
      table([{ title: "day", get: r => r.day }, ...statColumns], daily.days);
  });
};

// ---------------------------------------------------------------- health
loaders.health = async () => {
  const data = await api("/dashboard/api/health");
  const s = data.summary;
  $("#health-summary").innerHTML = [["critical", s.critical], ["warning", s.warning], ["info", s.info], ["ok", s.ok]]
    .map(([k, v]) => `<div class="stat"><div class="v sev-${k}">${v}</div><div class="k">${k}</div></div>`).join("");
  $("#health-checks").innerHTML = data.checks.map(c =>
    `<div class="check sev-${esc(c.severity)}" data-check="${esc(c.id)}">` +
    `<span class="badge sev-${esc(c.severity)}">${esc(c.severity)}</span> <span class="t">${esc(c.title)}</span>` +
    `<div class="e">${esc(c.evidence)}</div>` +
    (c.severity === "ok" ? "" : `<div class="f">Fix: ${esc(c.fix)}</div>`) + "</div>").join("");
};

// ---------------------------------------------------------------- recommendations
loaders.recommendations = async () => {
  const data = await api("/dashboard/api/recommendations");
  const box = $("#recommendations");
  if (!data.nodes.length) {
    box.innerHTML = emptyState("No nodes yet", "Recommendations are made per node once nodes join.");
    return;
  }
  box.innerHTML = data.nodes.map(n => `<div class="node-recs" data-node="${esc(n.node_id)}">` +
    `<h3>${esc(n.node_id)} <span class="hint">${n.memory_gb} GiB, ${n.budget_gb} GiB for models</span></h3>` +
    table([
      { title: "", html: r => r.installed ? "✓" :
        `<input type="checkbox" class="pick" data-model="${esc(r.model)}">` },
      { title: "model", get: r => r.model }, { title: "kind", get: r => r.category },
      { title: "memory GiB", num: true, get: r => r.memory_gb },
      { title: "good for", get: r => r.strengths }, { title: "why", get: r => r.reason },
    ], n.recommended) +
    `<p><button class="primary pull" data-node="${esc(n.node_id)}">Pull selected</button>` +
    `<span class="progress"></span></p></div>`).join("");
  box.querySelectorAll("button.pull").forEach(button => button.addEventListener("click", async () => {
    const section = button.closest(".node-recs");
    const progress = section.querySelector(".progress");
    const models = [...section.querySelectorAll("input.pick:checked")].map(i => i.dataset.model);
    if (!models.length) { progress.textContent = "tick at least one model"; return; }
    button.disabled = true;
    const node = button.dataset.node;
    try {
      for (const model of models) {
        progress.textContent = `${model}: starting…`;
        const started = await postJSON("/dashboard/api/pulls", { model, node_id: node });
        const job = await followPull(model, node, started.started_at, view => {
          const share = view.percent != null ? ` ${Math.round(view.percent)}%` : "";
          const eta = view.eta_seconds != null ? `, ${duration(view.eta_seconds)} left` : "";
          progress.textContent = `${model}: ${view.status}${share}${eta}`;
        });
        if (job.status !== "done") throw new Error(`${model}: ${job.error || job.status}`);
      }
      progress.textContent = `pulled: ${models.join(", ")}`;
      progress.dataset.done = "true";
    } catch (err) {
      progress.textContent = `failed: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  }));
};

// ---------------------------------------------------------------- settings
const TOGGLES = {
  auto_pull: "Auto-pull missing models (off: an unknown model is a 404)",
  vram_fallback: "VRAM-aware fallback: substitute a loaded model (opt-in)",
  context_protection: "Context protection",
  agent_defaults: "Coding agents' model ids (claude-*, gpt-*) by size",
  image_generation: "Image generation routing",
  transcription: "Speech-to-text routing",
};
loaders.settings = async () => {
  const data = await api("/dashboard/api/settings");
  $("#toggles").innerHTML = Object.entries(TOGGLES).map(([key, label]) =>
    `<label class="toggle"><span>${label}</span><span class="switch">` +
    `<input type="checkbox" data-setting="${key}" ${data.settings[key] ? "checked" : ""}><span></span></span></label>`).join("");
  $("#toggles").querySelectorAll("input").forEach(input => input.addEventListener("change", async () => {
    try {
      const saved = await api("/dashboard/api/settings", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ [input.dataset.setting]: input.checked }),
      });
      input.checked = saved.settings[input.dataset.setting];
    } catch (err) {
      input.checked = !input.checked;
      alert(err.message);
    }
  }));
  const aliases = $("#aliases");
  aliases.value = Object.entries(data.settings.model_aliases || {})
    .map(([pattern, models]) => `${pattern} = ${models.join(", ")}`).join("\n");
  $("#save-aliases").onclick = async () => {
    const parsed = {};
    for (const line of aliases.value.split("\n")) {
      if (!line.trim()) continue;
      const [pattern, models] = line.split("=");
      parsed[(pattern || "").trim()] = (models || "").split(",").map(m => m.trim()).filter(Boolean);
    }
    try {
      await api("/dashboard/api/settings", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model_aliases: parsed }),
      });
      $("#aliases-status").textContent = "saved";
    } catch (err) {
      $("#aliases-status").textContent = err.message;
    }
  };
  $("#settings-nodes").innerHTML = data.nodes.length ? table([
    { title: "node", html: r => `${esc(r.node_id)}${r.router ? ' <span class="badge sev-info">router</span>' : ""}` },
    { title: "status", html: r => `<span class="badge s-${esc(r.status)}">${esc(r.status)}</span>` },
    { title: "herd", get: r => r.agent_version }, { title: "backend", get: r => `${r.backend} ${r.backend_version}` },
  ], data.nodes) : emptyState("No nodes yet", "Nodes and their versions appear here once they join.");
  $("#config").innerHTML = `<div class="config-grid">` + Object.entries(data.config).map(([group, values]) =>
    `<div><h3>${esc(group)}</h3>` + table([{ title: "option", get: r => r[0] },
      { title: "value", get: r => Array.isArray(r[1]) ? r[1].join(", ") : r[1] }], Object.entries(values)) +
    "</div>").join("") + "</div>";
};

// Every script has registered its tabs by the time the document is parsed.
document.addEventListener("DOMContentLoaded", () => {
  connectEvents();
  showTab();
});
