// segany annotate: the browser side. Plain JS, no external assets.
"use strict";

const $ = (sel) => document.querySelector(sel);
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
  [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
];
const CANDIDATE_RGBA = [30, 144, 255, 120];
const PENDING_RGBA = [255, 255, 255, 70];

const S = {
  token: localStorage.getItem("segany-token") || null,
  config: null,
  images: [],
  current: null,
  nav: { prev: null, next: null },
  img: null,
  view: { s: 1, tx: 0, ty: 0 },
  hist: [],
  pos: 0,
  chain: Promise.resolve(),
  objects: [],
  objCanvas: new Map(),
  layer: null,
  pendingLayer: null,
  selected: null,
  fixing: null,
  accepting: false,
  drag: null,
  pan: null,
  space: false,
  frame: 0,
};

// -- API -------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (S.token) headers["Authorization"] = "Bearer " + S.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    if (r.status === 401) showLogin(detail);
    throw new ApiError(r.status, detail);
  }
  if (r.status === 204) return null;
  const ct = r.headers.get("content-type") || "";
  return ct.includes("application/json") ? r.json() : r.blob();
}

function toast(msg, isError) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = isError ? "error" : "";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = "hidden"; }, isError ? 6000 : 2500);
}

function fail(e) {
  console.error(e);
  if (e instanceof ApiError && e.status === 401) return;
  const offline = e instanceof TypeError; // fetch() could not reach the server
  const msg = offline
    ? "the server cannot be reached (is segany annotate still running?): nothing was saved, try again"
    : (e.message || String(e));
  toast(msg, true);
  setStatus(msg);
}

function setStatus(msg) { $("#status").textContent = msg; }

// -- login -----------------------------------------------------------------------------------
function showLogin(msg) {
  $("#login").classList.remove("hidden");
  $("#login-error").textContent = S.token ? msg || "" : "";
  $("#token").focus();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  S.token = $("#token").value.trim() || null;
  try {
    const me = await api("GET", "/api/me");
    localStorage.setItem("segany-token", S.token);
    $("#login").classList.add("hidden");
    $("#user-name").textContent = me.name;
    await start();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
});

// -- images ----------------------------------------------------------------------------------
async function loadImages() {
  const list = await api("GET", "/api/images");
  S.images = list.images;
  const dl = $("#categories");
  dl.innerHTML = "";
  for (const c of list.categories) {
    const o = document.createElement("option");
    o.value = c;
    dl.appendChild(o);
  }
  renderImageList();
}

function renderProgress() {
  const n = S.images.length;
  const annotated = S.images.filter((i) => i.accepted > 0).length;
  const done = S.images.filter((i) => i.done).length;
  $("#progress-text").textContent = `${annotated}/${n} annotated \u00b7 ${done} done`;
  $("#progress-bar").style.width = n ? `${(100 * done) / n}%` : "0";
}

function renderImageList() {
  renderProgress();
  const ul = $("#images");
  const f = $("#filter").value.toLowerCase();
  ul.innerHTML = "";
  for (const im of S.images) {
    if (f && !im.path.toLowerCase().includes(f)) continue;
    const li = document.createElement("li");
    li.dataset.id = im.id;
    if (S.current && im.id === S.current.id) li.classList.add("active");
    if (im.status !== "ok") li.classList.add("bad");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = im.path;
    li.appendChild(name);
    const badge = document.createElement("span");
    badge.className = "badge";
    if (im.status !== "ok") { badge.textContent = im.status; li.title = im.error || ""; }
    else {
      badge.textContent = (im.done ? "\u2713 " : "") + (im.accepted || "") +
        (im.pending ? ` +${im.pending}?` : "") + (im.stage === 2 ? " S2" : "");
      li.title = `${im.width}\u00d7${im.height}, ${im.accepted} objects, ${im.pending} pending`;
    }
    li.appendChild(badge);
    li.addEventListener("click", () => openImage(im.id).catch(fail));
    ul.appendChild(li);
  }
}

