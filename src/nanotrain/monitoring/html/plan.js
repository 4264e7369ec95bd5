// plan.js: the page of `nanotrain plan --html`. A table of DATA.candidates (click a header to sort,
// pick a value to filter, tick to show what does not fit) and a panel for the selected layout:
// its numbers, memory per rank against the device, the step's parts, the played pipeline
// timetable, and its one-knob neighbours ("what if"). Every number is the planner's.
const C = DATA.candidates, BY_ID = Object.fromEntries(C.map(c => [c.id, c]));
const AXES = ["tp", "cp", "pp", "vp", "dp", "ep", "etp", "zero", "micro", "schedule", "recompute"];
const MEASURES = [["step_s", "step s", v => fmt(v, 4)], ["tokens_per_s_per_gpu", "tok/s/GPU", int],
  ["mfu", "MFU", pct], ["memory_per_rank_gb", "mem GB", v => fmt(v, 3)]];
const MEMORY = [["weights", "weights"], ["gradients", "gradients"], ["master", "master"],
  ["optimizer", "optimizer_mem"], ["activations", "activations"], ["gathered_params", "gathered_params"]];
const state = {sort: "tokens_per_s_per_gpu", dir: -1, filters: {}, unfit: false, selected: null};
const value = (c, k) => (k in c.layout ? c.layout[k] : c[k]);
const cmp = (a, b) => (a > b) - (a < b);
const layoutText = c => AXES.slice(0, 9).map(k => `${k}=${c.layout[k]}`).join(" ") + ` ${c.schedule} recompute=${c.recompute}`;

function controls() {
  const selects = AXES.map(k => {
    const vals = [...new Set(C.map(c => value(c, k)))].sort(cmp);
    return `<label>${k} <select data-axis="${k}"><option value="">any</option>` +
      vals.map(v => `<option>${esc(v)}</option>`).join("") + `</select></label>`;
  }).join(" ");
  return `<div id="controls">${selects} <label><input type="checkbox" id="show-unfit"> show layouts that do not fit</label></div>`;
}

function visible() {
  const rows = C.filter(c => (state.unfit || c.fits) &&
    Object.entries(state.filters).every(([k, v]) => v === "" || String(value(c, k)) === v));
  return rows.sort((a, b) => state.dir * cmp(value(a, state.sort), value(b, state.sort)));
}

function drawTable() {
  const head = AXES.map(k => `<th data-sort="${k}">${k}</th>`).join("") +
    MEASURES.map(([k, label]) => `<th data-sort="${k}" title="${esc(EXPLAIN[k][0])}">${label}</th>`).join("") + "<th>source</th>";
  const body = visible().map(c => `<tr data-id="${esc(c.id)}" class="${c.fits ? "" : "unfit"} ${c.id === state.selected ? "sel" : ""}">` +
    AXES.map(k => `<td>${esc(value(c, k))}</td>`).join("") +
    MEASURES.map(([k, , f]) => `<td class="r">${f(c[k])}</td>`).join("") +
    `<td>${c.fits ? c.source : c.source + ", does not fit"}</td></tr>`).join("");
  const arrow = state.dir < 0 ? " \u25bc" : " \u25b2";
  document.getElementById("candidates").innerHTML = `<thead><tr>${head}</tr></thead><tbody>${body}</tbody>`;
  const th = document.querySelector(`#candidates th[data-sort="${state.sort}"]`);
  if (th) th.insertAdjacentText("beforeend", arrow);
}

function numbers(c) {
  return `<p id="numbers">${num("step_s", c.step_s, fmt(c.step_s, 4))} s per step, ` +
    `${num("tokens_per_s_per_gpu", c.tokens_per_s_per_gpu, int(c.tokens_per_s_per_gpu))} tokens/s per GPU, ` +
    `MFU ${num("mfu", c.mfu, pct(c.mfu))}, HFU ${num("hfu", c.hfu, pct(c.hfu))}, ` +
    `${num("model_tflops_per_gpu", c.model_tflops_per_gpu, fmt(c.model_tflops_per_gpu, 4))} model TFLOP/s per GPU, ` +
    `${num("memory_per_rank_gb", c.memory_per_rank_gb, fmt(c.memory_per_rank_gb, 4))} GB on the fullest rank ` +
    `(${c.fits ? "fits" : "<b>does not fit</b>"} ${fmt(DATA.request.capacity_gb)} GB).</p>`;
}

