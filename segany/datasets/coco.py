"""COCO instances JSON: the one reader (:func:`read_coco`) and the one writer
(:class:`CocoWriter`, and :func:`to_coco` for a set of :class:`ImageRecord`).

The writer takes model records (one class-agnostic category, ``score`` = predicted IoU;
also usable as a COCO results list via :meth:`CocoWriter.results`) or
:class:`MaskRecord` s. With ``categories`` (e.g. class names from text prompts) each record
names its ``category_id`` and may carry its own ``score`` (the detector's confidence).
Areas and boxes are always measured on the mask (:func:`~.records.rle_bbox`), whatever the
record says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import validate as V
from ..files import atomic_write
from .records import (
    DEFAULT_CATEGORIES,
    Dataset,
    DatasetError,
    ImageFile,
    ImageRecord,
    MaskRecord,
    TarMember,
    parse_annotations,
)

CATEGORY = dict(DEFAULT_CATEGORIES[0])


# -- reading ---------------------------------------------------------------------------------
def load_json(path: Path) -> Any:
    """A JSON file's content; :class:`DatasetError` naming the file if it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError as exc:  # also UnicodeDecodeError
        raise DatasetError(
            f"cannot read {path}: not valid JSON, cut short or damaged? ({len(raw)} bytes; {exc})"
        ) from None


def is_coco(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list)


def read_coco(
    source: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    *,
    data: Any = None,
    locate: Callable[[str], ImageFile | TarMember] | None = None,
) -> Dataset:
    """A COCO instances JSON (or a folder holding ``annotations.json``). Images are looked
    up in ``images``, else ``images/`` beside the file, else beside it. The whole file is
    checked (:func:`segany.validate.check_coco`) before anything is read. ``data``: the
    file's content when already loaded; ``locate`` finds an image by ``file_name`` instead
    (e.g. in the tars of a labeled dataset)."""
    src = Path(source).expanduser()
    ann_file = src / "annotations.json" if src.is_dir() else src
    if data is None:
        if not ann_file.is_file():
            raise DatasetError(f"no COCO annotations at {ann_file}")
        data = load_json(ann_file)
    if not is_coco(data):
        raise DatasetError(f"{ann_file} is not a COCO instances JSON (no 'images' list)")
    data.setdefault("annotations", [])
    try:
        V.check_coco(data, str(ann_file))
    except V.InputError as exc:
        raise DatasetError(str(exc)) from None
    root = ann_file.parent
    if images is not None:
        image_dir = Path(images).expanduser()
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for im in data["images"]:
        iid, name, h, w = int(im["id"]), im["file_name"], int(im["height"]), int(im["width"])
        anns = parse_annotations(by_image.get(iid, []), h, w, where=str(ann_file), image=name)
        out.append(
            ImageRecord(
                key=name,
                image_id=iid,
                height=h,
                width=w,
                file_name=name,
                source=locate(name) if locate else ImageFile(path=image_dir / name),
                annotations=anns,
            )
        )
    cats = data.get("categories")
    if not cats:
        used = sorted({a.category_id for im in out for a in im.annotations}) or [1]
        cats = [{"id": c, "name": "object", "supercategory": "object"} for c in used]
    name = root.name if ann_file.name == "annotations.json" else ann_file.stem
    return Dataset(name=name, kind="coco", source=ann_file, read=out, categories=cats)