async function openImage(id) {
  if (S.current && S.current.id === id && S.img) return;
  const info = await api("POST", `/api/images/${id}/open`); // fails first: nothing is lost
  resetPrompt();
  S.selected = null;
  S.current = info.image;
  S.nav = { prev: info.prev_id, next: info.next_id };
  history.replaceState(null, "", `#image=${id}`);
  $("#image-name").textContent = `${info.image.path} (${info.image.width}\u00d7${info.image.height})`;
  renderImageList();
  S.img = null;
  S.objects = [];
  S.layer = S.pendingLayer = null;
  redraw();
  if (info.image.status !== "ok") {
    setStatus(`cannot annotate: ${info.image.error}`);
    $("#objects").innerHTML = "";
    return;
  }
  setStatus(info.embedding === "ready" ? "ready: click on an object"
    : "computing the image embedding\u2026 (the first click waits for it)");
  const blob = await api("GET", `/api/images/${id}/file`);
  const url = URL.createObjectURL(blob);
  const img = new Image();
  img.decoding = "async";
  await new Promise((res, rej) => { img.onload = res; img.onerror = () => rej(new Error("the browser cannot show this image")); img.src = url; });
  if (!S.current || S.current.id !== id) return;
  S.img = img;
  fit();
  await loadObjects();
  setStatus(info.embedding === "ready" ? "ready: click on an object"
    : "click on an object (the embedding is being computed: the first click waits for it)");
  $("#canvas").focus();
}

function go(delta) {
  const id = delta > 0 ? S.nav.next : S.nav.prev;
  if (id == null) { toast(delta > 0 ? "last image" : "first image"); return; }
  api("POST", `/api/images/${S.current.id}/events`, { kind: delta > 0 ? "next" : "prev" }).catch(() => {});
  openImage(id).catch(fail);
}

// -- objects ---------------------------------------------------------------------------------
function colorFor(a) {
  return PALETTE[a.id % PALETTE.length];
}

async function loadObjects() {
  if (!S.current) return;
  const id = S.current.id;
  const res = await api("GET", `/api/images/${id}/annotations`);
  if (!S.current || S.current.id !== id) return;
  S.objects = res.annotations;
  const keep = new Set(S.objects.map((a) => a.id));
  for (const k of [...S.objCanvas.keys()]) if (!keep.has(k)) S.objCanvas.delete(k);
  rebuildLayers();
  renderObjects();
  const im = S.images.find((x) => x.id === id);
  if (im) {
    im.accepted = S.objects.filter((a) => a.status === "accepted").length;
    im.pending = S.objects.filter((a) => a.status === "pending").length;
    renderImageList();
  }
}

function objectCanvas(a) {
  const key = a.id;
  let c = S.objCanvas.get(key);
  if (!c || c.status !== a.status || c.counts !== a.segmentation.counts) {
    const rgba = a.status === "pending" ? PENDING_RGBA : [...colorFor(a), 110];
    c = { canvas: maskCanvas(a.segmentation, rgba), status: a.status, counts: a.segmentation.counts };
    S.objCanvas.set(key, c);
  }
  return c.canvas;
}

function rebuildLayers() {
  if (!S.current) return;
  const w = S.current.width, h = S.current.height;
  const mk = () => { const c = document.createElement("canvas"); c.width = w; c.height = h; return c; };
  S.layer = mk();
  S.pendingLayer = mk();
  const a1 = S.layer.getContext("2d"), a2 = S.pendingLayer.getContext("2d");
  for (const a of S.objects) {
    if (a.id === S.fixing) continue;
    (a.status === "pending" ? a2 : a1).drawImage(objectCanvas(a), 0, 0);
  }
  redraw();
}

function renderObjects() {
  const ul = $("#objects");
  ul.innerHTML = "";
  const acc = S.objects.filter((a) => a.status === "accepted").length;
  const pend = S.objects.length - acc;
  $("#obj-count").textContent = `${acc} accepted` + (pend ? `, ${pend} pending` : "");
  for (const a of S.objects) {
    const li = document.createElement("li");
    li.dataset.id = a.id;
    li.className = a.status + (a.id === S.selected ? " selected" : "");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = a.status === "pending" ? "#ddd" : `rgb(${colorFor(a).join(",")})`;
    li.appendChild(sw);
    const cat = document.createElement("input");
    cat.className = "cat";
    cat.value = a.category;
    cat.setAttribute("list", "categories");
    cat.title = "edit the category";
    cat.addEventListener("change", () => {
      if (cat.value.trim() === a.category) return;
      api("PATCH", `/api/annotations/${a.id}`, { category: cat.value })
        .then((r) => { a.category = r.category; cat.value = r.category; toast(`category: ${r.category}`); })
        .catch((e) => { cat.value = a.category; fail(e); });
    });
    cat.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") cat.value = a.category; // leave without saving the edit
      if (ev.key === "Enter" || ev.key === "Escape") {
        ev.preventDefault(); ev.stopPropagation();
        cat.blur(); // saves on Enter (change), then the shortcuts work again
        $("#canvas").focus();
      }
    });
    cat.addEventListener("focus", () => selectObject(a.id, false));
    li.appendChild(cat);
    const info = document.createElement("span");
    info.className = "muted small";
    info.textContent = a.status === "pending"
      ? `${a.source} ${a.score != null ? a.score.toFixed(2) : ""}` +
        (a.detector_score != null ? ` \u00b7 det ${a.detector_score.toFixed(2)}` : "")
      : `${a.area}px` + (a.clicks ? ` \u00b7 ${a.clicks} click${a.clicks === 1 ? "" : "s"}` : "");
    li.appendChild(info);
    const btns = document.createElement("span");
    btns.className = "btns";
    if (a.status === "pending") {
      btns.appendChild(button("\u2713", "accept (A)", () => decidePending(a.id, "accepted")));
      btns.appendChild(button("\u2717", "reject (R)", () => decidePending(a.id, "rejected")));
      btns.appendChild(button("\u270e", "fix with clicks (E)", () => fixPending(a.id)));
    }
    btns.appendChild(button("\u00d7", "delete (Del)", () => deleteObject(a.id), "del"));
    li.appendChild(btns);
    li.addEventListener("click", (ev) => {
      if (ev.target === li || ev.target === info || ev.target === sw) selectObject(a.id, true);
    });
    ul.appendChild(li);
  }
}

