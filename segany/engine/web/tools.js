// segany annotate: the brush and the eraser, and the history of every action (undo / redo).
//
// Brush (B) and eraser (X) paint discs of the chosen size (image pixels; [ and ] change it)
// along the mouse path: a pixel is painted when its centre is within size/2 of the path.
// They edit, in this order: the current candidate; else the selected object (saved with
// PATCH /api/annotations/{id} at the end of each stroke); else a new mask painted from
// nothing (a candidate: Enter accepts it).
//
// History: every action on the open image is one step, undone with Ctrl+Z (or U) and redone
// with Ctrl+Y / Ctrl+Shift+Z: clicks, strokes, accepts, deletes, category edits, accept /
// reject of a pending object, accept-all (one step), clearing the clicks. Undoing an accept
// deletes the object (and brings its clicks back); undoing a delete restores the same object
// (POST /api/annotations/{id}/restore). The history starts afresh on each image.
"use strict";

const T = {
  tool: "prompt", // "prompt" (clicks and boxes), "brush" or "eraser"
  size: Number(localStorage.getItem("segany-brush")) || 10,
  stroke: null,
  hover: null,
  saving: false,
  done: [],
  undone: [],
  chain: Promise.resolve(),
};

// -- tools -----------------------------------------------------------------------------------
function setTool(tool) {
  T.tool = T.tool === tool ? "prompt" : tool; // pressing B (or X) again goes back to clicks
  for (const t of ["prompt", "brush", "eraser"]) $(`#tool-${t}`).classList.toggle("on", T.tool === t);
  $("#canvas").style.cursor = T.tool === "prompt" ? "" : "none";
  if (T.tool !== "prompt") {
    setStatus(`${T.tool} ${T.size} px on ${describeTarget()}: drag to paint, ` +
      `[ ] size, ${T.tool === "brush" ? "B" : "X"} back to clicks`);
  } else setStatus("clicks: click on an object");
  redraw();
}

function setBrushSize(px) {
  T.size = Math.max(1, Math.min(256, Math.round(px)));
  localStorage.setItem("segany-brush", String(T.size));
  showBrushSize();
  redraw();
}

function showBrushSize() {
  $("#brush-size").value = Math.min(T.size, Number($("#brush-size").max));
  $("#brush-size-v").textContent = T.size;
}

function toolActive() { return T.tool !== "prompt" && !!S.img; }

// What a stroke edits now: {kind: "candidate", entry} | {kind: "object", ann} | {kind: "new"}.
function brushTarget() {
  const cur = current();
  if (cur) return cur.result ? { kind: "candidate", entry: cur } : null;
  const a = S.video ? null : S.objects.find((x) => x.id === S.selected); // (a video: candidates only)
  return a ? { kind: "object", ann: a } : { kind: "new" };
}

function describeTarget() {
  const t = brushTarget();
  if (!t) return "the candidate (still segmenting)";
  if (t.kind === "candidate") return "the candidate";
  if (t.kind === "object") return `object ${t.ann.id} (${t.ann.category})`;
  return "a new mask";
}

// Paint (val 1) or erase (0) the capsule of radius r around segment p0-p1: every pixel whose
// centre is within r of the segment. Returns whether a pixel changed.
function stampSegment(bits, H, W, p0, p1, r, val) {
  const dx = p1[0] - p0[0], dy = p1[1] - p0[1];
  const len2 = dx * dx + dy * dy;
  const xa = Math.max(0, Math.floor(Math.min(p0[0], p1[0]) - r));
  const xb = Math.min(W - 1, Math.ceil(Math.max(p0[0], p1[0]) + r));
  const ya = Math.max(0, Math.floor(Math.min(p0[1], p1[1]) - r));
  const yb = Math.min(H - 1, Math.ceil(Math.max(p0[1], p1[1]) + r));
  const r2 = r * r;
  let changed = false;
  for (let y = ya; y <= yb; y++) {
    for (let x = xa; x <= xb; x++) {
      const cx = x + 0.5, cy = y + 0.5;
      let t = len2 > 0 ? ((cx - p0[0]) * dx + (cy - p0[1]) * dy) / len2 : 0;
      t = Math.max(0, Math.min(1, t));
      const ex = cx - (p0[0] + t * dx), ey = cy - (p0[1] + t * dy);
      if (ex * ex + ey * ey <= r2 && bits[y * W + x] !== val) { bits[y * W + x] = val; changed = true; }
    }
  }
  return changed;
}

