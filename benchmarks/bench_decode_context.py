"""Per-point decoder cost of segment-everything prompts, with and without the prepared
decoder context, in one process (alternating, so machine load hits both alike).

    .venv/bin/python benchmarks/bench_decode_context.py
"""

import time

import numpy as np
import torch
from skimage import data

from segany import load_model
from segany import masks as M
from segany import transforms as T
from segany.predictor import Predictor

torch.set_num_threads(2)
m = load_model(progress=False)
pr = Predictor(m)
pr.set_image(data.coffee())
st = pr.state
pts = M.point_grid(8) * np.array([st.original_size[1], st.original_size[0]])
coords = T.coords_to_model(pts, st.original_size, m.img_size)[:, None, :]
labels = torch.ones(len(pts), 1, dtype=torch.int64)


def old():
    with torch.inference_mode():
        return m.decode(
            st.embedding, point_coords=coords, point_labels=labels, multimask_output=True
        )


def new():
    return pr.decode_low_res(coords, labels)


a, b = old(), new()
print(
    "max |logit diff|",
    (a[0] - b[0]).abs().max().item(),
    "iou diff",
    (a[1] - b[1]).abs().max().item(),
)
for _ in range(3):
    for name, f in (("without context", old), ("with context", new)):
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        print(f"{name}: {dt / len(pts) * 1000:.1f} ms/point (batch {len(pts)})")
