// herd dashboard, the instruments: Trends (series over a window, broken down by node, model
// or tag, with the fleet's events on every chart), Requests (the live feed and each request's
// trace) and Benchmarks (run from here, compared over time). Uses app.js's helpers.
"use strict";

// ---------------------------------------------------------------- trends
const trend = { window: localStorage.getItem("herd-window") || "24h", filters: {}, hidden: new Set(),
  timer: null };
const CATEGORY_NAMES = { node: "nodes", model: "models", drain: "drains & pauses", pull: "pulls",
  settings: "settings", benchmark: "benchmarks" };
const EVENT_WORDS = {
  node_joined: "joined", node_left: "left", node_degraded: "degraded", node_offline: "offline",
  node_recovered: "back online", node_forgotten: "forgotten", backend_down: "backend down",
  backend_up: "backend back", model_loaded: "loaded", model_evicted: "evicted",
  model_deleted: "deleted", drain_started: "draining", drain_stopped: "stopped draining",
  node_drained: "drained", node_paused: "paused", node_resumed: "resumed",
  pull_started: "pull started", pull_done: "pulled", pull_failed: "pull failed",
  pull_cancelled: "pull cancelled", settings_changed: "settings changed",
  benchmark_started: "benchmark started", benchmark_finished: "benchmark finished",
};
function eventLabel(e) {
  const who = [e.node_id, e.model].filter(Boolean).join(" · ");
  return `${EVENT_WORDS[e.kind] || e.kind}${who ? ": " + who : ""}${e.detail ? " (" + e.detail + ")" : ""}`;
}

// One chart per figure. `value(bucket)` is the figure; `pct` uses the chosen percentile.
const TREND_CHARTS = [
  { id: "requests", title: "Requests", bars: true, value: b => b.requests },
  { id: "latency", title: "Latency", unit: "ms", pct: "latency" },
  { id: "ttft", title: "Time to first token", unit: "ms", pct: "ttft" },
  { id: "tps", title: "Generation speed (tokens/s)", unit: "tok/s", value: b => b.tokens_per_second },
  { id: "errors", title: "Errors (failed + incomplete)", bars: true, value: b => b.errors },
  { id: "retries", title: "Retries", bars: true, value: b => b.retries },
  { id: "fallbacks", title: "Fallbacks (a fallback_models entry served)", bars: true, value: b => b.fallbacks },
  { id: "substitutions", title: "Substitutions (another model served)", bars: true, value: b => b.substitutions },
];

function trendSeries(chart, data, pct) {
  const whole = data.by === "none";
  if (chart.pct && whole) {
    const buckets = data.series.length ? data.series[0].buckets : [];
    return [50, 95, 99].map(p => ({ name: `p${p}`,
      points: buckets.map(b => ({ t: b.t, y: b[`${chart.pct}_p${p}`] })) }));
  }
  return data.series.map(s => ({ name: s.group, points: s.buckets.map(b => ({
    t: b.t, y: chart.pct ? b[`${chart.pct}_p${pct}`] : chart.value(b) })) }));
}

function renderTrendFilters(data) {
  const f = data.filters;
  const chips = Object.entries(f).filter(([, v]) => v).map(([k, v]) =>
    `<span class="chip filter" data-filter="${esc(k)}">${esc(k)}: ${esc(v)} ✕</span>`).join("");
  $("#trend-filters").innerHTML = chips ? `filtered to ${chips}` :
    `<span class="hint">click a row below to narrow every chart to it</span>`;
  $("#trend-filters").querySelectorAll(".chip.filter").forEach(chip => chip.addEventListener("click", () => {
    delete trend.filters[chip.dataset.filter];
    loaders.trends();
  }));
}

