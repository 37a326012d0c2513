"""Build tests/data/golden_coffee_small.npz from ../shared/reference/mobilesam_coffee.npz.

A fresh clone without ../shared still checks parity with this: the image (lossless), the
first 8 channels of the reference embedding plus per-channel means of all 256, and the
low-res logits (float16), IoUs and packed masks of the prompt cases below: one click
(three outputs), several points, a box, a box with a point, the refinement with a mask
input and the batch of boxes.
Run: .venv/bin/python tests/data/make_small_golden.py
"""

import json
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[3] / "shared/reference/mobilesam_coffee.npz"
OUT = Path(__file__).with_name("golden_coffee_small.npz")
CASES = ("c0", "c2", "c4", "c6", "refine", "batch")

z = np.load(SRC)
arrays = {
    "image": z["image"],
    "embedding_head": z["embedding"][:, :8],
    "embedding_channel_mean": z["embedding"].mean(axis=(2, 3)),
    "refine_mask_input": z["refine_mask_input"],
    "batch_boxes": z["batch_boxes"][:2],  # two of the four boxes: batching, half the bytes
}
for c in CASES:
    n = 2 if c == "batch" else None
    arrays[f"{c}_iou"] = z[f"{c}_iou"][:n]
    arrays[f"{c}_masks"] = z[f"{c}_masks"][:n]
    arrays[f"{c}_lowres"] = z[f"{c}_lowres"][:n].astype(np.float16)
np.savez_compressed(OUT, **arrays)
index = json.loads((SRC.parent / "index.json").read_text())["mobilesam_coffee.npz"]
cases = {c: index["cases"][c] for c in CASES if c in index["cases"]}  # refine, batch: below
cases["refine"] = index["refine"]
OUT.with_suffix(".json").write_text(json.dumps(cases, indent=1))
print(OUT, OUT.stat().st_size)
