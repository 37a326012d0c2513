// segany annotate: videos. A video's frames are shown one at a time (the frame slider, the
// arrow keys); clicks on a frame use the image click path (prompts.js) on that frame; Enter
// makes the chosen candidate a new object's mask on the frame, or the selected object's (a
// key frame: a correction); T propagates the selected object through the video in a
// background job (progress, Shift+X cancels); A accepts its track; Shift+C gives it the label
// of the label box. Masks of every object are drawn on each frame. Opening a video takes its
// lease (read-only while another page holds it) and every write goes through save().
"use strict";

const V = {
  videos: [],
  tracks: [],
  loading: 0, // the frame being loaded (a newer request wins)
  shown: null, // the frame whose image and masks are on the canvas
  job: null,
  newObject: false,
};

// -- the list --------------------------------------------------------------------------------
async function loadVideos() {
  V.videos = (await api("GET", "/api/videos")).videos;
  renderVideoList();
}

function renderVideoList() {
  const ul = $("#videos");
  ul.innerHTML = "";
  for (const v of V.videos) {
    const li = document.createElement("li");
    li.dataset.id = v.id;
    if (S.video && v.id === S.video.id) li.classList.add("active");
    if (v.status !== "ok") li.classList.add("bad");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = v.path;
    li.appendChild(name);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = v.status !== "ok" ? v.status
      : `${v.length}f` + (v.tracks ? ` ${v.accepted}/${v.tracks}` : "");
    if (v.locked_by && v.status === "ok") badge.textContent += " \u2298"; // as images locked by another page
    li.title = v.status !== "ok" ? v.error || "" : `${v.width}\u00d7${v.height}, ${v.length} frames, ` +
      `${v.tracks} objects (${v.accepted} accepted)` + (v.locked_by ? `, locked by ${v.locked_by}` : "");
    li.appendChild(badge);
    li.addEventListener("click", () => openVideo(v.id, 0).catch(fail));
    ul.appendChild(li);
  }
}

// -- open, leave -----------------------------------------------------------------------------
async function openVideo(id, frame) {
  const seq = ++S.navSeq; // the last image or video asked for wins (app.js openImage)
  S.navTarget = `video:${id}`;
  const v = await api("GET", `/api/videos/${id}`);
  if (seq !== S.navSeq) return;
  if (v.status !== "ok") { toast(`${v.path} cannot be annotated: ${v.error}`, true); return; }
  const info = await api("POST", `/api/videos/${id}/open`); // the lease, the object timer
  if (seq !== S.navSeq) { // another image or video was opened meanwhile: let this one go
    if (S.navTarget !== `video:${id}` && info.lock && info.lock.held) {
      api("DELETE", `/api/videos/${id}/lease`).catch(() => {});
    }
    return;
  }
  if (!(S.video && S.video.id === id)) releaseLease(); // the image's or other video's (network.js)
  resetPrompt();
  historyReset();
  S.selected = null;
  S.objects = [];
  S.objCanvas.clear();
  S.layer = S.pendingLayer = null;
  S.img = null;
  S.video = v;
  V.shown = null;
  S.current = { id: null, video: v.id, path: v.path, width: v.width, height: v.height, status: "ok" };
  V.newObject = false;
  document.body.classList.add("video-mode");
  $("#videobar").classList.remove("hidden");
  $("#frame-slider").max = String(v.length - 1);
  $("#image-name").textContent = `${v.path} (${v.width}\u00d7${v.height}, ${v.length} frames)`;
  onVideoOpened(info); // the lease: read-only while another page holds it (network.js)
  renderImageList();
  renderVideoList();
  await loadTracks();
  await showFrame(frame || 0, true);
}

// Back to images (openImage calls this first): let go of the video's lease (network.js).
function leaveVideo() {
  if (!S.video) return;
  releaseLease();
  S.video = null; // the open video (GET /api/videos/{id}) with its .frame
  V.tracks = [];
  S.objCanvas.clear();
  document.body.classList.remove("video-mode");
  $("#videobar").classList.add("hidden");
  renderVideoList();
}

