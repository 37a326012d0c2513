// segany annotate: the project's label set (GET / POST /api/labels): fixed ids, a stable
// colour each, hotkeys Shift+1..9. The label Enter applies is always on show: in the status
// bar, and on the canvas (the candidate drawn in the label's colour, its name at the mask).
//
// The rule: a label chosen from the set (click, Shift+digit, or the label of the last
// accepted object) stays chosen, on every image, and is shown. A name typed in the label
// field applies to the objects accepted while it is there; it is never carried to another
// image: opening an image puts the chosen label back in the field.
"use strict";

const LB = { list: [], chosen: null };

// What makes two names one label (the server's category_key: case and spaces do not count).
function labelKey(name) { return String(name).trim().split(/\s+/).join(" ").toLowerCase(); }

function labelByName(name) {
  const k = labelKey(name);
  return LB.list.find((l) => labelKey(l.name) === k) || null;
}

function hexRGB(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }

// The colour [r, g, b] of a label name (null: not in the set).
function labelRGB(name) {
  const l = labelByName(name);
  return l ? hexRGB(l.color) : null;
}

async function loadLabels() {
  LB.list = await api("GET", "/api/labels");
  if (LB.chosen === null) {
    const saved = localStorage.getItem("segany-label");
    const l = saved ? labelByName(saved) : null;
    LB.chosen = l ? l.name : null;
    $("#category").value = LB.chosen || "object";
  }
  renderLabels();
}

function renderLabels() {
  const box = $("#labels");
  box.innerHTML = "";
  if (!LB.list.length) {
    box.innerHTML = '<span class="muted small">no labels yet: type a name, Enter accepts with it</span>';
  }
  const typed = labelKey($("#category").value || "object");
  for (const l of LB.list) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "label-chip" + (labelKey(l.name) === typed ? " chosen" : "");
    b.dataset.id = l.id;
    b.title = `label ${l.id}` + (l.hotkey ? ` (${l.hotkey})` : "");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = l.color;
    b.appendChild(sw);
    b.appendChild(document.createTextNode(l.name));
    if (l.hotkey) {
      const k = document.createElement("kbd");
      k.textContent = "\u21e7" + l.hotkey.slice(-1);
      b.appendChild(k);
    }
    b.addEventListener("click", () => { chooseLabel(l.name); $("#canvas").focus(); });
    box.appendChild(b);
  }
  showLabel();
}

// Choose a label of the set (or a new name): it is what Enter applies from now on.
function chooseLabel(name) {
  const l = labelByName(name);
  LB.chosen = l ? l.name : name;
  localStorage.setItem("segany-label", LB.chosen);
  $("#category").value = LB.chosen;
  renderLabels();
  if (current()) renderCandidates(); // the thumbnails in the label's colour too
}

// Shift+1..9: the k-th label of the set.
function chooseLabelIndex(k) {
  const l = LB.list[k];
  if (!l) { toast(`no label ${k + 1}: the set has ${LB.list.length}`); return; }
  chooseLabel(l.name);
  setStatus(`label: ${l.name}`);
}

// After an accept as `name` (the server's spelling): the label is in the set now; chosen.
async function labelAccepted(name) {
  if (!labelByName(name)) {
    try { LB.list = await api("GET", "/api/labels"); } catch (e) { /* shown as new */ }
  }
  chooseLabel(name);
}

// Add the typed name to the set without accepting anything.
async function addTypedLabel() {
  const name = $("#category").value.trim();
  if (!name) { toast("type a label name first"); return; }
  try {
    const l = await save("POST", "/api/labels", { name }, "the label"); // retried: adding is idempotent
    LB.list = await api("GET", "/api/labels");
    chooseLabel(l.name);
    toast(`label ${l.id}: ${l.name}` + (l.hotkey ? ` (${l.hotkey})` : ""));
  } catch (e) { fail(e); }
}

// Opening an image: a typed name that is not the chosen label is dropped (no silent carry-over).
function labelsOnImageChange() {
  const want = LB.chosen || "object";
  if ($("#category").value !== want) $("#category").value = want;
  renderLabels();
}

// The status bar's label and the canvas follow the field.
function showLabel() {
  const name = acceptLabel();
  const l = labelByName(name);
  const el = $("#label-now");
  el.innerHTML = "";
  const sw = document.createElement("span");
  sw.className = "swatch";
  sw.style.background = l ? l.color : `rgb(${CANDIDATE_RGBA.slice(0, 3).join(",")})`;
  el.appendChild(sw);
  el.appendChild(document.createTextNode(`label: ${l ? l.name : name}` +
    (l ? (l.hotkey ? ` (${l.hotkey})` : "") : labelKey(name) === "object" ? " (default)" : " (new)")));
  redraw();
}

// The candidate's colour: the label Enter applies (a name not in the set: the default blue).
function candidateRGBA() {
  const rgb = labelRGB(acceptLabel());
  return rgb ? [...rgb, 120] : CANDIDATE_RGBA;
}

// A prompt entry's candidate canvases, in the colour of the label (re-made when it changes).
function candidateCanvases(entry) {
  const rgba = candidateRGBA();
  const key = rgba.join(",");
  if (!entry.canvases || entry.canvasKey !== key) {
    const H = S.current.height, W = S.current.width;
    entry.canvases = entry.result.masks.map((m) => (m.bits ? bitsCanvas(m.bits, H, W, rgba)
      : maskCanvas(m.segmentation, rgba)));
    entry.canvasKey = key;
  }
  return entry.canvases;
}

// The label's name at the candidate's box, in its colour (screen coordinates).
function drawLabelTag(c, cur) {
  const m = cur.result.masks[cur.sel];
  if (!m || !m.area) return;
  const name = acceptLabel();
  const rgb = labelRGB(name) || CANDIDATE_RGBA.slice(0, 3);
  const [x, y] = toScreen(m.bbox[0], m.bbox[1]);
  c.font = "bold 13px system-ui, sans-serif";
  const w = c.measureText(name).width + 10;
  const ty = Math.max(0, y - 20);
  c.fillStyle = `rgb(${rgb.join(",")})`;
  c.fillRect(x, ty, w, 18);
  const light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150;
  c.fillStyle = light ? "#000" : "#fff";
  c.fillText(name, x + 5, ty + 13);
}

$("#category").addEventListener("input", () => renderLabels());
$("#add-label").addEventListener("click", () => addTypedLabel());
