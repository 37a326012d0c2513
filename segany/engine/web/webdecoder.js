// segany annotate: the browser decoder. SAM's prompt encoder + mask decoder run in the page
// with onnxruntime-web (WebAssembly SIMD; threads when the page is cross-origin isolated)
// on the image's embedding and decoder context sent once by the server, so a click does
// not wait for the server. The graphs are the server's ONNX export (prompt.onnx: clicks
// without a mask input, on the per-image context; decoder.onnx: refinements). The
// upsampling to the image is transforms.masks_to_image's (bilinear, align_corners=False).
// Query flags: ?decoder=server (every click on the server), ?threads=N, ?dtype=float32.
"use strict";

const WD = {
  state: "off", // off | loading | ready | failed
  reason: "",
  info: null,
  prompt: null,
  decoder: null,
  threads: 1,
  images: new Map(), // image id -> Promise of {header, tensors}; the last three kept
  taps: new Map(),
  queue: Promise.resolve(), // the graphs' runs, one after another
  warm: null, // Promise of the warm-up runs (wdWarm), started by the first image's tensors
  runs: 0, // graph runs started
};

function wdParams() { return new URLSearchParams(location.search); }

function loadScript(src) {
  return new Promise((res, rej) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = res;
    s.onerror = () => rej(new Error(`cannot load ${src}`));
    document.head.appendChild(s);
  });
}

async function fetchBuffer(path) {
  const blob = await api("GET", path);
  return blob.arrayBuffer();
}

// Start the decoder from /api/config's web_decoder; resolves to whether it is usable.
async function wdInit(info) {
  WD.info = info;
  if (wdParams().get("decoder") === "server") { WD.reason = "?decoder=server"; return false; }
  if (!info || !info.available) { WD.reason = (info && info.reason) || "not offered"; return false; }
  if (typeof WebAssembly !== "object") { WD.reason = "no WebAssembly"; return false; }
  WD.state = "loading";
  try {
    await loadScript(info.runtime + "ort.wasm.min.js");
    ort.env.wasm.wasmPaths = info.runtime;
    const want = Number(wdParams().get("threads")) || Math.min(4, navigator.hardwareConcurrency || 1);
    WD.threads = self.crossOriginIsolated ? want : 1;
    ort.env.wasm.numThreads = WD.threads;
    const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    const [p, d] = await Promise.all([fetchBuffer(info.graphs.prompt), fetchBuffer(info.graphs.decoder)]);
    WD.prompt = await ort.InferenceSession.create(p, opts);
    WD.decoder = await ort.InferenceSession.create(d, opts);
    WD.state = "ready";
    const first = WD.images.values().next().value; // tensors asked for while loading
    if (first) first.then((im) => { if (!WD.warm) WD.warm = wdWarm(im); }).catch(() => {});
    return true;
  } catch (e) {
    console.error(e);
    WD.state = "failed";
    WD.reason = `onnxruntime-web failed: ${e.message || e}`;
    return false;
  }
}

function wdReady() { return WD.state === "ready"; }

// -- the image's tensors ---------------------------------------------------------------------
let HALF = null;
function halfToFloat(u16) {
  if (!HALF) {
    HALF = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      HALF[h] = e === 0 ? s * f * 2 ** -24 : e === 31 ? (f ? NaN : s * Infinity) : s * (1024 + f) * 2 ** (e - 25);
    }
  }
  const out = new Float32Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = HALF[u16[i]];
  return out;
}

// The server's payload (segany/engine/webdecoder.py) -> header and float32 ort tensors.
function wdParse(buf) {
  const dv = new DataView(buf);
  if (String.fromCharCode(dv.getUint8(0), dv.getUint8(1), dv.getUint8(2), dv.getUint8(3)) !== "SEGE") {
    throw new Error("not an embedding payload");
  }
  const n = dv.getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, n)));
  const base = 8 + n, tensors = {};
  for (const [name, m] of Object.entries(header.tensors)) {
    const raw = buf.slice(base + m.offset, base + m.offset + m.nbytes);
    const data = header.dtype === "float16" ? halfToFloat(new Uint16Array(raw)) : new Float32Array(raw);
    tensors[name] = new ort.Tensor("float32", data, m.shape);
  }
  return { header, tensors, bytes: buf.byteLength };
}