// -- frames ----------------------------------------------------------------------------------
async function showFrame(k, fitView) {
  const v = S.video;
  if (!v) return;
  k = Math.max(0, Math.min(v.length - 1, Math.round(k)));
  const changed = v.frame !== k;
  v.frame = k;
  S.current.id = `/api/videos/${v.id}/frames/${k}`; // where clicks go (prompts.js promptBase)
  if (changed || fitView) { resetPrompt(); historyReset(); }
  $("#frame-slider").value = String(k);
  renderFrameLabel();
  history.replaceState(null, "", `#video=${v.id}&frame=${k}`);
  const token = ++V.loading;
  const [blob, masks] = await Promise.all([
    api("GET", `/api/videos/${v.id}/frames/${k}`),
    api("GET", `/api/videos/${v.id}/frames/${k}/masks`),
  ]);
  const img = new Image();
  img.decoding = "async";
  const url = URL.createObjectURL(blob);
  try {
    await new Promise((res, rej) => { img.onload = res; img.onerror = () => rej(new Error("the browser cannot show this frame")); img.src = url; });
  } finally { URL.revokeObjectURL(url); } // (scrubbing makes many)
  if (token !== V.loading || S.video !== v) return; // scrubbed on meanwhile
  S.img = img;
  frameMasks(masks);
  V.shown = k;
  if (fitView) fit();
  redraw();
  const t = selectedTrack();
  setStatus(`frame ${k}: ` + (t ? `object ${t.object_id} (${t.category}) selected: click to correct it here, Enter sets it`
    : "click on an object, Enter makes it a video object"));
}

// The tracks' masks of the shown frame, drawn as objects (canvas.js draw()).
function frameMasks(res) {
  S.objects = res.masks.map((m) => ({
    id: m.track_id, category: m.category, status: "accepted", segmentation: m.segmentation,
    bbox: m.bbox, area: m.area, key: m.key, object_id: m.object_id,
  })).filter((a) => a.area > 0);
  rebuildLayers();
}

async function reloadFrame() {
  const v = S.video;
  if (!v) return;
  const k = v.frame, token = V.loading;
  const res = await api("GET", `/api/videos/${v.id}/frames/${k}/masks`);
  // another frame shown (or being loaded) meanwhile: these masks are not its masks
  if (S.video !== v || v.frame !== k || token !== V.loading) return;
  frameMasks(res);
  renderFrameLabel();
}

function renderFrameLabel() {
  const v = S.video;
  if (!v) return;
  const t = selectedTrack();
  const key = t && t.key_frames.includes(v.frame) ? " \u2022 key frame" : "";
  $("#frame-label").textContent = `frame ${v.frame + 1} / ${v.length} (${v.names[v.frame] || ""})${key}`;
}

function stepFrame(delta) {
  if (S.video) showFrame(S.video.frame + delta).catch(fail);
}

// K / Shift+K: the selected object's next / previous key frame.
function jumpKey(dir) {
  const t = selectedTrack();
  if (!t || !t.key_frames.length) { toast("select an object with key frames first"); return; }
  const f = S.video.frame;
  const ks = dir > 0 ? t.key_frames.filter((k) => k > f) : t.key_frames.filter((k) => k < f).reverse();
  showFrame(ks.length ? ks[0] : (dir > 0 ? t.key_frames[0] : t.key_frames[t.key_frames.length - 1])).catch(fail);
}

// -- tracks ----------------------------------------------------------------------------------
function selectedTrack() { return V.tracks.find((t) => t.id === S.selected) || null; }

async function loadTracks() {
  if (!S.video) return;
  V.tracks = await api("GET", `/api/videos/${S.video.id}/tracks`);
  renderTracks();
}

function renderTracks() {
  const ul = $("#tracks");
  ul.innerHTML = "";
  const acc = V.tracks.filter((t) => t.status === "accepted").length;
  $("#track-count").textContent = `${V.tracks.length} (${acc} accepted)`;
  for (const t of V.tracks) {
    const li = document.createElement("li");
    li.dataset.id = t.id;
    li.className = t.status + (t.id === S.selected ? " selected" : "");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${colorFor(t).join(",")})`;
    li.appendChild(sw);
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = `#${t.object_id} ${t.category}`;
    li.appendChild(what);
    const info = document.createElement("span");
    info.className = "muted small";
    info.textContent = `${t.frames}/${S.video.length}f \u00b7 keys ${t.key_frames.join(",")}` +
      (t.status === "accepted" ? " \u2713" : "");
    li.appendChild(info);
    const btns = document.createElement("span");
    btns.className = "btns";
    if (t.status !== "accepted") btns.appendChild(button("\u2713", "accept the track (A)", () => acceptTrack(t.id)));
    btns.appendChild(button("\u270e", "give it the label of the label box (Shift+C)", () => { selectTrack(t.id); relabelTrack(); }));
    btns.appendChild(button("\u00d7", "delete the object and its masks", () => deleteTrack(t.id), "del"));
    li.appendChild(btns);
    li.addEventListener("click", (ev) => { if (ev.target.tagName !== "BUTTON") selectTrack(t.id); });
    ul.appendChild(li);
  }
  renderFrameLabel();
}

