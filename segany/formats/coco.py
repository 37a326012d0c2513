"""COCO "instances" JSON for a folder of images (one class-agnostic category, ``score`` =
predicted IoU; also usable as a COCO results list via :meth:`CocoWriter.results`).

With ``categories`` (e.g. class names from text prompts) each record names its
``category_id`` and may carry its own ``score`` (the detector's confidence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import validate as V
from . import to_coco_rle

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


class CocoWriter:
    """Accumulate images and their masks, then :meth:`write` one JSON file."""

    def __init__(
        self,
        categories: list[dict[str, Any]] | None = None,
        *,
        extra_keys: tuple[str, ...] = (),
    ) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = [dict(c) for c in categories] if categories else [CATEGORY]
        self.extra_keys = extra_keys  # record keys copied into each annotation as they are

    def add(
        self,
        records: list[dict[str, Any]],
        *,
        file_name: str,
        width: int,
        height: int,
        image_id: int | None = None,
    ) -> int:
        image_id = len(self.images) + 1 if image_id is None else int(image_id)
        self.images.append(
            {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}
        )
        for r in records:
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(r.get("category_id", self.categories[0]["id"])),
                    "segmentation": to_coco_rle(r["segmentation"]),
                    "area": int(r["area"]),
                    "bbox": [float(v) for v in r["bbox"]],
                    "iscrowd": 0,
                    "score": float(r.get("score", r["predicted_iou"])),
                    "stability_score": float(r["stability_score"]),
                    **{k: r[k] for k in self.extra_keys if k in r},
                }
            )
        return image_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": {"description": "segany everything"},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def results(self) -> list[dict[str, Any]]:
        """The annotations as a COCO results list (for ``COCO.loadRes``)."""
        keys = ("image_id", "category_id", "segmentation", "score", "bbox", "area")
        return [{k: a[k] for k in keys} for a in self.annotations]

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(V.dumps(self.to_dict()))
        return path