function renderEventToggles(events) {
  const counts = {};
  events.forEach(e => { counts[e.category] = (counts[e.category] || 0) + 1; });
  $("#trend-events").innerHTML = "Events on the charts: " + Object.entries(CATEGORY_NAMES).map(([cat, name]) =>
    `<label class="cat-${cat}"><input type="checkbox" data-category="${cat}" ${trend.hidden.has(cat) ? "" : "checked"}>` +
    ` <i></i>${name} <span class="hint">${counts[cat] || 0}</span></label>`).join("");
  $("#trend-events").querySelectorAll("input").forEach(input => input.addEventListener("change", () => {
    if (input.checked) trend.hidden.delete(input.dataset.category); else trend.hidden.add(input.dataset.category);
    loaders.trends();
  }));
}

loaders.trends = async () => {
  const by = $("#trend-by").value, pct = $("#trend-pct").value;
  document.querySelectorAll("#trend-window button").forEach(b =>
    b.classList.toggle("active", b.dataset.window === trend.window));
  const query = new URLSearchParams({ window: trend.window, by });
  Object.entries(trend.filters).forEach(([k, v]) => { if (v) query.set(k, v); });
  const [data, timeline] = await Promise.all([
    api(`/dashboard/api/series?${query}`), api(`/dashboard/api/timeline?window=${trend.window}`)]);
  renderTrendFilters(data);
  renderEventToggles(timeline.events);
  const events = timeline.events.filter(e => !trend.hidden.has(e.category))
    .map(e => ({ t: e.timestamp, category: e.category, label: eventLabel(e) }));
  const names = data.by === "none" ? [] : data.groups;
  $("#trend-charts").innerHTML = TREND_CHARTS.map(chart => {
    const series = trendSeries(chart, data, pct);
    const title = chart.pct && data.by !== "none" ? `${chart.title}, p${pct}` : chart.title;
    return `<figure data-chart="${chart.id}"><figcaption>${esc(title)}` +
      (chart.unit ? ` <span class="hint">(${esc(chart.unit)})</span>` : "") + `</figcaption>` +
      Charts.time({ start: data.start, end: data.end, bucket: data.bucket_seconds, series,
        bars: chart.bars, events, unit: chart.unit, label: title }) +
      Charts.legend(chart.pct && data.by === "none" ? ["p50", "p95", "p99"] : names) + "</figure>";
  }).join("");
  $("#trend-by-name").textContent = data.by === "none" ? "window" : data.by;
  $("#trend-bucket").textContent = `${data.window}, one point per ${duration(data.bucket_seconds)}`;
  const columns = [
    { title: data.by === "none" ? "" : data.by, get: r => r.group },
    { title: "requests", num: true, get: r => r.requests },
    { title: "errors", num: true, get: r => r.errors },
    { title: "retries", num: true, get: r => r.retries },
    { title: "fallbacks", num: true, get: r => r.fallbacks },
    { title: "subst.", num: true, get: r => r.substitutions },
    { title: "latency p50", num: true, get: r => ms(r.latency_p50) },
    { title: "p95", num: true, get: r => ms(r.latency_p95) },
    { title: "p99", num: true, get: r => ms(r.latency_p99) },
    { title: "TTFT p50", num: true, get: r => ms(r.ttft_p50) },
    { title: "p95", num: true, get: r => ms(r.ttft_p95) },
    { title: "p99", num: true, get: r => ms(r.ttft_p99) },
    { title: "tokens/s", num: true, get: r => num(r.tokens_per_second) },
  ];
  const totals = $("#trend-totals");
  totals.innerHTML = data.totals.length ? table(columns, data.totals, data.by !== "none")
    : emptyState("No requests in this window", "Pick a longer window, or send a request.");
  if (data.by !== "none") {
    bindRows(totals, data.totals, row => {
      if (row.group.startsWith("(")) return;  // (other), (untagged), (no node): not a filter
      trend.filters[data.by] = row.group;
      loaders.trends();
    });
  }
  // Kept fresh while it is showing: every 15 s for minute buckets, every minute for longer.
  clearTimeout(trend.timer);
  trend.timer = setTimeout(() => {
    if (!$("#tab-trends").hidden) loaders.trends().catch(console.error);
  }, data.bucket_seconds >= 900 ? 60_000 : 15_000);
  const shown = timeline.events.slice().reverse().slice(0, 200);
  $("#trend-timeline").innerHTML = shown.length ? table([
    { title: "when", get: e => when(e.timestamp) },
    { title: "", html: e => badge(CATEGORY_NAMES[e.category] || e.category, `cat cat-${esc(e.category)}`) },
    { title: "what", get: e => EVENT_WORDS[e.kind] || e.kind },
    { title: "node", get: e => e.node_id || "" },
    { title: "model", get: e => e.model || "" },
    { title: "detail", get: e => e.detail },
  ], shown) : `<p class="hint">Nothing happened to the fleet in this window.</p>`;
};
document.querySelectorAll("#trend-window button").forEach(button => button.addEventListener("click", () => {
  trend.window = button.dataset.window;
  localStorage.setItem("herd-window", trend.window);
  loaders.trends();
}));
$("#trend-by").addEventListener("change", () => loaders.trends());
$("#trend-pct").addEventListener("change", () => loaders.trends());