function selectTrack(id) {
  S.selected = id;
  V.newObject = false;
  renderTracks();
  redraw();
  const t = selectedTrack();
  if (t) setStatus(`object ${t.object_id} (${t.category}): click to correct it on this frame, Enter sets it, T propagates`);
}

function selectNextTrack() {
  if (!V.tracks.length) return;
  const i = V.tracks.findIndex((t) => t.id === S.selected);
  selectTrack(V.tracks[(i + 1) % V.tracks.length].id);
}

function newObject() {
  S.selected = null;
  V.newObject = true;
  renderTracks();
  redraw();
  setStatus("new object: click on it, Enter makes it a video object");
}

// Enter in a video (prompts.js acceptNow): the chosen candidate becomes the selected object's
// mask on this frame (a key frame), or a new object's.
// Every write on the video's objects goes through save() (network.js): one Idempotency-Key
// per write, kept while the server is away and sent once when it is back.
async function acceptVideoMask(cur) {
  const v = S.video, k = v.frame;
  const m = cur.result.masks[cur.sel];
  const t = V.newObject ? null : selectedTrack();
  const body = { segmentation: m.segmentation, score: m.score };
  let out;
  if (t) {
    out = await save("PUT", `/api/tracks/${t.id}/frames/${k}`, body, `the key frame ${k}`);
  } else {
    out = await save("POST", `/api/videos/${v.id}/tracks`, { ...body, frame: k, category: acceptLabel() },
      "the new object");
  }
  if (!t) labelAccepted(out.category).catch(() => {}); // a new name joins the label set (labels.js)
  if (S.video !== v) return; // left the video while the save waited for the server
  V.newObject = false;
  S.selected = out.id;
  if (v.frame === k && current() === cur) { resetPrompt(); historyReset(); }
  await loadTracks();
  await reloadFrame();
  setStatus(`object ${out.object_id} (${out.category}): key frame ${k} set; T propagates from here`);
  loadVideos().catch(() => {});
}

// A write on one object, then the lists of now; the reason shown when the server refuses it.
async function trackWrite(method, id, body, what) {
  const v = S.video;
  const out = await save(method, `/api/tracks/${id}`, body, what);
  if (S.video === v) { await loadTracks(); await reloadFrame(); }
  loadVideos().catch(() => {});
  return out;
}

async function acceptTrack(id) {
  const t = V.tracks.find((x) => x.id === (id != null ? id : S.selected));
  if (!t) { toast("select an object first (Tab)"); return; }
  try {
    await trackWrite("PATCH", t.id, { status: "accepted" }, "the accept");
    setStatus(`object ${t.object_id} (${t.category}): track accepted (${t.frames} frames)`);
  } catch (e) { fail(e); }
}

// Shift+C: the selected object takes the label of the label box.
async function relabelTrack() {
  const t = selectedTrack();
  if (!t) { toast("select an object first (Tab)"); return; }
  const category = acceptLabel();
  try {
    const out = await trackWrite("PATCH", t.id, { category }, "the label");
    labelAccepted(out.category).catch(() => {});
    setStatus(`object ${t.object_id} is now ${out.category}`);
  } catch (e) { fail(e); }
}

async function deleteTrack(id) {
  const t = V.tracks.find((x) => x.id === id);
  if (!t || !window.confirm(`Delete object ${t.object_id} (${t.category}) and its masks on every frame?`)) return;
  try {
    if (S.selected === id) S.selected = null;
    await trackWrite("DELETE", id, undefined, "the delete");
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) { await loadTracks(); return; } // gone: done
    fail(e);
  }
}

