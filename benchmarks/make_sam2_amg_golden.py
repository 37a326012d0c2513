"""Golden of the reference ``SAM2AutomaticMaskGenerator`` (``sam2==1.1.0``) on seeded random
weights, for ``tests/test_sam2_amg.py``.

The model is the reduced SAM 2.1 of ``make_sam2_goldens.py --config tiny-test`` (same seed,
noise and float16 rounding, so the weights are those stored in
``tests/data/sam2_tiny_test_golden.npz``), the images are that file's two photos. Each run
below is the reference generator with small grids; its records (COCO RLE, scores, boxes,
points, crop boxes) go to a small JSON file. Random weights give IoU predictions around 0.5
and many near-threshold pixels, so most runs lower the thresholds to keep masks.

Run with the reference venv's python (segany never imports the reference packages)::

    ~/.cache/segany-reference/venv/bin/python benchmarks/make_sam2_amg_golden.py \\
        --out tests/data/sam2_amg_tiny_golden.json.gz
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sam2_goldens import IMAGES, TINY_TEST_OVERRIDES, build, load_photo  # noqa: E402

#: name -> (image index, generator options); the options are the reference's keywords.
RUNS: dict[str, tuple[int, dict]] = {
    # every mask of the grid (no filter; NMS off: random weights give near-duplicates)
    "all_masks": (
        0,
        dict(
            points_per_side=4,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            stability_score_offset=0.01,
            box_nms_thresh=1.0,
        ),
    ),
    # both filters, thresholds near the medians of random weights (NMS off: most masks of
    # random weights span the image, so their boxes coincide)
    "filters": (
        0,
        dict(
            points_per_side=4,
            pred_iou_thresh=0.46,
            stability_score_thresh=0.45,
            stability_score_offset=0.01,
            box_nms_thresh=1.0,
        ),
    ),
    "m2m": (
        0,
        dict(
            points_per_side=4,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            stability_score_offset=0.01,
            box_nms_thresh=1.0,
            use_m2m=True,
        ),
    ),
    # with box NMS too: one mask left
    "m2m_filters": (
        1,
        dict(
            points_per_side=4,
            pred_iou_thresh=0.46,
            stability_score_thresh=0.45,
            stability_score_offset=0.01,
            box_nms_thresh=0.95,
            use_m2m=True,
        ),
    ),
    "single_mask": (
        1,
        dict(
            points_per_side=4,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            stability_score_offset=0.01,
            box_nms_thresh=1.0,
            multimask_output=False,
        ),
    ),
    "crops": (
        1,
        dict(
            points_per_side=2,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            stability_score_offset=0.01,
            box_nms_thresh=0.9,
            crop_n_layers=1,
            crop_overlap_ratio=0.25,
        ),
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
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    model = build("configs/sam2.1/sam2.1_hiera_t.yaml", TINY_TEST_OVERRIDES)
    side = model.image_size
    photos = [load_photo(n, s) for n, s in IMAGES["tiny-test"]]
    out: dict = {"model": "tiny-test (make_sam2_goldens.py)", "runs": {}}
    for name, (index, opts) in RUNS.items():
        gen = SAM2AutomaticMaskGenerator(model, output_mode="coco_rle", **opts)
        # the predictor's feature sizes are set for 1024 px; this model runs at 256 px
        gen.predictor._bb_feat_sizes = [(side // k, side // k) for k in (4, 8, 16)]
        records = gen.generate(photos[index])
        q = [0, 50, 100]
        iou = np.percentile([r["predicted_iou"] for r in records] or [0], q).round(3)
        stab = np.percentile([r["stability_score"] for r in records] or [0], q).round(3)
        print(f"{name}: {len(records)} masks, predicted IoU {iou}, stability {stab}")
        out["runs"][name] = {"image": index, "options": opts, "records": records}
    with gzip.open(a.out, "wt", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
    print(a.out, a.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