// The image's tensors, fetched once (a click before they arrive waits for them).
function wdImage(imageId) {
  let p = WD.images.get(imageId);
  if (!p) {
    const t0 = performance.now();
    const dtype = wdParams().get("dtype"); // ?dtype=float32: the exact payload (twice the bytes)
    const query = dtype ? `?dtype=${encodeURIComponent(dtype)}` : "";
    p = fetchBuffer(`/api/images/${imageId}/embedding${query}`).then((buf) => {
      const im = wdParse(buf);
      im.loadMs = performance.now() - t0;
      if (!WD.warm && wdReady()) WD.warm = wdWarm(im);
      return im;
    });
    p.catch(() => WD.images.delete(imageId));
    WD.images.set(imageId, p);
    while (WD.images.size > 3) WD.images.delete(WD.images.keys().next().value);
  }
  return p;
}

// -- decoding --------------------------------------------------------------------------------
// One run of a graph, after the runs asked before it.
function wdRun(session, feeds) {
  const run = WD.queue.then(() => { WD.runs++; return session.run(feeds); });
  WD.queue = run.catch(() => {});
  return run;
}

// The first runs of the graphs are slow, and keep the CPU busy afterwards: V8 compiles the
// runtime's hot WebAssembly functions again, optimised, in the background (measured with
// benchmarks/bench_webdecoder.py: ~90 ms of compile CPU per click over the first clicks).
// Two runs of each graph on the first image's tensors, when they arrive, start that
// before the annotator's first click. Failures are left to the clicks to report.
async function wdWarm(im) {
  const [mh, mw] = im.header.mask_input_size, [h, w] = im.header.input_size;
  const points = {
    point_coords: new ort.Tensor("float32", Float32Array.from([w / 2, h / 2, 0, 0]), [1, 2, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from([1, -1]), [1, 2]),
  };
  const prompt = { ...points };
  for (const k of ["keys", "k", "v", "q"]) prompt[k] = im.tensors[k];
  const refine = {
    ...points,
    image_embeddings: im.tensors.image_embeddings,
    mask_input: new ort.Tensor("float32", new Float32Array(mh * mw), [1, 1, mh, mw]),
    has_mask_input: new ort.Tensor("float32", Float32Array.from([1]), [1]),
  };
  try {
    for (let i = 0; i < 2; i++) {
      await wdRun(WD.prompt, prompt);
      await wdRun(WD.decoder, refine);
    }
  } catch (e) { console.warn("decoder warm-up failed", e); }
}

// 1-D bilinear taps as F.interpolate(align_corners=False) computes them on the CPU (float32
// source position scale * (i + 0.5) - 0.5 clamped at 0; right neighbour clamped).
function linearTaps(nIn, nOut, scale) {
  const f = Math.fround, i0 = new Int32Array(nOut), i1 = new Int32Array(nOut), w1 = new Float32Array(nOut);
  for (let i = 0; i < nOut; i++) {
    const src = Math.max(0, f(f(f(scale) * f(i + 0.5)) - 0.5));
    const a = Math.min(Math.floor(src), nIn - 1);
    i0[i] = a; i1[i] = Math.min(a + 1, nIn - 1);
    w1[i] = Math.min(1, Math.max(0, f(src - a)));
  }
  return { i0, i1, w1 };
}

// Output sample j <- up to 4 low-res samples: upsample nLow by `factor`, keep the first
// nKept, resize those to nOut (transforms._resize_matrix, two bilinear steps composed).
function composedTaps(nLow, factor, nKept, nOut) {
  const key = `${nLow},${factor},${nKept},${nOut}`;
  let t = WD.taps.get(key);
  if (t) return t;
  const mid = linearTaps(nKept, nOut, Math.fround(nKept) / Math.fround(nOut));
  const low = linearTaps(nLow, nLow * factor, 1 / factor);
  const idx = new Int32Array(4 * nOut), w = new Float32Array(4 * nOut);
  for (let j = 0; j < nOut; j++) {
    const ms = [mid.i0[j], mid.i1[j]], mw = [1 - mid.w1[j], mid.w1[j]];
    for (let a = 0; a < 2; a++) {
      const m = ms[a], lw = [1 - low.w1[m], low.w1[m]], li = [low.i0[m], low.i1[m]];
      for (let b = 0; b < 2; b++) { idx[4 * j + 2 * a + b] = li[b]; w[4 * j + 2 * a + b] = mw[a] * lw[b]; }
    }
  }
  t = { idx, w, maxIdx: Math.max(...idx) };
  WD.taps.set(key, t);
  return t;
}

// Low-res logits (side x side, Float32Array) -> mask bits at image size (Uint8Array H*W).
function upsampleMask(low, side, header) {
  const [H, W] = header.original_size, [h, w] = header.input_size;
  const factor = header.img_size / side, thr = header.mask_threshold;
  const ty = composedTaps(side, factor, h, H), tx = composedTaps(side, factor, w, W);
  const rows = ty.maxIdx + 1, tmp = new Float32Array(rows * W);
  for (let r = 0; r < rows; r++) { // along x, for the low-res rows any pixel reads
    const src = r * side, dst = r * W;
    for (let x = 0; x < W; x++) {
      const k = 4 * x, I = tx.idx, Wt = tx.w;
      tmp[dst + x] = Wt[k] * low[src + I[k]] + Wt[k + 1] * low[src + I[k + 1]] +
        Wt[k + 2] * low[src + I[k + 2]] + Wt[k + 3] * low[src + I[k + 3]];
    }
  }
  const out = new Uint8Array(H * W);
  for (let y = 0; y < H; y++) { // along y
    const k = 4 * y, I = ty.idx, Wt = ty.w;
    const r0 = I[k] * W, r1 = I[k + 1] * W, r2 = I[k + 2] * W, r3 = I[k + 3] * W;
    const a0 = Wt[k], a1 = Wt[k + 1], a2 = Wt[k + 2], a3 = Wt[k + 3], o = y * W;
    for (let x = 0; x < W; x++) {
      const v = a0 * tmp[r0 + x] + a1 * tmp[r1 + x] + a2 * tmp[r2 + x] + a3 * tmp[r3 + x];
      out[o + x] = v > thr ? 1 : 0;
    }
  }
  return out;
}

// Area and COCO box [x, y, w, h] (x + w one past the last column) of mask bits.
function maskStats(bits, H, W) {
  let area = 0, x0 = W, y0 = H, x1 = -1, y1 = -1;
  for (let y = 0; y < H; y++) {
    const o = y * W;
    for (let x = 0; x < W; x++) {
      if (!bits[o + x]) continue;
      area++;
      if (x < x0) x0 = x;
      if (x > x1) x1 = x;
      if (y < y0) y0 = y;
      y1 = y;
    }
  }
  return { area, bbox: area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0] };
}

