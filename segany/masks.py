"""Pure helpers on masks, boxes and point grids (no model, no I/O).

Conventions: masks are ``(..., H, W)`` bool tensors/arrays; boxes are XYXY in pixels
where a mask's box spans its first to last occupied pixel index (``x1 = last column``,
as Meta's generator reports them and uses them for NMS); points are ``(x, y)``. What is
written to files uses COCO's box instead (``x + w`` one past the last column):
:func:`segany.datasets.rle_bbox`.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from . import validate as V

# -- point grids and crops ------------------------------------------------------------------


def point_grid(n_per_side: int) -> np.ndarray:
    """``(n*n, 2)`` cell centres of an ``n x n`` grid over ``[0, 1]^2``, row-major, (x, y)."""
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    side = (np.arange(n_per_side, dtype=np.float64) + 0.5) / n_per_side
    xs, ys = np.meshgrid(side, side, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int = 1) -> list[np.ndarray]:
    """One grid per crop layer; layer ``i`` has ``int(n / downscale**i)`` points per side."""
    return [point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, ints) and their layer index: the whole image (layer 0), then for
    layer ``i >= 1`` a ``2^i x 2^i`` set of crops overlapping by ``overlap_ratio`` of the
    short side (scaled down by ``2 / 2^i``)."""
    h, w = image_size
    boxes, layers = [[0, 0, w, h]], [0]
    short = min(h, w)
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short * (2 / n))
        cw = int(math.ceil((overlap * (n - 1) + w) / n))
        ch = int(math.ceil((overlap * (n - 1) + h) / n))
        x0s = [int((cw - overlap) * i) for i in range(n)]
        y0s = [int((ch - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
            layers.append(layer)
    return boxes, layers


# -- scores ----------------------------------------------------------------------------------


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks ``logits > threshold + offset`` and ``logits > threshold - offset``
    (the first lies inside the second), over the last two axes. Empty -> 0/0 = NaN as in
    the reference; callers filter with ``>=`` so NaN is dropped."""
    inter = (logits > threshold + offset).sum((-1, -2), dtype=torch.int32)
    union = (logits > threshold - offset).sum((-1, -2), dtype=torch.int32)
    return inter / union


# -- boxes -----------------------------------------------------------------------------------


def cover_fraction(masks: torch.Tensor, max_fraction: float = 1.0) -> float:
    """Fraction of the ``(H, W)`` frame covered by the union of ``(N, H, W)`` bool masks,
    leaving out masks that alone cover ``max_fraction`` of the frame or more."""
    if masks.shape[0] == 0:
        return 0.0
    if max_fraction < 1.0:
        area = masks.flatten(1).sum(1)
        masks = masks[area < max_fraction * masks.shape[-1] * masks.shape[-2]]
    small = masks
    if small.shape[0] == 0:
        return 0.0
    return float(small.any(0).float().mean())


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` bool -> ``(..., 4)`` XYXY of first/last occupied column and row;
    ``[0, 0, 0, 0]`` for an empty mask."""
    shape = masks.shape
    h, w = shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*shape[:-2], 4, dtype=torch.int64)
    m = masks.reshape(-1, h, w)
    rows = m.any(-1)
    cols = m.any(-2)
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y1 = torch.where(rows, ar_h, -1).amax(-1)
    y0 = torch.where(rows, ar_h, h).amin(-1)
    x1 = torch.where(cols, ar_w, -1).amax(-1)
    x0 = torch.where(cols, ar_w, w).amin(-1)
    out = torch.stack([x0, y0, x1, y1], -1)
    empty = ~rows.any(-1)
    out[empty] = 0
    return out.reshape(*shape[:-2], 4)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of XYXY boxes (area ``(x1-x0)*(y1-y0)``)."""
    a = a.float()
    b = b.float()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of kept boxes by decreasing score (ties in
    input order). A box is dropped when a kept box with a higher score overlaps it with
    IoU ``> iou_threshold``.

    Vectorised: the greedy result is the unique fixed point of "kept iff no kept
    higher-ranked box suppresses it", reached by repeated matrix steps (at most the length
    of the longest suppression chain) instead of a loop over boxes.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    over = box_iou(b, b) > iou_threshold
    over = torch.triu(over, diagonal=1)  # over[i, j]: i (higher) would suppress j
    if not over.any():
        return order
    overf = over.float()
    keep = torch.ones(n, dtype=torch.bool)
    for _ in range(n + 1):
        new = (keep.float() @ overf) == 0
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS applied independently within each group id (boxes of different groups never
    suppress each other). Returns kept indices by decreasing score."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    boxes = boxes.float()
    span = (boxes.max() - boxes.min() + 1).clamp(min=1)
    shifted = boxes + (groups.to(boxes) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Which image-frame boxes lie within ``atol`` of an edge of ``crop_box`` that is not
    also an edge of the image (such masks are likely cut by the crop)."""
    b = boxes.float()
    crop = torch.tensor(crop_box, dtype=torch.float32)
    img = torch.tensor(image_box, dtype=torch.float32)
    near_crop = (b - crop).abs() <= atol
    near_img = (b - img).abs() <= atol
    return (near_crop & ~near_img).any(-1)


def xyxy_to_xywh(boxes: torch.Tensor | np.ndarray) -> Any:
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


def xywh_to_xyxy(boxes: Any) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes (``(..., 4)``, array-like) as float64 ``[x0, y0, x1, y1]``."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[..., 2] += out[..., 0]
    out[..., 3] += out[..., 1]
    return out


# -- RLE -------------------------------------------------------------------------------------


def masks_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W)`` bool -> uncompressed COCO RLE dicts ``{"size": [H, W], "counts":
    [...]}`` (column-major runs starting with a run of zeros)."""
    m = torch.as_tensor(masks, dtype=torch.bool)
    n, h, w = m.shape
    if n == 0:
        return []
    flat = m.transpose(1, 2).reshape(n, h * w)
    change = flat[:, 1:] ^ flat[:, :-1]
    idx = change.nonzero()
    per_mask = torch.bincount(idx[:, 0], minlength=n).tolist()
    positions = (idx[:, 1] + 1).tolist()
    first = flat[:, 0].tolist()
    out = []
    start = 0
    total = h * w
    for i in range(n):
        cuts = positions[start : start + per_mask[i]]
        start += per_mask[i]
        bounds = [0, *cuts, total]
        counts = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if first[i]:
            counts = [0, *counts]
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed or COCO (compressed) RLE -> ``(H, W)`` bool; a malformed one raises
    :class:`segany.validate.InputError`."""
    return V.segmentation_to_mask(rle)


def rle_area(rle: dict[str, Any]) -> int:
    return int(mask_utils.area(V.segmentation_to_rle(rle)))


def masks_to_coco_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W)`` bool -> compressed COCO RLE dicts with ``counts`` as str (JSON-ready)."""
    m = np.asarray(torch.as_tensor(masks, dtype=torch.bool).numpy(), dtype=np.uint8)
    if m.shape[0] == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
    return [{"size": list(e["size"]), "counts": e["counts"].decode("ascii")} for e in encoded]


def uncompressed_to_coco_rle(rle: dict[str, Any]) -> dict[str, Any]:
    enc = V.segmentation_to_rle(rle)
    return {"size": list(enc["size"]), "counts": enc["counts"].decode("ascii")}


def mask_iou_matrix(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> np.ndarray:
    """Pairwise mask IoU ``(len(a), len(b))`` of COCO RLEs (compressed or not)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    ca = [_as_coco(r) for r in a]
    cb = [_as_coco(r) for r in b]
    return np.asarray(mask_utils.iou(ca, cb, [0] * len(cb)))


