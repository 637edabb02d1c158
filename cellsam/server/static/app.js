// cellsam labeling page: plain JS + canvas, no build step.
// State lives in `S`; the server owns the labels (every edit is committed before it replies).
"use strict";

const $ = (id) => document.getElementById(id);
const TILE = 1024; // display tiles (image pixels)
const TOKEN = new URLSearchParams(location.search).get("token");

const S = {
  project: null, images: [], image: null,            // current ImageInfo
  labels: null, H: 0, W: 0, version: -1,             // Uint32Array H*W
  overlay: null, overlayCtx: null, overlayData: null, // offscreen canvas with label colours
  tiles: new Map(),                                   // "x0,y0" -> {img, ok}
  scale: 1, tx: 0, ty: 0,                             // screen = image * scale + t
  tool: "click", selected: new Set(),
  prompt: null,                                       // {cell, points: [[x,y]], labels: [1|0]}
  drag: null, stroke: null, boxDrag: null, spaceDown: false,
  review: null,                                       // {boxes: [{box, score, on}]}
  pending: 0, done: 0, lastError: "", queue: Promise.resolve(), ft: null, ftTimer: null,
};

// ---------------------------------------------------------------- server calls
async function api(method, path, body, isForm) {
  const headers = {};
  if (TOKEN) headers["X-CellSAM-Token"] = TOKEN;
  const opts = { method, headers };
  if (body !== undefined && body !== null) {
    if (isForm) opts.body = body;
    else { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  }
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { const j = await r.json(); if (j.error) msg = j.error; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  const type = r.headers.get("content-type") || "";
  if (type.includes("application/json")) return r.json();
  return r;
}

// Edits run one after the other; the status line says "saved" only after the server confirmed.
function edit(path, body) {
  if (!S.image) return Promise.resolve(null);
  const id = S.image.id;
  S.pending++; showSave();
  const job = S.queue.then(async () => {
    try {
      const res = await api("POST", `/api/images/${id}/${path}`, body);
      if (S.image && S.image.id === id) await applyEdit(res);
      S.lastError = "";
      return res;
    } catch (e) {
      S.lastError = e.message;
      return null;
    } finally {
      S.pending--; S.done++; showSave();
    }
  });
  S.queue = job.catch(() => null);
  return job;
}

async function applyEdit(res) {
  if (res.base_version !== S.version || (res.window && !res.patch)) {
    await loadLabels();
  } else if (res.window) {
    const [y0, x0, y1, x1] = res.window;
    const bin = atob(res.patch);
    const buf = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) buf[i] = bin.charCodeAt(i);
    const patch = new Uint32Array(buf.buffer);
    const w = x1 - x0;
    for (let y = y0; y < y1; y++) S.labels.set(patch.subarray((y - y0) * w, (y - y0 + 1) * w), y * S.W + x0);
    S.version = res.version;
    renderOverlay(y0 - 1, x0 - 1, y1 + 1, x1 + 1);
  } else {
    S.version = res.version;  // nothing changed
  }
  S.image.n_cells = res.n_cells; S.image.version = res.version;
  S.image.can_undo = res.can_undo; S.image.can_redo = res.can_redo; S.image.edited = res.edited;
  for (const c of [...S.selected]) if (!cellExists(c)) S.selected.delete(c);
  updateImageList(); updateStatus(); draw();
}

function showSave() {
  const el = $("st-save");
  el.dataset.pending = String(S.pending); el.dataset.done = String(S.done);  // for tests: edits in flight / finished
  if (S.pending > 0) { el.className = "saving"; el.textContent = "saving…"; }
  else if (S.lastError) { el.className = "error"; el.textContent = "edit failed (earlier edits are saved): " + S.lastError; }
  else if (S.image) { el.className = "saved"; el.textContent = `saved ✓ (v${S.version})`; }
  else { el.className = ""; el.textContent = ""; }
}

function flash(msg, isError) {
  S.lastError = isError ? msg : "";
  const el = $("st-save");
  el.className = isError ? "error" : "saved";
  el.textContent = msg;
}

// ---------------------------------------------------------------- project and images
async function loadProject() {
  S.project = await api("GET", "/api/project");
  S.images = S.project.images;
  $("project-name").textContent = S.project.name;
  $("st-model").textContent = "model: " + S.project.model;
  $("st-model").title = S.project.model;  // the bar shows a long path shortened
  updateImageList();
  if (!S.image && S.images.length) await openImage(S.images[0].id);
  $("empty").hidden = S.images.length > 0;
}

function updateImageList() {
  const ul = $("image-list");
  ul.innerHTML = "";
  for (const im of S.images) {
    if (S.image && im.id === S.image.id) Object.assign(im, S.image);
    const li = document.createElement("li");
    li.className = S.image && im.id === S.image.id ? "current" : "";
    const marks = (im.reviewed ? " ✓" : "") + (im.edited ? " ✎" : "");
    li.innerHTML = `<span class="name"></span><span class="meta">${im.n_cells} cells${marks}</span>`;
    li.querySelector(".name").textContent = im.name;
    li.title = `${im.name}: ${im.width}×${im.height}, ${im.n_channels} channel(s)`;
    li.onclick = () => openImage(im.id);
    ul.appendChild(li);
  }
  const used = S.images.filter((im) => im.n_cells > 0 && (im.reviewed || im.edited)).length;
  $("ft-count").textContent = `${used} image(s) edited (✎) or marked reviewed (✓): fine-tuning uses these; ` +
    "\"Segment all\" alone does not count";
}

async function openImage(id) {
  S.image = await api("GET", `/api/images/${id}`);
  S.H = S.image.height; S.W = S.image.width;
  S.selected.clear(); S.prompt = null; S.review = null; $("review-panel").hidden = true;
  S.tiles = new Map();
  S.overlay = document.createElement("canvas");
  S.overlay.width = S.W; S.overlay.height = S.H;
  S.overlayCtx = S.overlay.getContext("2d");
  S.overlayData = S.overlayCtx.createImageData(S.W, S.H);
  await loadLabels();
  fillChannelPickers();
  $("image-panel").hidden = false; $("empty").hidden = true;
  $("exp-tif").href = `/api/images/${id}/export/labels.tif`;
  $("exp-png").href = `/api/images/${id}/export/labels.png`;
  fit(); updateImageList(); updateStatus(); showSave();
  api("POST", `/api/images/${id}/embed`, {}).catch(() => null); // warm the embedding cache
}

async function loadLabels() {
  const r = await api("GET", `/api/images/${S.image.id}/labels`);
  const buf = await r.arrayBuffer();
  S.labels = new Uint32Array(buf);
  S.version = parseInt(r.headers.get("X-Labels-Version"), 10);
  renderOverlay(0, 0, S.H, S.W);
  draw();
}

function fillChannelPickers() {
  const im = S.image;
  for (const [sel, key] of [[$("ch-nuclear"), "nuclear"], [$("ch-wholecell"), "wholecell"]]) {
    sel.innerHTML = "";
    const none = document.createElement("option");
    none.value = ""; none.textContent = im.n_channels === 1 || im.n_channels >= 3 && im.n_channels <= 4 ? "auto / none" : "none";
    sel.appendChild(none);
    for (let c = 0; c < im.n_channels; c++) {
      const o = document.createElement("option"); o.value = String(c); o.textContent = `channel ${c}`; sel.appendChild(o);
    }
    sel.value = im[key] === null ? "" : String(im[key]);
  }
  $("reviewed").checked = im.reviewed;
}

async function setChannels() {
  const v = (el) => (el.value === "" ? null : parseInt(el.value, 10));
  try {
    S.image = await api("PATCH", `/api/images/${S.image.id}`, { nuclear: v($("ch-nuclear")), wholecell: v($("ch-wholecell")) });
    S.tiles = new Map(); draw(); flash("channels changed"); updateImageList();
    api("POST", `/api/images/${S.image.id}/embed`, {}).catch(() => null);
  } catch (e) { flash(e.message, true); fillChannelPickers(); }
}

async function setReviewed(value) {
  try {
    S.image = await api("PATCH", `/api/images/${S.image.id}`, { reviewed: value });
    $("reviewed").checked = S.image.reviewed; updateImageList(); flash(value ? "marked reviewed" : "marked not reviewed");
  } catch (e) { flash(e.message, true); }
}

async function upload(files) {
  for (const f of files) {
    const fd = new FormData();
    fd.append("file", f);
    if ($("upload-axis").value !== "") fd.append("channel_axis", $("upload-axis").value);
    try {
      flash(`uploading ${f.name}…`);
      const info = await api("POST", "/api/images", fd, true);
      S.images.push(info); updateImageList(); flash(`added ${f.name}`);
      if (!S.image) await openImage(info.id);
    } catch (e) { flash(`${f.name}: ${e.message}`, true); }
  }
  $("empty").hidden = S.images.length > 0;
}

async function deleteImage() {
  if (!S.image) return;
  const im = S.image;
  if (!confirm(`Delete ${im.name} and its labels from the project? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/api/images/${im.id}`);
    const i = S.images.findIndex((x) => x.id === im.id);
    S.images = S.images.filter((x) => x.id !== im.id);
    S.image = null; S.labels = null; S.selected.clear(); S.prompt = null;
    $("image-panel").hidden = true;
    flash(`deleted ${im.name}`);
    if (S.images.length) await openImage(S.images[Math.min(i, S.images.length - 1)].id);
    else { $("empty").hidden = false; updateImageList(); updateStatus(); draw(); }
  } catch (e) { flash(e.message, true); }
}

async function importLabels(file) {
  const fd = new FormData(); fd.append("file", file);
  S.pending++; showSave();
  try { await applyEdit(await api("POST", `/api/images/${S.image.id}/labels`, fd, true)); S.lastError = ""; }
  catch (e) { S.lastError = e.message; }
  finally { S.pending--; S.done++; showSave(); }
}

// ---------------------------------------------------------------- colours and overlay
const colorCache = new Map();
function colorOf(id) {
  let c = colorCache.get(id);
  if (!c) {
    const h = (id * 0.618033988749895) % 1, s = 0.75, l = 0.55;  // golden-ratio hues
    const f = (n) => { const k = (n + h * 12) % 12; return l - s * Math.min(l, 1 - l) * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
    c = [Math.round(f(0) * 255), Math.round(f(8) * 255), Math.round(f(4) * 255)];
    colorCache.set(id, c);
  }
  return c;
}

function renderOverlay(y0, x0, y1, x1) {
  if (!S.labels) return;
  y0 = Math.max(0, y0); x0 = Math.max(0, x0); y1 = Math.min(S.H, y1); x1 = Math.min(S.W, x1);
  if (y0 >= y1 || x0 >= x1) return;
  const L = S.labels, W = S.W, H = S.H, d = S.overlayData.data;
  const outlines = $("outlines").checked, byLabel = $("color-by-label").checked;
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const i = y * W + x, l = L[i], o = i * 4;
      if (l === 0) { d[o + 3] = 0; continue; }
      const edge = (x === 0 || L[i - 1] !== l) || (x === W - 1 || L[i + 1] !== l) ||
                   (y === 0 || L[i - W] !== l) || (y === H - 1 || L[i + W] !== l);
      const sel = S.selected.has(l);
      let c = sel ? [255, 255, 255] : byLabel ? colorOf(l) : [255, 214, 64];
      if (edge && !outlines && !sel) c = [Math.min(255, c[0] + 70), Math.min(255, c[1] + 70), Math.min(255, c[2] + 70)];
      d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2];
      d[o + 3] = outlines ? (edge ? 255 : (sel ? 90 : 0)) : (edge ? 255 : (sel ? 200 : 150));
    }
  }
  S.overlayCtx.putImageData(S.overlayData, 0, 0, x0, y0, x1 - x0, y1 - y0);
}

