// conveyor dashboard: reads /dashboard/events (one JSON frame per message) and draws it.
// No libraries: plain DOM updates and two <canvas> drawings (the belt and a tokens/s history).
"use strict";

const KIND_DECODE = 1, KIND_PADDING = 2;
const history = [];
const HISTORY_LEN = 240;
let lastBelt = null;
// The belt as the page keeps it: the server sends it whole in the first frame (belt.full), then
// only the steps that are new. Cells are [slot, request id, kind code] here.
const belt = { steps: [], numSlots: 0, numColumns: 120, kinds: [] };

function mergeBelt(update) {
  if (update.full) belt.steps = [];
  const last = belt.steps.length ? belt.steps[belt.steps.length - 1].step : -1;
  for (const s of update.steps) {
    if (s.step <= last) continue;
    belt.steps.push({ step: s.step, ms: s.ms,
                      cells: s.cells.map(([slot, req, kind]) => [slot, update.requests[req], kind]) });
  }
  belt.steps.splice(0, Math.max(0, belt.steps.length - update.num_columns));
  belt.numSlots = update.num_slots; belt.numColumns = update.num_columns; belt.kinds = update.kinds;
}

function $(id) { return document.getElementById(id); }
function byTestId(id) { return document.querySelector(`[data-testid="${id}"]`); }

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function setValue(testId, value, text) {
  const el = byTestId(testId);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text;
}

function hue(requestId) {
  let h = 0;
  for (let i = 0; i < requestId.length; i++) h = (h * 31 + requestId.charCodeAt(i)) >>> 0;
  return (h * 137.508) % 360;
}

function renderNumbers(f) {
  const status = $("status");
  status.textContent = f.status;
  status.className = "pill " + (f.status === "ok" ? "ok" : "bad");
  $("model").textContent = f.model || "";
  $("uptime").textContent = `up ${Math.round(f.uptime_s)} s`;
  setValue("num-running", f.num_running, String(f.num_running));
  $("slots").textContent = f.belt.num_slots ? `of ${f.belt.num_slots} slots` : "";
  setValue("num-waiting", f.num_waiting, String(f.num_waiting));
  const kv = f.kv;
  setValue("kv-usage", kv.usage, `${fmt(100 * kv.usage, kv.usage > 0 && kv.usage < 0.01 ? 2 : 1)}%`);
  const total = Math.max(1, kv.total);
  const bar = $("kv-bar").children;
  bar[0].style.width = `${100 * kv.live / total}%`;
  bar[1].style.width = `${100 * kv.cached / total}%`;
  bar[2].style.width = `${100 * kv.free / total}%`;
  $("kv-detail").textContent = `${kv.live} live / ${kv.cached} cached / ${kv.free} free blocks`;
  setValue("tokens-per-s", f.tokens_per_s.out, fmt(f.tokens_per_s.out));
  $("tokens-in").textContent = `out; in (prefill) ${fmt(f.tokens_per_s.in)}`;
  $("ttft").textContent = `${fmt(f.ttft_ms.p50, 0)} / ${fmt(f.ttft_ms.p99, 0)} ms`;
  $("itl").textContent = `${fmt(f.itl_ms.p50, 0)} / ${fmt(f.itl_ms.p99, 0)} ms`;
  $("preemptions").textContent = String(f.preemptions.total);
  $("preemptions-minute").textContent = `${f.preemptions.last_minute} in the last minute`;
  renderCost(f.cost);
}

function renderCost(cost) {
  if (cost.price_per_hour === null) {
    setValue("cost-per-mtok", null, "-");
    return;
  }
  const out = cost["1m"].output, tot = cost["1m"].total;
  setValue("cost-per-mtok", out, out === null ? "idle" : `$${fmt(out, 2)}`);
  const since = cost.since_start;
  $("cost-detail").textContent = `output tokens, last minute; all tokens $${fmt(tot, 2)}. ` +
    `Since start: $${fmt(since.output, 2)} out, $${fmt(since.total, 2)} all ` +
    `(at $${fmt(cost.price_per_hour, 2)}/h)`;
}

