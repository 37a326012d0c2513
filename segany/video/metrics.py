"""DAVIS measures of video object segmentation (Perazzi et al., CVPR 2016; Pont-Tuset et
al., 2017): region similarity J (mask IoU), boundary accuracy F (F-measure of boundary
pixels matched within 0.8% of the image diagonal), and per object their mean, recall
(fraction of frames above 0.5) and decay (first quarter of the frames minus the last).

Conventions as the DAVIS evaluation code has them: J of two empty masks is 1; the boundary
of a mask is the set of pixels that differ from their right, lower or lower-right
neighbour (:func:`boundary`); matching dilates with a disk of radius
``ceil(0.008 * diagonal)``; the first and last frames of a sequence are not scored in the
semi-supervised protocol.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

BOUNDARY_FRACTION = 0.008
DECAY_BINS = 4


def j_measure(mask: np.ndarray, gt: np.ndarray) -> float:
    """Mask IoU of two ``(H, W)`` bool masks; 1 when both are empty."""
    mask, gt = mask.astype(bool), gt.astype(bool)
    union = np.logical_or(mask, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(mask, gt).sum() / union)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a ``(H, W)`` bool mask, as DAVIS's ``seg2bmap`` marks them: pixels
    differing from their right, lower or lower-right neighbour (zero past the image); on the
    last row only the right neighbour counts, on the last column only the lower one."""
    m = mask.astype(bool)
    right = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    down = np.zeros_like(m)
    down[:-1] = m[1:]
    diag = np.zeros_like(m)
    diag[:-1, :-1] = m[1:, 1:]
    b = (m ^ right) | (m ^ down) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def f_measure(mask: np.ndarray, gt: np.ndarray, bound: float = BOUNDARY_FRACTION) -> float:
    """Boundary F-measure of two ``(H, W)`` bool masks, with a match tolerance of
    ``ceil(bound * diagonal)`` pixels (``bound`` >= 1: pixels as given)."""
    radius = int(bound if bound >= 1 else math.ceil(bound * math.hypot(*mask.shape[:2])))
    fb, gb = boundary(mask), boundary(gt)
    n_f, n_g = int(fb.sum()), int(gb.sum())
    if n_f == 0 and n_g == 0:
        return 1.0
    if n_f == 0 or n_g == 0:
        return 0.0  # precision or recall is 0
    disk = _disk(radius)
    f_near = cv2.dilate(fb.astype(np.uint8), disk).astype(bool)
    g_near = cv2.dilate(gb.astype(np.uint8), disk).astype(bool)
    precision = float((fb & g_near).sum() / n_f)
    recall = float((gb & f_near).sum() / n_g)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def statistics(values: list[float] | np.ndarray) -> dict[str, float]:
    """``mean``, ``recall`` (fraction > 0.5) and ``decay`` (mean of the first of four
    equal bins of frames minus the mean of the last) of per-frame values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": math.nan, "recall": math.nan, "decay": math.nan}
    edges = np.round(np.linspace(1, x.size, DECAY_BINS + 1) + 1e-10).astype(int) - 1
    bins = [x[edges[i] : edges[i + 1] + 1] for i in range(DECAY_BINS)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[-1])) if x.size >= 2 else 0.0
    return {"mean": float(x.mean()), "recall": float((x > 0.5).mean()), "decay": decay}


def score_sequence(
    predicted: list[np.ndarray], truth: list[np.ndarray], *, skip_ends: bool = True
) -> dict[str, object]:
    """J and F per frame for one object over a sequence (lists of ``(H, W)`` bool masks,
    frame by frame), with their :func:`statistics`; ``skip_ends`` leaves out the first
    frame (given) and the last (as DAVIS does)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted frames for {len(truth)} ground truth")
    idx = range(1, len(truth) - 1) if skip_ends and len(truth) > 2 else range(len(truth))
    j = [j_measure(predicted[i], truth[i]) for i in idx]
    f = [f_measure(predicted[i], truth[i]) for i in idx]
    js, fs = statistics(j), statistics(f)
    return {"J": js, "F": fs, "JF": (js["mean"] + fs["mean"]) / 2, "per_frame": {"J": j, "F": f}}