function cellExists(c) { return S.labels && S.labels.indexOf(c) >= 0; }

// ---------------------------------------------------------------- view
const canvas = $("view");
const ctx = canvas.getContext("2d");
let drawQueued = false;

function draw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => { drawQueued = false; paint(); });
}

function fit() {
  const r = canvas.getBoundingClientRect();
  if (!S.W) return;
  S.scale = Math.min(r.width / S.W, r.height / S.H) * 0.97;
  S.tx = (r.width - S.W * S.scale) / 2; S.ty = (r.height - S.H * S.scale) / 2;
  draw();
}

function toImage(ev) {
  const r = canvas.getBoundingClientRect();
  return [(ev.clientX - r.left - S.tx) / S.scale, (ev.clientY - r.top - S.ty) / S.scale];
}

function tileFor(x0, y0) {
  const key = `${x0},${y0}`;
  let t = S.tiles.get(key);
  if (!t) {
    const img = new Image();
    t = { img, ok: false };
    const v = `${S.image.nuclear}-${S.image.wholecell}`;
    img.onload = () => { t.ok = true; draw(); };
    img.src = `/api/images/${S.image.id}/display.png?x0=${x0}&y0=${y0}&w=${TILE}&h=${TILE}&v=${v}`;
    S.tiles.set(key, t);
  }
  return t;
}