function button(text, title, fn, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  if (cls) b.className = cls;
  b.addEventListener("click", (ev) => { ev.stopPropagation(); fn(); });
  return b;
}

function selectObject(id, toggle) {
  S.selected = toggle && S.selected === id ? null : id;
  for (const li of document.querySelectorAll("#objects li")) {
    li.classList.toggle("selected", Number(li.dataset.id) === S.selected);
  }
  redraw();
}

function selectNext() {
  if (!S.objects.length) return;
  const i = S.objects.findIndex((a) => a.id === S.selected);
  const next = S.objects[(i + 1) % S.objects.length];
  selectObject(next.id, false);
  const li = document.querySelector(`#objects li[data-id="${next.id}"]`);
  if (li) li.scrollIntoView({ block: "nearest" });
}

async function deleteObject(id) {
  const a = S.objects.find((x) => x.id === id);
  try {
    await api("DELETE", `/api/annotations/${id}`);
    if (S.selected === id) S.selected = null;
    if (a && a.status === "accepted" && S.current) {
      S.lastDeleted = { imageId: S.current.id, body: { segmentation: a.segmentation, category: a.category, score: a.score } };
    }
    await loadObjects();
    toast(S.lastDeleted ? `deleted object ${id}: U restores it` : "deleted");
  } catch (e) { fail(e); }
}

async function restoreDeleted() {
  const d = S.lastDeleted;
  if (!d || !S.current || d.imageId !== S.current.id) { toast("nothing to restore on this image"); return; }
  try {
    const a = await api("POST", `/api/images/${d.imageId}/annotations`, d.body);
    S.lastDeleted = null;
    await loadObjects();
    toast(`restored as object ${a.id} (${a.category})`);
  } catch (e) { fail(e); }
}

async function decidePending(id, status) {
  const a = S.objects.find((x) => x.id === id);
  if (!a || a.status !== "pending") { toast("select a pending object first"); return; }
  const body = { status };
  const cat = $("#category").value.trim();
  // class-agnostic pre-fills take the category box; named ones (by class, imported) keep theirs
  if (status === "accepted" && cat && a.category === "object") body.category = cat;
  try {
    await api("PATCH", `/api/annotations/${id}`, body);
    await loadObjects();
    const next = S.objects.find((x) => x.status === "pending");
    S.selected = next ? next.id : null;
    renderObjects();
    redraw();
  } catch (e) { fail(e); }
}

async function acceptAllPending() {
  const pend = S.objects.filter((a) => a.status === "pending");
  if (!pend.length) { toast("no pending objects"); return; }
  const cat = $("#category").value.trim();
  const agnostic = pend.filter((a) => a.category === "object").length;
  const label = cat && agnostic ? ` (${agnostic} class-agnostic one(s) as "${cat}")` : "";
  if (!window.confirm(`Accept all ${pend.length} pending object(s)${label}?`)) return;
  try {
    for (const a of pend) {
      const body = { status: "accepted" };
      if (cat && a.category === "object") body.category = cat;
      await api("PATCH", `/api/annotations/${a.id}`, body);
    }
    await loadObjects();
    toast(`${pend.length} accepted`);
  } catch (e) { fail(e); }
}

function fixPending(id) {
  const a = S.objects.find((x) => x.id === id);
  if (!a || a.status !== "pending") { toast("select a pending object first"); return; }
  resetPrompt();
  S.fixing = id;
  S.selected = id;
  rebuildLayers();
  const [x, y, w, h] = a.bbox;
  pushPrompt([], [], [x, y, x + w, y + h]);
  setStatus(`fixing pending object ${id}: add clicks, Enter replaces it`);
}

