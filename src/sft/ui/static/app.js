// sft ui: draws the curves of a run (or of several, overlaid) as inline SVG and keeps them
// current by polling /api/metrics (only the bytes of metrics.jsonl added since the last poll).
// Every text this script shows goes through textContent: nothing from a run becomes markup.
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const POLL_MS = 1500;

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v) {
  if (!isFinite(v)) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(1) : String(Number(v.toPrecision(4)));
}

// series: [{name, points: [[x, y], ...]}]; redraws the chart in `box` from scratch
function draw(box, title, series) {
  const legend = series.length > 1 ? series.length : 0;  // one line per run above the plot
  const W = 440, H = 220 + 12 * legend, L = 56, R = 10, T = 24 + 12 * legend, B = 30;
  const pts = series.flatMap(s => s.points);
  box.textContent = "";
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img"});
  svg.appendChild(el("text", {x: L, y: 16, class: "title"}, title));
  box.appendChild(svg);
  box.dataset.points = String(pts.length);
  if (!pts.length) {
    svg.appendChild(el("text", {x: L, y: H / 2, class: "empty"}, "no data yet"));
    return;
  }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  svg.appendChild(el("text", {x: L - 4, y: T + 4, class: "tick", "text-anchor": "end"}, fmt(y1)));
  svg.appendChild(el("text", {x: L - 4, y: H - B, class: "tick", "text-anchor": "end"}, fmt(y0)));
  svg.appendChild(el("text", {x: L, y: H - B + 14, class: "tick"}, fmt(x0)));
  svg.appendChild(el("text", {x: W - R, y: H - B + 14, class: "tick", "text-anchor": "end"}, fmt(x1)));
  svg.appendChild(el("text", {x: (L + W) / 2, y: H - 4, class: "tick", "text-anchor": "middle"}, "step"));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const color = COLORS[s.index % COLORS.length];
    const d = s.points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    const line = el("polyline", {points: d, fill: "none", stroke: color, "stroke-width": 1.6, class: "series"});
    line.appendChild(el("title", {}, s.name));
    svg.appendChild(line);
    if (s.points.length < 30) s.points.forEach(p => svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: color})));
    if (series.length > 1) svg.appendChild(el("text", {x: W - R, y: 28 + 12 * i, class: "legend", fill: color, "text-anchor": "end"}, s.name));
  });
}

// one run's rows, read incrementally; value(key) gives that curve's points
class Feed {
  constructor(id) { this.id = id; this.offset = 0; this.rows = []; this.status = ""; this.problems = []; }
  async poll() {
    const r = await fetch(`/api/metrics?id=${encodeURIComponent(this.id)}&offset=${this.offset}`);
    if (!r.ok) return false;
    const j = await r.json();
    this.offset = j.offset; this.status = j.status;
    this.problems = this.problems.concat(j.problems);
    this.rows = this.rows.concat(j.rows);
    return j.rows.length > 0;
  }
  points(key) {
    if (key === "tokens_per_s") {
      const out = []; let prev = {elapsed_s: 0};  // step 1's time counts from the start of training
      for (const r of this.rows) {
        if (!("tokens" in r) || !isFinite(r.elapsed_s)) continue;
        if (r.elapsed_s > prev.elapsed_s && (r.step === 1 || prev.step !== undefined)) out.push([r.step, r.tokens / (r.elapsed_s - prev.elapsed_s)]);
        prev = r;
      }
      return out;
    }
    // "a|b": whichever of the keys a row has (eval_loss, or dev_loss when the run has a dev set)
    const keys = key.split("|");
    const out = [];
    for (const r of this.rows) {
      const k = keys.find(k => typeof r[k] === "number" && isFinite(r[k]));
      if (k !== undefined) out.push([r.step, r[k]]);
    }
    return out;
  }
}

function redraw(feeds) {
  for (const box of document.querySelectorAll(".chart")) {
    draw(box, box.dataset.title, feeds.map((f, i) => ({name: f.id, index: i, points: f.points(box.dataset.key)})));
  }
}

async function watch(feeds, onUpdate) {
  let changed = false;
  for (const f of feeds) { try { changed = (await f.poll()) || changed; } catch (e) { /* server gone: retry */ } }
  if (changed || !document.querySelector(".chart svg")) { redraw(feeds); if (onUpdate) onUpdate(); }
  setTimeout(() => watch(feeds, onUpdate), POLL_MS);
}

function start() {
  const main = document.getElementById("main");
  const page = main && main.dataset.page;
  if (page === "run") {
    const feed = new Feed(main.dataset.run);
    watch([feed], () => {
      const last = feed.rows.filter(r => "loss" in r).pop();
      if (last) {
        document.getElementById("step").textContent = String(last.step);
        document.getElementById("last-loss").textContent = fmt(last.loss);
      }
      const st = document.getElementById("status");
      if (feed.status) { st.textContent = feed.status; st.className = "status " + feed.status; }
      if (feed.problems.length) document.getElementById("problems").textContent = "metrics.jsonl: " + feed.problems.join("; ") + " (skipped)";
    });
  } else if (page === "compare") {
    const ids = JSON.parse(main.dataset.runs);
    document.querySelectorAll(".swatch").forEach(s => { s.style.background = COLORS[Number(s.dataset.index) % COLORS.length]; });
    watch(ids.map(id => new Feed(id)));
  }
}
document.addEventListener("DOMContentLoaded", start);