// ---------------------------------------------------------------- requests (live feed)
const feed = { last: null, loading: false, selected: null };
const STATUS_CLASS = { completed: "sev-ok", failed: "sev-critical", incomplete: "sev-critical",
  client_disconnected: "sev-warning" };

loaders.requests = async () => {
  if (feed.loading) return;
  feed.loading = true;
  try {
    const data = await api(`/dashboard/api/requests?limit=${$("#feed-limit").value}`);
    const errorsOnly = $("#feed-errors").checked;
    const rows = data.requests.filter(r => !errorsOnly || r.status !== "completed");
    $("#feed-note").textContent = `the newest first, of the last ${data.kept} the router keeps in memory`;
    const box = $("#feed");
    box.innerHTML = rows.length ? table([
      { title: "time", get: r => new Date(r.timestamp * 1000).toLocaleTimeString() },
      { title: "model asked → served", html: r => r.asked === r.served ? esc(r.served)
        : `${esc(r.asked)} → <b>${esc(r.served)}</b>` },
      { title: "node", get: r => r.node_id || "–" },
      { title: "status", html: r => badge(r.status.replace("_", " "), STATUS_CLASS[r.status] || "") },
      { title: "TTFT", num: true, get: r => ms(r.ttft_ms) },
      { title: "tokens/s", num: true, get: r => num(r.tokens_per_second) },
      { title: "latency", num: true, get: r => ms(r.latency_ms) },
      { title: "why that node", html: r => `<span class="why">${esc(r.why)}</span>` },
    ], rows, true) : emptyState("No requests yet", "Requests appear here as they finish.");
    box.querySelectorAll("tr.click").forEach((tr, i) => {
      tr.dataset.request = rows[i].request_id;
      tr.classList.toggle("selected", rows[i].request_id === feed.selected);
    });
    bindRows(box, rows, row => showTrace(row.request_id));
  } finally {
    feed.loading = false;
  }
};

