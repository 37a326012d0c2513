"""Simulated interaction for training (the SAM paper, appendix A "Training algorithm").

Each ground-truth mask is segmented over several *rounds*:

- round 0: with equal odds, a positive point drawn uniformly from the mask, or the mask's
  box with each coordinate moved by Gaussian noise of standard deviation 10% of the box
  side, at most 20 pixels (:func:`jitter_boxes`);
- later rounds: one point drawn uniformly from the error region between the previous
  prediction and the ground truth (positive in a missed part, negative in a false part:
  :func:`sample_error_points`), with the previous round's low-res logits as the mask prompt;
- two of the later rounds add no point (the model only sees its own previous mask): one at
  a random position among the point rounds, one at the end (:func:`round_schedule`). The
  paper's 11 rounds are 1 initial prompt + 8 points + 2 rounds without a new point.

All functions here are pure: arrays in, arrays out, randomness from the ``rng`` passed in.
Coordinates are ``(x, y)`` pixel indices (the prompt encoder adds the half-pixel offset).
"""

from __future__ import annotations

import numpy as np

#: The paper's schedule: 8 sampled points after the first prompt, and 2 rounds without one.
POINT_ROUNDS = 8
EMPTY_ROUNDS = 2
#: Box noise: standard deviation as a fraction of the box side, and its cap in pixels.
BOX_NOISE = 0.1
BOX_MAX_SHIFT = 20.0


def round_schedule(
    rng: np.random.Generator, point_rounds: int = POINT_ROUNDS, empty_rounds: int = EMPTY_ROUNDS
) -> list[bool]:
    """Whether each round after the first adds a point: ``point_rounds`` ``True`` and
    ``empty_rounds`` ``False``, the last round always ``False`` (when ``empty_rounds`` > 0)
    and the other empty rounds at random positions among the point rounds."""
    if point_rounds < 0 or empty_rounds < 0:
        raise ValueError("round counts must be non-negative")
    if empty_rounds == 0:
        return [True] * point_rounds
    head = [True] * point_rounds
    for _ in range(empty_rounds - 1):
        head.insert(int(rng.integers(len(head) + 1)), False)
    return head + [False]


def num_rounds(point_rounds: int = POINT_ROUNDS, empty_rounds: int = EMPTY_ROUNDS) -> int:
    """Rounds per mask including the first prompt (11 for the paper's schedule)."""
    return 1 + point_rounds + empty_rounds


def sample_points(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One pixel ``(x, y)`` drawn uniformly from each mask of ``masks`` ``(B, H, W)``.

    Raises ``ValueError`` for an empty mask."""
    out = np.zeros((len(masks), 2), dtype=np.float64)
    for i, m in enumerate(masks):
        flat = np.flatnonzero(m)
        if flat.size == 0:
            raise ValueError(f"mask {i} is empty: cannot sample a point in it")
        y, x = divmod(int(flat[rng.integers(flat.size)]), m.shape[1])
        out[i] = (x, y)
    return out


def jitter_boxes(
    boxes: np.ndarray,
    rng: np.random.Generator,
    noise: float = BOX_NOISE,
    max_shift: float = BOX_MAX_SHIFT,
) -> np.ndarray:
    """XYXY ``boxes`` ``(B, 4)`` with each coordinate moved by Gaussian noise of standard
    deviation ``noise`` x the box side (width for x, height for y), clipped to
    ``max_shift`` pixels; corners re-ordered so that ``x0 <= x1`` and ``y0 <= y1``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if noise <= 0:
        return b.copy()
    side = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]] * 2, axis=1)
    shift = np.clip(rng.normal(size=b.shape) * noise * side, -max_shift, max_shift)
    out = b + shift
    x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1)


def error_regions(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(false_negative, false_positive)``: ground truth not predicted, and predicted
    outside the ground truth (boolean arrays of the inputs' shape)."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    return gt & ~pred, pred & ~gt


def sample_error_points(
    gt: np.ndarray,
    pred: np.ndarray,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One point per mask drawn uniformly from its error region.

    Args:
        gt, pred: ``(B, H, W)`` boolean ground truth and prediction.
        valid: optional ``(B, H, W)`` or ``(H, W)`` boolean: where points may go (e.g. the
            image part of a padded frame); the error region is restricted to it.

    Returns:
        ``coords`` ``(B, 2)`` pixel ``(x, y)`` and ``labels`` ``(B,)``: 1 for a point in the
        false-negative part, 0 in the false-positive part, -1 (no point; coordinates 0)
        when the prediction has no error.
    """
    fn, fp = error_regions(gt, pred)
    if valid is not None:
        fn = fn & valid
        fp = fp & valid
    b, _, w = fn.shape
    coords = np.zeros((b, 2), dtype=np.float64)
    labels = np.full(b, -1, dtype=np.int64)
    for i in range(b):
        flat = np.flatnonzero(fn[i] | fp[i])
        if flat.size == 0:
            continue
        idx = int(flat[rng.integers(flat.size)])
        y, x = divmod(idx, w)
        coords[i] = (x, y)
        labels[i] = 1 if fn[i].flat[idx] else 0
    return coords, labels


def lowres_to_model_points(
    coords: np.ndarray, rng: np.random.Generator, stride: int, input_size: np.ndarray
) -> np.ndarray:
    """Cells ``(x, y)`` of a low-res grid (``stride`` model pixels per cell) -> a model-frame
    pixel drawn uniformly inside each cell, kept inside ``input_size`` ``(B, 2)`` as
    ``(h, w)`` rows (the image part of the padded frame)."""
    pix = coords * stride + rng.integers(stride, size=coords.shape)
    limit = np.stack([input_size[:, 1], input_size[:, 0]], axis=1) - 1
    return np.minimum(pix, limit).astype(np.float64)


def choose_first_prompts(n: int, rng: np.random.Generator, box_prob: float = 0.5) -> np.ndarray:
    """``(n,)`` bool: which masks start from a box (``True``) rather than a point."""
    return rng.random(n) < box_prob
