"""Golden of the reference ``SamAutomaticMaskGenerator`` of ``segment-anything-hq==0.3`` on
seeded random weights, for ``tests/test_hq_commands.py``.

The model is the reduced HQ-SAM of ``make_hq_goldens.py --config vit-tiny-test`` (same seed,
noise and float16 rounding, so its weights are those stored in
``tests/data/hq_sam_tiny_test_golden.npz``); the image is that file's photo (200x150).
Each run below is the reference generator (its defaults are SAM 1's; it calls its predictor
with multimask output and ``hq_token_only=False``, one mask per point) with a small grid;
its records (COCO RLE, scores, boxes, points, crop boxes) go to a small JSON file. Random
weights give predicted IoUs near 0.5 and near-threshold pixels, so the runs lower the
thresholds to keep masks.

Run with the reference venv's python (segany never imports the reference packages)::

    ~/.cache/segany-reference/venv/bin/python benchmarks/make_hq_amg_golden.py \\
        --out tests/data/hq_amg_tiny_golden.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_hq_goldens import CONFIGS, PHOTO, build_reference  # noqa: E402

#: name -> the reference generator's keywords
RUNS: dict[str, dict] = {
    # every mask of the grid (no filter, NMS off: random weights give near-duplicates)
    "all_masks": dict(
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        stability_score_offset=0.01,
        box_nms_thresh=1.0,
    ),
    # both filters, thresholds near the medians of random weights (NMS off: most masks of
    # random weights span the image, so their boxes coincide)
    "filters": dict(
        points_per_side=4,
        pred_iou_thresh=0.57,
        stability_score_thresh=0.845,
        stability_score_offset=0.01,
        box_nms_thresh=1.0,
    ),
    # box NMS at work
    "nms": dict(
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        stability_score_offset=0.01,
        box_nms_thresh=0.97,
    ),
    # one crop layer (its crops' masks kept: NMS off)
    "crops": dict(
        points_per_side=2,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        stability_score_offset=0.01,
        box_nms_thresh=1.0,
        crop_n_layers=1,
        crop_nms_thresh=1.0,
        crop_overlap_ratio=0.25,
    ),
}


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from segment_anything_hq import SamAutomaticMaskGenerator

    model = build_reference("vit-tiny-test")
    with Image.open(PHOTO) as img:
        size = CONFIGS["vit-tiny-test"]["photo_size"]
        photo = np.asarray(img.convert("RGB").resize(size, Image.LANCZOS)).copy()
    out: dict = {"model": "vit-tiny-test (make_hq_goldens.py)", "runs": {}}
    for name, opts in RUNS.items():
        gen = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **opts)
        records = gen.generate(photo)
        q = [0, 50, 100]
        iou = np.percentile([r["predicted_iou"] for r in records] or [0], q).round(3)
        stab = np.percentile([r["stability_score"] for r in records] or [0], q).round(3)
        print(f"{name}: {len(records)} masks, predicted IoU {iou}, stability {stab}")
        out["runs"][name] = {"options": opts, "records": records}
    with gzip.open(a.out, "wt", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
    print(a.out, a.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