function emptyMask(H, W) {
  const bits = new Uint8Array(H * W);
  return { bits, segmentation: rleEncode(bits, H, W), score: null, area: 0, bbox: [0, 0, 0, 0] };
}

// A mask object after an edit: its bits, RLE (uncompressed, as the server accepts it), stats.
function editedMask(m, bits, H, W) {
  const st = maskStats(bits, H, W);
  return { ...m, bits, segmentation: rleEncode(bits, H, W), area: st.area, bbox: st.bbox, edited: true };
}

function toolDown(ev, sx, sy) {
  if (ev.button !== 0) return; // right button: nothing in brush mode
  if (T.saving) { toast("saving the last stroke\u2026"); return; }
  let target = brushTarget();
  if (!target) { toast("wait for the candidate, then paint on it"); return; }
  const H = S.current.height, W = S.current.width;
  let created = false;
  if (target.kind === "new") { // a mask painted from nothing becomes the current candidate
    const entry = { points: [], labels: [], box: null, sel: 0, canvases: null, error: null,
      result: { masks: [emptyMask(H, W)], best: 0, ms: 0, painted: true } };
    S.hist = S.hist.slice(0, S.pos);
    S.hist.push(entry);
    S.pos = S.hist.length;
    target = { kind: "candidate", entry };
    created = true;
  }
  let bits;
  if (target.kind === "candidate") {
    const m = target.entry.result.masks[target.entry.sel];
    bits = m.bits ? m.bits.slice() : rleDecode(m.segmentation);
  } else {
    bits = rleDecode(target.ann.segmentation);
    S.editing = target.ann.id; // drawn from the stroke's bits until saved
    rebuildLayers();
  }
  const [x, y] = toImage(sx, sy);
  const p = [round1(x), round1(y)];
  T.stroke = { target, created, bits, points: [p], val: T.tool === "brush" ? 1 : 0,
    r: T.size / 2, size: T.size, tool: T.tool, canvas: null, dirty: true };
  stampSegment(bits, H, W, p, p, T.stroke.r, T.stroke.val);
  redraw();
}

function toolMove(ev) {
  const r = $("#canvas").getBoundingClientRect();
  const [x, y] = toImage(ev.clientX - r.left, ev.clientY - r.top);
  T.hover = [x, y];
  const st = T.stroke;
  if (!st) { if (toolActive()) redraw(); return; }
  const p = [round1(x), round1(y)];
  const last = st.points[st.points.length - 1];
  if (p[0] === last[0] && p[1] === last[1]) return;
  st.points.push(p);
  if (stampSegment(st.bits, S.current.height, S.current.width, last, p, st.r, st.val)) st.dirty = true;
  redraw();
}

async function toolUp() {
  const st = T.stroke;
  if (!st) return;
  T.stroke = null;
  const H = S.current.height, W = S.current.width;
  const step = { kind: "stroke", tool: st.tool, size: st.size, points: st.points };
  if (st.target.kind === "candidate") {
    const entry = st.target.entry, sel = entry.sel;
    const before = entry.result.masks[sel];
    const after = editedMask(before, st.bits, H, W);
    entry.result.masks[sel] = after;
    entry.canvases = null;
    record({ ...step, target: "candidate", entry, sel, before, after, created: st.created });
    renderCandidates();
    redraw();
    setStatus(`${st.tool}: the candidate has ${after.area} px; Enter accepts as "${acceptLabel()}"`);
    return;
  }
  const a = st.target.ann;
  const before = a.segmentation;
  T.saving = true;
  try {
    const r = await save("PATCH", `/api/annotations/${a.id}`, { segmentation: rleEncode(st.bits, H, W) }, "the stroke");
    record({ ...step, target: "object", id: a.id, before, after: r.segmentation });
    setStatus(`${st.tool}: object ${a.id} has ${r.area} px (saved)`);
  } catch (e) {
    fail(e); // nothing was saved: the object is drawn as it was
  } finally {
    T.saving = false;
    S.editing = null;
    await loadObjects().catch(fail);
  }
}

