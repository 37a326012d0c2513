// segany annotate: prompts, candidates (decoded in the page or on the server), accept, pre-fill.
"use strict";

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
  if (S.accepting) { toast("the accepted object is being saved: click again when it is"); return; }
  // t0: the mousedown (or key) that made this prompt; the latency shown runs to the paint
  const t0 = S.downAt != null ? S.downAt : performance.now();
  S.downAt = null;
  const entry = { points, labels, box, result: null, sel: 0, canvases: null, error: null, t0 };
  S.hist = S.hist.slice(0, S.pos);
  S.hist.push(entry);
  S.pos = S.hist.length;
  record({ kind: "prompt", fixing: S.fixing }); // one step of the history (tools.js)
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
  const usePrev = prev && prev.result && S.hist.includes(prev);
  setStatus("segmenting\u2026");
  let res = null;
  if (wdReady() && !S.video) { // (a video frame's clicks are decoded on the server)
    try {
      const low = usePrev ? prev.result.masks[prev.sel].low || null : null;
      res = await wdPredict(imageId, entry.points, entry.labels, entry.box, low, multimask);
      api("POST", `/api/images/${imageId}/events`, { kind: "predict", data: {
        points: entry.points.length, box: !!entry.box, refine: !!low, ms: Math.round(res.ms * 100) / 100,
      } }).catch(() => {}); // counted as a click of the object, as the server counts its own
    } catch (e) {
      console.error(e); // the server answers this click (and says so in the latency)
      res = null;
    }
  }
  if (!res) res = await serverPredict(entry, usePrev ? prev : null, imageId, multimask);
  if (!res) { setStatus("the server is back"); return; } // the click was undone while offline
  entry.result = res;
  entry.sel = res.best;
  entry.canvases = null; // made in the colour of the label (labels.js candidateCanvases)
  entry.paint = true; // draw() reports mousedown -> painted mask
  setStatus(`${entry.points.length} point(s)${entry.box ? " + box" : ""}: choose a candidate, ` +
    `Enter accepts as "${acceptLabel()}"`);
  if (current() === entry) { renderCandidates(); redraw(); }
}

async function serverPredict(entry, prev, imageId, multimask) {
  const body = { points: entry.points, labels: entry.labels, box: entry.box, multimask };
  if (prev && prev.result.masks[prev.sel].mask_input_id) {
    body.mask_input_id = prev.result.masks[prev.sel].mask_input_id;
  }
  try {
    return await api("POST", `${promptBase(imageId)}/predict`, body);
  } catch (e) {
    if (e instanceof TypeError) { // offline: the click is kept and answered when the server is back
      setStatus("offline: your click is kept and will be answered when the server is back");
      await whenOnline();
      if (!S.current || S.current.id !== imageId || !S.hist.includes(entry)) return null; // undone meanwhile
      setStatus("segmenting\u2026");
      return serverPredict(entry, prev, imageId, multimask);
    }
    if (e instanceof ApiError && e.status === 404 && body.mask_input_id) {
      delete body.mask_input_id; // the server forgot the previous mask (restart): go on without
      return api("POST", `${promptBase(imageId)}/predict`, body);
    }
    entry.error = e.message;
    renderCandidates();
    setStatus(`segmenting failed: ${e instanceof TypeError ? "the server cannot be reached" : e.message}`);
    throw e;
  }
}

// Where a prompt goes: an image (its id), or a video frame (video.js sets S.current.id to
// the frame's path, so that a frame change drops the answers meant for another frame).
function promptBase(id) { return typeof id === "string" ? id : `/api/images/${id}`; }

// Called by draw() once the entry's mask is in the canvas: the latency shown.
function painted(entry) {
  entry.paint = false;
  const ms = performance.now() - entry.t0;
  const r = entry.result;
  S.latencies.push({ ms, local: !!r.local, compute: r.local ? r.decodeMs : r.ms });
  $("#latency").textContent = `click\u2192paint ${ms.toFixed(0)} ms ` + (r.local
    ? `(in the page: decode ${r.decodeMs.toFixed(0)} ms, ${WD.threads} thread${WD.threads > 1 ? "s" : ""})`
    : `(server ${r.ms.toFixed(0)} ms)`);
}

function selectCandidate(k) {
  const cur = current();
  if (!cur || !cur.result || k >= cur.result.masks.length) return;
  cur.sel = k;
  renderCandidates();
  redraw();
  if (!S.video) api("POST", `/api/images/${S.current.id}/events`, { kind: "select", data: { index: k } }).catch(() => {});
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
    ctx.drawImage(candidateCanvases(cur)[k], 0, 0);
    d.appendChild(c);
    const label = document.createElement("div");
    label.className = "score";
    label.innerHTML = `<kbd>${k + 1}</kbd> <span class="val"></span>`;
    label.querySelector(".val").textContent = m.score != null ? m.score.toFixed(3) : "painted";
    d.appendChild(label);
    d.addEventListener("click", () => selectCandidate(k));
    box.appendChild(d);
  });
}

// One prompt back / forward (a step of the history in tools.js, which records the event).
function undo() {
  if (S.pos === 0) return;
  S.pos -= 1;
  renderCandidates();
  redraw();
}

function redo() {
  if (S.pos >= S.hist.length) return;
  S.pos += 1;
  renderCandidates();
  redraw();
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
  if (S.video) { // a video object's mask on this frame (video.js)
    if (!cur || !cur.result) { toast("click on an object first"); return; }
    try { await acceptVideoMask(cur); } catch (e) { fail(e); }
    return;
  }
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
  const before = { hist: S.hist, pos: S.pos, fixing: S.fixing }; // undo brings the clicks back
  try {
    const a = await save("POST", `/api/images/${S.current.id}/annotations`, body, "the accept");
    record({ kind: "accept", id: a.id, replaces: body.replaces != null ? body.replaces : null, ...before });
    labelAccepted(a.category).catch(() => {});
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
  if (!S.current || S.video) return;
  try {
    await save("POST", `/api/images/${S.current.id}/done`, { done: true }, "the done mark");
    const im = S.images.find((x) => x.id === S.current.id);
    if (im) im.done = true;
    await loadImages();
    await nextInQueue(); // the per-user queue (network.js): returned images first
  } catch (e) { fail(e); }
}

// prefill(): in network.js (a background job with progress and cancel)