// -- prompts and candidates ------------------------------------------------------------------
function current() { return S.pos > 0 ? S.hist[S.pos - 1] : null; }

function resetPrompt() {
  S.hist = [];
  S.pos = 0;
  const hadFix = S.fixing !== null;
  S.fixing = null;
  renderCandidates();
  if (hadFix) rebuildLayers();
  redraw();
}

function pushPrompt(points, labels, box) {
  const entry = { points, labels, box, result: null, sel: 0, canvases: null, error: null };
  S.hist = S.hist.slice(0, S.pos);
  S.hist.push(entry);
  S.pos = S.hist.length;
  redraw();
  renderCandidates();
  const prev = S.hist.length > 1 ? S.hist[S.hist.length - 2] : null;
  const imageId = S.current.id;
  S.chain = S.chain.then(() => runPredict(entry, prev, imageId)).catch(fail);
}

function addPoint(x, y, label) {
  const cur = current();
  const points = cur ? [...cur.points, [x, y]] : [[x, y]];
  const labels = cur ? [...cur.labels, label] : [label];
  pushPrompt(points, labels, cur ? cur.box : null);
}

function setBox(box) {
  const cur = current();
  pushPrompt(cur ? cur.points : [], cur ? cur.labels : [], box);
}

async function runPredict(entry, prev, imageId) {
  if (!S.current || S.current.id !== imageId || !S.hist.includes(entry)) return;
  const multimask = $("#always3").checked || (entry.points.length === 1 && !entry.box);
  const body = { points: entry.points, labels: entry.labels, box: entry.box, multimask };
  if (prev && prev.result && S.hist.includes(prev)) {
    body.mask_input_id = prev.result.masks[prev.sel].mask_input_id;
  }
  const t0 = performance.now();
  setStatus("segmenting\u2026");
  let res;
  try {
    res = await api("POST", `/api/images/${imageId}/predict`, body);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404 && body.mask_input_id) {
      delete body.mask_input_id; // the server forgot the previous mask (restart): go on without
      res = await api("POST", `/api/images/${imageId}/predict`, body);
    } else {
      entry.error = e.message;
      renderCandidates();
      setStatus(`segmenting failed: ${e instanceof TypeError ? "the server cannot be reached" : e.message}`);
      throw e;
    }
  }
  const rtt = performance.now() - t0;
  entry.result = res;
  entry.sel = res.best;
  entry.canvases = res.masks.map((m) => maskCanvas(m.segmentation, CANDIDATE_RGBA));
  $("#latency").textContent = `click\u2192mask ${rtt.toFixed(0)} ms (server ${res.ms.toFixed(0)} ms)`;
  setStatus(`${entry.points.length} point(s)${entry.box ? " + box" : ""}: choose a candidate, ` +
    `Enter accepts as "${acceptLabel()}"`);
  if (current() === entry) { renderCandidates(); redraw(); }
}

function selectCandidate(k) {
  const cur = current();
  if (!cur || !cur.result || k >= cur.result.masks.length) return;
  cur.sel = k;
  renderCandidates();
  redraw();
  api("POST", `/api/images/${S.current.id}/events`, { kind: "select", data: { index: k } }).catch(() => {});
}

function renderCandidates() {
  const box = $("#candidates");
  box.innerHTML = "";
  const cur = current();
  if (!cur) { box.innerHTML = '<p class="muted small">click on the image</p>'; return; }
  if (!cur.result) {
    box.innerHTML = cur.error ? `<p class="error small"></p>` : '<p class="muted small">segmenting\u2026</p>';
    if (cur.error) box.firstChild.textContent = cur.error;
    return;
  }
  // thumbnails show the region around the candidates (union of their boxes, with a margin)
  const W = S.current.width, H = S.current.height;
  let x0 = W, y0 = H, x1 = 0, y1 = 0;
  for (const m of cur.result.masks) {
    if (!m.area) continue;
    x0 = Math.min(x0, m.bbox[0]); y0 = Math.min(y0, m.bbox[1]);
    x1 = Math.max(x1, m.bbox[0] + m.bbox[2]); y1 = Math.max(y1, m.bbox[1] + m.bbox[3]);
  }
  if (x1 <= x0 || y1 <= y0) { x0 = 0; y0 = 0; x1 = W; y1 = H; }
  const pad = Math.max(16, 0.25 * Math.max(x1 - x0, y1 - y0));
  const tw = 120, th = 96;
  let rw = x1 - x0 + 2 * pad, rh = y1 - y0 + 2 * pad;
  if (rw / rh > tw / th) rh = (rw * th) / tw; else rw = (rh * tw) / th;
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const view = [cx - rw / 2, cy - rh / 2, rw, rh];
  cur.result.masks.forEach((m, k) => {
    const d = document.createElement("div");
    d.className = "candidate" + (k === cur.sel ? " selected" : "");
    d.dataset.index = k;
    const c = document.createElement("canvas");
    c.width = tw; c.height = th;
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#1b1e23";
    ctx.fillRect(0, 0, tw, th);
    const sc = tw / view[2];
    ctx.setTransform(sc, 0, 0, sc, -view[0] * sc, -view[1] * sc);
    if (S.img) ctx.drawImage(S.img, 0, 0, W, H);
    ctx.drawImage(cur.canvases[k], 0, 0);
    d.appendChild(c);
    const label = document.createElement("div");
    label.className = "score";
    label.innerHTML = `<kbd>${k + 1}</kbd> <span class="val"></span>`;
    label.querySelector(".val").textContent = m.score.toFixed(3);
    d.appendChild(label);
    d.addEventListener("click", () => selectCandidate(k));
    box.appendChild(d);
  });
}