function paint() {
  const dpr = window.devicePixelRatio || 1, r = canvas.getBoundingClientRect();
  if (canvas.width !== Math.round(r.width * dpr) || canvas.height !== Math.round(r.height * dpr)) {
    canvas.width = Math.round(r.width * dpr); canvas.height = Math.round(r.height * dpr);
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#0e0f11"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!S.image) return;
  ctx.setTransform(S.scale * dpr, 0, 0, S.scale * dpr, S.tx * dpr, S.ty * dpr);
  ctx.imageSmoothingEnabled = S.scale < 1;
  // visible image window -> tiles
  const vx0 = Math.max(0, -S.tx / S.scale), vy0 = Math.max(0, -S.ty / S.scale);
  const vx1 = Math.min(S.W, (r.width - S.tx) / S.scale), vy1 = Math.min(S.H, (r.height - S.ty) / S.scale);
  for (let y = Math.floor(vy0 / TILE) * TILE; y < vy1; y += TILE) {
    for (let x = Math.floor(vx0 / TILE) * TILE; x < vx1; x += TILE) {
      const t = tileFor(x, y);
      if (t.ok) ctx.drawImage(t.img, x, y);
    }
  }
  ctx.imageSmoothingEnabled = false;
  if ($("show-labels").checked && S.overlay) {
    ctx.globalAlpha = parseFloat($("opacity").value);
    ctx.drawImage(S.overlay, 0, 0);
    ctx.globalAlpha = 1;
  }
  const px = 1 / S.scale;
  if (S.review) {
    for (const b of S.review.boxes) {
      ctx.strokeStyle = b.on ? "#5bff8a" : "#ff5b5b"; ctx.lineWidth = 1.5 * px;
      ctx.setLineDash(b.on ? [] : [4 * px, 3 * px]);
      ctx.strokeRect(b.box[0], b.box[1], b.box[2] - b.box[0], b.box[3] - b.box[1]);
    }
    ctx.setLineDash([]);
  }
  if (S.boxDrag) {
    const [a, b] = S.boxDrag;
    ctx.strokeStyle = "#4fc3ff"; ctx.lineWidth = 1.5 * px;
    ctx.strokeRect(Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.abs(b[0] - a[0]), Math.abs(b[1] - a[1]));
  }
  if (S.stroke) {
    ctx.strokeStyle = S.tool === "erase" ? "rgba(255,80,80,.6)" : "rgba(120,200,255,.6)";
    ctx.lineWidth = 2 * brush(); ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.beginPath();
    S.stroke.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (S.stroke.length === 1) ctx.lineTo(S.stroke[0][0] + 0.01, S.stroke[0][1]);
    ctx.stroke();
  }
  if (S.prompt) {
    S.prompt.points.forEach(([x, y], i) => {
      ctx.fillStyle = S.prompt.labels[i] ? "#3dff6e" : "#ff4040";
      ctx.beginPath(); ctx.arc(x, y, 4 * px, 0, 2 * Math.PI); ctx.fill();
      ctx.strokeStyle = "#000"; ctx.lineWidth = px; ctx.stroke();
    });
  }
  $("st-zoom").textContent = `zoom ${(S.scale * 100).toFixed(0)}%`;
}

function zoomAt(factor, sx, sy) {
  const ns = Math.min(64, Math.max(0.02, S.scale * factor));
  S.tx = sx - (sx - S.tx) * (ns / S.scale); S.ty = sy - (sy - S.ty) * (ns / S.scale);
  S.scale = ns; draw();
}

function brush() { return parseFloat($("brush").value); }

function updateStatus() {
  $("st-image").textContent = S.image ? `${S.image.name} (${S.image.width}×${S.image.height})` : "no image";
  $("st-image").title = $("st-image").textContent;
  $("st-cells").textContent = S.image ? `${S.image.n_cells} cells` : "";
  const sel = S.selected.size ? `, ${S.selected.size} selected` : "";
  const pr = S.prompt ? `, editing cell ${S.prompt.cell ?? "(new)"}` : "";
  $("st-tool").textContent = `tool: ${S.tool}${sel}${pr}`;
  $("btn-undo").disabled = !(S.image && S.image.can_undo);
  $("btn-redo").disabled = !(S.image && S.image.can_redo);
  for (const b of document.querySelectorAll("#tools button")) b.classList.toggle("active", b.dataset.tool === S.tool);
}

function setTool(t) { S.tool = t; S.prompt = null; updateStatus(); draw(); }

function labelAt(x, y) {
  const xi = Math.floor(x), yi = Math.floor(y);
  if (!S.labels || xi < 0 || yi < 0 || xi >= S.W || yi >= S.H) return -1;
  return S.labels[yi * S.W + xi];
}

function refreshSelection() { renderOverlay(0, 0, S.H, S.W); updateStatus(); draw(); }

// ---------------------------------------------------------------- actions
async function clickPrompt(x, y, positive) {
  if (!S.prompt) {
    const under = labelAt(x, y);
    S.prompt = { cell: under > 0 ? under : null, points: [], labels: [] };
  }
  S.prompt.points.push([x, y]); S.prompt.labels.push(positive ? 1 : 0);
  draw();
  const p = S.prompt;
  const res = await edit("cells", { points: p.points, point_labels: p.labels, cell: p.cell, overwrite: $("overwrite").checked });
  if (res && S.prompt === p) { p.cell = res.cell; updateStatus(); }
  if (!res && S.prompt === p && p.cell === null) S.prompt = null;  // a failed first click starts over
  draw();
}

function finishPrompt() { S.prompt = null; updateStatus(); draw(); }

async function deleteSelected() {
  if (!S.selected.size) return flash("select cells first (S, then click)", true);
  const cells = [...S.selected]; S.selected.clear();
  await edit("delete", { cells }); refreshSelection();
}

async function mergeSelected() {
  if (S.selected.size < 2) return flash("select at least two cells to merge (Shift+click)", true);
  const cells = [...S.selected];
  const res = await edit("merge", { cells });
  S.selected = new Set(res ? [res.cell] : []); refreshSelection();
}

async function undo() { S.prompt = null; await edit("undo"); }
async function redo() { S.prompt = null; await edit("redo"); }

async function segmentAll() {
  if (!S.image) return;
  flash("segmenting…"); S.review = null; $("review-panel").hidden = true;
  await edit("segment", {});
}

async function detectBoxes() {
  if (!S.image) return;
  flash("finding cells…");
  try {
    const th = parseFloat($("box-threshold").value);
    const res = await api("POST", `/api/images/${S.image.id}/detect`, { box_threshold: th });
    S.review = { boxes: res.boxes.map((b, i) => ({ box: b, score: res.scores[i], on: true })) };
    $("review-panel").hidden = false; updateReviewCount(); flash(`${res.boxes.length} boxes to review`); draw();
  } catch (e) { flash(e.message, true); }
}

function updateReviewCount() {
  if (!S.review) return;
  const on = S.review.boxes.filter((b) => b.on).length;
  $("review-count").textContent = `${on} of ${S.review.boxes.length} boxes accepted (click a box to toggle)`;
}

async function acceptBoxes() {
  const boxes = S.review.boxes.filter((b) => b.on).map((b) => b.box);
  if (!boxes.length) return flash("no box accepted", true);
  const replace = $("review-replace").checked;
  S.review = null; $("review-panel").hidden = true; draw();
  await edit("decode", { boxes, replace });
}

function discardReview() { S.review = null; $("review-panel").hidden = true; draw(); }

function toggleBoxAt(x, y) {
  let best = null, area = Infinity;
  for (const b of S.review.boxes) {
    const [x0, y0, x1, y1] = b.box, a = (x1 - x0) * (y1 - y0);
    if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && a < area) { best = b; area = a; }
  }
  if (best) { best.on = !best.on; updateReviewCount(); draw(); }
}

