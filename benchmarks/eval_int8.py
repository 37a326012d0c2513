"""Accuracy cost of the reduced-precision variants (int8 ONNX graphs, bf16 torch encoder)
against fp32 torch/ONNX.

Protocol of ``../shared/reference/README.md``: one click at the GT mask's interior point
farthest from its boundary (``cv2.distanceTransform``, L2, mask size 5, on the mask padded
by one pixel), multimask output; "auto" = the mask with the highest predicted IoU,
"oracle" = the best of the three. Mean IoU over all masks, in percent, and the mean
encoder / click time of each backend.

    python benchmarks/eval_int8.py [--data ../shared/data/davis17_firstframes]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "davis17_firstframes"


def click_point(mask: np.ndarray) -> tuple[float, float]:
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument(
        "--backends",
        default="torch,onnx,onnx-int8,torch-bf16",
        help="torch, onnx, onnx-int8, or torch-bf16 (torch backend, bf16 encoder)",
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from segany import load_predictor
    from segany.predictor import EmbeddingCache
    from segany.runtime import set_threads

    set_threads(args.threads)
    data = Path(args.data)
    coco = json.loads((data / "annotations.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    print(
        f"{'backend':10s} {'masks':>5s} {'1 click auto':>12s} {'oracle':>7s} "
        f"{'encoder s':>9s} {'click ms':>8s}"
    )
    for backend in args.backends.split(","):
        name, _, precision = backend.partition("-bf")
        pred = load_predictor(
            backend=name,
            precision="bf16" if precision else "fp32",
            cache=EmbeddingCache(max_items=0),
            progress=False,
        )
        auto, oracle, t_enc, t_click = [], [], [], []
        for img in coco["images"]:
            rgb = cv2.cvtColor(
                cv2.imread(str(data / "images" / img["file_name"])), cv2.COLOR_BGR2RGB
            )
            t = time.perf_counter()
            pred.set_image(rgb)
            t_enc.append(time.perf_counter() - t)
            for a in by_image.get(img["id"], []):
                gt = mask_utils.decode(a["segmentation"]).astype(bool)
                t = time.perf_counter()
                out = pred.predict(np.array([click_point(gt)]), np.array([1]))
                t_click.append(time.perf_counter() - t)
                ious = [iou(m, gt) for m in out.masks]
                auto.append(ious[int(np.argmax(out.scores))])
                oracle.append(max(ious))
        print(
            f"{backend:10s} {len(auto):5d} {100 * np.mean(auto):12.2f} "
            f"{100 * np.mean(oracle):7.2f} {np.mean(t_enc):9.3f} {1e3 * np.mean(t_click):8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
