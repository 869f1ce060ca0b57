// herd dashboard, Planner tab: what if the fleet changed? Replays the router's recorded traffic
// on a virtual copy of the fleet (POST /dashboard/api/plan) and shows the figures side by side.
// Takes from app.js (loaded first): api(), esc(), the tab registry `loaders` and showTab().
"use strict";

(() => {
  const KINDS = {
    "add-node": "add a node",
    "remove-node": "remove a node",
    "pin": "pin a model on a node",
    "unload": "unload a model from a node",
    "slots": "set a node's slots",
    "set": "substitution (vram_fallback)",
  };
  const ROWS = [
    ["requests", "requests", f => f.requests, "count"],
    ["latency p50", "latency_p50", f => f.latency_p50, "s"],
    ["latency p95", "latency_p95", f => f.latency_p95, "s"],
    ["time to first token p50", "ttft_p50", f => f.ttft_p50, "s"],
    ["time to first token p95", "ttft_p95", f => f.ttft_p95, "s"],
    ["cold starts (requests that waited for a load)", "cold_starts", f => f.cold_starts, "count"],
    ["model loads", "loads", f => f.loads, "count"],
    ["evictions", "evictions", f => f.evictions, "count"],
    ["substitutions", "substitutions", f => f.substitutions, "count"],
    ["errors", "errors", f => f.errors, "count"],
  ];
  const LOWER_IS_BETTER = new Set(["latency_p50", "latency_p95", "ttft_p50", "ttft_p95",
    "cold_starts", "loads", "evictions", "errors"]);

  let options = null;
  let changes = [];
  let running = false;

  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "/dashboard/static/planner.css";
  document.head.appendChild(link);

  const section = document.getElementById("tab-planner");
  section.innerHTML = `
    <p class="hint">Replays this router's recorded traffic on a virtual copy of the fleet, as it
      is and with your changes, using herd's own scorer, queues and registry on a virtual clock.
      Predictions compare with the <em>no change</em> replay of the same traffic.</p>
    <div class="plan-form">
      <label>Traffic of the last
        <select id="plan-hours">
          <option value="1">1 hour</option><option value="6">6 hours</option>
          <option value="24" selected>24 hours</option><option value="72">3 days</option>
          <option value="168">7 days</option>
        </select></label>
      <label>Change <select id="plan-kind"></select></label>
      <span id="plan-args"></span>
      <button id="plan-add">Add change</button>
    </div>
    <ul id="plan-changes" class="plan-changes"></ul>
    <p><button class="primary" id="plan-run">Run plan</button>
      <span id="plan-status" class="hint"></span></p>
    <div id="plan-result"></div>
    <div id="plan-limits" class="plan-limits"></div>`;

  const $p = sel => section.querySelector(sel);
  const select = (id, items) => `<select id="${id}">` +
    items.map(([value, text]) => `<option value="${esc(value)}">${esc(text)}</option>`).join("") + "</select>";
  const gib = b => `${((b || 0) / 1024 ** 3).toFixed(0)} GiB`;

  function nodeItems(withEvery) {
    const items = options.nodes.map(n => [n.node_id, `${n.node_id}${n.online ? "" : " (offline)"}`]);
    return withEvery ? [["*", "every node"], ...items] : items;
  }

  function renderArgs() {
    const kind = $p("#plan-kind").value;
    const box = $p("#plan-args");
    if (kind === "add-node") {
      box.innerHTML = select("plan-preset", [
        ...options.presets.map(p => [p.name, `${p.title}, ${p.slots} slots`]),
        ...options.nodes.map(n => [`copy:${n.node_id}`, `a copy of ${n.node_id}`]),
      ]);
    } else if (kind === "remove-node") {
      box.innerHTML = select("plan-node", nodeItems(false));
    } else if (kind === "pin" || kind === "unload") {
      box.innerHTML = select("plan-node", nodeItems(false)) + " " + select("plan-model", []);
      const fill = () => {
        const node = options.nodes.find(n => n.node_id === $p("#plan-node").value);
        const models = kind === "pin" ? options.models : (node ? node.models.map(m => m.name) : []);
        $p("#plan-model").innerHTML = models.map(m => `<option value="${esc(m)}">${esc(m)}</option>`).join("");
      };
      $p("#plan-node").addEventListener("change", fill);
      fill();
    } else if (kind === "slots") {
      box.innerHTML = select("plan-node", nodeItems(true)) +
        ` <input id="plan-slots" type="number" min="1" max="64" value="4" aria-label="slots">`;
    } else {
      box.innerHTML = select("plan-setting", [["true", "on"], ["false", "off"]]);
      $p("#plan-setting").value = options.settings.vram_fallback ? "false" : "true";
    }
  }

  function currentChange() {
    const kind = $p("#plan-kind").value;
    if (kind === "add-node") return { kind, value: $p("#plan-preset").value };
    if (kind === "remove-node") return { kind, value: $p("#plan-node").value };
    if (kind === "pin" || kind === "unload") {
      const model = $p("#plan-model").value;
      return model ? { kind, value: `${$p("#plan-node").value}:${model}` } : null;
    }
    if (kind === "slots") return { kind, value: `${$p("#plan-node").value}=${$p("#plan-slots").value}` };
    return { kind, value: `vram_fallback=${$p("#plan-setting").value}` };
  }

  function describe(change) {
    const [kind, value] = [change.kind, change.value];
    if (kind === "add-node") {
      if (value.startsWith("copy:")) return `add a copy of ${value.slice(5)}`;
      const preset = options.presets.find(p => p.name === value);
      return `add a ${preset ? preset.title : value}`;
    }
    if (kind === "remove-node") return `remove ${value}`;
    if (kind === "pin" || kind === "unload") {
      const at = value.indexOf(":");
      return `${kind} ${value.slice(at + 1)} ${kind === "pin" ? "on" : "from"} ${value.slice(0, at)}`;
    }
    if (kind === "slots") {
      const [node, slots] = value.split("=");
      return `${slots} slots on ${node === "*" ? "every node" : node}`;
    }
    return `substitution ${value.endsWith("true") ? "on" : "off"}`;
  }

  function renderChanges() {
    const list = $p("#plan-changes");
    list.innerHTML = changes.length ? changes.map((c, i) =>
      `<li class="chip" data-change="${i}">${esc(describe(c))} ` +
      `<button class="ghost remove" data-index="${i}" title="remove this change">&times;</button></li>`).join("")
      : `<li class="hint">No change yet: the plan then replays the fleet as it is.</li>`;
    list.querySelectorAll("button.remove").forEach(b => b.addEventListener("click", () => {
      changes.splice(Number(b.dataset.index), 1);
      renderChanges();
    }));
  }

  const fmt = (v, unit) => v == null ? "–" : unit === "s" ? `${v.toFixed(2)} s` : String(v);

  function delta(name, base, value, unit) {
    if (base == null || value == null || name === "requests") return "";
    const diff = value - base;
    if (Math.abs(diff) < (unit === "s" ? 0.005 : 0.5)) return `<span class="delta same">±0</span>`;
    const better = LOWER_IS_BETTER.has(name) ? diff < 0 : diff > 0;
    // Seconds as a share of the no-change figure, unless that is too small to divide by.
    const sign = diff > 0 ? "+" : "";
    const text = unit === "s" && base >= 0.1 ? `${sign}${Math.round(100 * diff / base)}%`
      : `${sign}${unit === "s" ? diff.toFixed(2) + " s" : diff}`;
    return `<span class="delta ${better ? "better" : "worse"}">${text}</span>`;
  }

  function renderResult(plan) {
    const w = plan.window;
    const columns = [
      { title: "recorded", figures: plan.recorded, cls: "recorded" },
      { title: "no change (replay)", figures: plan.baseline.figures, cls: "baseline" },
      ...plan.scenarios.map((s, i) => ({ title: plan.scenarios.length > 1 ? `what if ${i + 1}` : "what if",
        label: s.label, figures: s.figures, cls: "scenario" })),
    ];
    const base = plan.baseline.figures;
    const head = `<tr><th></th>${columns.map(c => `<th class="num ${c.cls}">${esc(c.title)}` +
      (c.label ? `<div class="sub">${esc(c.label)}</div>` : "") + "</th>").join("")}</tr>`;
    const body = ROWS.map(([title, name, get, unit]) => `<tr data-figure="${name}"><td>${esc(title)}</td>` +
      columns.map(c => `<td class="num ${c.cls}">${fmt(get(c.figures), unit)}` +
        (c.cls === "scenario" ? " " + delta(name, get(base), get(c.figures), unit) : "") + "</td>").join("") +
      "</tr>").join("");
    const fidelity = plan.fidelity;
    const truncated = w.truncated ? ` (the window holds ${w.requests_in_window}: the most recent ${w.requests_used} were used)` : "";
    const skipped = Object.entries(w.skipped).map(([why, n]) => `${n} ${why}`).join(", ");
    const fleet = s => `<table class="plan-fleet"><thead><tr><th>node</th><th>origin</th><th class="num">memory</th>` +
      `<th class="num">slots</th><th>model</th><th class="num">decode tok/s</th><th class="num">prefill tok/s</th>` +
      `<th class="num">load s</th><th>speed from</th></tr></thead><tbody>` +
      s.fleet.map(n => n.models.map((m, i) => `<tr>${i === 0 ? `<td rowspan="${n.models.length}">${esc(n.node_id)}</td>` +
        `<td rowspan="${n.models.length}">${esc(n.origin)}</td><td class="num" rowspan="${n.models.length}">${gib(n.memory_bytes)}</td>` +
        `<td class="num" rowspan="${n.models.length}">${n.slots}</td>` : ""}` +
        `<td>${esc(m.name)}${m.loaded ? ' <span class="chip hot">loaded</span>' : ""}</td>` +
        `<td class="num">${m.decode_tokens_per_second}</td><td class="num">${m.prefill_tokens_per_second >= 1e6 ? "instant" : m.prefill_tokens_per_second}</td>` +
        `<td class="num">${m.load_seconds}</td><td>${esc(m.source)}${m.samples ? ` (${m.samples})` : ""}</td></tr>`).join("")).join("") +
      "</tbody></table>";
    $p("#plan-result").innerHTML =
      `<p id="plan-window">${w.requests_replayed} requests of the last ${w.hours} h replayed in ` +
      `${w.sessions} sessions (${w.conversations} conversations)${truncated}` +
      `${skipped ? `; left out: ${esc(skipped)}` : ""}. Took ${plan.elapsed_seconds} s.</p>` +
      `<div id="plan-fidelity" class="plan-fidelity ${fidelity.matches ? "ok" : "off"}">` +
      (fidelity.matches ? "The no-change replay reproduces the recorded traffic"
        : "The no-change replay does <strong>not</strong> reproduce the recorded traffic: treat the predictions with care") +
      ` (it should have ${esc(fidelity.rule)}).</div>` +
      (plan.notes.length ? `<ul class="plan-notes">${plan.notes.map(n => `<li>${esc(n)}</li>`).join("")}</ul>` : "") +
      `<table id="plan-table" class="plan-table"><thead>${head}</thead><tbody>${body}</tbody></table>` +
      `<details class="plan-details"><summary>The virtual fleet, no change</summary>${fleet(plan.baseline)}</details>` +
      plan.scenarios.map((s, i) => `<details class="plan-details"><summary>The virtual fleet, what if` +
        `${plan.scenarios.length > 1 ? " " + (i + 1) : ""}: ${esc(s.label)}</summary>${fleet(s)}</details>`).join("");
  }

  async function run() {
    if (running) return;
    running = true;
    const button = $p("#plan-run");
    const status = $p("#plan-status");
    button.disabled = true;
    status.textContent = "replaying…";
    try {
      const plan = await api("/dashboard/api/plan", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ hours: Number($p("#plan-hours").value), changes }),
      });
      renderResult(plan);
      status.textContent = "";
      status.dataset.done = "true";
    } catch (err) {
      status.textContent = `failed: ${err.message}`;
    } finally {
      running = false;
      button.disabled = false;
    }
  }

  async function load() {
    options = await api("/dashboard/api/plan/options");
    const kind = $p("#plan-kind");
    if (!kind.options.length) {
      kind.innerHTML = options.change_kinds.map(k => `<option value="${k}">${esc(KINDS[k] || k)}</option>`).join("");
      kind.addEventListener("change", renderArgs);
      $p("#plan-add").addEventListener("click", () => {
        const change = currentChange();
        if (change && changes.length < options.limits.max_changes) { changes.push(change); renderChanges(); }
      });
      $p("#plan-run").addEventListener("click", run);
    }
    renderArgs();
    renderChanges();
    $p("#plan-limits").innerHTML = `<h2>What the replay leaves out</h2><ul>` +
      options.model_limits.map(t => `<li>${esc(t)}</li>`).join("") + "</ul>" +
      `<p class="hint">At most ${options.limits.max_requests.toLocaleString()} of the window's most ` +
      `recent requests are replayed, within ${options.limits.budget_seconds} s.</p>`;
    if (!options.nodes.length) {
      $p("#plan-result").innerHTML = `<div class="empty"><strong>No nodes yet</strong>` +
        "The planner replays your traffic on the nodes that have joined this router.</div>";
    }
  }

  if (typeof loaders === "object") {
    loaders.planner = load;
    if (location.hash === "#planner") showTab();
  }
})();
