"""Reading a COCO instances JSON for the annotator's import (``POST /api/import/coco``).

Every value is checked before it is used (:mod:`segany.validate`: nothing reaches
pycocotools unchecked) and the whole file is refused with one message naming the image,
category or annotation at fault, so an import either loads everything it can match or
nothing:

- ``images``: objects with an integer ``id`` (unique) and a relative ``file_name``; images
  the folder does not have are skipped (and listed);
- ``categories`` (optional): objects with an integer ``id`` (unique) and a non-blank
  ``name`` of at most 128 characters;
- ``annotations``: objects with an integer ``image_id`` of a listed image, a
  ``category_id`` of a listed category (any integer when no categories are listed), a
  segmentation (polygons or RLE) valid for the registered image's size, and a finite
  ``score`` if any. Annotations of skipped images are counted, not read; empty masks are
  counted and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..validate import InputError, check_score, integer_id


@dataclass
class CocoImport:
    #: COCO image id -> the registered image (only the images the folder has).
    matched: dict[int, Any] = field(default_factory=dict)
    skipped_images: list[str] = field(default_factory=list)
    #: ``(annotation index, annotation, category name)`` of the matched images.
    annotations: list[tuple[int, dict[str, Any], str]] = field(default_factory=list)
    skipped_annotations: int = 0


def read_coco(
    data: Any,
    known: dict[str, Any],
    root: Path,
    *,
    clean_category: Any,
    safe_relpath: Any,
    max_category: int,
) -> CocoImport:
    """Check ``data`` and match its images against ``known`` (relative path -> registered
    image). Raises :class:`InputError` naming what is wrong; ``safe_relpath`` raises the
    service's error for a file name outside the images folder."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError("not a COCO instances JSON: needs an 'images' list")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise InputError("'annotations' must be a list")
    cats_in = data.get("categories")
    if cats_in is not None and not isinstance(cats_in, list):
        raise InputError("'categories' must be a list")
    cats: dict[int, str] | None = None
    if cats_in is not None:
        cats = {}
        for i, c in enumerate(cats_in):
            where = f"categories[{i}]"
            if not isinstance(c, dict):
                raise InputError(f"{where} is not an object")
            cid = _id(c.get("id"), f"{where}: id")
            if cid in cats:
                raise InputError(f"{where}: category id {cid} appears twice")
            name = c.get("name")
            if not isinstance(name, str):
                raise InputError(f"{where} (id {cid}): name must be a string, got {_show(name)}")
            try:
                name = clean_category(name)
            except ValueError:
                raise InputError(f"{where} (id {cid}): the name is blank") from None
            if len(name) > max_category:
                raise InputError(
                    f"{where} (id {cid}): the name is longer than {max_category} characters"
                )
            cats[cid] = name
    out = CocoImport()
    listed: set[int] = set()
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise InputError(f"{where}: every image needs 'id' and 'file_name'")
        iid = _id(entry["id"], f"{where}: id")
        if iid in listed:
            raise InputError(f"{where}: image id {iid} appears twice")
        listed.add(iid)
        name = entry["file_name"]
        if not isinstance(name, str):
            raise InputError(f"{where} (id {iid}): file_name must be a string")
        safe_relpath(root, name)  # refuses absolute paths and '..'
        im = known.get(PurePosixPath(name).as_posix())
        if im is None or im.status != "ok":
            out.skipped_images.append(name)
            continue
        out.matched[iid] = im
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            raise InputError(f"annotations[{i}] is not an object")
        where = label(i, a)
        if "id" in a:
            _id(a["id"], f"{where}: id")
        iid = _id(a.get("image_id"), f"{where}: image_id")
        if iid not in listed:
            raise InputError(f"{where}: image_id {iid} is not in 'images'")
        category = "object"
        if "category_id" in a:
            cid = _id(a["category_id"], f"{where}: category_id")
            if cats is not None and cid not in cats:
                raise InputError(f"{where}: category_id {cid} is not in 'categories'")
            category = cats[cid] if cats is not None else str(cid)
        try:
            check_score(a.get("score"), "score")
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if iid not in out.matched:
            out.skipped_annotations += 1
            continue
        if "segmentation" not in a:
            raise InputError(f"{where}: has no segmentation")
        out.annotations.append((i, a, category))
    return out


def _id(value: Any, what: str) -> int:
    return integer_id(value, what)


def _show(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label(index: int, a: dict[str, Any]) -> str:
    """How an annotation is named in messages."""
    return f"annotation {_show(a.get('id'))} (annotations[{index}])"