// ---------------------------------------------------------------- fine-tuning
async function ftStart() {
  const body = { mask_steps: parseInt($("ft-mask-steps").value, 10),
                 detection_steps: $("ft-stage1").checked ? parseInt($("ft-det-steps").value, 10) : 0 };
  try { S.ft = await api("POST", "/api/finetune", body); ftShow(); ftPoll(); }
  catch (e) { $("ft-status").textContent = e.message; }
}

function ftPoll() {
  clearTimeout(S.ftTimer);
  S.ftTimer = setTimeout(async () => {
    try { S.ft = await api("GET", "/api/finetune"); } catch (e) { return; }
    ftShow();
    if (S.ft && S.ft.state === "running") ftPoll();
  }, 1000);
}

function ftShow() {
  const j = S.ft, run = j && j.state === "running";
  $("ft-progress").hidden = !run; $("btn-ft-cancel").hidden = !run; $("btn-ft-start").disabled = run;
  $("btn-ft-use").hidden = !(j && j.state === "done");
  $("ft-warning").hidden = !(j && j.warning);
  if (!j) return;
  $("btn-ft-use").textContent = j.worse ? "Use new model anyway…" : "Use new model";
  $("ft-warning").textContent = j.warning ? "⚠ " + j.warning : "";
  $("ft-progress").value = j.progress;
  const f = (s) => (s ? `F1 ${s.f1.toFixed(3)}, AP50 ${s.ap50.toFixed(3)}` : "…");
  let txt = `${j.state}: ${j.phase} (trained on ${j.images} images, ${j.tiles} tiles)`;
  if (j.held_out && j.held_out.length) txt += `\nheld out: ${j.held_out.join(", ")}`;
  if (j.before) txt += `\nbefore: ${f(j.before)}`;
  if (j.after) txt += `\nafter:  ${f(j.after)}`;
  if (j.before && j.scored_on) txt += `\n(scored on ${j.scored_on})`;
  if (j.message) txt += `\n${j.message}`;
  $("ft-status").textContent = txt;
}