function undo() {
  if (S.pos === 0) return;
  S.pos -= 1;
  renderCandidates();
  redraw();
  if (S.current) api("POST", `/api/images/${S.current.id}/events`, { kind: "undo" }).catch(() => {});
}

function redo() {
  if (S.pos >= S.hist.length) return;
  S.pos += 1;
  renderCandidates();
  redraw();
  if (S.current) api("POST", `/api/images/${S.current.id}/events`, { kind: "redo" }).catch(() => {});
}

function acceptLabel() {
  // what Enter saves the current mask as: a fixed pending object keeps its class
  const fixed = S.fixing !== null ? S.objects.find((x) => x.id === S.fixing) : null;
  if (fixed && fixed.category !== "object") return fixed.category;
  return $("#category").value.trim() || "object";
}

async function accept() {
  if (S.accepting) return; // one accept at a time (Enter held down, double clicks)
  S.accepting = true;
  try { await acceptNow(); } finally { S.accepting = false; }
}

async function acceptNow() {
  await S.chain;
  const cur = current();
  if (!S.current) return;
  if (!cur || !cur.result) {
    const sel = S.objects.find((a) => a.id === S.selected && a.status === "pending");
    if (sel) { await decidePending(sel.id, "accepted"); return; }
    toast("click on an object first");
    return;
  }
  const m = cur.result.masks[cur.sel];
  const category = acceptLabel();
  const body = { segmentation: m.segmentation, category, score: m.score };
  if (S.fixing !== null) body.replaces = S.fixing;
  try {
    const a = await api("POST", `/api/images/${S.current.id}/annotations`, body);
    localStorage.setItem("segany-category", category);
    const dl = $("#categories");
    if (![...dl.options].some((o) => o.value === category)) {
      const o = document.createElement("option"); o.value = category; dl.appendChild(o);
    }
    const wasFix = S.fixing !== null;
    S.fixing = null;
    S.hist = []; S.pos = 0;
    renderCandidates();
    await loadObjects();
    if (wasFix) { // go on with the next pending object, as after accept / reject
      const next = S.objects.find((x) => x.status === "pending");
      selectObject(next ? next.id : null, false);
    }
    setStatus(`accepted object ${a.id} (${a.category}); click the next object`);
  } catch (e) { fail(e); }
}

async function markDoneAndNext() {
  if (!S.current) return;
  try {
    await api("POST", `/api/images/${S.current.id}/done`, { done: true });
    const im = S.images.find((x) => x.id === S.current.id);
    if (im) im.done = true;
    await loadImages();
    go(1);
  } catch (e) { fail(e); }
}

async function prefill() {
  if (!S.current) return;
  if (S.prefilling) { toast("a pre-fill is running on this image"); return; }
  const body = {
    pred_iou_thresh: Number($("#iou").value),
    stability_score_thresh: Number($("#stab").value),
    points_per_side: Number($("#pps").value),
  }; // segment-everything masks are class-agnostic ("object"); accepting one (A) applies the
  // category box. With classes, the text detector names each mask (its class is kept).
  const classes = $("#classes").value.trim();
  if (classes) body.classes = classes;
  setStatus(classes ? `pre-filling (detecting ${classes})\u2026` : "pre-filling (segment everything)\u2026");
  $("#prefill").disabled = true;
  S.prefilling = true;
  try {
    const r = await api("POST", `/api/images/${S.current.id}/prefill`, body);
    await loadObjects();
    const first = S.objects.find((a) => a.status === "pending");
    if (first) selectObject(first.id, false);
    setStatus(`pre-filled ${r.created} masks in ${r.seconds.toFixed(1)} s` +
      (r.skipped_overlap ? ` (${r.skipped_overlap} overlapped accepted objects)` : "") +
      ": A accepts, R rejects, E fixes, or click to add what is missing");
  } catch (e) { fail(e); setStatus("pre-fill failed"); }
  finally { $("#prefill").disabled = false; S.prefilling = false; }
}

