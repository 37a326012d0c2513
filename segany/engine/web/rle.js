// COCO run-length encoding, read side only (the server writes RLEs with pycocotools).
"use strict";

// The compressed "counts" string -> run lengths (pycocotools' rleFrString).
function rleCounts(s) {
  if (Array.isArray(s)) return s;
  const cnts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (cnts.length > 2) x += cnts[cnts.length - 2];
    cnts.push(x);
  }
  return cnts;
}

// RLE {size: [h, w], counts} -> Uint8Array of h*w, row-major, 1 inside the mask.
function rleDecode(rle) {
  const h = rle.size[0], w = rle.size[1];
  const out = new Uint8Array(h * w);
  const cnts = rleCounts(rle.counts);
  let idx = 0;
  for (let i = 0; i < cnts.length; i++) {
    const n = cnts[i];
    if (i % 2 === 1) {
      // column-major run: pixel idx -> (row idx % h, col idx / h)
      let row = idx % h, col = (idx - row) / h;
      for (let j = 0; j < n; j++) {
        out[row * w + col] = 1;
        if (++row === h) { row = 0; col++; }
      }
    }
    idx += n;
  }
  return out;
}

// A mask painted into a canvas of the image's size, in one colour.
function maskCanvas(rle, rgba) {
  return bitsCanvas(rleDecode(rle), rle.size[0], rle.size[1], rgba);
}

// Uint8Array of h*w (row-major, non-zero inside) -> a canvas: the mask in one colour, its
// outline (mask pixels with a background 4-neighbour) opaque. One pass, 32-bit pixels.
function bitsCanvas(m, h, w, rgba) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  const px = new Uint32Array(img.data.buffer);
  const little = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  const pack = (a) => (little ? ((a << 24) | (rgba[2] << 16) | (rgba[1] << 8) | rgba[0])
    : ((rgba[0] << 24) | (rgba[1] << 16) | (rgba[2] << 8) | a)) >>> 0;
  const fill = pack(rgba[3]), edge = pack(255);
  for (let y = 0; y < h; y++) {
    const o = y * w, border = y === 0 || y === h - 1;
    for (let x = 0; x < w; x++) {
      const i = o + x;
      if (!m[i]) continue;
      px[i] = border || x === 0 || x === w - 1 || !m[i - 1] || !m[i + 1] || !m[i - w] || !m[i + w]
        ? edge : fill;
    }
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

// Uint8Array of h*w (row-major) -> uncompressed COCO RLE {size: [h, w], counts: [...]}
// (column-major runs, starting with a background run), as the server accepts it.
function rleEncode(m, h, w) {
  const counts = [];
  let val = 0, run = 0;
  for (let x = 0; x < w; x++) {
    for (let y = 0, i = x; y < h; y++, i += w) {
      const v = m[i] ? 1 : 0;
      if (v !== val) { counts.push(run); run = 0; val = v; }
      run++;
    }
  }
  counts.push(run);
  return { size: [h, w], counts };
}

if (typeof module !== "undefined") module.exports = { rleCounts, rleDecode, rleEncode };