async function ftUse() {
  const j = S.ft;
  if (j && j.worse && !confirm(`${j.warning}\n\nUse the new model anyway?`)) return;
  try {
    const r = await api("POST", "/api/finetune/use", { force: Boolean(j && j.worse) });
    flash("now using " + r.model); await loadProject();
  } catch (e) { flash(e.message, true); }
}

// ---------------------------------------------------------------- mouse
canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
canvas.addEventListener("wheel", (ev) => {
  ev.preventDefault();
  const r = canvas.getBoundingClientRect();
  zoomAt(Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
}, { passive: false });

canvas.addEventListener("pointerdown", (ev) => {
  if (!S.image) return;
  canvas.setPointerCapture(ev.pointerId);
  const [x, y] = toImage(ev);
  if (ev.button === 1 || S.spaceDown || (S.tool === "pan" && ev.button === 0)) {
    S.drag = { sx: ev.clientX, sy: ev.clientY, tx: S.tx, ty: S.ty }; canvas.classList.add("panning"); return;
  }
  if (S.review && ev.button === 0) { toggleBoxAt(x, y); return; }
  if (S.tool === "click") { clickPrompt(x, y, ev.button === 0 && !ev.shiftKey); return; }
  if (ev.button !== 0) return;
  if (S.tool === "box") S.boxDrag = [[x, y], [x, y]];
  else if (S.tool === "paint" || S.tool === "erase") S.stroke = [[x, y]];
  else if (S.tool === "select") {
    const l = labelAt(x, y);
    if (!ev.shiftKey) S.selected.clear();
    if (l > 0) { if (S.selected.has(l) && ev.shiftKey) S.selected.delete(l); else S.selected.add(l); }
    refreshSelection();
  }
  draw();
});

canvas.addEventListener("pointermove", (ev) => {
  if (!S.image) return;
  const [x, y] = toImage(ev);
  const l = labelAt(x, y);
  $("st-cursor").textContent = l >= 0 ? `x ${Math.floor(x)}, y ${Math.floor(y)}${l ? ", cell " + l : ""}` : "";
  if (S.drag) { S.tx = S.drag.tx + ev.clientX - S.drag.sx; S.ty = S.drag.ty + ev.clientY - S.drag.sy; draw(); return; }
  if (S.boxDrag) { S.boxDrag[1] = [x, y]; draw(); }
  if (S.stroke) { S.stroke.push([x, y]); draw(); }
});

canvas.addEventListener("pointerup", async () => {
  if (S.drag) { S.drag = null; canvas.classList.remove("panning"); return; }
  if (S.boxDrag) {
    const [a, b] = S.boxDrag; S.boxDrag = null; draw();
    const box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) return;
    await edit("cells", { box, overwrite: $("overwrite").checked });
  }
  if (S.stroke) {
    const points = S.stroke; S.stroke = null;
    const one = S.selected.size === 1 ? [...S.selected][0] : null;
    const res = await edit("paint", { points, radius: brush(), cell: one, erase: S.tool === "erase",
                                      overwrite: $("overwrite").checked });
    if (res && S.tool === "paint" && one === null && res.cell) { S.selected = new Set([res.cell]); refreshSelection(); }
    draw();
  }
});

