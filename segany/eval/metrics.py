"""Scores of predicted masks against ground truth.

IoU is computed on boolean masks; two empty masks agree perfectly (IoU 1). Mean IoU is
reported in percent. Object sizes follow COCO: small below 32x32 pixels of area, medium below
96x96, large from there on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SMALL_AREA = 32**2
MEDIUM_AREA = 96**2
SIZES = ("small", "medium", "large")


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def batch_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of ``pred`` ``(..., H, W)`` against ``gt`` broadcast to it (e.g. ``(B, K, H, W)``
    candidates against ``(B, 1, H, W)`` ground truth) -> ``(...)``."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    inter = (pred & gt).sum(axis=(-1, -2))
    union = (pred | gt).sum(axis=(-1, -2))
    out = np.ones(union.shape, dtype=np.float64)
    nz = union > 0
    out[nz] = inter[nz] / union[nz]
    return out


def miou(ious: Iterable[float]) -> float:
    """Mean IoU in percent (NaN for no masks)."""
    arr = np.asarray(list(ious), dtype=np.float64)
    return float(arr.mean() * 100.0) if arr.size else float("nan")


def size_class(area: float) -> str:
    """COCO size class of an object of ``area`` pixels."""
    if area < SMALL_AREA:
        return "small"
    if area < MEDIUM_AREA:
        return "medium"
    return "large"


def miou_by_size(ious: Sequence[float], areas: Sequence[float]) -> dict[str, dict[str, float]]:
    """``{"small"|"medium"|"large": {"miou": percent, "masks": n}}`` (sizes with no mask
    are given ``miou`` NaN and ``masks`` 0)."""
    if len(ious) != len(areas):
        raise ValueError(f"{len(ious)} IoUs but {len(areas)} areas")
    groups: dict[str, list[float]] = {s: [] for s in SIZES}
    for iou, area in zip(ious, areas):
        groups[size_class(area)].append(float(iou))
    return {s: {"miou": miou(v), "masks": len(v)} for s, v in groups.items()}


def clicks_to_reach(ious_per_click: Sequence[float], threshold: float) -> int | None:
    """The first number of clicks (1-based) whose IoU reaches ``threshold`` (fraction, e.g.
    0.85); ``None`` if never within the clicks given."""
    for k, iou in enumerate(ious_per_click, start=1):
        if iou >= threshold:
            return k
    return None


def noc(ious: np.ndarray, threshold: float, max_clicks: int | None = None) -> float:
    """Mean number of clicks to reach ``threshold`` IoU (NoC@85, NoC@90 of the interactive
    segmentation literature) over ``ious`` ``(masks, clicks)``; a mask that never reaches it
    counts as ``max_clicks`` (default: the number of columns)."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.ndim != 2 or ious.shape[0] == 0:
        return float("nan")
    cap = ious.shape[1] if max_clicks is None else max_clicks
    counts = [clicks_to_reach(row, threshold) for row in ious]
    return float(np.mean([cap if c is None else c for c in counts]))


def fraction_above(ious: Iterable[float], threshold: float) -> float:
    """Percent of masks whose IoU is at least ``threshold``."""
    arr = np.asarray(list(ious), dtype=np.float64)
    return float((arr >= threshold).mean() * 100.0) if arr.size else float("nan")
