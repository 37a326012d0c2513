// segany annotate: the browser side. Plain JS, no external assets.
"use strict";

const $ = (sel) => document.querySelector(sel);
const CANDIDATE_RGBA = [30, 144, 255, 120];
const PENDING_RGBA = [255, 255, 255, 70];

const S = {
  token: localStorage.getItem("segany-token") || null,
  config: null,
  images: [],
  current: null,
  video: null, // the open video (video.js)
  navSeq: 0,
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
  downAt: null,
  latencies: [], // {ms: mousedown -> painted mask, local: decoded in the page, compute}
};

// -- API -------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

// opts.key: the write's Idempotency-Key (see save() in network.js). Every request names the
// tab's session (image leases); an unreachable server turns the offline banner on.
async function api(method, path, body, opts) {
  const headers = {};
  if (S.token) headers["Authorization"] = "Bearer " + S.token;
  if (S.session) headers["X-Segany-Session"] = S.session;
  if (opts && opts.key) headers["Idempotency-Key"] = opts.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    netDown();
    throw e;
  }
  netUp();
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
    ? "offline: the server cannot be reached (is segany annotate still running?); " +
      "this page and its clicks are kept, try again when it is back"
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
  syncCurrent(); // the open image's review state (network.js)
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
    if (S.reviewer && im.review !== "submitted") continue; // reviewer mode: what waits for review
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
        (im.pending ? ` +${im.pending}?` : "") + (im.stage === 2 ? " S2" : "") +
        ({ submitted: " \u2709", approved: " \u2605", returned: " \u21a9" }[im.review] || "") +
        (im.locked_by ? " \u2298" : "");
      li.title = `${im.width}\u00d7${im.height}, ${im.accepted} objects, ${im.pending} pending` +
        (im.review && im.review !== "none" ? `, ${im.review}` : "") +
        (im.locked_by ? `, locked by ${im.locked_by}` : "") +
        (im.assignee ? `, assigned to ${im.assignee}` : "");
      if (im.review === "returned") li.classList.add("returned");
    }
    li.appendChild(badge);
    li.addEventListener("click", () => openImage(im.id).catch(fail));
    ul.appendChild(li);
  }
}

async function openImage(id) {
  if (S.current && S.current.id === id && S.img) return;
  const seq = ++S.navSeq; // the last image or video asked for wins (video.js openVideo)
  S.navTarget = `image:${id}`;
  const info = await api("POST", `/api/images/${id}/open`); // fails first: nothing is lost
  if (seq !== S.navSeq) { // another image or a video was opened meanwhile: let this one go
    const other = S.navTarget !== `image:${id}`;
    if (other && info.lock && info.lock.held) api("DELETE", `/api/images/${id}/lease`).catch(() => {});
    return;
  }
  leaveVideo(); // (video.js)
  resetPrompt();
  historyReset(); // the history is the open image's (tools.js)
  labelsOnImageChange(); // a typed label name is not carried to this image (labels.js)
  S.selected = null;
  S.current = info.image;
  S.nav = { prev: info.prev_id, next: info.next_id };
  onOpened(info); // the lease, the review box, the embedding's status (network.js)
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
  if (wdReady()) { // the embeddings for the page's decoder: this image's, then the next one's
    const next = S.images.find((x) => x.id === info.next_id && x.status === "ok");
    wdImage(id).then(() => { if (next) wdImage(next.id); }).catch(() => {});
  }
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
  if (id == null) { toast(delta > 0 ? "your queue is empty" : "first image"); return; }
  api("POST", `/api/images/${S.current.id}/events`, { kind: delta > 0 ? "next" : "prev" }).catch(() => {});
  openImage(id).catch(fail);
}

// -- objects ---------------------------------------------------------------------------------
// An object's colour: its label's (labels.js); grey until the label set is loaded.
function colorFor(a) {
  return labelRGB(a.category) || [128, 128, 128];
}

async function loadObjects() {
  if (!S.current || S.video) return;
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
  const rgba = a.status === "pending" ? PENDING_RGBA : [...colorFor(a), 110];
  if (!c || c.rgba !== rgba.join(",") || c.counts !== a.segmentation.counts) {
    c = { canvas: maskCanvas(a.segmentation, rgba), rgba: rgba.join(","), counts: a.segmentation.counts };
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
    if (a.id === S.fixing || a.id === S.editing) continue; // (S.editing: a brush stroke on it)
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
      const before = a.category;
      save("PATCH", `/api/annotations/${a.id}`, { category: cat.value }, "the category")
        .then((r) => {
          if (r.category !== before) record({ kind: "category", id: a.id, before, after: r.category });
          a.category = r.category; cat.value = r.category; toast(`category: ${r.category}`);
          rebuildLayers(); // in the new label's colour
        })
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
  try {
    await save("DELETE", `/api/annotations/${id}`, undefined, "the delete");
    record({ kind: "delete", id }); // undo restores it, same id (tools.js)
    if (S.selected === id) S.selected = null;
    await loadObjects();
    toast(`deleted object ${id}: Ctrl+Z (or U) restores it`);
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
    const r = await save("PATCH", `/api/annotations/${id}`, body, `the ${status === "accepted" ? "accept" : "reject"}`);
    record({ kind: "decide", id, status, before: a.category, after: r.category });
    await loadObjects();
    const next = S.objects.find((x) => x.status === "pending");
    S.selected = next ? next.id : null;
    renderObjects();
    redraw();
  } catch (e) { fail(e); }
}

// Accept the pending objects (those with score >= the "score >=" box when it is above 0),
// after a confirmation; one step of the history undoes them all.
async function acceptAllPending() {
  const all = S.objects.filter((a) => a.status === "pending");
  const min = Number($("#min-score").value) || 0;
  const pend = min > 0 ? all.filter((a) => a.score != null && a.score >= min) : all;
  if (!pend.length) { toast(min > 0 ? `no pending objects with score >= ${min}` : "no pending objects"); return; }
  const cat = $("#category").value.trim();
  const agnostic = pend.filter((a) => a.category === "object").length;
  const label = cat && agnostic ? ` (${agnostic} class-agnostic one(s) as "${cat}")` : "";
  const what = min > 0 ? `Accept ${pend.length} of ${all.length} pending object(s) with score >= ${min}`
    : `Accept all ${pend.length} pending object(s)`;
  if (!window.confirm(`${what}${label}?`)) return;
  const items = [];
  try {
    for (const a of pend) {
      const body = { status: "accepted" };
      if (cat && a.category === "object") body.category = cat;
      const r = await save("PATCH", `/api/annotations/${a.id}`, body, "the accepts");
      items.push({ id: a.id, before: a.category, after: r.category });
    }
    toast(`${pend.length} accepted: Ctrl+Z returns them to pending`);
  } catch (e) { fail(e); }
  if (items.length) record({ kind: "acceptAll", items }); // what was done, even if cut short
  await loadObjects().catch(fail);
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
