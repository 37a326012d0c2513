"""Simulated clicks for interactive evaluation.

The deterministic protocol (the SAM paper's, after RITM):

- the first click is the interior point of the ground-truth mask farthest from its boundary:
  ``cv2.distanceTransform`` (L2, mask size 5) of the mask padded by one pixel (so the image
  border counts as boundary), first maximum in row-major order (``argmax``);
- each next click is the point farthest from the boundary of the error region: the distance
  transform is taken of the missed part (ground truth not predicted, "false negative") and of
  the false part (predicted, not ground truth); the click goes to the deeper of the two, as a
  positive click in a missed part, a negative one in a false part (a tie goes to the positive).

The random variant draws the first click uniformly from the mask and each next click
uniformly from the larger of the two error parts (positive when the missed part is larger),
from a seeded :class:`numpy.random.Generator`.

Points are image pixels ``(x, y)`` = (column, row), as integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    """One simulated click: image pixel ``(x, y)``; ``positive`` is label 1 (object)."""

    x: int
    y: int
    positive: bool

    @property
    def label(self) -> int:
        return 1 if self.positive else 0


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Row/column extent ``(r0, r1, c0, c1)`` (exclusive ends) of a mask's pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``mask`` to the nearest pixel outside it, the image border
    counting as outside (``cv2.distanceTransform``, L2, mask size 5, on the padded mask)."""
    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def farthest_point(mask: np.ndarray) -> tuple[int, int, float] | None:
    """The pixel of ``mask`` farthest from its boundary: ``(x, y, distance)``, the first
    maximum in row-major order; ``None`` for an empty mask.

    Only the mask's bounding box is transformed: the zero ring that the padding adds around
    it separates the mask from everything outside, so the result equals that of the
    whole-image transform (ties included, as row-major order is kept inside the box).
    """
    mask = np.asarray(mask, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return None
    r0, r1, c0, c1 = box
    dist = distance_to_boundary(mask[r0:r1, c0:c1])
    idx = int(np.argmax(dist))
    y, x = divmod(idx, dist.shape[1])
    return x + c0, y + r0, float(dist.flat[idx])


def first_click(gt: np.ndarray) -> Click:
    """The interior point of ``gt`` farthest from its boundary (a positive click)."""
    found = farthest_point(gt)
    if found is None:
        raise ValueError("cannot place a click in an empty mask")
    x, y, _ = found
    return Click(x, y, True)


def error_regions(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(missed, false)``: ground truth not predicted, and predicted outside ground truth."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    return gt & ~pred, pred & ~gt


def next_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """The point farthest from the boundary of the error region between ``pred`` and
    ``gt``: positive in a missed part, negative in a false part. ``None`` when ``pred``
    equals ``gt``."""
    missed, false = error_regions(gt, pred)
    fn = farthest_point(missed)
    fp = farthest_point(false)
    if fn is None and fp is None:
        return None
    if fp is None or (fn is not None and fn[2] >= fp[2]):
        assert fn is not None
        return Click(fn[0], fn[1], True)
    return Click(fp[0], fp[1], False)


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """A pixel ``(x, y)`` of ``mask`` drawn uniformly; ``None`` for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


def random_first_click(gt: np.ndarray, rng: np.random.Generator) -> Click:
    """A uniformly drawn pixel of ``gt`` (a positive click)."""
    p = random_point(gt, rng)
    if p is None:
        raise ValueError("cannot place a click in an empty mask")
    return Click(p[0], p[1], True)


def random_next_click(gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator) -> Click | None:
    """A uniformly drawn pixel of the larger error part: positive in the missed part,
    negative in the false part. ``None`` when ``pred`` equals ``gt``."""
    missed, false = error_regions(gt, pred)
    n_missed, n_false = int(missed.sum()), int(false.sum())
    if n_missed == 0 and n_false == 0:
        return None
    positive = n_missed >= n_false
    p = random_point(missed if positive else false, rng)
    assert p is not None
    return Click(p[0], p[1], positive)


class ClickSampler:
    """First and next clicks of one protocol: ``"center"`` (deterministic, farthest from
    the boundary) or ``"random"`` (uniform, seeded)."""

    MODES = ("center", "random")

    def __init__(self, mode: str = "center", seed: int = 0) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown click mode {mode!r}; choose from {self.MODES}")
        self.mode = mode
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def first(self, gt: np.ndarray) -> Click:
        if self.mode == "random":
            return random_first_click(gt, self.rng)
        return first_click(gt)

    def next(self, gt: np.ndarray, pred: np.ndarray) -> Click | None:
        if self.mode == "random":
            return random_next_click(gt, pred, self.rng)
        return next_click(gt, pred)