// -- canvas ----------------------------------------------------------------------------------
const canvas = $("#canvas");
const ctx = canvas.getContext("2d");

function resize() {
  const dpr = window.devicePixelRatio || 1;
  const r = $("#stage").getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(r.width * dpr));
  canvas.height = Math.max(1, Math.round(r.height * dpr));
  canvas.style.width = r.width + "px";
  canvas.style.height = r.height + "px";
  redraw();
}

function fit() {
  if (!S.current) return;
  const r = $("#stage").getBoundingClientRect();
  const s = Math.min(r.width / S.current.width, r.height / S.current.height) * 0.98;
  S.view = { s, tx: (r.width - S.current.width * s) / 2, ty: (r.height - S.current.height * s) / 2 };
  redraw();
}

function redraw() {
  if (S.frame) return;
  S.frame = requestAnimationFrame(() => { S.frame = 0; draw(); });
}

function toScreen(x, y) { return [x * S.view.s + S.view.tx, y * S.view.s + S.view.ty]; }
function toImage(sx, sy) { return [(sx - S.view.tx) / S.view.s, (sy - S.view.ty) / S.view.s]; }

function draw() {
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#1b1e23";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  $("#zoom").textContent = S.img ? `${Math.round(S.view.s * 100)}%` : "";
  if (!S.img || !S.current) return;
  const { s, tx, ty } = S.view;
  ctx.setTransform(dpr * s, 0, 0, dpr * s, dpr * tx, dpr * ty);
  ctx.imageSmoothingEnabled = s < 1.5;
  ctx.drawImage(S.img, 0, 0, S.current.width, S.current.height);
  ctx.imageSmoothingEnabled = false;
  if (S.pendingLayer) ctx.drawImage(S.pendingLayer, 0, 0);
  if (S.layer) ctx.drawImage(S.layer, 0, 0);
  if (S.selected !== null) {
    const a = S.objects.find((x) => x.id === S.selected);
    if (a && a.id !== S.fixing) {
      ctx.globalAlpha = 1;
      ctx.drawImage(objectCanvas(a), 0, 0);
      const [x, y, w, h] = a.bbox;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      const [x0, y0] = toScreen(x, y);
      ctx.strokeStyle = "#ffeb3b";
      ctx.lineWidth = 2;
      ctx.setLineDash([5, 4]);
      ctx.strokeRect(x0, y0, w * s, h * s);
      ctx.setLineDash([]);
      ctx.setTransform(dpr * s, 0, 0, dpr * s, dpr * tx, dpr * ty);
    }
  }
  const cur = current();
  if (cur && cur.canvases) ctx.drawImage(cur.canvases[cur.sel], 0, 0);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  if (cur && cur.box) {
    const [x0, y0] = toScreen(cur.box[0], cur.box[1]);
    const [x1, y1] = toScreen(cur.box[2], cur.box[3]);
    ctx.strokeStyle = "#00e5ff";
    ctx.lineWidth = 2;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  if (S.drag && S.drag.box) {
    ctx.strokeStyle = "#fff";
    ctx.setLineDash([6, 4]);
    ctx.lineWidth = 1.5;
    ctx.strokeRect(S.drag.sx, S.drag.sy, S.drag.cx - S.drag.sx, S.drag.cy - S.drag.sy);
    ctx.setLineDash([]);
  }
  if (cur) {
    cur.points.forEach(([x, y], i) => {
      const [px, py] = toScreen(x, y);
      ctx.beginPath();
      ctx.arc(px, py, 6, 0, Math.PI * 2);
      ctx.fillStyle = cur.labels[i] === 1 ? "#2ecc40" : "#ff4136";
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    });
  }
}

function eventPos(ev) {
  const r = canvas.getBoundingClientRect();
  return [ev.clientX - r.left, ev.clientY - r.top];
}

function inImage(x, y) {
  return S.current && x >= 0 && y >= 0 && x <= S.current.width && y <= S.current.height;
}

canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());

