"""Zero-shot evaluation protocols over any dataset segany reads.

A dataset is anything :func:`segany.datasets.open_dataset` reads: typically a folder with
``images/`` and ``annotations.json`` (COCO "instances": RLE, compressed or not, or
polygons), also SA-1B files or tars and ``segany label`` outputs. Each runner takes a
:class:`~segany.predictor.Predictor`, embeds every image once and batches the prompts of
an image through :meth:`~segany.predictor.Predictor.predict_batch`; it returns a plain
dict of figures (the content of ``results.json``) whose per-mask details sit under the key
``"per_mask"``.

- :func:`run_points`: simulated clicks (:mod:`segany.eval.clicks`); mIoU after 1..N clicks,
  at one click both "auto" (highest predicted IoU of the three outputs) and "oracle" (best
  of the three against ground truth); later clicks use single output with the previous
  low-res logits fed back as ``mask_input``.
- :func:`run_boxes`: the ground-truth box (optionally jittered), single output.
- :func:`run_proposals`: segment-everything, class-agnostic mask recall (COCOeval).
- :func:`run_instances`: detector boxes -> masks -> mask AP (COCOeval).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import masks as M
from ..datasets import DatasetError
from ..predictor import Predictor
from . import metrics as MT
from .clicks import Click, ClickSampler
from .coco_protocols import coco_evaluate, load_detections, run_instances, run_proposals
from .common import (
    DEFAULT_BATCH,
    CocoDataset,
    Progress,
    add_timing,
    chunks,
    gt_area,
    result_header,
    rounded,
    rounded_sizes,
)

__all__ = [
    "REPORTED_CLICKS",
    "CocoDataset",
    "DatasetError",
    "box_from_mask",
    "click_image",
    "coco_evaluate",
    "jitter_boxes",
    "load_detections",
    "run_boxes",
    "run_instances",
    "run_points",
    "run_proposals",
]

#: Click counts reported under ``results["miou"]`` (those within ``max_clicks``).
REPORTED_CLICKS = (1, 2, 3, 5, 9)


# -- points ----------------------------------------------------------------------------------
def _click_arrays(clicks: list[list[Click]]) -> tuple[np.ndarray, np.ndarray]:
    coords = np.array([[[c.x, c.y] for c in seq] for seq in clicks], dtype=np.float64)
    labels = np.array([[c.label for c in seq] for seq in clicks], dtype=np.int64)
    return coords, labels


def click_image(
    predictor: Predictor,
    gts: np.ndarray,
    *,
    max_clicks: int = 9,
    sampler: ClickSampler | None = None,
    feedback: bool = True,
    batch_size: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:
    """Simulate clicks on every ground-truth mask ``gts`` ``(M, H, W)`` of the image set in
    ``predictor``.

    Returns ``iou`` ``(M, max_clicks)`` (column 0: the "auto" mask of the first click),
    ``oracle_iou_1`` ``(M,)``, ``scores_1`` ``(M, 3)`` predicted IoUs of the first click,
    ``ious_1`` ``(M, 3)`` their true IoUs, and ``clicks`` ``(M, max_clicks, 3)`` as
    ``(x, y, label)`` (-1 rows after a mask was matched exactly and needed no more clicks).
    """
    sampler = sampler or ClickSampler()
    m = len(gts)
    iou = np.zeros((m, max_clicks))
    ious_1 = np.zeros((m, 3))
    scores_1 = np.zeros((m, 3))
    clicks_out = np.full((m, max_clicks, 3), -1, dtype=np.int64)
    if m == 0:
        return {
            "iou": iou,
            "oracle_iou_1": np.zeros(0),
            "scores_1": scores_1,
            "ious_1": ious_1,
            "clicks": clicks_out,
        }
    h, w = gts.shape[1:]
    preds = np.zeros((m, h, w), dtype=bool)
    side = predictor.model.prompt_encoder.mask_input_size
    logits = np.zeros((m, 1, *side), dtype=np.float32)
    seqs: list[list[Click]] = [[sampler.first(g)] for g in gts]
    # click 1: three candidates; "auto" keeps the one with the highest predicted IoU
    for sl in chunks(m, batch_size):
        coords, labels = _click_arrays(seqs[sl])
        out = predictor.predict_batch(
            point_coords=coords, point_labels=labels, multimask_output=True
        )
        cand = MT.batch_iou(out.masks, gts[sl, None])
        best = out.scores.argmax(axis=1)
        rows = np.arange(len(best))
        ious_1[sl] = cand
        scores_1[sl] = out.scores
        iou[sl, 0] = cand[rows, best]
        preds[sl] = out.masks[rows, best]
        logits[sl, 0] = out.low_res_logits[rows, best]
    active = np.arange(m)
    for k in range(1, max_clicks):
        nxt = []
        for i in active:
            c = sampler.next(gts[i], preds[i])
            if c is None:  # matched exactly: nothing left to correct
                iou[i, k:] = iou[i, k - 1]
                continue
            seqs[i].append(c)
            nxt.append(i)
        active = np.asarray(nxt, dtype=np.int64)
        if len(active) == 0:
            break
        for sl in chunks(len(active), batch_size):
            idx = active[sl]
            coords, labels = _click_arrays([seqs[i] for i in idx])
            out = predictor.predict_batch(
                point_coords=coords,
                point_labels=labels,
                mask_input=logits[idx] if feedback else None,
                multimask_output=False,
            )
            iou[idx, k] = MT.batch_iou(out.masks[:, 0], gts[idx])
            preds[idx] = out.masks[:, 0]
            logits[idx, 0] = out.low_res_logits[:, 0]
    for i, seq in enumerate(seqs):
        for k, c in enumerate(seq):
            clicks_out[i, k] = (c.x, c.y, c.label)
    return {
        "iou": iou,
        "oracle_iou_1": ious_1.max(axis=1),
        "scores_1": scores_1,
        "ious_1": ious_1,
        "clicks": clicks_out,
    }


def run_points(
    predictor: Predictor,
    dataset: CocoDataset,
    *,
    model: str = "model",
    max_clicks: int = 9,
    clicks: str = "center",
    seed: int = 0,
    feedback: bool = True,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Point protocol over the dataset (see the module doc). ``clicks``: ``"center"`` or
    ``"random"`` (seeded by ``seed``). ``progress`` is called with the number of masks done
    after each image."""
    if max_clicks < 1:
        raise ValueError("max_clicks must be at least 1")
    sampler = ClickSampler(clicks, seed)
    images = dataset.select(limit)
    start = time.perf_counter()
    per_mask: list[dict[str, Any]] = []
    all_iou = []
    oracle = []
    areas = []
    for im, rgb, anns, gts in dataset.iter_images(images):
        if len(anns):
            predictor.set_image(rgb)
            r = click_image(
                predictor,
                gts,
                max_clicks=max_clicks,
                sampler=sampler,
                feedback=feedback,
                batch_size=batch_size,
            )
            for j, ann in enumerate(anns):
                area = gt_area(ann, gts[j])
                areas.append(area)
                all_iou.append(r["iou"][j])
                oracle.append(float(r["oracle_iou_1"][j]))
                per_mask.append(
                    {
                        "image_id": im.image_id,
                        "ann_id": ann.get("id"),
                        "area": area,
                        "iou": [round(float(v), 5) for v in r["iou"][j]],
                        "ious_1": [round(float(v), 5) for v in r["ious_1"][j]],
                        "scores_1": [round(float(v), 5) for v in r["scores_1"][j]],
                        "clicks": [list(map(int, c)) for c in r["clicks"][j] if c[2] >= 0],
                    }
                )
        if progress is not None:
            progress(len(anns))
    ious = np.asarray(all_iou).reshape(-1, max_clicks)
    result = result_header("points", dataset, model, images)
    per_click = [MT.miou(ious[:, k]) for k in range(max_clicks)]
    shown = sorted({k for k in REPORTED_CLICKS if k <= max_clicks} | {max_clicks})
    result.update(
        {
            "masks": len(per_mask),
            "clicks": clicks,
            "seed": seed if clicks == "random" else None,
            "feedback": feedback,
            "max_clicks": max_clicks,
            "miou": {str(k): rounded(per_click[k - 1]) for k in shown},
            "oracle_miou_1": rounded(MT.miou(oracle)),
            "miou_per_click": [rounded(v) for v in per_click],
            "miou_by_size_1": rounded_sizes(MT.miou_by_size(ious[:, 0].tolist(), areas)),
            "oracle_miou_by_size_1": rounded_sizes(MT.miou_by_size(oracle, areas)),
            # clicks to reach 85 / 90 % IoU (capped at max_clicks; meaningless for 1 click)
            "noc85": rounded(MT.noc(ious, 0.85)) if max_clicks > 1 else None,
            "noc90": rounded(MT.noc(ious, 0.90)) if max_clicks > 1 else None,
        }
    )
    add_timing(result, start, len(images))
    result["per_mask"] = per_mask
    return result