// ---------------------------------------------------------------- keyboard
document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" && ev.target.type !== "checkbox" && ev.target.type !== "range" || ev.target.tagName === "SELECT") return;
  const k = ev.key, ctrl = ev.ctrlKey || ev.metaKey;
  if (k === " ") { S.spaceDown = true; ev.preventDefault(); return; }
  if (ctrl && (k === "z" || k === "Z")) { ev.preventDefault(); return ev.shiftKey ? redo() : undo(); }
  if (ctrl && (k === "y" || k === "Y")) { ev.preventDefault(); return redo(); }
  if (ctrl || ev.altKey) return;
  const r = canvas.getBoundingClientRect();
  const actions = {
    c: () => setTool("click"), b: () => setTool("box"), s: () => setTool("select"), p: () => setTool("paint"),
    e: () => setTool("erase"), h: () => setTool("pan"), z: undo, y: redo,
    a: segmentAll, d: detectBoxes, m: mergeSelected, n: finishPrompt,
    Delete: deleteSelected, Backspace: deleteSelected,
    Enter: () => (S.review ? acceptBoxes() : finishPrompt()),
    Escape: () => { if (S.review) discardReview(); else if (S.prompt) finishPrompt(); else { S.selected.clear(); refreshSelection(); } },
    o: () => { $("outlines").checked = !$("outlines").checked; renderOverlay(0, 0, S.H, S.W); draw(); },
    l: () => { $("color-by-label").checked = !$("color-by-label").checked; renderOverlay(0, 0, S.H, S.W); draw(); },
    v: () => { $("show-labels").checked = !$("show-labels").checked; draw(); },
    ",": () => { $("opacity").value = Math.max(0, parseFloat($("opacity").value) - 0.1); draw(); },
    ".": () => { $("opacity").value = Math.min(1, parseFloat($("opacity").value) + 0.1); draw(); },
    "[": () => { $("brush").value = Math.max(1, brush() - 1); $("brush-value").textContent = $("brush").value; },
    "]": () => { $("brush").value = Math.min(60, brush() + 1); $("brush-value").textContent = $("brush").value; },
    "+": () => zoomAt(1.25, r.width / 2, r.height / 2), "=": () => zoomAt(1.25, r.width / 2, r.height / 2),
    "-": () => zoomAt(0.8, r.width / 2, r.height / 2), 0: fit,
    r: () => S.image && setReviewed(!S.image.reviewed),
    j: () => stepImage(1), k: () => stepImage(-1), PageDown: () => stepImage(1), PageUp: () => stepImage(-1),
    "?": () => { $("help").open = !$("help").open; },
  };
  const f = actions[k] || actions[k.toLowerCase()];
  if (f) { ev.preventDefault(); f(); }
});
document.addEventListener("keyup", (ev) => { if (ev.key === " ") S.spaceDown = false; });