// -- propagation (a background job: video_jobs.py) -------------------------------------------
async function propagate() {
  const t = selectedTrack();
  if (!S.video || !t) { toast("select an object (Tab), or make one: click, Enter"); return; }
  if (V.job) { toast("a propagation is running"); return; }
  const start = t.key_frames.includes(S.video.frame) ? S.video.frame : t.key_frames[0];
  const what = `object ${t.object_id} from frame ${start}`;
  $("#propagate").disabled = true;
  $("#propagate-cancel").classList.remove("hidden");
  try {
    let job = await save("POST", `/api/tracks/${t.id}/propagate`, { start }, "the propagation");
    V.job = job;
    while (job.state === "running" || job.state === "saving") {
      const pct = job.frames_planned ? Math.round((100 * job.frames_done) / job.frames_planned) : 0;
      const text = `propagating ${what}: ` + (job.state === "saving" ? "saving\u2026"
        : `${job.frames_done} / ${job.frames_planned} frames (${pct}%)`) + " \u2014 Shift+X or Cancel stops it";
      $("#propagate-status").textContent = text;
      setStatus(text);
      await sleep(250);
      try { job = await api("GET", `/api/propagation-jobs/${job.id}`); }
      catch (e) { if (isNetworkError(e)) await whenOnline(); else throw e; }
      V.job = job;
    }
    let text;
    if (job.state === "cancelled") text = `propagation of ${what} cancelled: nothing was saved`;
    else if (job.state === "failed") { text = `propagation failed: ${job.error}`; toast(text, true); }
    else text = `propagated ${what}: ${job.frames_saved} frames saved in ${job.seconds.toFixed(1)} s; ` +
      "scrub to check, click + Enter corrects a frame, A accepts";
    $("#propagate-status").textContent = text;
    setStatus(text);
    await loadTracks();
    await reloadFrame();
  } catch (e) { fail(e); }
  finally {
    V.job = null;
    $("#propagate").disabled = false;
    $("#propagate-cancel").classList.add("hidden");
  }
}

async function cancelPropagation() {
  if (!V.job) { toast("no propagation is running"); return; }
  try {
    const r = await api("POST", `/api/propagation-jobs/${V.job.id}/cancel`);
    if (r.state === "running") setStatus("cancelling the propagation\u2026");
    else toast("too late to cancel: the propagation was already saving");
  } catch (e) { fail(e); }
}

// -- keys and buttons ------------------------------------------------------------------------
// The video's keys (canvas.js calls this first in video mode); true when the key was used.
function videoKey(ev) {
  const k = ev.key;
  const n = ev.shiftKey ? 10 : 1;
  if (k === "ArrowRight" || k === "." || k === ">") { stepFrame(n); return true; }
  if (k === "ArrowLeft" || k === "," || k === "<") { stepFrame(-n); return true; }
  if (k === "n") { stepFrame(1); return true; }
  if (k === "p") { stepFrame(-1); return true; }
  if (k === "Home") { showFrame(0).catch(fail); return true; }
  if (k === "End") { showFrame(S.video.length - 1).catch(fail); return true; }
  if (k === "t" || k === "T") { propagate(); return true; }
  if (k === "X") { cancelPropagation(); return true; }
  if (k === "a" || k === "A") { acceptTrack(); return true; }
  if (k === "o") { newObject(); return true; }
  if (k === "C") { relabelTrack(); return true; }
  if (k === "k" || k === "K") { jumpKey(ev.shiftKey ? -1 : 1); return true; }
  if (k === "Tab") { ev.preventDefault(); selectNextTrack(); return true; }
  if (k === "Delete" || k === "Backspace") { if (S.selected !== null) deleteTrack(S.selected); return true; }
  return ["g", "e", "r"].includes(k); // image-only actions do nothing here
}

$("#frame-slider").addEventListener("input", (ev) => showFrame(Number(ev.target.value)).catch(fail));
$("#frame-prev").addEventListener("click", () => stepFrame(-1));
$("#frame-next").addEventListener("click", () => stepFrame(1));
$("#propagate").addEventListener("click", () => propagate());
$("#propagate-cancel").addEventListener("click", () => cancelPropagation());
$("#accept-track").addEventListener("click", () => acceptTrack());
$("#new-track").addEventListener("click", () => newObject());
$("#add-video").addEventListener("click", async () => {
  const path = $("#video-path").value.trim();
  if (!path) { toast("type the path of a folder of frames inside the images folder"); return; }
  try {
    const v = await api("POST", "/api/videos", { path });
    $("#video-path").value = "";
    toast(`${v.path}: ${v.length} frames`);
    await loadImages();
    await loadVideos();
  } catch (e) { fail(e); }
});
