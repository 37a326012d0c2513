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
