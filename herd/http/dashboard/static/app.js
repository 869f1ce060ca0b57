// herd dashboard: eight tabs over /dashboard/api and the live /dashboard/events stream.
"use strict";

const $ = sel => document.querySelector(sel);
const esc = v => String(v ?? "").replace(/[&<>"']/g, c =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const GiB = 1024 ** 3;
const gib = b => ((b || 0) / GiB).toFixed(1);
const num = v => v == null ? "–" : (Math.round(v * 10) / 10).toLocaleString();
const pct = v => v == null ? "–" : (v * 100).toFixed(1) + "%";
const when = ts => ts ? new Date(ts * 1000).toLocaleString() : "–";

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
function meter(label, used, total, text) {
  const share = total > 0 ? Math.min(1, used / total) : 0;
  const cls = share > 0.92 ? "crit" : share > 0.8 ? "warn" : "";
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
    cards.innerHTML = status.nodes.map(n => {
      const mem = n.memory, used = mem.total_bytes - mem.available_bytes;
      const hot = new Set(n.models_loaded.map(m => m.name));
      const spill = m => m.spilled
        ? ` <span class="badge sev-warning spill">${Math.round(m.offload * 100)}% CPU</span>` : "";
      const chips = n.models_loaded.map(m =>
        `<span class="chip hot" title="loaded, context ${m.context_length}` +
        `${m.spilled ? ", spilled out of VRAM: part of it runs on the CPU" : ""}">${esc(m.name)}${spill(m)}</span>`).join("") +
        n.models_available.filter(m => !hot.has(m.name)).map(m =>
          `<span class="chip" title="on disk">${esc(m.name)}</span>`).join("");
      const backend = n.backend.healthy ? `${esc(n.backend.kind)} ${esc(n.backend.version)}`
        : `<span class="s-offline">backend down</span>`;
      return `<div class="card node" data-node="${esc(n.node_id)}">` +
        `<h3>${esc(n.node_id)} <span class="badge s-${esc(n.status)}">${esc(n.status)}</span>` +
        `${n.draining ? ' <span class="badge sev-warning">draining</span>' : ""}` +
        `${n.models_loaded.some(m => m.spilled) ? ' <span class="badge sev-warning spilled">spilled</span>' : ""}</h3>` +
        `<div class="sub">${esc(n.host)} · ${backend} · ${n.requests_in_flight} in flight, ${n.requests_pending} pending</div>` +
        meter("memory", used, mem.total_bytes, `${gib(used)} / ${gib(mem.total_bytes)} GiB`) +
        acceleratorMeter(n.accelerator) +
        meter("cpu", n.cpu.percent, 100, `${num(n.cpu.percent)}%`) +
        `<div class="models">${chips || '<span class="hint">no models</span>'}</div></div>`;
    }).join("");
  }
  const pulls = status.pulls || [];
  $("#pulls").innerHTML = pulls.length ? "<h2>Pulls</h2>" + table([
    { title: "model", get: r => r.model },
    { title: "node", get: r => r.node },
    { title: "by", get: r => r.origin },
    { title: "status", html: r => `<span class="badge ${r.status === "failed" ? "sev-critical" : r.status === "done" ? "sev-ok" : "sev-info"}">${esc(r.status)}</span>` },
    { title: "progress", html: r => r.total_bytes
      ? meter("", r.completed_bytes, r.total_bytes, `${gib(r.completed_bytes)} / ${gib(r.total_bytes)} GiB`)
      : esc(r.error || "") },
  ], pulls) : "";
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

let lastStatus = null;
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

// ---------------------------------------------------------------- trends
loaders.trends = async () => {
  const hours = $("#trend-hours").value;
  const data = await api(`/dashboard/api/trends?hours=${hours}`);
  const label = b => {
    const d = new Date(b.hour * 1000);
    return Number(hours) > 24 ? `${d.getMonth() + 1}/${d.getDate()} ${d.getHours()}h`
      : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  };
  // One bucket per hour across the whole range, zero where nothing happened.
  const byHour = new Map(data.buckets.map(x => [x.hour, x]));
  const last = Math.floor(Date.now() / 3600000) * 3600, b = [];
  for (let h = last - (Number(hours) - 1) * 3600; h <= last; h += 3600) {
    b.push(byHour.get(h) || { hour: h, requests: 0, avg_latency_ms: 0, prompt_tokens: 0, completion_tokens: 0 });
  }
  $("#chart-requests").innerHTML = Charts.bars(b.map(x => ({ label: label(x), y: x.requests })), "requests");
  $("#chart-latency").innerHTML = Charts.line(b.map(x => ({ label: label(x), y: x.avg_latency_ms || 0 })), "latency");
  $("#chart-tokens").innerHTML = Charts.line(b.map(x => ({ label: label(x), y: x.prompt_tokens + x.completion_tokens })), "tokens");
};
$("#trend-hours").addEventListener("change", () => loaders.trends());

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

// ---------------------------------------------------------------- benchmarks
loaders.benchmarks = async () => {
  const data = await api("/dashboard/api/benchmarks?hours=168");
  if (!data.runs.length) {
    $("#bench-chart").innerHTML = "";
    $("#bench-table").innerHTML = emptyState("No benchmark runs yet",
      "Save a run with <code>POST /dashboard/api/benchmarks</code> " +
      "(<code>{\"name\": \"...\", \"results\": {\"requests_per_second\": ...}}</code>).");
    return;
  }
  const figure = r => {
    const d = r.data || {};
    return d.requests_per_second ?? d.rps ?? d.throughput ?? null;
  };
  $("#bench-chart").innerHTML = `<figure><figcaption>Throughput per run (requests/s)</figcaption>` +
    Charts.line(data.runs.map(r => ({ label: `#${r.id}`, y: figure(r) || 0 })), "throughput") + "</figure>";
  $("#bench-table").innerHTML = table([
    { title: "run", get: r => `#${r.id}` }, { title: "name", get: r => r.name },
    { title: "when", get: r => when(r.timestamp) },
    { title: "results", html: r => `<code>${esc(JSON.stringify(r.data)).slice(0, 200)}</code>` },
  ], data.runs.slice().reverse());
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
    try {
      for (const model of models) {
        progress.textContent = `${model}: starting…`;
        const response = await fetch("/dashboard/api/pull", {
          method: "POST", headers: { "Content-Type": "application/json", ...keyHeader() },
          body: JSON.stringify({ model, node_id: button.dataset.node }),
        });
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "", last = {};
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          const lines = buffer.split("\n"); buffer = lines.pop();
          for (const line of lines) {
            if (!line.trim()) continue;
            last = JSON.parse(line);
            const share = last.total ? ` ${Math.round(100 * (last.completed || 0) / last.total)}%` : "";
            progress.textContent = `${model}: ${last.error || last.status}${share}`;
          }
        }
        if (last.error) throw new Error(last.error);
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

connectEvents();
showTab();