async function showTrace(requestId) {
  feed.selected = requestId;
  document.querySelectorAll("#feed tr.click").forEach(tr =>
    tr.classList.toggle("selected", tr.dataset.request === requestId));
  const t = await api(`/dashboard/api/requests/${encodeURIComponent(requestId)}`);
  const panel = $("#trace");
  const breakdown = Object.entries(t.scores_breakdown || {});
  const widest = Math.max(1, ...breakdown.map(([, v]) => Math.abs(v)));
  const bars = breakdown.map(([k, v]) =>
    `<div class="signal"><span>${esc(k)}</span><span class="bar-track">` +
    `<span class="bar-fill ${v < 0 ? "neg" : "pos"}" style="width:${(50 * Math.abs(v) / widest).toFixed(1)}%;` +
    `${v < 0 ? "right:50%" : "left:50%"}"></span></span><span class="v">${v > 0 ? "+" : ""}${num(v)}</span></div>`).join("");
  const runners = (t.runners_up || []).map(r => ({ ...r, gap: t.score != null ? t.score - r.score : null }));
  const fact = (k, v) => v == null || v === "" || (Array.isArray(v) && !v.length) ? ""
    : `<dt>${esc(k)}</dt><dd>${esc(Array.isArray(v) ? v.join(", ") : v)}</dd>`;
  panel.hidden = false;
  panel.innerHTML = `<h3>${esc(t.request_id)} ${badge(t.status.replace("_", " "), STATUS_CLASS[t.status] || "")}` +
    `<button class="ghost close" title="close">✕</button></h3>` +
    `<p class="why">${esc(t.why)}</p><dl class="facts">` +
    fact("when", when(t.timestamp)) + fact("asked", t.original_model) + fact("served", t.model) +
    fact("node", t.node_id) + fact("score", t.score) + fact("kind", `${t.kind} (${t.original_format})`) +
    fact("TTFT", ms(t.time_to_first_token_ms)) + fact("latency", ms(t.latency_ms)) +
    fact("tokens", t.prompt_tokens != null ? `${t.prompt_tokens} in, ${t.completion_tokens ?? "?"} out` : null) +
    fact("tokens/s", t.tokens_per_second) + fact("retries", t.retry_count || null) +
    fact("left after failing", t.excluded_nodes) + fact("fallback", t.fallback_used ? "yes" : null) +
    fact("substitution", t.substitution) + fact("context", t.context_action) + fact("tags", t.tags) +
    fact("error", t.error_message) + `</dl>` +
    (bars ? `<h4>Score breakdown <span class="hint">(points per signal, summing to ${num(t.score)})</span></h4>` +
      `<div class="signals">${bars}</div>` : "") +
    `<h4>Runners-up</h4>` + (runners.length ? table([
      { title: "node", get: r => r.node_id },
      { title: "score", num: true, get: r => num(r.score) },
      { title: "behind", num: true, get: r => r.gap == null ? "–" : num(r.gap) },
    ], runners) : `<p class="hint">None: no other node could serve it.</p>`);
  panel.querySelector("button.close").addEventListener("click", () => {
    panel.hidden = true;
    feed.selected = null;
  });
}

// The live stream says when a request has finished: refresh the feed (if it is showing).
statusListeners.push(status => {
  if (status.last_request_id === feed.last) return;
  feed.last = status.last_request_id;
  if (!$("#tab-requests").hidden && !$("#feed-pause").checked) loaders.requests().catch(console.error);
});
["#feed-limit", "#feed-errors", "#feed-pause"].forEach(sel =>
  $(sel).addEventListener("change", () => loaders.requests()));

// ---------------------------------------------------------------- benchmarks
const bench = { timer: null, targetsDrawn: false };

function benchTargets() {
  const nodes = (lastStatus ? lastStatus.nodes : []).filter(n => n.status !== "offline");
  const models = new Map();
  nodes.forEach(n => n.models_available.forEach(m => {
    if ((m.capabilities || []).includes("embedding") || /embed/.test(m.name)) return;
    if (!models.has(m.name)) models.set(m.name, []);
    models.get(m.name).push(n.node_id);
  }));
  return [...models.entries()].sort();
}