// Draw hooks (canvas.js draw()): the candidate as the stroke paints it; the stroke on an
// object; the brush outline; the label tag at the candidate.
function candidateLayer(cur) {
  const st = T.stroke;
  if (st && st.target.kind === "candidate" && st.target.entry === cur) return strokeCanvas(st);
  return candidateCanvases(cur)[cur.sel];
}

function strokeCanvas(st) {
  if (st.dirty || !st.canvas) {
    const H = S.current.height, W = S.current.width;
    const rgba = st.target.kind === "object" ? [...colorFor(st.target.ann), 110] : candidateRGBA();
    st.canvas = bitsCanvas(st.bits, H, W, rgba);
    st.dirty = false;
  }
  return st.canvas;
}

function drawToolOverlay(c, dpr) {
  const { s, tx, ty } = S.view;
  const st = T.stroke;
  if (st && st.target.kind === "object") {
    c.setTransform(dpr * s, 0, 0, dpr * s, dpr * tx, dpr * ty);
    c.drawImage(strokeCanvas(st), 0, 0);
  }
  c.setTransform(dpr, 0, 0, dpr, 0, 0);
  const cur = current();
  if (cur && cur.result) drawLabelTag(c, cur);
  if (toolActive() && T.hover) {
    const [px, py] = toScreen(T.hover[0], T.hover[1]);
    c.beginPath();
    c.arc(px, py, Math.max(1, (T.size / 2) * s), 0, Math.PI * 2);
    c.lineWidth = 1.5;
    c.strokeStyle = T.tool === "brush" ? "#fff" : "#ff4136";
    c.setLineDash(T.tool === "brush" ? [] : [4, 3]);
    c.stroke();
    c.setLineDash([]);
  }
}

// -- history ---------------------------------------------------------------------------------
function record(step) {
  T.done.push(step);
  T.undone = [];
  renderHistory();
}

function historyReset() {
  T.done = [];
  T.undone = [];
  renderHistory();
}

function renderHistory() {
  const last = T.done[T.done.length - 1], next = T.undone[T.undone.length - 1];
  $("#undo").disabled = !last;
  $("#redo").disabled = !next;
  $("#undo").title = last ? `undo ${last.kind} (Ctrl+Z)` : "nothing to undo";
  $("#redo").title = next ? `redo ${next.kind} (Ctrl+Y)` : "nothing to redo";
}

function historyUndo() { return historyStep(T.done, T.undone, "undo"); }
function historyRedo() { return historyStep(T.undone, T.done, "redo"); }