# -- writing ---------------------------------------------------------------------------------
class CocoWriter:
    """Accumulate images and their masks, then :meth:`write` one JSON file."""

    def __init__(
        self,
        categories: Sequence[Mapping[str, Any]] | None = None,
        *,
        extra_keys: tuple[str, ...] = (),
        description: str = "segany everything",
    ) -> None:
        """``categories``: COCO categories (default one ``object`` class); ``extra_keys``:
        record keys (or :class:`MaskRecord` fields, when set) copied into each annotation
        as they are."""
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = [dict(c) for c in categories] if categories else [dict(CATEGORY)]
        self.extra_keys = extra_keys
        self.description = description

    def add(
        self,
        records: Iterable[Mapping[str, Any] | MaskRecord],
        *,
        file_name: str,
        width: int,
        height: int,
        image_id: int | None = None,
        keep_ids: bool = False,
        file_values: bool = False,
    ) -> int:
        """Add one image and its masks (model records or :class:`MaskRecord`); returns the
        image id (``len(images) + 1`` unless given). Annotation ids count from 1 over the
        file, or with ``keep_ids`` are the records' own. Areas and boxes are measured on
        the masks, or with ``file_values`` taken from the records' source file where it gave
        them (ground truth for COCOeval: COCO's areas are polygon areas)."""
        image_id = len(self.images) + 1 if image_id is None else int(image_id)
        h, w = V.check_image_size(height, width)
        self.images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for i, r in enumerate(records):
            m = as_mask_record(r, h, w, index=i, where=file_name)
            score = m.score if m.score is not None else m.predicted_iou
            area, bbox = m.area, m.bbox
            if file_values:
                area = m.file_area if m.file_area is not None else area
                bbox = m.file_bbox if m.file_bbox is not None else bbox
            ann = {
                "id": m.id if keep_ids else len(self.annotations) + 1,
                "image_id": image_id,
                "category_id": _category(r, m, self.categories[0]["id"]),
                "segmentation": m.segmentation(),
                "area": area,
                "bbox": list(bbox),
                "iscrowd": int(m.iscrowd),
            }
            if score is not None:
                ann["score"] = score
            if m.stability_score is not None:
                ann["stability_score"] = m.stability_score
            for k in self.extra_keys:
                if isinstance(r, Mapping):
                    if k in r:
                        ann[k] = r[k]
                elif getattr(r, k, None) is not None:
                    ann[k] = getattr(r, k)
            self.annotations.append(ann)
        return image_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": {"description": self.description},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def results(self) -> list[dict[str, Any]]:
        """The annotations as a COCO results list (for ``COCO.loadRes``)."""
        keys = ("image_id", "category_id", "segmentation", "score", "bbox", "area")
        return [{k: a[k] for k in keys if k in a} for a in self.annotations]

    def write(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write(path, V.dumps(self.to_dict()))


def _category(r: Any, m: MaskRecord, default: int) -> int:
    if isinstance(r, Mapping) and "category_id" not in r:
        return int(default)
    return m.category_id


def as_mask_record(
    r: Mapping[str, Any] | MaskRecord, height: int, width: int, *, index: int, where: str
) -> MaskRecord:
    """A model record (dict) or a :class:`MaskRecord` -> :class:`MaskRecord` of an image of
    ``height`` x ``width``; a malformed one raises :class:`DatasetError` naming ``where``."""
    if isinstance(r, MaskRecord):
        if r.size != (height, width):
            raise DatasetError(f"{where}: mask {r.id} is {r.size}, the image {[height, width]}")
        return r
    try:
        return MaskRecord.from_annotation(r, height, width, index=index)
    except V.InputError as exc:
        raise DatasetError(f"{where}: mask #{index}: {exc}") from None


def to_coco(
    images: Iterable[ImageRecord],
    *,
    absolute_paths: bool = False,
    categories: Sequence[Mapping[str, Any]] | None = None,
    file_values: bool = False,
) -> dict[str, Any]:
    """A COCO instances dict of ``images`` through :class:`CocoWriter` (image and
    annotation ids kept; ``file_name`` the image's key, or its absolute path;
    ``categories`` default to one ``object`` category per id used; ``file_values``: see
    :meth:`CocoWriter.add`)."""
    images = list(images)
    if not categories:
        used = sorted({a.category_id for im in images for a in im.annotations}) or [1]
        categories = [{**CATEGORY, "id": c} for c in used]
    writer = CocoWriter(categories, description="segany dataset")
    for im in images:
        writer.add(
            im.annotations,
            file_name=str(im.path.resolve()) if absolute_paths else im.key,
            width=im.width,
            height=im.height,
            image_id=im.image_id,
            keep_ids=True,
            file_values=file_values,
        )
    return writer.to_dict()


__all__ = [
    "CATEGORY",
    "CocoWriter",
    "as_mask_record",
    "is_coco",
    "load_json",
    "read_coco",
    "to_coco",
]