// One prompt (image pixels) -> {masks: [{bits, low, score, area, bbox, segmentation}],
// best, ms}, as the server's /predict answers it. `maskInput`: the previous mask's
// low-res logits (Float32Array) or null.
async function wdPredict(imageId, points, labels, box, maskInput, multimask) {
  const im = await wdImage(imageId);
  const t0 = performance.now();
  const hd = im.header, [H, W] = hd.original_size, [h, w] = hd.input_size;
  const f = Math.fround, sx = f(w / W), sy = f(h / H);
  const coords = [], labs = [];
  points.forEach(([x, y], i) => { coords.push(f(f(x) * sx), f(f(y) * sy)); labs.push(labels[i]); });
  if (box) {
    coords.push(f(f(box[0]) * sx), f(f(box[1]) * sy), f(f(box[2]) * sx), f(f(box[3]) * sy));
    labs.push(2, 3);
  } else { coords.push(0, 0); labs.push(-1); } // the padding point the released models expect
  const n = labs.length;
  const feeds = {
    point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(labs), [1, n]),
  };
  const [mh, mw] = hd.mask_input_size;
  let out;
  if (maskInput) {
    feeds.image_embeddings = im.tensors.image_embeddings;
    feeds.mask_input = new ort.Tensor("float32", maskInput, [1, 1, mh, mw]);
    feeds.has_mask_input = new ort.Tensor("float32", Float32Array.from([1]), [1]);
    out = await wdRun(WD.decoder, feeds);
  } else {
    for (const k of ["keys", "k", "v", "q"]) feeds[k] = im.tensors[k];
    out = await wdRun(WD.prompt, feeds);
  }
  const lowAll = out.low_res_masks.data, iou = out.iou_predictions.data;
  const decodeMs = performance.now() - t0;
  const ks = multimask ? [1, 2, 3] : [0];
  const masks = ks.map((k, index) => {
    const low = lowAll.slice(k * mh * mw, (k + 1) * mh * mw);
    const bits = upsampleMask(low, mw, hd);
    const st = maskStats(bits, H, W);
    let rle = null;
    return {
      index, bits, low, score: iou[k], area: st.area, bbox: st.bbox,
      get segmentation() { return rle || (rle = rleEncode(bits, H, W)); },
    };
  });
  let best = 0;
  masks.forEach((m, i) => { if (m.score > masks[best].score) best = i; });
  return { masks, best, width: W, height: H, local: true, decodeMs, ms: performance.now() - t0 };
}
