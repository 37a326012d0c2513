"""Generator settings on nuclei: best IoU per ground-truth nucleus and seconds per tile.

Two 256-px tiles of the DSB2018 test mosaic (tests/mosaic.py), MobileSAM; each row is a set
of `MaskGenerator` settings (docs/microscopy.md has the table).

    python benchmarks/bench_nuclei_presets.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    {"preset": "fast"},
    {"preset": "fast", "dense_below_cover": 1.0, "refine_points_per_side": 16},
    {"preset": "fast", "dense_below_cover": 1.0},
    {"preset": "reference"},
]


def best_ious(masks: np.ndarray, gt: np.ndarray, min_area: int = 60) -> list[float]:
    """Best IoU of each ground-truth object (``gt`` ids, 0 = background) with any mask."""
    out = []
    for i in np.unique(gt)[1:]:
        m = gt == i
        if m.sum() < min_area:
            continue
        if len(masks) == 0:
            out.append(0.0)
            continue
        inter = (masks & m).sum((1, 2))
        out.append(float((inter / (masks | m).sum((1, 2))).max()))
    return out


def main() -> None:
    sys.path.insert(0, str(REPO))
    from segany import load_predictor
    from segany.everything import MaskGenerator
    from segany.runtime import cpu_info
    from tests.mosaic import NUCLEI, build_mosaic, load_coco

    rgb, labels = build_mosaic(load_coco(NUCLEI), 3, 3, 248)
    crop = (slice(124, 620), slice(124, 620))
    _, inv = np.unique(labels[crop], return_inverse=True)
    rgb, gt = np.ascontiguousarray(rgb[crop]), inv.reshape(496, 496)
    pred = load_predictor("mobile_sam")
    print(f"CPU: {cpu_info()['model']}")
    for kw in SETTINGS:
        row = []
        for y, x in ((0, 0), (240, 240)):
            gen = MaskGenerator(pred, **kw)
            t = time.perf_counter()
            found, _ = gen.generate_masks(rgb[y : y + 256, x : x + 256])
            dt = time.perf_counter() - t
            ious = best_ious(found.masks.numpy(), gt[y : y + 256, x : x + 256])
            row.append(f"{len(found.masks)} masks, IoU {np.mean(ious):.2f}, {dt:.1f} s")
        print(kw, " | ".join(row))


if __name__ == "__main__":
    main()
