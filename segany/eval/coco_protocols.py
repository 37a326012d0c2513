"""Protocols scored by COCOeval: segment-everything proposals (class-agnostic mask recall)
and instances from detector boxes (mask AP). See :mod:`.protocols` for the click and box
protocols and the shape of a result.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import masks as M
from ..predictor import Predictor
from . import metrics as MT
from .common import (
    DEFAULT_BATCH,
    CocoDataset,
    DatasetError,
    Progress,
    add_timing,
    chunks,
    gt_area,
    result_header,
    rounded,
    rounded_sizes,
)

# -- COCOeval --------------------------------------------------------------------------------
AR_NAMES = ("ar_10", "ar_100", "ar_1000", "ar_small", "ar_medium", "ar_large")
AP_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def coco_evaluate(
    dataset: CocoDataset,
    results: list[dict[str, Any]],
    image_ids: list[int],
    *,
    iou_type: str = "segm",
    use_cats: bool = True,
    max_dets: tuple[int, int, int] = (1, 10, 100),
) -> tuple[np.ndarray, Any]:
    """COCOeval ``stats`` (12 numbers, fractions; -1 where undefined) and the evaluator."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = dataset.coco.loadRes(results) if results else _empty_results(dataset)
        ev = COCOeval(dataset.coco, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.params.useCats = int(use_cats)
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev


def _empty_results(dataset: CocoDataset) -> Any:
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {
        "images": list(dataset.coco.dataset["images"]),
        "categories": list(dataset.coco.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def _pct(v: float) -> float | None:
    return None if v < 0 else rounded(v * 100.0)


# -- proposals -------------------------------------------------------------------------------
def run_proposals(
    predictor: Predictor,
    dataset: CocoDataset,
    *,
    model: str = "model",
    preset: str = "reference",
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    generator: Any = None,
) -> dict[str, Any]:
    """Segment everything in each image; class-agnostic mask recall with COCOeval (segm,
    ``useCats`` = 0, maxDets 10/100/1000, score = predicted IoU), plus the mean over ground
    truth masks of the best proposal's IoU ("best-proposal mIoU").

    The proposals come from a :class:`~segany.everything.MaskGenerator` over ``predictor``
    with ``preset`` and ``overrides``, or from ``generator``: any object whose
    ``generate(rgb)`` returns records with ``segmentation`` (COCO RLE) and
    ``predicted_iou`` (the preset is then reported as ``"custom"``)."""
    if generator is None:
        from ..everything import MaskGenerator

        gen = MaskGenerator(predictor, preset=preset, output_mode="coco_rle", **(overrides or {}))
    else:
        gen, preset = generator, "custom"
    images = dataset.select(limit)
    start = time.perf_counter()
    dets: list[dict[str, Any]] = []
    best: list[float] = []
    areas: list[float] = []
    per_image = []
    for im, rgb, anns, gts in dataset.iter_images(images):
        records = gen.generate(rgb)
        for rec in records:
            dets.append(
                {
                    "image_id": im.image_id,
                    "category_id": 1,
                    "segmentation": rec["segmentation"],
                    "score": float(rec["predicted_iou"]),
                }
            )
        if len(anns):
            gt_rles = M.masks_to_coco_rle(gts)
            mat = M.mask_iou_matrix(gt_rles, [r["segmentation"] for r in records])
            top = mat.max(axis=1) if mat.shape[1] else np.zeros(len(anns))
            best.extend(float(v) for v in top)
            areas.extend(gt_area(a, g) for a, g in zip(anns, gts))
        per_image.append({"image_id": im.image_id, "proposals": len(records), "masks": len(anns)})
        if progress is not None:
            progress(1)
    seconds_gen = time.perf_counter() - start
    stats, ev = coco_evaluate(
        dataset, dets, [im.image_id for im in images], use_cats=False, max_dets=(10, 100, 1000)
    )
    result = result_header("proposals", dataset, model, images)
    result.update(
        {
            "masks": dataset.count_masks(images),
            "proposals": len(dets),
            "preset": preset,
            "settings": _settings_dict(getattr(gen, "settings", None)),
            **{name: _pct(float(v)) for name, v in zip(AR_NAMES, stats[6:12])},
            "best_proposal_miou": rounded(MT.miou(best)),
            "best_proposal_miou_by_size": rounded_sizes(MT.miou_by_size(best, areas)),
            "recall_vs_iou": _recall_curve(ev),
            "generate_seconds": round(seconds_gen, 2),
        }
    )
    add_timing(result, start, len(images))
    result["per_image"] = per_image
    return result


def _settings_dict(settings: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else {}


def _recall_curve(ev: Any) -> dict[str, list[float]]:
    """Recall (percent) at each IoU threshold 0.50:0.95, all areas, the largest maxDets."""
    rec = ev.eval["recall"][:, :, 0, -1]  # (T, K, A, M) -> (T, K)
    vals = [float(np.mean(r[r > -1])) * 100 if (r > -1).any() else float("nan") for r in rec]
    return {
        "iou": [round(float(t), 2) for t in ev.params.iouThrs],
        "recall": [rounded(v) for v in vals],
    }


# -- instances from detector boxes -----------------------------------------------------------
def load_detections(
    source: str | Path, dataset: CocoDataset, *, score_thresh: float = 0.0
) -> list[dict[str, Any]]:
    """COCO results JSON (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``) -> the
    detections on images of ``dataset`` with ``score`` >= ``score_thresh``. ``"gt"`` makes
    detections from the ground-truth boxes (score 1; an upper bound for the box source)."""
    if str(source) == "gt":
        return [
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": list(a["bbox"]),
                "score": 1.0,
            }
            for im in dataset.images
            for a in dataset.annotations(im.image_id)
        ]
    path = Path(source)
    try:
        dets = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read detections {path}: {exc}") from exc
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list):
        raise DatasetError(f"{path}: expected a COCO results list of detections")
    known = {im.image_id for im in dataset.images}
    out = []
    for d in dets:
        try:
            if d["image_id"] in known and float(d.get("score", 1.0)) >= score_thresh:
                out.append(
                    {
                        "image_id": d["image_id"],
                        "category_id": d["category_id"],
                        "bbox": [float(v) for v in d["bbox"]],
                        "score": float(d.get("score", 1.0)),
                    }
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: malformed detection {d!r}: {exc}") from exc
    return out


def run_instances(
    predictor: Predictor,
    dataset: CocoDataset,
    detections: list[dict[str, Any]],
    *,
    model: str = "model",
    boxes_source: str = "",
    limit: int | None = None,
    max_per_image: int = 100,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Instance segmentation from detector boxes: each box (the ``max_per_image`` highest
    scores of an image) prompts one mask (single output) that keeps the box's category and
    score; mask AP with COCOeval (segm), and the boxes' own AP (bbox) beside it."""
    images = dataset.select(limit)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    used: list[dict[str, Any]] = []
    for im in images:
        dets = sorted(by_image.get(im.image_id, []), key=lambda d: -d["score"])[:max_per_image]
        if dets:
            rgb = dataset.load(im)
            predictor.set_image(rgb)
            h, w = rgb.shape[:2]
            boxes = np.stack([M.xywh_to_xyxy(d["bbox"]) for d in dets])
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            ok = (boxes[:, 2] > boxes[:, 0]) | (boxes[:, 3] > boxes[:, 1])
            dets = [d for d, k in zip(dets, ok) if k]
            boxes = boxes[ok]
            for sl in chunks(len(dets), batch_size):
                out = predictor.predict_batch(boxes=boxes[sl], multimask_output=False)
                rles = M.masks_to_coco_rle(out.masks[:, 0])
                for d, rle in zip(dets[sl], rles):
                    results.append(
                        {
                            "image_id": im.image_id,
                            "category_id": d["category_id"],
                            "segmentation": rle,
                            "score": d["score"],
                        }
                    )
            used.extend(dets)
        if progress is not None:
            progress(1)
    ids = [im.image_id for im in images]
    seg_stats, _ = coco_evaluate(dataset, results, ids, iou_type="segm")
    box_stats, _ = coco_evaluate(dataset, [dict(d) for d in used], ids, iou_type="bbox")
    result = result_header("instances", dataset, model, images)
    result.update(
        {
            "masks": dataset.count_masks(images),
            "detections": len(results),
            "boxes": boxes_source,
            **{f"mask_{n}": _pct(float(v)) for n, v in zip(AP_NAMES, seg_stats[:6])},
            **{f"box_{n}": _pct(float(v)) for n, v in zip(AP_NAMES, box_stats[:6])},
        }
    )
    add_timing(result, start, len(images))
    return result
