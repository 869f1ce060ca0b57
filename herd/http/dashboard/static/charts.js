// Small SVG charts for the dashboard: a line chart, a bar chart, and time series over a window
// (lines with gaps where a bucket has no data, stacked bars, event markers). No dependencies.
"use strict";

const Charts = (() => {
  const W = 600, H = 180, L = 52, R = 10, T = 10, B = 26;

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 4, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return String(Math.round(v * 10) / 10);
  }

  function frame(points, label) {
    const max = niceMax(Math.max(0, ...points.map(p => p.y)));
    const x = i => L + (points.length <= 1 ? (W - L - R) / 2 : i * (W - L - R) / (points.length - 1));
    const y = v => T + (H - T - B) * (1 - v / max);
    let svg = `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${label}">`;
    for (let k = 0; k <= 4; k++) {
      const v = max * k / 4, yy = y(v);
      svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${yy}" y2="${yy}"/>`;
      svg += `<text x="${L - 6}" y="${yy + 3}" text-anchor="end">${fmt(v)}</text>`;
    }
    const step = Math.max(1, Math.ceil(points.length / 8));
    points.forEach((p, i) => {
      if (i % step === 0) svg += `<text x="${x(i)}" y="${H - 6}" text-anchor="middle">${p.label}</text>`;
    });
    return { svg, x, y };
  }

  function empty(text) {
    return `<div class="empty">${text}</div>`;
  }

  function line(points, label) {
    if (!points.length) return empty("No requests in this range yet.");
    const f = frame(points, label);
    const d = points.map((p, i) => `${i ? "L" : "M"}${f.x(i).toFixed(1)},${f.y(p.y).toFixed(1)}`).join("");
    const area = `${d}L${f.x(points.length - 1).toFixed(1)},${f.y(0)}L${f.x(0).toFixed(1)},${f.y(0)}Z`;
    const dots = points.map((p, i) => p.y ? `<circle class="dot" r="2.5" cx="${f.x(i).toFixed(1)}" ` +
      `cy="${f.y(p.y).toFixed(1)}"><title>${p.label}: ${fmt(p.y)}</title></circle>` : "").join("");
    return f.svg + `<path class="area" d="${area}"/><path class="series" d="${d}"/>${dots}</svg>`;
  }

  function bars(points, label) {
    if (!points.length) return empty("No requests in this range yet.");
    const f = frame(points, label);
    const width = Math.max(2, (W - L - R) / Math.max(points.length, 1) * 0.7);
    const rects = points.map((p, i) =>
      `<rect class="bar" x="${(f.x(i) - width / 2).toFixed(1)}" y="${f.y(p.y).toFixed(1)}" ` +
      `width="${width.toFixed(1)}" height="${(f.y(0) - f.y(p.y)).toFixed(1)}"><title>${p.label}: ${fmt(p.y)}</title></rect>`
    ).join("");
    return f.svg + rects + "</svg>";
  }

  // A fixed palette that reads on both themes; series keep their colour by position.
  const PALETTE = ["#2f6fde", "#1a9d5b", "#c77800", "#d23c3c", "#8e44ad", "#0f9fb5",
    "#b5651d", "#6b7c93", "#e056a0", "#7a9a01"];
  const color = i => PALETTE[i % PALETTE.length];
  const escape = v => String(v ?? "").replace(/[&<>"']/g, c =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  function clock(t, span) {
    const d = new Date(t * 1000);
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return span > 86400 ? `${d.getMonth() + 1}/${d.getDate()} ${hm}` : hm;
  }

  // Time series over [start, end). spec: { start, end, bucket, series: [{ name, points:
  // [{ t, y }] }], bars: stacked bars (else lines), events: [{ t, label, category }],
  // unit, connect: join every point (else a missing bucket breaks the line) }.
  // Points sit in the middle of their bucket; a point alone is drawn as a dot.
  function time(spec) {
    const { start, end, series } = spec;
    const bucket = spec.bucket || 0;
    const span = Math.max(1, end - start);
    const unit = spec.unit ? ` ${spec.unit}` : "";
    const x = t => L + (W - L - R) * Math.min(1, Math.max(0, (t - start) / span));
    const mid = t => x(t + bucket / 2);
    let max = 0;
    if (spec.bars) {
      const sums = new Map();
      series.forEach(s => s.points.forEach(p => sums.set(p.t, (sums.get(p.t) || 0) + (p.y || 0))));
      max = Math.max(0, ...sums.values());
    } else {
      series.forEach(s => s.points.forEach(p => { if (p.y != null) max = Math.max(max, p.y); }));
    }
    max = spec.bars ? Math.max(4, niceMax(max)) : niceMax(max);  // counts: whole-number ticks
    const y = v => T + (H - T - B) * (1 - v / max);
    let svg = `<svg class="chart time" viewBox="0 0 ${W} ${H}" role="img" aria-label="${escape(spec.label || "")}">`;
    for (let k = 0; k <= 4; k++) {
      const v = max * k / 4, yy = y(v);
      svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${yy}" y2="${yy}"/>`;
      svg += `<text x="${L - 6}" y="${yy + 3}" text-anchor="end">${fmt(v)}</text>`;
    }
    for (let k = 0; k <= 5; k++) {
      const t = start + span * k / 5;
      svg += `<text x="${x(t)}" y="${H - 6}" text-anchor="${k === 0 ? "start" : k === 5 ? "end" : "middle"}">${clock(t, span)}</text>`;
    }
    const width = bucket ? Math.max(1.5, (W - L - R) * bucket / span * 0.8) : 4;
    if (spec.bars) {
      const base = new Map();
      series.forEach((s, i) => s.points.forEach(p => {
        if (!p.y) return;
        const below = base.get(p.t) || 0;
        base.set(p.t, below + p.y);
        svg += `<rect class="bar" data-series="${escape(s.name)}" style="fill:${color(i)}" ` +
          `x="${(mid(p.t) - width / 2).toFixed(1)}" y="${y(below + p.y).toFixed(1)}" width="${width.toFixed(1)}" ` +
          `height="${(y(below) - y(below + p.y)).toFixed(1)}"><title>${escape(clock(p.t, span))} ${escape(s.name)}: ${fmt(p.y)}${unit}</title></rect>`;
      }));
    } else {
      series.forEach((s, i) => {
        const pts = s.points.filter(p => p.y != null).sort((a, b) => a.t - b.t);
        let d = "", run = [];
        const flush = () => {
          if (run.length === 1) {
            const p = run[0];
            svg += `<circle class="dot lone" style="fill:${color(i)}" r="3" cx="${mid(p.t).toFixed(1)}" cy="${y(p.y).toFixed(1)}"/>`;
          }
          run = [];
        };
        pts.forEach((p, k) => {
          const joined = k > 0 && (spec.connect || p.t - pts[k - 1].t <= bucket * 1.001);
          if (!joined) flush();
          d += `${joined ? "L" : "M"}${mid(p.t).toFixed(1)},${y(p.y).toFixed(1)}`;
          run.push(p);
          svg += `<circle class="dot" style="fill:${color(i)}" r="2" cx="${mid(p.t).toFixed(1)}" cy="${y(p.y).toFixed(1)}">` +
            `<title>${escape(clock(p.t, span))} ${escape(s.name)}: ${fmt(p.y)}${unit}</title></circle>`;
        });
        flush();
        if (d) svg += `<path class="series" data-series="${escape(s.name)}" style="stroke:${color(i)}" d="${d}"/>`;
      });
    }
    (spec.events || []).forEach(e => {
      if (e.t < start || e.t > end) return;
      const xx = x(e.t).toFixed(1);
      svg += `<g class="event cat-${escape(e.category)}"><line x1="${xx}" x2="${xx}" y1="${T}" y2="${H - B}"/>` +
        `<path d="M${xx},${T}l-4,-6h8z"/><title>${escape(clock(e.t, span))} ${escape(e.label)}</title></g>`;
    });
    if (!series.some(s => s.points.length)) {
      svg += `<text class="nodata" x="${(L + W - R) / 2}" y="${(T + H - B) / 2}" text-anchor="middle">no requests in this window</text>`;
    }
    return svg + "</svg>";
  }

  function legend(names) {
    if (names.length < 2) return "";
    return `<div class="legend">` + names.map((n, i) =>
      `<span><i style="background:${color(i)}"></i>${escape(n)}</span>`).join("") + "</div>";
  }

  return { line, bars, time, legend, color };
})();
