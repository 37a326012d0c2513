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

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ..validate import InputError, check_score, integer_id


@dataclass
class CocoImport:
    #: COCO image id -> the registered image (only the images the folder has).
    matched: dict[int, Any] = field(default_factory=dict)
    skipped_images: list[str] = field(default_factory=list)
    skipped_annotations: int = 0
    #: Every listed image id, and category id -> name (``None``: no categories listed).
    listed: set[int] = field(default_factory=set)
    categories: dict[int, str] | None = None
    #: The annotations (a list, or a :class:`JsonArray` decoded one at a time).
    raw_annotations: Any = ()

    def annotations(self) -> Iterator[tuple[int, dict[str, Any], str, Any]]:
        """``(index, annotation, category name, registered image)`` for each annotation of
        a matched image, checked (except its segmentation, which the caller turns into an
        RLE with the image's size); others are counted in ``skipped_annotations``. Raises
        :class:`InputError` naming the annotation."""
        cats = self.categories
        for i, a in enumerate(self.raw_annotations):
            if not isinstance(a, dict):
                raise InputError(f"annotations[{i}] is not an object")
            where = label(i, a)
            if "id" in a:
                _id(a["id"], f"{where}: id")
            iid = _id(a.get("image_id"), f"{where}: image_id")
            if iid not in self.listed:
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
            if iid not in self.matched:
                self.skipped_annotations += 1
                continue
            if "segmentation" not in a:
                raise InputError(f"{where}: has no segmentation")
            yield i, a, category, self.matched[iid]


class JsonArray:
    """A JSON array inside a text, decoded one element at a time when iterated (so that
    only one element's objects are alive at once)."""

    def __init__(self, text: str, start: int) -> None:
        self.text = text
        self.start = start  # the index of "["
        self.end = self._scan()  # one past "]"; checks the syntax

    def __iter__(self) -> Iterator[Any]:
        return self._elements()

    def _elements(self) -> Iterator[Any]:
        text, dec = self.text, _DECODER
        i = _ws(text, self.start + 1)
        if text.startswith("]", i):
            return
        while True:
            value, i = dec.raw_decode(text, i)
            yield value
            i = _ws(text, i)
            if text.startswith("]", i):
                return
            if not text.startswith(",", i):
                raise ValueError(f"expected ',' or ']' at character {i}")
            i = _ws(text, i + 1)

    def _scan(self) -> int:
        text, dec = self.text, _DECODER
        i = _ws(text, self.start + 1)
        if text.startswith("]", i):
            return i + 1
        while True:
            _, i = dec.raw_decode(text, i)  # decoded and dropped: finds the element's end
            i = _ws(text, i)
            if text.startswith("]", i):
                return i + 1
            if not text.startswith(",", i):
                raise ValueError(f"expected ',' or ']' at character {i}")
            i = _ws(text, i + 1)


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def _ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def parse_coco(f: BinaryIO) -> Any:
    """The COCO JSON document in the binary file ``f``; its top-level ``annotations`` array
    stays a :class:`JsonArray` (the bulk of a large file), every other value is decoded.
    Raises :class:`ValueError` for malformed JSON (or text that is not UTF-8)."""
    text = f.read().decode("utf-8")  # the bytes are dropped as soon as they are decoded
    i = _ws(text, 0)
    if not text.startswith("{", i):
        return json.loads(text)  # not an object: the caller refuses it with its message
    out: dict[str, Any] = {}
    i = _ws(text, i + 1)
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            key, i = _DECODER.raw_decode(text, i)
            if not isinstance(key, str):
                raise ValueError(f"expected a key at character {i}")
            i = _ws(text, i)
            if not text.startswith(":", i):
                raise ValueError(f"expected ':' at character {i}")
            i = _ws(text, i + 1)
            if key == "annotations" and text.startswith("[", i):
                arr = JsonArray(text, i)
                out[key], i = arr, arr.end
            else:
                out[key], i = _DECODER.raw_decode(text, i)
            i = _ws(text, i)
            if text.startswith("}", i):
                i += 1
                break
            if not text.startswith(",", i):
                raise ValueError(f"expected ',' or '}}' at character {i}")
            i = _ws(text, i + 1)
    if _ws(text, i) != len(text):
        raise ValueError(f"extra data at character {_ws(text, i)}")
    return out


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
    if not isinstance(anns, (list, JsonArray)):
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
            except ValueError as exc:
                why = "is blank" if not name.strip() else f"is refused ({exc})"
                raise InputError(f"{where} (id {cid}): the name {why}") from None
            if len(name) > max_category:
                raise InputError(
                    f"{where} (id {cid}): the name is longer than {max_category} characters"
                )
            cats[cid] = name
    out = CocoImport(categories=cats, raw_annotations=anns)
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise InputError(f"{where}: every image needs 'id' and 'file_name'")
        iid = _id(entry["id"], f"{where}: id")
        if iid in out.listed:
            raise InputError(f"{where}: image id {iid} appears twice")
        out.listed.add(iid)
        name = entry["file_name"]
        if not isinstance(name, str):
            raise InputError(f"{where} (id {iid}): file_name must be a string")
        safe_relpath(root, name)  # refuses absolute paths and '..'
        im = known.get(PurePosixPath(name).as_posix())
        if im is None or im.status != "ok":
            out.skipped_images.append(name)
            continue
        out.matched[iid] = im
    return out


def _id(value: Any, what: str) -> int:
    return integer_id(value, what)


def _show(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label(index: int, a: dict[str, Any]) -> str:
    """How an annotation is named in messages."""
    return f"annotation {_show(a.get('id'))} (annotations[{index}])"