# -- boxes -----------------------------------------------------------------------------------
def jitter_boxes(
    boxes: np.ndarray,
    rng: np.random.Generator,
    scale: float,
    max_shift: float = 20.0,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Each coordinate of XYXY ``boxes`` moved by Gaussian noise of standard deviation
    ``scale`` x the box side (width for x, height for y), at most ``max_shift`` pixels (the
    SAM paper's box noise: 10% of the side, up to 20 px); clipped to the image ``(H, W)``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if scale <= 0:
        return b.copy()
    side = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]] * 2, axis=1)
    noise = rng.normal(size=b.shape) * scale * side
    out = b + np.clip(noise, -max_shift, max_shift)
    x0 = np.minimum(out[:, 0], out[:, 2])
    x1 = np.maximum(out[:, 0], out[:, 2])
    y0 = np.minimum(out[:, 1], out[:, 3])
    y1 = np.maximum(out[:, 1], out[:, 3])
    out = np.stack([x0, y0, x1, y1], axis=1)
    if size is not None:
        h, w = size
        for lo, hi, side in ((0, 2, w), (1, 3, h)):
            out[:, [lo, hi]] = out[:, [lo, hi]].clip(0, side)
            thin = out[:, hi] - out[:, lo] < 1  # pushed off the image: keep 1 px inside
            centre = ((out[thin, lo] + out[thin, hi]) / 2).clip(0.5, max(0.5, side - 0.5))
            out[thin, lo], out[thin, hi] = centre - 0.5, centre + 0.5
    return out


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a mask in pixel-edge coordinates ``(x0, y0, x1 + 1, y1 + 1)``, as a
    COCO ``bbox`` of a mask gives."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def run_boxes(
    predictor: Predictor,
    dataset: CocoDataset,
    *,
    model: str = "model",
    jitter: float = 0.0,
    max_shift: float = 20.0,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Box protocol: each mask's ground-truth box (the annotation's ``bbox``, else the
    mask's extent), optionally jittered, single output."""
    rng = np.random.default_rng(seed)
    images = dataset.select(limit)
    start = time.perf_counter()
    per_mask: list[dict[str, Any]] = []
    ious: list[float] = []
    areas: list[float] = []
    for im, rgb, anns, gts in dataset.iter_images(images):
        if len(anns):
            predictor.set_image(rgb)
            boxes = np.stack(
                [
                    M.xywh_to_xyxy(a["bbox"]) if "bbox" in a else box_from_mask(g)
                    for a, g in zip(anns, gts)
                ]
            )
            boxes = jitter_boxes(boxes, rng, jitter, max_shift, size=rgb.shape[:2])
            got = np.zeros(len(anns))
            for sl in chunks(len(anns), batch_size):
                out = predictor.predict_batch(boxes=boxes[sl], multimask_output=False)
                got[sl] = MT.batch_iou(out.masks[:, 0], gts[sl])
            for j, ann in enumerate(anns):
                area = gt_area(ann, gts[j])
                areas.append(area)
                ious.append(float(got[j]))
                per_mask.append(
                    {
                        "image_id": im.image_id,
                        "ann_id": ann.get("id"),
                        "area": area,
                        "box": [round(float(v), 2) for v in boxes[j]],
                        "iou": round(float(got[j]), 5),
                    }
                )
        if progress is not None:
            progress(len(anns))
    result = result_header("boxes", dataset, model, images)
    result.update(
        {
            "masks": len(per_mask),
            "jitter": jitter,
            "max_shift": max_shift if jitter > 0 else None,
            "seed": seed if jitter > 0 else None,
            "miou": rounded(MT.miou(ious)),
            "miou_by_size": rounded_sizes(MT.miou_by_size(ious, areas)),
            "iou_above_50": rounded(MT.fraction_above(ious, 0.5)),
            "iou_above_75": rounded(MT.fraction_above(ious, 0.75)),
            "iou_above_90": rounded(MT.fraction_above(ious, 0.9)),
        }
    )
    add_timing(result, start, len(images))
    result["per_mask"] = per_mask
    return result