function drawBenchTargets() {
  const rows = benchTargets();
  if (!rows.length) {
    $("#bench-targets").innerHTML = `<p class="hint">No node has a chat model yet.</p>`;
    return;
  }
  const allNodes = [...new Set(rows.flatMap(([, nodes]) => nodes))].sort();
  $("#bench-targets").innerHTML = `<table class="targets"><thead><tr><th>model</th><th>any node</th>` +
    allNodes.map(n => `<th>${esc(n)}</th>`).join("") + `</tr></thead><tbody>` +
    rows.map(([model, nodes]) => `<tr><td>${esc(model)}</td>` +
      `<td><input type="checkbox" class="target" data-model="${esc(model)}" data-node=""></td>` +
      allNodes.map(n => `<td>${nodes.includes(n)
        ? `<input type="checkbox" class="target" data-model="${esc(model)}" data-node="${esc(n)}">` : ""}</td>`).join("") +
      `</tr>`).join("") + `</tbody></table>`;
  bench.targetsDrawn = true;
}

function renderBenchProgress(view) {
  const run = view.run;
  const running = view.running;
  $("#bench-start").disabled = running;
  $("#bench-cancel").hidden = !running;
  if (!run) { $("#bench-progress").innerHTML = ""; $("#bench-status").textContent = ""; return; }
  $("#bench-status").textContent = running ? `running: ${run.current || "starting"}`
    : `${run.name}: ${run.status}${run.error ? " (" + run.error + ")" : ""}`;
  $("#bench-progress").innerHTML = meter(`${run.name} #${run.number}`, run.done, run.total,
    `${run.done} / ${run.total} requests`, true) + (run.summary.length ? benchSummaryTable(run.summary) : "");
}

function benchSummaryTable(summary, previous) {
  const before = new Map((previous || []).map(t => [t.target, t]));
  const delta = (r, key, better) => {
    const old = before.get(r.target);
    if (!old || old[key] == null || r[key] == null || !old[key]) return "";
    const change = (r[key] - old[key]) / old[key];
    const good = better === "up" ? change > 0 : change < 0;
    return ` <small class="${Math.abs(change) < 0.05 ? "hint" : good ? "sev-ok" : "sev-critical"}">` +
      `${change > 0 ? "+" : ""}${(change * 100).toFixed(0)}%</small>`;
  };
  return table([
    { title: "target", get: r => r.target },
    { title: "served by", get: r => (r.served_by || []).join(", ") },
    { title: "requests", num: true, get: r => r.requests },
    { title: "errors", num: true, get: r => r.errors },
    { title: "warm-up", num: true, get: r => ms(r.warmup_ms) },
    { title: "TTFT p50", num: true, html: r => esc(ms(r.ttft_p50)) + delta(r, "ttft_p50", "down") },
    { title: "TTFT p95", num: true, get: r => ms(r.ttft_p95) },
    { title: "latency p50", num: true, html: r => esc(ms(r.latency_p50)) + delta(r, "latency_p50", "down") },
    { title: "tokens/s", num: true, html: r => esc(num(r.tokens_per_second)) + delta(r, "tokens_per_second", "up") },
  ], summary);
}

async function pollBenchmark() {
  clearTimeout(bench.timer);
  const view = await api("/dashboard/api/benchmarks/current");
  renderBenchProgress(view);
  if (view.running && !$("#tab-benchmarks").hidden) {
    bench.timer = setTimeout(() => pollBenchmark().catch(console.error), 1000);
  } else if (!view.running && bench.wasRunning) {
    bench.wasRunning = false;
    await drawBenchRuns();
  }
  bench.wasRunning = view.running;
}