function renderBatch(f) {
  const b = f.batch;
  const rows = [["steps", b.num_steps], ["slot utilization", fmt(b.slot_utilization === null ? null : 100 * b.slot_utilization) + "%"],
    ["padding waste", fmt(b.padding_waste === null ? null : 100 * b.padding_waste) + "%"],
    ["idle slot-steps (held, no work)", b.held_idle_slot_steps], ["empty slot-steps", b.empty_slot_steps],
    ["mean step", fmt(b.mean_step_ms) + " ms"]];
  $("batch").innerHTML = rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
  const tenants = $("tenants");
  if (!f.tenants.length) { tenants.textContent = "no steps in the last minute"; return; }
  tenants.innerHTML = "";
  for (const t of f.tenants) {
    const row = document.createElement("div");
    row.className = "tenant";
    row.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span><span>${fmt(100 * t.share)}%</span>`;
    row.querySelector(".name").textContent = t.tenant;
    row.querySelector(".fill").style.width = `${100 * t.share}%`;
    tenants.appendChild(row);
  }
}

function drawBelt() {
  const canvas = $("belt");
  const columns = belt.numColumns, rows = Math.max(1, belt.numSlots);
  const width = canvas.clientWidth || 960;
  const cellH = Math.max(3, Math.min(14, Math.floor(360 / rows)));
  canvas.width = width; canvas.height = rows * cellH;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#f3f4f6"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  const cellW = width / columns, offset = columns - belt.steps.length;
  const holder = belt.steps.map(s => { const m = new Map(); for (const c of s.cells) m.set(c[0], c[1]); return m; });
  let busy = 0;
  belt.steps.forEach((step, i) => {
    const x = (offset + i) * cellW;
    for (const [slot, req, kind] of step.cells) {
      const h = hue(req), y = slot * cellH;
      ctx.fillStyle = kind === KIND_PADDING ? "#b5b5b5" : `hsl(${h}, 65%, ${kind === KIND_DECODE ? 48 : 76}%)`;
      ctx.fillRect(x, y, Math.ceil(cellW), cellH - 1);
      if (kind !== KIND_DECODE) {          // stripes: prefill chunk, or a padded slot
        ctx.fillStyle = kind === KIND_PADDING ? "#8a8a8a" : `hsl(${h}, 65%, 58%)`;
        ctx.fillRect(x, y + (cellH - 1) / 2, Math.ceil(cellW), 1);
      }
      if (kind !== KIND_PADDING) busy++;
      ctx.fillStyle = "#111";
      if (i > 0 && holder[i - 1].get(slot) !== req) ctx.fillRect(x, y, 1.5, cellH - 1);     // join
      if (i < belt.steps.length - 1 && holder[i + 1].get(slot) !== req)
        ctx.fillRect(x + cellW - 1.5, y, 1.5, cellH - 1);                                      // departure
    }
  });
  canvas.dataset.steps = String(belt.steps.length);
  canvas.dataset.busyCells = String(busy);
  lastBelt = { cellW, cellH, offset };
}

function hoverBelt(event) {
  if (!lastBelt) return;
  const { cellW, cellH, offset } = lastBelt;
  const rect = event.target.getBoundingClientRect();
  const col = Math.floor((event.clientX - rect.left) / cellW) - offset;
  const slot = Math.floor((event.clientY - rect.top) / cellH);
  const step = belt.steps[col];
  const cell = step && step.cells.find(c => c[0] === slot);
  $("belt-hover").textContent = cell ?
    `slot ${slot}, step ${step.step} (${fmt(step.ms)} ms): ${cell[1]} ${belt.kinds[cell[2]]}` :
    (step ? `slot ${slot}, step ${step.step}: empty` : "");
}

function drawHistory(value) {
  history.push(value);
  if (history.length > HISTORY_LEN) history.shift();
  $("hist-len").textContent = String(history.length);
  const canvas = $("history");
  canvas.width = canvas.clientWidth || 960;
  const ctx = canvas.getContext("2d"), h = canvas.height, top = Math.max(1, ...history);
  ctx.clearRect(0, 0, canvas.width, h);
  ctx.strokeStyle = "#3367d6"; ctx.lineWidth = 1.5; ctx.beginPath();
  history.forEach((v, i) => {
    const x = canvas.width * i / (HISTORY_LEN - 1), y = h - 4 - (h - 8) * v / top;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#56606b"; ctx.fillText(`max ${fmt(top)}`, 4, 12);
}

function onFrame(event) {
  const frame = JSON.parse(event.data);
  renderNumbers(frame);
  renderBatch(frame);
  mergeBelt(frame.belt);
  drawBelt();
  drawHistory(frame.tokens_per_s.out);
}

function connect() {
  const source = new EventSource("/dashboard/events");
  source.onmessage = onFrame;
  source.onerror = () => { $("status").textContent = "reconnecting"; $("status").className = "pill bad"; };
}

$("belt").addEventListener("mousemove", hoverBelt);
connect();
