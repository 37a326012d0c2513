// The stats page: tables from /api/stats.
"use strict";

function cell(tr, text, tag) {
  const td = document.createElement(tag || "td");
  td.textContent = text == null ? "\u2013" : String(text);
  tr.appendChild(td);
}

function table(id, head, rows) {
  const t = document.getElementById(id);
  t.innerHTML = "";
  const tr = document.createElement("tr");
  head.forEach((h) => cell(tr, h, "th"));
  t.appendChild(tr);
  for (const r of rows) {
    const row = document.createElement("tr");
    r.forEach((v) => cell(row, v));
    t.appendChild(row);
  }
  if (!rows.length) {
    const row = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = head.length;
    td.textContent = "no accepted masks yet";
    row.appendChild(td);
    t.appendChild(row);
  }
}

const HEAD = ["annotator", "stage", "masks", "images", "masks / image", "s / mask (mean)",
  "s / mask (median)", "clicks / mask", "manual", "pre-filled"];
const line = (r) => [r.annotator, r.stage, r.masks, r.images, r.masks_per_image, r.seconds_per_mask,
  r.median_seconds, r.clicks_per_mask, r.manual, r.prefill];

(async function () {
  const token = localStorage.getItem("segany-token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  try {
    const r = await fetch("/api/stats", { headers });
    if (!r.ok) throw new Error((await r.json()).detail || r.statusText);
    const s = await r.json();
    document.getElementById("summary").textContent =
      `${s.images_annotated} of ${s.images_total} images annotated, ${s.images_done} marked done; ` +
      `${s.clicks_total} prompts, ${s.undo_total} undos; ${s.imported} imported objects.`;
    table("stages", HEAD, s.stages.map(line));
    table("rows", HEAD, s.rows.map(line));
    const p = s.prefill;
    table("prefill", ["proposed", "accepted", "fixed", "rejected", "pending", "deleted",
      "acceptance rate"],
      p.proposed ? [[p.proposed, p.accepted, p.fixed, p.rejected, p.pending, p.deleted,
        p.acceptance_rate]] : []);
    table("cats", ["category", "accepted masks"], Object.entries(s.categories));
    const v = s.videos;
    document.getElementById("video-summary").textContent =
      `${v.videos_annotated} of ${v.videos_total} videos with accepted objects; objects proposed ` +
      `${v.proposed}, accepted ${v.accepted}, pending ${v.pending}, deleted ${v.deleted}.`;
    const vline = (r) => [r.annotator, r.objects, r.accepted, r.videos, r.seconds_per_object,
      r.median_seconds, r.clicks_per_object, r.key_frames_per_object];
    table("video-rows", ["annotator", "objects", "accepted", "videos", "s / object (mean)",
      "s / object (median)", "clicks / object", "key frames / object"],
      v.proposed ? v.rows.map(vline).concat([vline(v.all)]) : []);
  } catch (e) {
    document.getElementById("error").textContent = "cannot load the stats: " + e.message;
  }
})();
