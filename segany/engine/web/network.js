// segany annotate: the network and the team. The offline banner (the server polled while it
// cannot be reached), writes retried until the server answers (each with its own
// Idempotency-Key, so a retry whose first attempt was saved is not saved twice), the lease
// of the open image or video (renewed while the page stays; read-only while another page
// holds it),
// the embedding's status kept current, review (submit, approve, return) and background
// pre-fill with progress and cancel. Plain JS, no external assets.
"use strict";

const NET = {
  offline: false,
  waiters: [], // resolved when the server answers again
  poll: null,
  writes: 0, // writes waiting for the server
  lease: null, // {target: "image:ID" | "video:ID", url, held, by}
  beat: null,
  job: null, // the running pre-fill job {id, imageId}
};

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const a = new Uint8Array(16);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

// one session per tab (kept across reloads of the tab; the lease is released on leaving)
S.session = sessionStorage.getItem("segany-session") || newId();
sessionStorage.setItem("segany-session", S.session);

const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

// -- offline ---------------------------------------------------------------------------------
function isNetworkError(e) { return e instanceof TypeError; } // fetch() could not reach the server

function netDown() {
  if (NET.offline) return;
  NET.offline = true;
  renderBanner();
  NET.poll = setInterval(async () => {
    try {
      const r = await fetch("/api/health", { cache: "no-store" });
      if (r.ok || r.status === 503) netUp(); // it answers (503: its database is away)
    } catch (e) { /* still away */ }
  }, 1000);
}

function netUp() {
  if (!NET.offline) return;
  NET.offline = false;
  clearInterval(NET.poll);
  NET.poll = null;
  renderBanner();
  const w = NET.waiters;
  NET.waiters = [];
  for (const res of w) res();
  if ($("#status").textContent.startsWith("offline")) {
    setStatus(NET.writes ? "the server is back: saving\u2026" : "the server is back");
  }
  refreshLease();
}

function whenOnline() {
  return NET.offline ? new Promise((res) => NET.waiters.push(res)) : Promise.resolve();
}

function renderBanner() {
  const b = $("#offline");
  b.classList.toggle("hidden", !NET.offline);
  b.textContent = "The server cannot be reached: your work on this page is kept" +
    (NET.writes ? ` and ${NET.writes} change${NET.writes === 1 ? "" : "s"} will be saved` : "") +
    " when it is back. Checking every second\u2026";
}

// A write the page must not lose: retried (with the same key) until the server answers.
// Errors the server gives (4xx) are thrown; unreachable server and 502/503/504 wait.
async function save(method, path, body, what) {
  const key = newId();
  NET.writes += 1;
  renderBanner();
  try {
    for (;;) {
      try {
        return await api(method, path, body, { key });
      } catch (e) {
        if (isNetworkError(e)) {
          setStatus(`offline: ${what} is kept and will be saved when the server is back`);
          await whenOnline();
        } else if (e instanceof ApiError && [502, 503, 504].includes(e.status)) {
          setStatus(`the server cannot save now (${e.message}): ${what} is retried`);
          await sleep(1000);
        } else throw e;
      }
    }
  } finally {
    NET.writes -= 1;
    renderBanner();
  }
}

// -- the lease of the open image or video ----------------------------------------------------
// What this page annotates: {target: "image:ID" | "video:ID", url: its lease route}.
function leaseTarget() {
  if (S.video) return { target: `video:${S.video.id}`, url: `/api/videos/${S.video.id}/lease` };
  if (S.current && S.current.id != null) {
    return { target: `image:${S.current.id}`, url: `/api/images/${S.current.id}/lease` };
  }
  return null;
}

function onOpened(info) {
  NET.lease = info.lock ? { ...leaseTarget(), held: info.lock.held, by: info.lock.by } : null;
  NET.embedding = info.image.status === "ok" ? info.embedding : "none";
  renderLock();
  renderReview();
  startBeat();
  if (NET.embedding === "computing") waitEmbedding(info.image.id);
}

// A video was opened (video.js openVideo): its lease, renewed like an image's.
function onVideoOpened(info) {
  NET.lease = info.lock ? { ...leaseTarget(), held: info.lock.held, by: info.lock.by } : null;
  NET.embedding = "ready"; // a frame is embedded on its first click
  renderLock();
  startBeat();
}

// Let go of the lease of what the page leaves (after a renewal on its way, which would take
// it again); the next image's or video's lease is set by its open meanwhile.
async function releaseLease() {
  const l = NET.lease;
  clearInterval(NET.beat);
  NET.beat = null;
  NET.lease = null;
  renderLock();
  await NET.inflight;
  if (l && l.held) api("DELETE", l.url).catch(() => {});
}

