"""YOLO segmentation labels: one line per mask, ``CLASS x1 y1 x2 y2 ...`` with polygon
vertices normalised to ``[0, 1]`` (the mask's largest outer contour)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import masks as M
from ..files import atomic_write
from .records import to_mask


def yolo_lines(records: list[dict[str, Any]], *, class_id: int = 0) -> list[str]:
    lines = []
    for r in records:
        mask = to_mask(r["segmentation"])
        h, w = mask.shape
        polys = M.mask_to_polygons(mask)
        if not polys:
            continue
        p = polys[0] / np.array([w, h], dtype=np.float64)
        coords = " ".join(f"{v:.6f}" for v in np.clip(p, 0, 1).ravel())
        lines.append(f"{class_id} {coords}")
    return lines


def write_yolo(path: str | Path, records: list[dict[str, Any]], *, class_id: int = 0) -> Path:
    lines = yolo_lines(records, class_id=class_id)
    return atomic_write(path, "\n".join(lines) + ("\n" if lines else ""))


def read_yolo(path: str | Path) -> list[tuple[int, np.ndarray]]:
    """``(class, (K, 2) normalised polygon)`` per line."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        vals = np.asarray([float(v) for v in parts[1:]]).reshape(-1, 2)
        out.append((int(parts[0]), vals))
    return out