// Steps run one at a time; a step the server refuses stays where it was (try again).
function historyStep(from, to, way) {
  T.chain = T.chain.then(async () => {
    await S.chain;
    const step = from.pop();
    if (!step) { toast(way === "undo" ? "nothing to undo" : "nothing to redo"); return; }
    try {
      await STEPS[step.kind][way](step);
      to.push(step);
      if (S.current && !S.video) {
        api("POST", `/api/images/${S.current.id}/events`, { kind: way, data: { action: step.kind } })
          .catch(() => {});
      }
      setStatus(`${way === "undo" ? "undone" : "redone"}: ${step.kind}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        toast(`${way} of ${step.kind} skipped: the object is gone (${e.message})`, true);
      } else {
        from.push(step);
        fail(e);
      }
    } finally {
      renderHistory();
    }
  });
  return T.chain;
}

// Undo of a delete (and redo of an accept): the object back, under its id (the server says
// if it had to take another one: the history then uses the new id). Saved with retries
// (network.js save()); a 409 whose object is there (restored by an earlier attempt whose
// answer was lost, or by another tab) is the restore done.
async function restoreObject(step, id) {
  let a;
  try {
    a = await save("POST", `/api/annotations/${id}/restore`, undefined, "the restore");
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 409)) throw e;
    try { a = await api("GET", `/api/annotations/${id}`); } catch (e2) { throw e; }
  }
  if (a.id !== id) {
    for (const s of [...T.done, ...T.undone, step]) {
      if (s.id === id) s.id = a.id;
      for (const it of s.items || []) if (it.id === id) it.id = a.id;
    }
    toast(`object ${id} restored as ${a.id}`);
  }
  return a;
}

async function patchObject(id, body) {
  return save("PATCH", `/api/annotations/${id}`, body, "the change");
}

// Undo of an accept, redo of a delete: saved with retries; a 404 (deleted already: an earlier
// attempt whose answer was lost, or another tab) is the delete done.
async function deleteQuietly(id) {
  try {
    await save("DELETE", `/api/annotations/${id}`, undefined, "the delete");
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
  }
}

function restorePrompt(step) {
  S.hist = step.hist;
  S.pos = step.pos;
  S.fixing = step.fixing;
  renderCandidates();
  rebuildLayers();
}

function clearPrompt() {
  if (S.pos === 0 && S.fixing === null) { resetPrompt(); return; }
  record({ kind: "clear", hist: S.hist, pos: S.pos, fixing: S.fixing });
  resetPrompt();
  setStatus("cleared (Ctrl+Z brings the clicks back)");
}

const STEPS = {
  prompt: {
    undo: async (s) => {
      undo();
      if (S.pos === 0 && s.fixing != null) { S.fixing = null; rebuildLayers(); } // the fix's box
    },
    redo: async (s) => {
      if (s.fixing != null && S.fixing !== s.fixing) { S.fixing = s.fixing; rebuildLayers(); }
      redo();
    },
  },
  clear: {
    undo: async (s) => restorePrompt(s),
    redo: async () => resetPrompt(),
  },
  stroke: {
    undo: async (s) => {
      if (s.target === "object") { await patchObject(s.id, { segmentation: s.before }); await loadObjects(); return; }
      s.entry.result.masks[s.sel] = s.before;
      s.entry.canvases = null;
      if (s.created) undo(); else { renderCandidates(); redraw(); }
    },
    redo: async (s) => {
      if (s.target === "object") { await patchObject(s.id, { segmentation: s.after }); await loadObjects(); return; }
      s.entry.result.masks[s.sel] = s.after;
      s.entry.canvases = null;
      if (s.created) redo(); else { renderCandidates(); redraw(); }
    },
  },
  accept: { // a new object (or the fix of a pending one)
    undo: async (s) => {
      await deleteQuietly(s.id);
      if (s.replaces != null) await patchObject(s.replaces, { status: "pending" });
      restorePrompt(s);
      await loadObjects();
    },
    redo: async (s) => {
      if (s.replaces != null) await patchObject(s.replaces, { status: "rejected" });
      await restoreObject(s, s.id);
      S.hist = []; S.pos = 0; S.fixing = null;
      renderCandidates();
      await loadObjects();
    },
  },
  delete: {
    undo: async (s) => { await restoreObject(s, s.id); await loadObjects(); },
    redo: async (s) => { await deleteQuietly(s.id); await loadObjects(); },
  },
  category: {
    undo: async (s) => { await patchObject(s.id, { category: s.before }); await loadObjects(); },
    redo: async (s) => { await patchObject(s.id, { category: s.after }); await loadObjects(); },
  },
  decide: { // a pending object accepted or rejected
    undo: async (s) => { await patchObject(s.id, { status: "pending", category: s.before }); await loadObjects(); },
    redo: async (s) => { await patchObject(s.id, { status: s.status, category: s.after }); await loadObjects(); },
  },
  acceptAll: { // one step for all of them
    undo: async (s) => {
      for (const it of s.items) await patchObject(it.id, { status: "pending", category: it.before });
      await loadObjects();
    },
    redo: async (s) => {
      for (const it of s.items) await patchObject(it.id, { status: "accepted", category: it.after });
      await loadObjects();
    },
  },
};

// -- wiring ----------------------------------------------------------------------------------
window.addEventListener("mousemove", (ev) => { if (T.stroke || toolActive()) toolMove(ev); });
window.addEventListener("mouseup", () => { if (T.stroke) toolUp(); });
$("#canvas").addEventListener("mouseleave", () => { T.hover = null; if (toolActive()) redraw(); });
for (const t of ["prompt", "brush", "eraser"]) {
  $(`#tool-${t}`).addEventListener("click", () => { setTool(t === "prompt" ? T.tool : t); $("#canvas").focus(); });
}
$("#brush-size").addEventListener("input", (ev) => setBrushSize(Number(ev.target.value)));
showBrushSize();
renderHistory();
