// report.js: the run report's step, predicted (the planner on this CPU) beside measured, part by
// part, and the pipeline timelines in the plan page's style: the planner's played timetable, and
// the run's measured one where it recorded one (logging.timeline_step).
function sideBySide(rows) {
  return `<table class="side"><tr><th>part (ms per step)</th><th>predicted</th><th>measured</th></tr>` +
    rows.map(([part, p, m], j) => `<tr><td>${esc(part)}</td><td class="r">${p == null ? "" : num(`predicted:${j}`, p, fmt(p))}</td>` +
      `<td class="r">${num(`measured:${j}`, m, fmt(m))}</td></tr>`).join("") + `</table>`;
}

function runSection(run, i) {
  const m = run.measured, p = run.predicted;
  let s = `<div class="run" id="run-${i}"><h3>${esc(run.name)}</h3>`;
  if (!m) return s + "<p>The run logged no step timing.</p></div>";
  const measuredParts = [["data", m["time/data_ms"]], ["compute", m["time/compute_ms"]], ["optimizer", m["time/optimizer_ms"]]];
  const full = Math.max(m.step_ms, p ? p.step_s * 1e3 : 0) * 1.02;
  if (p) {
    s += `<p>${esc(p.cluster)}; layout ${esc(Object.entries(p.layout).map(([k, v]) => `${k}=${v}`).join(","))}, ${esc(p.schedule)}, recompute ${esc(p.recompute)}</p>` +
      sideBySide(run.side_by_side) +
      `<h4>predicted (${doc("compute", "the planner's parts")})</h4>` +
      stackedBar(`predicted-bar-${i}`, stepParts(p.breakdown).map(([k, v]) => [k, v * 1e3]), full, "ms");
  } else {
    s += `<p>Measured ${num("step_ms", m.step_ms, fmt(m.step_ms))} ms per step; no prediction: ${esc(run.why_not)}.</p>`;
  }
  s += `<h4>measured (data wait, forward + backward, optimizer)</h4>` + stackedBar(`measured-bar-${i}`, measuredParts, full, "ms");
  const tl = run.timeline, t = p && p.layout.pp > 1 ? p.timetable : null;
  const span = Math.max(t ? t.span_s : 0, tl ? tl.span_ms * 1e-3 : 0);  // one time axis for both, in s
  if (t) s += `<h4>pipeline timeline, predicted (the played timetable, ${t.micro_batches} of ${t.of} micro-batches)</h4>` +
    timeline(`predicted-timeline-${i}`, t.ranks.length, timetableEvents(t), span / t.unit_s, t.unit_s);
  if (tl) s += `<h4>pipeline timeline, measured at step ${tl.step}</h4>` +
    timeline(`measured-timeline-${i}`, tl.ranks, tl.events, span * 1e3, 1e-3);
  return s + "</div>";
}

document.getElementById("steps").innerHTML = DATA.runs.map(runSection).join("");