async function drawBenchRuns() {
  const data = await api("/dashboard/api/benchmarks?hours=168");
  const ours = data.runs.filter(r => r.data && r.data.format === "herd.benchmark/1");
  const others = data.runs.filter(r => !(r.data && r.data.format === "herd.benchmark/1"));
  if (!data.runs.length) {
    $("#bench-charts").innerHTML = "";
    $("#bench-table").innerHTML = emptyState("No benchmark runs yet",
      "Start one above, or save your own with <code>POST /dashboard/api/benchmarks</code>.");
    return;
  }
  // Over time: per target, its figures run after run (finished runs only).
  const done = ours.filter(r => r.data.status === "done");
  const targets = [...new Set(done.flatMap(r => r.data.targets.map(t => t.target)))];
  const seriesFor = key => targets.map(target => ({ name: target, points: done.flatMap(r =>
    r.data.targets.filter(t => t.target === target && t[key] != null).map(t => ({ t: r.timestamp, y: t[key] }))) }));
  const times = data.runs.map(r => r.timestamp);
  const start = Math.min(...times), end = Math.max(...times);
  const pad = Math.max(60, (end - start) * 0.05);
  const chart = (title, key, unit) => `<figure><figcaption>${title}</figcaption>` +
    Charts.time({ start: start - pad, end: end + pad, series: seriesFor(key), connect: true, unit, label: title }) +
    Charts.legend(targets) + "</figure>";
  const legacy = others.filter(r => (r.data || {}).requests_per_second != null);
  const figures = (done.length ? chart("Generation speed (tokens/s, median)", "tokens_per_second", "tok/s") +
    chart("Time to first token (ms, p50)", "ttft_p50", "ms") + chart("Latency (ms, p50)", "latency_p50", "ms") : "") +
    (legacy.length ? `<figure><figcaption>Throughput per saved run (requests/s)</figcaption>` +
      Charts.line(legacy.map(r => ({ label: `#${r.id}`, y: r.data.requests_per_second })), "throughput") + "</figure>" : "");
  $("#bench-charts").innerHTML = figures ? `<h2>Over time</h2><div class="charts">${figures}</div>` : "";
  const rows = data.runs.slice().reverse();
  const box = $("#bench-table");
  box.innerHTML = table([
    { title: "run", get: r => `#${r.id}` }, { title: "name", get: r => r.name },
    { title: "when", get: r => when(r.timestamp) },
    { title: "status", html: r => r.data.format ? badge(r.data.status, r.data.status === "done" ? "sev-ok"
      : r.data.status === "cancelled" ? "sev-warning" : "sev-critical") : "" },
    { title: "results", html: r => r.data.format
      ? esc(r.data.targets.map(t => `${t.target}: ${num(t.tokens_per_second)} tok/s`).join("; "))
      : `<code>${esc(JSON.stringify(r.data)).slice(0, 200)}</code>` },
  ], rows, true);
  bindRows(box, rows, row => {
    if (!row.data.format) return;
    const earlier = ours.filter(r => r.id < row.id && r.data.status === "done").pop();
    $("#bench-detail").innerHTML = `<h2>#${row.id} ${esc(row.name)}` +
      (earlier ? ` <span class="hint">compared with #${earlier.id}</span>` : "") + `</h2>` +
      benchSummaryTable(row.data.targets, earlier ? earlier.data.targets : null);
  });
}

loaders.benchmarks = async () => {
  if (!bench.targetsDrawn) drawBenchTargets();
  await Promise.all([pollBenchmark(), drawBenchRuns()]);
};
statusListeners.push(() => {
  if (!bench.targetsDrawn && !$("#tab-benchmarks").hidden) drawBenchTargets();
});
$("#bench-start").addEventListener("click", async () => {
  const targets = [...document.querySelectorAll("#bench-targets input.target:checked")].map(i =>
    ({ model: i.dataset.model, ...(i.dataset.node ? { node_id: i.dataset.node } : {}) }));
  if (!targets.length) { $("#bench-status").textContent = "tick at least one target"; return; }
  try {
    await postJSON("/dashboard/api/benchmarks/run", { name: $("#bench-name").value, targets,
      repeat: Number($("#bench-repeat").value) });
    bench.wasRunning = true;
    await pollBenchmark();
  } catch (err) {
    $("#bench-status").textContent = err.message;
  }
});
$("#bench-cancel").addEventListener("click", async () => {
  try {
    await postJSON("/dashboard/api/benchmarks/cancel", {});
    await pollBenchmark();
  } catch (err) {
    $("#bench-status").textContent = err.message;
  }
});
