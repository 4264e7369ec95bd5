// common.js: what both pages draw. Nothing here models anything: it formats and draws the numbers
// of the page's embedded JSON (document.getElementById("data")).
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const DOCS = DATA.docs || "docs/planning.md";
const STEP = "the-model-of-one-step", MEM = "memory-per-rank-by-kind";

// One line per bar and term, and the section of docs/planning.md that derives it.
const EXPLAIN = {
  compute: ["GEMMs, attention and elementwise work of the busiest pipeline rank, over all its micro-batches", STEP],
  tp: ["tensor-parallel all-reduces / all-gathers / reduce-scatters the blocks wait for", STEP],
  ep: ["expert-parallel all-to-alls (dispatch and combine of the routed tokens) left exposed", STEP],
  cp: ["context-parallel ring sends that attention could not cover", STEP],
  dp: ["data-parallel gradient sync (and ZeRO gathers) the backward could not hide", STEP],
  edp: ["the experts' gradient sync over their data-parallel group, exposed", STEP],
  bubble: ["pipeline idle time: the played schedule's makespan minus the busiest rank's work", STEP],
  optimizer: ["AdamW over this rank's share of the parameters, memory bound", STEP],
  data: ["drawing the step's micro-batches (measured on this CPU)", "this-machine---hardware-cpu-against-measured-steps"],
  scalars: ["the step's small all-reduces: token count, gradient norm, expert load", "this-machine---hardware-cpu-against-measured-steps"],
  weights: ["the model's parameters this rank holds, in the parameter dtype", MEM],
  gradients: ["their gradients (ZeRO-2/3: this rank's slice)", MEM],
  master: ["fp32 master weights kept beside low-precision parameters (ZeRO-1+: a slice)", MEM],
  optimizer_mem: ["AdamW's two moments (ZeRO-1+: this rank's slice)", MEM],
  activations: ["what the forward keeps for the backward, for the micro-batches in flight", MEM],
  gathered_params: ["ZeRO-3: a block's parameters gathered for its pass", MEM],
  step_s: ["seconds per optimizer step: the parts below, summed", STEP],
  tokens_per_s_per_gpu: ["tokens of the global batch per second, per GPU", STEP],
  mfu: ["model FLOPs per second against the GEMM dtype's dense peak", "mfu-hfu-and-the-conventions-of-published-figures"],
  memory_per_rank_gb: ["the fullest rank's memory, every kind summed", MEM],
  F: ["forward of one micro-batch through one chunk", "the-model-of-one-step"],
  B: ["backward (the input's gradient; the weights' too where not split off)", "the-model-of-one-step"],
  W: ["the weights' gradient, split from B by the zero-bubble schedules", "the-model-of-one-step"],
  idle: ["the rank waits: the pipeline bubble", "the-model-of-one-step"],
};
const COLORS = {compute: "#4e79a7", tp: "#f28e2b", ep: "#e15759", cp: "#76b7b2", dp: "#59a14f", edp: "#edc948",
  bubble: "#bab0ac", optimizer: "#b07aa1", data: "#9c755f", scalars: "#ff9da7",
  weights: "#4e79a7", gradients: "#59a14f", master: "#edc948", optimizer_mem: "#b07aa1", activations: "#e15759",
  gathered_params: "#76b7b2", F: "#4e79a7", B: "#59a14f", W: "#f28e2b", idle: "#e8e8e8"};

const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v, d = 3) => v == null ? "" : Math.abs(v) >= 10 ** d ? Math.round(v).toLocaleString("en-US") :
  Number(v).toPrecision(d).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "").replace(/\.?0+e/, "e");
const pct = v => (100 * v).toFixed(1) + "%";
const int = v => Math.round(v).toLocaleString("en-US");
const signed = (v, f) => (v >= 0 ? "+" : "\u2212") + f(Math.abs(v));
// A number as the page shows it, with the JSON's value beside it for the curious (and the tests).
const num = (field, v, text) => `<span class="num" data-field="${field}" data-value="${v}">${text}</span>`;
const doc = (name, label) => {
  const [line, section] = EXPLAIN[name] || ["", STEP];
  return `<a class="term" href="${DOCS}#${section}" title="${esc(line)}">${esc(label || name)}</a>`;
};