canvas.addEventListener("mousedown", (ev) => {
  canvas.focus();
  if (!S.img) return;
  const [sx, sy] = eventPos(ev);
  if (ev.button === 1 || (ev.button === 0 && (S.space || ev.altKey))) {
    S.pan = { sx, sy, tx: S.view.tx, ty: S.view.ty };
    ev.preventDefault();
    return;
  }
  if (ev.button === 2) {
    const [x, y] = toImage(sx, sy);
    if (inImage(x, y)) addPoint(round1(x), round1(y), 0);
    ev.preventDefault();
    return;
  }
  if (ev.button === 0) S.drag = { sx, sy, cx: sx, cy: sy, box: false, shift: ev.shiftKey };
});

window.addEventListener("mousemove", (ev) => {
  if (!S.pan && !S.drag) return;
  const [sx, sy] = eventPos(ev);
  if (S.pan) {
    S.view.tx = S.pan.tx + sx - S.pan.sx;
    S.view.ty = S.pan.ty + sy - S.pan.sy;
    redraw();
  } else if (S.drag) {
    S.drag.cx = sx; S.drag.cy = sy;
    if (Math.hypot(sx - S.drag.sx, sy - S.drag.sy) > 5) S.drag.box = true;
    if (S.drag.box) redraw();
  }
});

window.addEventListener("mouseup", (ev) => {
  if (S.pan) { S.pan = null; return; }
  const d = S.drag;
  if (!d) return;
  S.drag = null;
  if (d.box) {
    let [x0, y0] = toImage(Math.min(d.sx, d.cx), Math.min(d.sy, d.cy));
    let [x1, y1] = toImage(Math.max(d.sx, d.cx), Math.max(d.sy, d.cy));
    const W = S.current.width, H = S.current.height;
    x0 = clamp(x0, 0, W); x1 = clamp(x1, 0, W); y0 = clamp(y0, 0, H); y1 = clamp(y1, 0, H);
    if (x1 - x0 >= 2 && y1 - y0 >= 2) setBox([round1(x0), round1(y0), round1(x1), round1(y1)]);
    else redraw();
    return;
  }
  if (ev.target !== canvas) return;
  const [x, y] = toImage(d.sx, d.sy);
  if (inImage(x, y)) addPoint(round1(x), round1(y), d.shift ? 0 : 1);
});

canvas.addEventListener("wheel", (ev) => {
  if (!S.img) return;
  ev.preventDefault();
  const [sx, sy] = eventPos(ev);
  const f = Math.pow(1.0015, -ev.deltaY);
  const s = clamp(S.view.s * f, 0.02, 40);
  const k = s / S.view.s;
  S.view = { s, tx: sx - (sx - S.view.tx) * k, ty: sy - (sy - S.view.ty) * k };
  redraw();
}, { passive: false });

function clamp(v, a, b) { return Math.min(b, Math.max(a, v)); }
function round1(v) { return Math.round(v * 10) / 10; }

// -- keyboard --------------------------------------------------------------------------------
window.addEventListener("keydown", (ev) => {
  const inField = ev.target instanceof HTMLInputElement || ev.target instanceof HTMLTextAreaElement;
  if (!$("#login").classList.contains("hidden")) return;
  if (ev.key === "Enter" && ev.target.id === "classes") { // pre-fill these classes
    ev.preventDefault(); ev.target.blur(); prefill(); return;
  }
  if (ev.key === "Enter" && (!inField || ev.target.id === "category")) {
    ev.preventDefault();
    if (ev.shiftKey) markDoneAndNext(); else accept();
    if (inField) ev.target.blur();
    return;
  }
  if (inField) {
    if (ev.key === "Escape") ev.target.blur();
    return;
  }
  const k = ev.key;
  if ((ev.ctrlKey || ev.metaKey) && (k === "z" || k === "Z")) {
    ev.preventDefault(); if (ev.shiftKey) redo(); else undo(); return;
  }
  if ((ev.ctrlKey || ev.metaKey) && (k === "y" || k === "Y")) { ev.preventDefault(); redo(); return; }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (k === "1" || k === "2" || k === "3") { selectCandidate(Number(k) - 1); return; }
  if (k === " ") { S.space = true; ev.preventDefault(); return; }
  if (k === "Escape") { resetPrompt(); setStatus("cleared"); return; }
  if (k === "n" || k === "ArrowRight") { go(1); return; }
  if (k === "p" || k === "ArrowLeft") { go(-1); return; }
  if (k === "Delete" || k === "Backspace") { if (S.selected !== null) deleteObject(S.selected); return; }
  if (k === "Tab") { ev.preventDefault(); selectNext(); return; }
  if (k === "A") { acceptAllPending(); return; }
  if (k === "a") { if (S.selected !== null) decidePending(S.selected, "accepted"); return; }
  if (k === "r") { if (S.selected !== null) decidePending(S.selected, "rejected"); return; }
  if (k === "e") { if (S.selected !== null) fixPending(S.selected); return; }
  if (k === "g") { prefill(); return; }
  if (k === "u") { restoreDeleted(); return; }
  if (k === "c") { ev.preventDefault(); $("#category").focus(); $("#category").select(); return; }
  if (k === "f") { fit(); return; }
});
window.addEventListener("keyup", (ev) => { if (ev.key === " ") S.space = false; });
window.addEventListener("resize", () => { resize(); if (S.img) fit(); });