def _as_coco(rle: dict[str, Any]) -> dict[str, Any]:
    return V.segmentation_to_rle(rle)


# -- cleanup ---------------------------------------------------------------------------------


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``mode="islands"``) smaller than
    ``min_area`` pixels (8-connectivity). If every island is small, the largest is kept.
    Returns the mask and whether it changed."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    work = (mask ^ holes).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size == 0:
        return mask, False
    if holes:
        fill = np.zeros(n, dtype=bool)
        fill[0] = True
        fill[small] = True
        return fill[labels], True
    keep = np.ones(n, dtype=bool)
    keep[0] = False
    keep[small] = False
    if not keep.any():
        keep[int(np.argmax(sizes)) + 1] = True
    return keep[labels], True


def clean_mask(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill small holes then drop small islands; returns the mask and whether it changed."""
    m, c1 = remove_small_regions(mask, min_area, "holes")
    m, c2 = remove_small_regions(m, min_area, "islands")
    return m, c1 or c2


# -- polygons --------------------------------------------------------------------------------


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[np.ndarray]:
    """Outer contours of a mask as ``(K, 2)`` float ``(x, y)`` arrays (cv2.findContours,
    simple chain approximation), largest first."""
    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polys = [c.reshape(-1, 2).astype(np.float64) for c in contours if len(c) >= min_points]
    polys.sort(key=lambda p: -cv2.contourArea(p.astype(np.float32)))
    return polys
