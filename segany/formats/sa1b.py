"""SA-1B per-image JSON: ``{"image": {image_id, width, height, file_name}, "annotations":
[{id, segmentation (COCO RLE), bbox (XYWH), area, predicted_iou, stability_score,
crop_box, point_coords}]}``.

Records without ``crop_box`` / ``point_coords`` (masks prompted by a box, e.g. from text
prompts) get the whole image and no points. ``extra_keys`` copies more record keys into each
annotation as they are (e.g. ``category_id``, ``label``, ``phrase``, ``score`` of text
prompts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import validate as V
from . import to_coco_rle


def to_sa1b(
    records: list[dict[str, Any]],
    *,
    image_id: int,
    file_name: str,
    width: int,
    height: int,
    extra_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One image's records -> its SA-1B JSON (a dict); see the module doc."""
    full = [0.0, 0.0, float(width), float(height)]
    anns = []
    for i, r in enumerate(records):
        anns.append(
            {
                "id": i,
                "segmentation": to_coco_rle(r["segmentation"]),
                "bbox": [float(v) for v in r["bbox"]],
                "area": int(r["area"]),
                "predicted_iou": float(r["predicted_iou"]),
                "stability_score": float(r["stability_score"]),
                "crop_box": [float(v) for v in r.get("crop_box", full)],
                "point_coords": [[float(x), float(y)] for x, y in r.get("point_coords", ())],
                **{k: r[k] for k in extra_keys if k in r},
            }
        )
    return {
        "image": {
            "image_id": int(image_id),
            "width": int(width),
            "height": int(height),
            "file_name": file_name,
        },
        "annotations": anns,
    }


def write_sa1b(path: str | Path, records: list[dict[str, Any]], **image: Any) -> Path:
    """Write one image's masks; ``image``: image_id, file_name, width, height."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(V.dumps(to_sa1b(records, **image)))
    return path


def read_sa1b(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if "image" not in data or "annotations" not in data:
        raise ValueError(f"{path} is not an SA-1B image JSON (needs 'image' and 'annotations')")
    return data
