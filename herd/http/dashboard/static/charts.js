// Small SVG charts for the dashboard: a line chart and a bar chart. No dependencies.
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

  return { line, bars };
})();
