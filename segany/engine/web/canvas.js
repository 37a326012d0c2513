// segany annotate: the canvas, mouse, keyboard, buttons and start-up.
"use strict";

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
    if (a && a.id !== S.fixing && a.id !== S.editing) {
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
  if (cur && cur.result) {
    ctx.drawImage(candidateLayer(cur), 0, 0); // in the label's colour, as a stroke paints it
    if (cur.paint) painted(cur);
  }
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
  drawToolOverlay(ctx, dpr); // a stroke on an object, the label tag, the brush (tools.js)
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
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
  S.downAt = performance.now(); // the latency shown runs from here to the painted mask
  canvas.focus();
  if (!S.img) return;
  const [sx, sy] = eventPos(ev);
  if (ev.button === 1 || (ev.button === 0 && (S.space || ev.altKey))) {
    S.pan = { sx, sy, tx: S.view.tx, ty: S.view.ty };
    ev.preventDefault();
    return;
  }
  if (toolActive()) { toolDown(ev, sx, sy); ev.preventDefault(); return; } // brush, eraser
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
    S.downAt = performance.now(); // a box is prompted when the drag ends
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
    ev.preventDefault(); if (ev.shiftKey) historyRedo(); else historyUndo(); return;
  }
  if ((ev.ctrlKey || ev.metaKey) && (k === "y" || k === "Y")) { ev.preventDefault(); historyRedo(); return; }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (S.video && videoKey(ev)) return; // frames, propagation, tracks (video.js)
  if (ev.shiftKey && /^Digit[1-9]$/.test(ev.code)) { chooseLabelIndex(Number(ev.code.slice(5)) - 1); return; }
  if (k === "1" || k === "2" || k === "3") { selectCandidate(Number(k) - 1); return; }
  if (k === " ") { S.space = true; ev.preventDefault(); return; }
  if (k === "Escape") { if (T.tool !== "prompt") setTool(T.tool); else clearPrompt(); return; }
  if (k === "b") { setTool("brush"); return; }
  if (k === "x") { setTool("eraser"); return; }
  if (k === "X") { cancelPrefill(); return; } // Shift+X: x is the eraser
  if (k === "[" || k === "]") { setBrushSize(k === "]" ? Math.max(T.size + 1, T.size * 1.25) : T.size / 1.25); return; }
  if (k === "n" || k === "ArrowRight") { go(1); return; }
  if (k === "p" || k === "ArrowLeft") { go(-1); return; }
  if (k === "Delete" || k === "Backspace") { if (S.selected !== null) deleteObject(S.selected); return; }
  if (k === "Tab") { ev.preventDefault(); selectNext(); return; }
  if (k === "A") { acceptAllPending(); return; }
  if (k === "a") { if (S.selected !== null) decidePending(S.selected, "accepted"); return; }
  if (k === "r") { if (S.selected !== null) decidePending(S.selected, "rejected"); return; }
  if (k === "e") { if (S.selected !== null) fixPending(S.selected); return; }
  if (k === "g") { prefill(); return; }
  if (k === "u") { historyUndo(); return; }
  if (k === "c") { ev.preventDefault(); $("#category").focus(); $("#category").select(); return; }
  if (k === "f") { fit(); return; }
});
window.addEventListener("keyup", (ev) => { if (ev.key === " ") S.space = false; });
window.addEventListener("resize", () => { resize(); if (S.img) fit(); });

// -- buttons ---------------------------------------------------------------------------------
$("#accept").addEventListener("click", () => accept());
$("#undo").addEventListener("click", () => historyUndo());
$("#redo").addEventListener("click", () => historyRedo());
$("#clear").addEventListener("click", () => clearPrompt());
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
      link.download = kind === "coco" ? "annotations_coco.json"
        : kind === "video" ? "videos_coco.json" : kind === "davis" ? "videos_davis.zip" : `annotations_${kind}.zip`;
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
  // the browser decoder loads beside the first image; clicks go to the server until it is ready
  if (!S.decoder) {
    S.decoder = wdInit(S.config.web_decoder).then((ok) => {
      $("#decoder").textContent = ok ? `decoder: in the page (${WD.threads} thread${WD.threads > 1 ? "s" : ""})`
        : "decoder: server";
      $("#decoder").title = ok ? `onnxruntime-web ${WD.info.version}, WebAssembly SIMD` : WD.reason;
      if (ok && S.current && S.current.status === "ok") wdImage(S.current.id).catch(() => {});
      return ok;
    });
  }
  await loadLabels();
  await loadImages();
  await loadVideos();
  const vm = /video=(\d+)(?:&frame=(\d+))?/.exec(location.hash);
  if (vm && !S.navSeq && V.videos.some((v) => v.id === Number(vm[1]) && v.status === "ok")) {
    await openVideo(Number(vm[1]), Number(vm[2] || 0));
    return;
  }
  // an image or a video chosen while the lists loaded wins over the first one opened here
  if (S.navSeq) return;
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
  $("#category").value = "object"; // the chosen label comes with the label set (loadLabels)
  try {
    S.config = await api("GET", "/api/config");
    setupSliders(S.config.prefill_defaults);
    if (S.config.auth && !S.token) { showLogin(); return; }
    if (S.config.auth) $("#user-name").textContent = (await api("GET", "/api/me")).name;
    else $("#user-name").textContent = S.config.model;
    await start();
  } catch (e) { fail(e); }
})();