function startBeat() {
  clearInterval(NET.beat);
  const every = Math.max(500, (1000 * ((S.config && S.config.lease_seconds) || 60)) / 3);
  NET.beat = setInterval(() => { if (NET.embedding !== "computing") refreshLease(); }, every);
}

// one renewal at a time, remembered so that letting go can wait for it (a renewal still on
// its way would take the lease again after the server released it)
function refreshLease() {
  NET.inflight = renewLease();
  return NET.inflight;
}

async function stopLease() {
  clearInterval(NET.beat);
  NET.beat = null;
  await NET.inflight;
}

async function renewLease() {
  const t = leaseTarget();
  if (!t || NET.offline || !NET.beat) return null; // stopped: this page let go
  let r;
  try { r = await api("POST", t.url); } catch (e) { return null; }
  const now = leaseTarget();
  if (!now || now.target !== t.target || !NET.beat) return null;
  const was = NET.lease;
  NET.lease = { ...t, held: r.held, by: r.by };
  if (was && !was.held && r.held) toast(`the ${S.video ? "video" : "image"} is free now: you can annotate it`);
  renderLock();
  if (r.status !== "ok") {
    NET.embedding = "none";
    setStatus(`cannot annotate: ${r.error || r.status}`);
  } else if (NET.embedding === "computing" && r.embedding === "ready") {
    NET.embedding = "ready";
    if (/^(computing|click on an object \(the embedding)/.test($("#status").textContent)) {
      setStatus("ready: click on an object (the embedding is computed)");
    }
  }
  return r;
}

async function waitEmbedding(id) {
  while (S.current && S.current.id === id && NET.embedding === "computing" && NET.beat) {
    await sleep(1000);
    await whenOnline();
    await refreshLease();
  }
}

function renderLock() {
  const bar = $("#lockbar");
  const l = NET.lease;
  const t = leaseTarget();
  const locked = l && t && l.target === t.target && !l.held;
  bar.classList.toggle("hidden", !locked);
  if (locked) {
    bar.textContent = `Locked by ${l.by}: read-only here (saves are refused) until that page ` +
      `leaves the ${S.video ? "video" : "image"} or stops answering.`;
  }
}

window.addEventListener("pagehide", () => {
  if (!NET.lease || !NET.lease.held) return;
  const headers = { "X-Segany-Session": S.session };
  if (S.token) headers["Authorization"] = "Bearer " + S.token;
  fetch(NET.lease.url, { method: "DELETE", headers, keepalive: true }).catch(() => {});
});

// -- queue and review ------------------------------------------------------------------------
async function nextInQueue() {
  if (!S.current) return;
  const q = await api("GET", `/api/queue?after=${S.current.id}`);
  if (q.next_id == null) {
    setStatus("your queue is empty: every image is done, in review, locked or assigned to someone else");
    toast("your queue is empty");
    return;
  }
  await openImage(q.next_id);
}

const REVIEW_TEXT = {
  none: "not submitted",
  submitted: "submitted for review",
  approved: "approved",
  returned: "returned to its annotator",
};

function renderReview() {
  const im = S.current;
  const box = $("#review-box");
  if (!im) { box.classList.add("hidden"); return; }
  box.classList.remove("hidden");
  const state = im.review || "none";
  $("#review-state").textContent = REVIEW_TEXT[state] +
    (im.submitted_by && state !== "none" ? ` (by ${im.submitted_by})` : "");
  const c = $("#review-comment");
  c.textContent = im.comment ? `${im.reviewer || "reviewer"}: \u201c${im.comment}\u201d` : "";
  c.classList.toggle("hidden", !im.comment);
  $("#approve").disabled = state !== "submitted";
  $("#return").disabled = !(state === "submitted" || state === "approved");
}

async function reviewAction(action) {
  if (!S.current) return;
  const body = { action };
  const comment = $("#review-text").value.trim();
  if (comment) body.comment = comment;
  if (action === "return" && !comment) {
    toast("write what to change in the comment box first", true);
    $("#review-text").focus();
    return;
  }
  await stopLease(); // the server lets go of this page's lease: the image is its annotator's
  try {
    const out = await save("POST", `/api/images/${S.current.id}/review`, body, "the review");
    S.current = { ...S.current, ...out };
    NET.lease = null;
    $("#review-text").value = "";
    renderReview();
    await loadImages();
    const done = action === "approve" ? `approved ${out.path}`
      : `returned ${out.path} to ${out.submitted_by || "its annotator"}`;
    setStatus(done);
    toast(done);
    if ($("#reviewer-mode").checked) nextForReview(done);
  } catch (e) { startBeat(); fail(e); }
}

function nextForReview(before) {
  const next = S.images.find((x) => x.review === "submitted");
  if (next) openImage(next.id).catch(fail);
  else setStatus((before ? before + "; " : "") + "nothing left to review");
}

$("#approve").addEventListener("click", () => reviewAction("approve"));
$("#return").addEventListener("click", () => reviewAction("return"));
$("#reviewer-mode").addEventListener("change", async () => {
  S.reviewer = $("#reviewer-mode").checked;
  try { await loadImages(); } catch (e) { fail(e); return; } // the states of now
  if (S.reviewer && !(S.current && S.current.review === "submitted")) nextForReview();
});

// loadImages() calls this: the open image's review and lock fields as the list has them now
function syncCurrent() {
  if (!S.current) return;
  const im = S.images.find((x) => x.id === S.current.id);
  if (!im) return;
  for (const k of ["review", "submitted_by", "reviewer", "comment", "assignee", "done"]) S.current[k] = im[k];
  renderReview();
}

// -- pre-fill in the background --------------------------------------------------------------
async function prefill() {
  if (!S.current || S.video) return;
  if (S.prefilling) { toast("a pre-fill is running on this image"); return; }
  const body = {
    pred_iou_thresh: Number($("#iou").value),
    stability_score_thresh: Number($("#stab").value),
    points_per_side: Number($("#pps").value),
  }; // segment-everything masks are class-agnostic ("object"); accepting one (A) applies the
  // category box. With classes, the text detector names each mask (its class is kept).
  const classes = $("#classes").value.trim();
  if (classes) body.classes = classes;
  const imageId = S.current.id;
  const what = classes ? `detecting ${classes}` : "segment everything";
  setStatus(`pre-filling (${what})\u2026`);
  $("#prefill").disabled = true;
  $("#prefill-cancel").classList.remove("hidden");
  S.prefilling = true;
  try {
    let job = await api("POST", `/api/images/${imageId}/prefill-jobs`, body);
    NET.job = { id: job.id, imageId };
    while (job.state === "running" || job.state === "saving") {
      if (S.current && S.current.id === imageId) {
        const pct = job.points_planned ? Math.round((100 * job.points_done) / job.points_planned) : null;
        setStatus(`pre-filling (${what}): ` + (job.state === "saving" ? "saving\u2026"
          : pct == null ? "running\u2026" : `${job.points_done} / ${job.points_planned} points (${pct}%)`) +
          " \u2014 Shift+X or Cancel stops it");
      }
      await sleep(250);
      try { job = await api("GET", `/api/prefill-jobs/${job.id}`); }
      catch (e) { if (isNetworkError(e)) await whenOnline(); else throw e; }
    }
    if (job.state === "cancelled") {
      setStatus("pre-fill cancelled: nothing was saved (earlier pending objects are kept)");
    } else if (job.state === "failed") {
      setStatus(`pre-fill failed: ${job.error}`);
      toast(`pre-fill failed: ${job.error}`, true);
    } else if (S.current && S.current.id === imageId) {
      const r = job.result;
      await loadObjects();
      const first = S.objects.find((a) => a.status === "pending");
      if (first) selectObject(first.id, false);
      setStatus(`pre-filled ${r.created} masks in ${r.seconds.toFixed(1)} s` +
        (r.skipped_overlap ? ` (${r.skipped_overlap} overlapped accepted objects)` : "") +
        ": A accepts, R rejects, E fixes, or click to add what is missing");
    }
  } catch (e) { fail(e); }
  finally {
    $("#prefill").disabled = false;
    $("#prefill-cancel").classList.add("hidden");
    S.prefilling = false;
    NET.job = null;
  }
}

async function cancelPrefill() {
  const job = NET.job;
  if (!job) { toast("no pre-fill is running"); return; }
  try {
    const r = await api("POST", `/api/prefill-jobs/${job.id}/cancel`);
    if (r.state === "running") setStatus("cancelling the pre-fill\u2026");
    else if (r.state === "saving" || r.state === "done") {
      toast("too late to cancel: the pre-fill was already saving its masks");
    }
  } catch (e) { fail(e); }
}

$("#prefill-cancel").addEventListener("click", () => cancelPrefill());
