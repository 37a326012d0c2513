"""One PNG per mask (0/255) in a folder per image, plus ``metadata.csv`` (SAM's
``amg.py`` layout: id, area, bbox, point, predicted IoU, stability, crop box). The bbox
is measured on the mask (:func:`~.records.rle_bbox`), as in every writer."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import atomic_file
from .coco import as_mask_record
from .records import to_mask

HEADER = (
    "id,file,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
    "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
).split(",")


def write_png(folder: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write ``folder/<i>.png`` for every mask and ``folder/metadata.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(records):
        name = f"{i}.png"
        mask = to_mask(r["segmentation"])
        m = as_mask_record(r, *mask.shape, index=i, where=str(folder))
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)
        (px, py) = m.point_coords[0] if m.point_coords else ("", "")
        crop = m.crop_box or (0.0, 0.0, float(mask.shape[1]), float(mask.shape[0]))
        rows.append([i, name, m.area, *m.bbox, px, py, m.predicted_iou, m.stability_score, *crop])
    with atomic_file(folder / "metadata.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return folder


def read_png(folder: str | Path) -> tuple[list[dict[str, str]], list[np.ndarray]]:
    """Rows of ``metadata.csv`` and the masks they name."""
    folder = Path(folder)
    with open(folder / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    masks = [np.asarray(Image.open(folder / r["file"])) > 127 for r in rows]
    return rows, masks
