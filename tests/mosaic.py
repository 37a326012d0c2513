"""Mosaics of real COCO-layout images whose ground truth still holds: shared by the tiling
tests and ``benchmarks/bench_tiles.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from segany import validate as V
from segany.everything import PRESETS, _Found
from segany.tiles import TileGrid
from segany.transforms import load_image

NUCLEI = Path(__file__).resolve().parent / "data" / "nuclei"


def load_coco(root: Path) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """``[(rgb (H, W, 3) uint8, [object masks (H, W) bool, ...]), ...]`` of a COCO folder
    (``annotations.json`` + ``images/``), in the file's image order."""
    data = json.loads((root / "annotations.json").read_text())
    V.check_coco(data)
    out = []
    for img in data["images"]:
        rgb = load_image(root / "images" / img["file_name"])
        h, w = rgb.shape[:2]
        objs = [
            V.segmentation_to_mask(a["segmentation"], h, w)
            for a in data["annotations"]
            if a["image_id"] == img["id"] and not a.get("iscrowd", 0)
        ]
        out.append((rgb, objs))
    return out


def build_mosaic(
    items: list[tuple[np.ndarray, list[np.ndarray]]], rows: int, cols: int, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """A ``rows x cols`` grid of ``side``-pixel cells, the items repeated in order (each
    cropped to the cell from its top-left corner): ``(rgb (rows*side, cols*side, 3) uint8,
    labels (same, uint32))``, ground-truth object ``i`` labelled ``i`` (1-based, unique
    across the mosaic; 0 = background)."""
    rgb = np.zeros((rows * side, cols * side, 3), np.uint8)
    labels = np.zeros(rgb.shape[:2], np.uint32)
    next_id = 1
    for k in range(rows * cols):
        img, objs = items[k % len(items)]
        r, c = divmod(k, cols)
        h, w = min(side, img.shape[0]), min(side, img.shape[1])
        cell = (slice(r * side, r * side + h), slice(c * side, c * side + w))
        rgb[cell] = img[:h, :w]
        for m in objs:
            m = m[:h, :w]
            if m.any():
                labels[cell][m] = next_id
                next_id += 1
    return rgb, labels


class OracleGenerator:
    """A stand-in for MaskGenerator returning the ground truth seen by each tile, in the
    order TiledMaskGenerator visits the tiles: checks the merging alone, exactly."""

    def __init__(self, gt: np.ndarray, grid: TileGrid) -> None:
        self.settings = PRESETS["fast"]
        self.gt, self.windows = gt, [grid.window(r, c) for r, c in grid]
        self.calls = 0

    def generate_masks(self, rgb):
        x0, y0, x1, y1 = self.windows[self.calls]
        self.calls += 1
        crop = self.gt[y0:y1, x0:x1]
        ids = [i for i in np.unique(crop) if i]
        masks = torch.as_tensor(np.stack([crop == i for i in ids] or [crop < 0]))[: len(ids)]
        n = len(ids)
        z = torch.zeros(n, 4)
        found = _Found(masks, torch.full((n,), 0.9), torch.ones(n), z[:, :2], z, z)
        return found, crop.shape