// A horizontal stacked bar: parts [[name, value, color key]], drawn against `full` (the
// bar's width); `limit` draws a red line there (a device's capacity).
function stackedBar(id, parts, full, unit, limit) {
  const W = 720, H = 26, x = v => W * v / full;
  let s = `<svg id="${id}" class="bar" width="${W}" height="${H + 4}" viewBox="0 0 ${W} ${H + 4}" xmlns="http://www.w3.org/2000/svg">`;
  let at = 0;
  for (const [name, v, key] of parts) {
    if (v <= 0) continue;
    s += `<rect x="${x(at)}" y="2" width="${Math.max(x(v), 0.5)}" height="${H}" fill="${COLORS[key || name]}">` +
      `<title>${esc(name)}: ${fmt(v)} ${unit}: ${esc((EXPLAIN[key || name] || [""])[0])}</title></rect>`;
    at += v;
  }
  if (limit != null) s += `<line x1="${x(limit)}" x2="${x(limit)}" y1="0" y2="${H + 4}" stroke="#d00" stroke-width="2"><title>capacity ${fmt(limit)} ${unit}</title></line>`;
  const legend = parts.map(([name, v, key]) =>
    `<span class="key"><i style="background:${COLORS[key || name]}"></i>${doc(key || name, name)} ${num(name, v, fmt(v))}</span>`).join(" ");
  return s + `</svg><div class="legend">${legend} ${unit}</div>`;
}

// A pipeline timeline: one row per rank; each event [rank, kind, chunk, mb, start, end] in units
// of `unit` seconds; F, B and W coloured, the rest of the row idle.
function timeline(id, ranks, events, span, unit, caption) {
  const W = 720, rowH = 20, left = 56, plotW = W - left - 8, H = ranks * rowH + 22;
  const x = t => left + plotW * t / span;
  let s = `<svg id="${id}" class="timeline" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" xmlns="http://www.w3.org/2000/svg">`;
  for (let r = 0; r < ranks; r++)
    s += `<text x="2" y="${r * rowH + 14}" font-size="11">rank ${r}</text><rect x="${left}" y="${r * rowH + 2}" width="${plotW}" height="${rowH - 4}" fill="${COLORS.idle}"><title>idle: ${EXPLAIN.idle[0]}</title></rect>`;
  for (const [r, k, c, mb, a, b] of events) {
    if (!(k in {F: 1, B: 1, W: 1})) continue;
    s += `<rect x="${x(a)}" y="${r * rowH + 2}" width="${Math.max(x(b) - x(a), 0.4)}" height="${rowH - 4}" fill="${COLORS[k]}" stroke="#fff" stroke-width="0.3"><title>${k} micro-batch ${mb}, chunk ${c}: ${fmt((b - a) * unit)} s</title></rect>`;
  }
  s += `<text x="${left}" y="${H - 4}" font-size="11">0</text><text x="${W - 8}" y="${H - 4}" font-size="11" text-anchor="end">${fmt(span * unit)} s</text></svg>`;
  const keys = ["F", "B", "W", "idle"].map(k => `<span class="key"><i style="background:${COLORS[k]}"></i>${doc(k)}</span>`).join(" ");
  return s + `<div class="legend">${keys} ${esc(caption || "")}</div>`;
}

// Breakdown parts in a fixed order, the rest after: [[name, seconds]].
const STEP_ORDER = ["compute", "tp", "ep", "cp", "dp", "edp", "bubble", "optimizer", "data", "scalars"];
function stepParts(breakdown) {
  const names = STEP_ORDER.filter(k => k in breakdown).concat(Object.keys(breakdown).filter(k => !STEP_ORDER.includes(k)));
  return names.map(k => [k, breakdown[k]]);
}

// A planner timetable (columns per rank: kind string, chunk, mb, start, end) as timeline() events.
const timetableEvents = t => t.ranks.flatMap((row, r) =>
  [...row.kind].map((k, i) => [r, k, row.chunk[i], row.mb[i], row.start[i], row.end[i]]));