function whatIf(c) {
  if (!c.neighbours.length) return "<p>No one-knob neighbour runs.</p>";
  return `<div id="whatif">` + c.neighbours.map(n =>
    `<button class="${n.fits ? "" : "unfit"}" data-id="${esc(n.id)}" title="${esc(n.id)}">${esc(n.knob)}<br>` +
    `${signed(n.d_tokens_per_s_per_gpu, int)} tok/s/GPU<br>${signed(n.d_memory_per_rank_gb, v => fmt(v, 2))} GB</button>`).join("") + `</div>`;
}

function drawPanel(c) {
  const cap = DATA.request.capacity_gb;
  const mem = MEMORY.map(([k, key]) => [k, c.memory_by_kind_gb[k] || 0, key]);
  const memTotal = mem.reduce((a, p) => a + p[1], 0);
  const t = c.timetable;
  const played = t.micro_batches === t.of ? `all ${t.of} micro-batches` : `the first ${t.micro_batches} of ${t.of} micro-batches (the step extends the steady state)`;
  document.getElementById("panel").innerHTML = `<h2 id="selected" data-id="${esc(c.id)}">${esc(layoutText(c))}</h2>` +
    numbers(c) + `<h3>Memory per rank (${doc("weights", "by kind")}, GB)</h3>` +
    stackedBar("memory-bar", mem, Math.max(cap, memTotal) * 1.05, "GB", cap) +
    `<h3>The step (${doc("compute", "its parts")}, seconds)</h3>` + stackedBar("step-bar", stepParts(c.breakdown), c.step_s, "s") +
    `<h3>Pipeline timeline (${esc(c.schedule)})</h3>` +
    timeline("timeline", t.ranks.length, timetableEvents(t), t.span_s / t.unit_s, t.unit_s, `played with ${played}`) +
    `<h3>What if (one knob changed: tokens/s per GPU and memory per rank against this layout)</h3>` + whatIf(c);
  document.querySelectorAll("#whatif button").forEach(b => b.onclick = () => select(b.dataset.id));
}

function select(id) {
  state.selected = id;
  drawPanel(BY_ID[id]);
  drawTable();
}

function main() {
  const r = DATA.request;
  document.body.insertAdjacentHTML("beforeend", `<p>${r.gpus} x ${esc(r.cluster)}; global batch ${r.global_batch} x ` +
    `${r.seq_len} tokens, ${esc(r.dtype)} GEMMs. ${C.length} layouts: those the search kept, and their one-knob ` +
    `neighbours. ${esc(DATA.explanation)}</p>` + DATA.notes.map(n => `<p class="note">${esc(n)}</p>`).join("") +
    controls() + `<div class="cols"><div class="tablewrap"><table id="candidates"></table></div><div id="panel"></div></div>`);
  document.querySelectorAll("#controls select").forEach(s => s.onchange = () => { state.filters[s.dataset.axis] = s.value; drawTable(); });
  document.getElementById("show-unfit").onchange = e => { state.unfit = e.target.checked; drawTable(); };
  document.getElementById("candidates").onclick = e => {
    const th = e.target.closest("th[data-sort]"), tr = e.target.closest("tr[data-id]");
    if (th) { e.preventDefault(); state.dir = state.sort === th.dataset.sort ? -state.dir : -1; state.sort = th.dataset.sort; drawTable(); }
    else if (tr) select(tr.dataset.id);
  };
  select((C.find(c => c.fits) || C[0]).id);
}
main();