function stepImage(d) {
  if (!S.images.length) return;
  const i = S.images.findIndex((im) => S.image && im.id === S.image.id);
  const j = Math.min(S.images.length - 1, Math.max(0, i + d));
  if (j !== i) openImage(S.images[j].id);
}

// ---------------------------------------------------------------- controls
for (const b of document.querySelectorAll("#tools button")) b.onclick = () => setTool(b.dataset.tool);
$("upload").onchange = (ev) => { upload([...ev.target.files]); ev.target.value = ""; };
$("import-labels").onchange = (ev) => { if (ev.target.files[0]) importLabels(ev.target.files[0]); ev.target.value = ""; };
$("ch-nuclear").onchange = setChannels; $("ch-wholecell").onchange = setChannels;
$("reviewed").onchange = (ev) => setReviewed(ev.target.checked);
$("btn-delete-image").onclick = deleteImage;
$("btn-segment").onclick = segmentAll; $("btn-detect").onclick = detectBoxes;
$("btn-accept").onclick = acceptBoxes; $("btn-discard").onclick = discardReview;
$("box-threshold").oninput = () => { $("box-threshold-value").textContent = parseFloat($("box-threshold").value).toFixed(2); };
$("box-threshold").onchange = () => { if (S.review) detectBoxes(); };
$("btn-delete").onclick = deleteSelected; $("btn-merge").onclick = mergeSelected;
$("btn-undo").onclick = undo; $("btn-redo").onclick = redo;
$("brush").oninput = () => { $("brush-value").textContent = $("brush").value; };
$("opacity").oninput = draw; $("show-labels").onchange = draw;
$("outlines").onchange = $("color-by-label").onchange = () => { renderOverlay(0, 0, S.H, S.W); draw(); };
$("btn-pairs-folder").onclick = async () => {
  try { const r = await api("POST", "/api/export/pairs"); flash(`wrote ${r.folder} (${r.files.length} files)`); }
  catch (e) { flash(e.message, true); }
};
$("btn-ft-start").onclick = ftStart;
$("btn-ft-cancel").onclick = async () => { try { S.ft = await api("POST", "/api/finetune/cancel"); ftShow(); } catch (e) { flash(e.message, true); } };
$("btn-ft-use").onclick = ftUse;
window.addEventListener("resize", draw);
window.addEventListener("beforeunload", (ev) => { if (S.pending > 0) { ev.preventDefault(); ev.returnValue = ""; } });

loadProject().then(async () => {
  try { S.ft = await api("GET", "/api/finetune"); ftShow(); if (S.ft && S.ft.state === "running") ftPoll(); } catch (e) { /* none */ }
  updateStatus();
}).catch((e) => flash(e.message, true));
