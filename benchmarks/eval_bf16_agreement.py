"""How far the bf16 image encoder (``precision="bf16"``) moves a model's outputs from fp32.

For models whose real weights are not available here (SAM 2.1, HQ-SAM), accuracy against
ground truth cannot be measured, so this compares the bf16 path with the fp32 path of the
same model (random weights, seed 0, for registry names; a checkpoint path for real ones) on
real photos: relative L2 error of the embedding (and SAM 2's high-resolution features),
then per object of ``annotations.json`` one click at its interior point farthest from the
boundary (the protocol of ``eval_int8.py``), multimask output, and for the three masks at
image size: the IoU of the bf16 mask with the fp32 one, the share of confident pixels
(``|fp32 logit| > 1``) whose sign flips, and whether both pick the same best mask. With a
real checkpoint (``mobile_sam``) it also prints the 1-click mIoU against the ground truth
of both paths. Needs a CPU with bfloat16 units (or ``SEGANY_FORCE_BF16=1``).

    python benchmarks/eval_bf16_agreement.py --model sam2.1_hiera_t [--max-images 10]
    python benchmarks/eval_bf16_agreement.py --model mobile_sam
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from eval_int8 import DATA, click_point, iou  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="sam2.1_hiera_t", help="registry name or checkpoint")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from segany import load_predictor
    from segany.models import build_model
    from segany.models.registry import MODEL_REGISTRY
    from segany.predictor import EmbeddingCache, Predictor
    from segany.runtime import cpu_info, set_threads

    set_threads(args.threads)
    random_weights = args.model in MODEL_REGISTRY and args.model != "mobile_sam"
    if random_weights:
        torch.manual_seed(0)
        model = build_model(args.model).eval()
        preds = {
            p: Predictor(model, cache=EmbeddingCache(max_items=0), fuse=True, precision=p)
            for p in ("fp32", "bf16")
        }
    else:
        preds = {
            p: load_predictor(
                args.model, backend="torch", precision=p, cache=EmbeddingCache(max_items=0)
            )
            for p in ("fp32", "bf16")
        }
    data = Path(args.data)
    coco = json.loads((data / "annotations.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images = coco["images"][: args.max_images]
    emb_err, hr_err, logit_err, mask_iou, flips, same_best = [], [], [], [], [], []
    gt_iou: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for img in images:
        rgb = cv2.cvtColor(cv2.imread(str(data / "images" / img["file_name"])), cv2.COLOR_BGR2RGB)
        for p in preds.values():
            p.set_image(rgb)
        s32, s16 = preds["fp32"].state, preds["bf16"].state
        emb_err.append(rel(s16.embedding, s32.embedding))
        for a, b in zip(s16.high_res, s32.high_res):
            hr_err.append(rel(a, b))
        for ann in by_image.get(img["id"], []):
            gt = mask_utils.decode(ann["segmentation"]).astype(bool)
            pt = np.array([click_point(gt)])
            out = {k: p.predict(pt, np.array([1]), return_logits=True) for k, p in preds.items()}
            l32, l16 = out["fp32"].masks, out["bf16"].masks
            logit_err.append(rel(out["bf16"].low_res_logits, out["fp32"].low_res_logits))
            for m32, m16 in zip(l32, l16):
                mask_iou.append(iou(m16 > 0, m32 > 0))
                sure = np.abs(m32) > 1
                flips.append(
                    float(((m16[sure] > 0) != (m32[sure] > 0)).mean()) if sure.any() else 0
                )
            best = {k: int(np.argmax(o.scores)) for k, o in out.items()}
            same_best.append(best["fp32"] == best["bf16"])
            if not random_weights:
                for k, o in out.items():
                    gt_iou[k].append(iou(o.masks[best[k]] > 0, gt))
    res = {
        "cpu": cpu_info()["model"],
        "model": args.model,
        "weights": "random (seed 0)" if random_weights else "checkpoint",
        "images": len(images),
        "clicks": len(same_best),
        "embedding_rel_l2_median": float(np.median(emb_err)),
        "high_res_rel_l2_median": float(np.median(hr_err)) if hr_err else None,
        "low_res_logits_rel_l2_median": float(np.median(logit_err)),
        "mask_iou_bf16_vs_fp32_mean": float(np.mean(mask_iou)),
        "mask_iou_bf16_vs_fp32_p05": float(np.percentile(mask_iou, 5)),
        "confident_pixel_flips_mean": float(np.mean(flips)),
        "same_best_mask": float(np.mean(same_best)),
    }
    if not random_weights:
        res.update({f"miou_1click_{k}": 100 * float(np.mean(v)) for k, v in gt_iou.items()})
    for k, v in res.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