// -- buttons ---------------------------------------------------------------------------------
$("#accept").addEventListener("click", () => accept());
$("#undo").addEventListener("click", undo);
$("#redo").addEventListener("click", redo);
$("#clear").addEventListener("click", () => resetPrompt());
$("#done").addEventListener("click", () => markDoneAndNext());
$("#prefill").addEventListener("click", () => prefill());
$("#accept-all").addEventListener("click", () => acceptAllPending());
$("#filter").addEventListener("input", renderImageList);
$("#rescan").addEventListener("click", async () => {
  try {
    const r = await api("POST", "/api/rescan");
    toast(`${r.total} images (${r.added} new, ${r.updated} changed, ${r.missing} missing)`);
    await loadImages();
  } catch (e) { fail(e); }
});
$("#export-btn").addEventListener("click", () => $("#export-menu").classList.toggle("open"));
for (const a of document.querySelectorAll("[data-export]")) {
  a.addEventListener("click", async (ev) => {
    ev.preventDefault();
    $("#export-menu").classList.remove("open");
    const kind = a.dataset.export;
    try {
      let blob = await api("GET", `/api/export/${kind}`);
      if (!(blob instanceof Blob)) blob = new Blob([JSON.stringify(blob)], { type: "application/json" });
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = kind === "coco" ? "annotations_coco.json" : `annotations_${kind}.zip`;
      link.click();
    } catch (e) { fail(e); }
  });
}
$("#import-file").addEventListener("change", async (ev) => {
  const f = ev.target.files[0];
  ev.target.value = "";
  $("#export-menu").classList.remove("open");
  if (!f) return;
  try {
    const data = JSON.parse(await f.text());
    const r = await api("POST", "/api/import/coco", data);
    toast(`imported ${r.annotations} objects on ${r.images} images as pending` +
      (r.skipped_images.length ? ` (${r.skipped_images.length} images not found)` : ""));
    await loadImages();
    await loadObjects();
  } catch (e) { fail(e); }
});

function setupSliders(defaults) {
  const saved = JSON.parse(localStorage.getItem("segany-prefill") || "{}");
  const sl = [["iou", "pred_iou_thresh"], ["stab", "stability_score_thresh"], ["pps", "points_per_side"]];
  for (const [id, key] of sl) {
    const el = $("#" + id);
    el.value = saved[key] != null ? saved[key] : defaults[key];
    const show = () => { $(`#${id}-v`).textContent = el.value; };
    show();
    el.addEventListener("input", () => {
      show();
      saved[key] = Number(el.value);
      localStorage.setItem("segany-prefill", JSON.stringify(saved));
    });
  }
  const cl = $("#classes");
  cl.value = saved.classes || "";
  cl.addEventListener("input", () => {
    saved.classes = cl.value;
    localStorage.setItem("segany-prefill", JSON.stringify(saved));
  });
  if (!S.config.detector) {
    cl.disabled = true;
    cl.value = "";
    cl.placeholder = "classes: start the server with --detector";
  } else {
    cl.title = `pre-fill these classes with the text detector ${S.config.detector} ` +
      "instead of segmenting everything";
  }
}

// -- start -----------------------------------------------------------------------------------
async function start() {
  await loadImages();
  const m = /image=(\d+)/.exec(location.hash);
  const want = m ? Number(m[1]) : null;
  const first = S.images.find((i) => i.id === want) ||
    S.images.find((i) => i.status === "ok" && !i.done) || S.images[0];
  if (first) await openImage(first.id);
  else setStatus("no images in the folder: add some and press Rescan");
}

(async function boot() {
  resize();
  renderCandidates();
  $("#category").value = localStorage.getItem("segany-category") || "object";
  try {
    S.config = await api("GET", "/api/config");
    setupSliders(S.config.prefill_defaults);
    if (S.config.auth && !S.token) { showLogin(); return; }
    if (S.config.auth) $("#user-name").textContent = (await api("GET", "/api/me")).name;
    else $("#user-name").textContent = S.config.model;
    await start();
  } catch (e) { fail(e); }
})();
