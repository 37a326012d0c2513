"""Pictures: masks drawn over images, with the prompts that produced them."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: Distinct colours (RGB) cycled over masks.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (30, 144, 255), (255, 99, 71), (60, 179, 113), (238, 130, 238), (255, 215, 0),
    (0, 206, 209), (255, 140, 0), (147, 112, 219), (50, 205, 50), (220, 20, 60),
    (70, 130, 180), (244, 164, 96), (46, 139, 87), (218, 112, 214), (189, 183, 107),
)  # fmt: skip


def color(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def draw_mask(
    image: np.ndarray,
    mask: np.ndarray,
    rgb: tuple[int, int, int],
    *,
    alpha: float = 0.5,
    outline: int = 2,
) -> np.ndarray:
    """Blend one boolean ``(H, W)`` mask into an RGB uint8 image and outline it (in place
    on a copy; returns the copy)."""
    out = image.copy()
    m = mask.astype(bool)
    if m.any():
        tint = np.asarray(rgb, dtype=np.float32)
        out[m] = (out[m].astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
        if outline > 0:
            contours, _ = cv2.findContours(
                m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
            )
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in rgb), outline)
    return out


def draw_prompts(
    image: np.ndarray,
    *,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
) -> np.ndarray:
    """Draw points (green = object, red = background, white ring) and an XYXY box."""
    out = image.copy()
    radius = max(4, round(max(image.shape[:2]) / 100))
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(box).reshape(4))
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 255, 0), max(2, radius // 2))
    if points is not None:
        labs = np.ones(len(points), int) if labels is None else np.asarray(labels)
        for (x, y), lab in zip(np.asarray(points).reshape(-1, 2), labs):
            c = (0, 200, 0) if lab == 1 else (230, 0, 0)
            centre = (int(round(x)), int(round(y)))
            cv2.circle(out, centre, radius, c, -1, lineType=cv2.LINE_AA)
            cv2.circle(out, centre, radius, (255, 255, 255), 2, lineType=cv2.LINE_AA)
    return out


def overlay_prediction(
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Image with each mask in its own colour and the prompts on top."""
    out = image
    for i, m in enumerate(masks):
        out = draw_mask(out, m, color(i), alpha=alpha)
    return draw_prompts(out, points=points, labels=labels, box=box)


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    alpha: float = 0.45,
    outline: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Image with many masks (e.g. "segment everything"), each in its own colour with its
    outline; larger masks are drawn first so small ones stay visible."""
    out = np.array(image, dtype=np.uint8, copy=True)
    if len(masks) == 0:
        return out
    ms = [np.asarray(m, dtype=bool) for m in masks]
    order = np.argsort([-int(m.sum()) for m in ms], kind="stable")
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(len(ms), 3))
    tint = out.astype(np.float32)
    for k in order:
        m = ms[k]
        tint[m] = tint[m] * (1 - alpha) + colours[k].astype(np.float32) * alpha
    out = tint.astype(np.uint8)
    if outline > 0:
        for k in order:
            contours, _ = cv2.findContours(
                ms[k].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
            )
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colours[k]), outline)
    return out


def overlay_records(image: np.ndarray, records: Sequence[dict], **kwargs) -> np.ndarray:
    """:func:`overlay_masks` over generator records (any segmentation encoding)."""
    from .datasets import to_mask

    return overlay_masks(image, [to_mask(r["segmentation"]) for r in records], **kwargs)


def candidates_panel(
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    best: int | None = None,
) -> np.ndarray:
    """The candidate masks side by side, each captioned with its index and predicted IoU;
    the ``best`` one is framed."""
    tiles = []
    for i, (m, s) in enumerate(zip(masks, scores)):
        tile = draw_prompts(draw_mask(image, m, color(i)), points=points, labels=labels, box=box)
        bar = np.full((28, tile.shape[1], 3), 255, np.uint8)
        text = f"mask {i}: IoU {float(s):.3f}" + ("  (best)" if i == best else "")
        cv2.putText(bar, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        tile = np.concatenate([bar, tile], axis=0)
        if i == best:
            cv2.rectangle(tile, (0, 0), (tile.shape[1] - 1, tile.shape[0] - 1), (0, 160, 0), 4)
        tiles.append(tile)
        tiles.append(np.full((tile.shape[0], 6, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


def overlay_labeled(
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    captions: Sequence[str],
    *,
    boxes: np.ndarray | None = None,
    class_ids: Sequence[int] | np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Masks tinted by class (``class_ids``, else one colour per mask), each with its XYXY
    box (if given) and a caption such as ``"dog 0.87"`` on a filled tag at the box's (else
    the mask's) top-left corner. Larger masks are drawn first."""
    out = np.array(image, dtype=np.uint8, copy=True)
    ms = [np.asarray(m, dtype=bool) for m in masks]
    if len(captions) != len(ms):
        raise ValueError(f"{len(captions)} captions for {len(ms)} masks")
    ids = list(range(len(ms))) if class_ids is None else [int(c) for c in class_ids]
    order = np.argsort([-int(m.sum()) for m in ms], kind="stable")
    for k in order:
        out = draw_mask(out, ms[k], color(ids[k]), alpha=alpha)
    h, w = out.shape[:2]
    scale = max(0.4, min(1.2, max(h, w) / 1200))
    thick = max(1, round(scale * 2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k in order:
        rgb = color(ids[k])
        if boxes is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(boxes[k]).reshape(4))
            cv2.rectangle(out, (x0, y0), (x1, y1), rgb, thick)
        else:
            ys, xs = np.nonzero(ms[k])
            if len(xs) == 0:
                continue
            x0, y0 = int(xs.min()), int(ys.min())
        text = str(captions[k])
        (tw, th), base = cv2.getTextSize(text, font, scale, thick)
        tx = min(max(0, x0), max(0, w - tw - 4))
        ty = y0 - th - base - 4 if y0 - th - base - 4 >= 0 else y0  # above the box, else inside
        cv2.rectangle(out, (tx, ty), (tx + tw + 4, ty + th + base + 4), rgb, -1)
        ink = (0, 0, 0) if sum(rgb) > 380 else (255, 255, 255)
        cv2.putText(out, text, (tx + 2, ty + th + 2), font, scale, ink, thick, cv2.LINE_AA)
    return out
