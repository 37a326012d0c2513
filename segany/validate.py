"""The one validation layer for values that enter segany from outside.

Masks, polygons, RLEs, boxes, scores and image sizes come from HTTP requests, COCO / SA-1B
files, the annotator's store and checkpoints. pycocotools' C code trusts what it is given: a
polygon with a NaN or 1e9 coordinate makes it allocate without bound, and a compressed RLE
whose runs do not sum to ``H * W`` decodes into uninitialised memory (or past the end of its
buffer). Everything here is checked in numpy first; nothing reaches pycocotools unchecked.

Errors are :class:`InputError` (a ``ValueError``) with a message that names the value
(``what``) and the problem; callers add where it came from (file, annotation id, request).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Largest image (pixels) whose masks are decoded: 2^28 = 16384 x 16384.
MAX_PIXELS = 1 << 28
#: Largest image side accepted for masks.
MAX_SIDE = 1 << 20
#: Polygon path length (pixel steps, summed over a segmentation's polygons) beyond
#: ``max(MIN_PATH, PATH_PER_SIDE * (H + W))``: pycocotools' rasteriser allocates memory in
#: proportion to it.
MIN_PATH = 1_000_000
PATH_PER_SIDE = 64
#: Most vertices in one segmentation.
MAX_VERTICES = 1_000_000


class InputError(ValueError):
    """A malformed value from outside segany; the message says what and why."""


# -- numbers ---------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def finite(value: Any, what: str) -> float:
    """``value`` as a float; :class:`InputError` unless it is a finite real number."""
    if not _is_number(value):
        raise InputError(f"{what} must be a number, got {_show(value)}")
    f = float(value)
    if not math.isfinite(f):
        raise InputError(f"{what} must be finite, got {f}")
    return f


def check_score(value: Any, what: str = "score") -> float | None:
    """A confidence or quality score: ``None`` stays ``None``, else a finite float."""
    return None if value is None else finite(value, what)


def integer_id(value: Any, what: str) -> int:
    """An id that fits the store's 64-bit signed integers (``bool`` and floats refused)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{what} must be an integer, got {_show(value)}")
    v = int(value)
    if not -(1 << 63) <= v < (1 << 63):
        raise InputError(f"{what} {_show(v)} does not fit a 64-bit integer")
    return v


def check_image_size(height: Any, width: Any, what: str = "image size") -> tuple[int, int]:
    """``(H, W)`` as positive ints with at most :data:`MAX_PIXELS` pixels."""
    dims = []
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            if _is_number(v) and float(v).is_integer():
                v = int(v)
            else:
                raise InputError(f"{what}: {name} must be an integer, got {_show(v)}")
        v = int(v)
        if not 1 <= v <= MAX_SIDE:
            raise InputError(f"{what}: {name} must be between 1 and {MAX_SIDE}, got {v}")
        dims.append(v)
    h, w = dims
    if h * w > MAX_PIXELS:
        raise InputError(f"{what}: {h}x{w} pixels is more than the {MAX_PIXELS} allowed")
    return h, w


def check_box_xywh(box: Any, what: str = "bbox") -> list[float]:
    """A COCO ``[x, y, w, h]`` box: four finite numbers, ``w, h >= 0``."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise InputError(f"{what} must be [x, y, width, height], got {_show(box)}")
    x, y, w, h = (finite(v, what) for v in box)
    if w < 0 or h < 0:
        raise InputError(f"{what} has a negative width or height: {[x, y, w, h]}")
    return [x, y, w, h]


# -- segmentations ---------------------------------------------------------------------------


def decode_rle_string(counts: str | bytes, what: str = "counts") -> np.ndarray:
    """The run lengths of a compressed COCO RLE string, as int64, without pycocotools.

    The format (pycocotools' ``rleToString``): each run is written in 5-bit groups, least
    significant first, as characters ``48 + group`` with bit 0x20 set on all but the last
    group of a run and bit 0x10 of the last group the sign; from the fourth run on, a run is
    stored as its difference to the run two before it.
    """
    raw = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (c < 0).any() or (c > 63).any():
        raise InputError(f"{what} holds characters outside the COCO RLE alphabet")
    more = (c & 0x20) != 0
    if more[-1]:
        raise InputError(f"{what} ends in the middle of a run")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 35 bits: far beyond any image
        raise InputError(f"{what} holds a run longer than 7 characters")
    pos = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    negative = (c[ends] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * lengths)), x)
    runs = x.copy()
    if runs.size > 3:
        runs[3::2] = x[1] + np.cumsum(x[3::2])
    if runs.size > 4:
        runs[4::2] = x[2] + np.cumsum(x[4::2])
    return runs


def _check_runs(runs: np.ndarray, h: int, w: int, what: str) -> None:
    if runs.size and runs.min() < 0:
        raise InputError(f"{what} holds a negative run length")
    total = int(runs.sum())
    if total != h * w:
        raise InputError(f"{what}: runs sum to {total}, expected height * width = {h * w}")


def _rle_size(seg: Mapping[str, Any], what: str) -> tuple[int, int]:
    size = seg.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise InputError(f"{what}.size must be [height, width], got {_show(size)}")
    return check_image_size(size[0], size[1], f"{what}.size")


def _check_polygons(seg: list[Any], h: int, w: int, what: str) -> list[list[float]]:
    polys: list[list[float]] = []
    path = 0.0
    vertices = 0
    for i, p in enumerate(seg):
        if not isinstance(p, (list, tuple)):
            raise InputError(
                f"{what} must be a list of polygons [x0, y0, x1, y1, ...]; item {i} is {_show(p)}"
            )
        if len(p) < 6 or len(p) % 2:
            raise InputError(
                f"{what}: polygon {i} has {len(p)} numbers; a polygon needs an even number, "
                "at least 6 (three points)"
            )
        if not all(_is_number(v) for v in p):
            raise InputError(f"{what}: polygon {i} holds a value that is not a number")
        xy = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise InputError(f"{what}: polygon {i} holds NaN or infinity")
        bad = (xy[:, 0] < -w) | (xy[:, 0] > 2 * w) | (xy[:, 1] < -h) | (xy[:, 1] > 2 * h)
        if bad.any():
            x, y = xy[np.argmax(bad)]
            raise InputError(
                f"{what}: polygon {i} has the point ({x:g}, {y:g}), far outside the {w}x{h} image"
            )
        step = np.abs(np.diff(np.vstack([xy, xy[:1]]), axis=0)).max(axis=1)
        path += float(step.sum())
        vertices += len(xy)
        polys.append(xy.ravel().tolist())
    limit = max(MIN_PATH, PATH_PER_SIDE * (h + w))
    if path > limit or vertices > MAX_VERTICES:
        raise InputError(
            f"{what}: polygons too long to rasterise ({vertices} points, path of {path:.0f} "
            f"pixels; at most {MAX_VERTICES} points and {limit} pixels)"
        )
    return polys


def segmentation_to_rle(
    seg: Any, height: int | None = None, width: int | None = None, *, what: str = "segmentation"
) -> dict[str, Any]:
    """Any COCO segmentation -> a checked compressed RLE ``{"size": [H, W], "counts": bytes}``.

    ``seg`` is a list of polygons ``[[x0, y0, x1, y1, ...], ...]`` (image pixels; needs
    ``height`` and ``width``), an uncompressed RLE ``{"size": [H, W], "counts": [int, ...]}``
    (column-major runs, zeros first) or a compressed one (``counts`` a str or bytes). When
    ``height`` and ``width`` are given an RLE's size must equal them. An empty polygon list
    is the empty mask. Raises :class:`InputError`.
    """
    from pycocotools import mask as mask_utils

    if height is not None or width is not None:
        h, w = check_image_size(height, width, f"{what}: image size")
    else:
        h = w = None
    if isinstance(seg, Mapping):
        rh, rw = _rle_size(seg, what)
        if h is not None and (rh, rw) != (h, w):
            raise InputError(f"{what}.size {[rh, rw]} does not match the image {[h, w]}")
        counts = seg.get("counts")
        if isinstance(counts, (str, bytes)):
            raw = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
            _check_runs(decode_rle_string(raw, f"{what}.counts"), rh, rw, f"{what}.counts")
            return {"size": [rh, rw], "counts": bytes(raw)}
        if isinstance(counts, (list, tuple)):
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in counts):
                raise InputError(f"{what}.counts must be integers")
            if any(not 0 <= v <= rh * rw for v in counts):
                raise InputError(f"{what}.counts holds a run outside 0..{rh * rw}")
            runs = np.asarray(counts, dtype=np.int64) if counts else np.zeros(0, np.int64)
            _check_runs(runs, rh, rw, f"{what}.counts")
            return mask_utils.frPyObjects({"size": [rh, rw], "counts": list(counts)}, rh, rw)
        raise InputError(f"{what}.counts must be a list of run lengths or an RLE string")
    if isinstance(seg, (list, tuple)):
        if h is None or w is None:
            raise InputError(f"{what}: polygons need the image's height and width")
        polys = _check_polygons(list(seg), h, w, what)
        if not polys:
            return mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    raise InputError(f"{what} must be polygons or an RLE dict, got {_show(seg)}")


def segmentation_to_mask(
    seg: Any, height: int | None = None, width: int | None = None, *, what: str = "segmentation"
) -> np.ndarray:
    """Any COCO segmentation (see :func:`segmentation_to_rle`) -> ``(H, W)`` bool mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(segmentation_to_rle(seg, height, width, what=what)).astype(bool)


# -- datasets --------------------------------------------------------------------------------


def check_coco(data: Any, where: str = "COCO file") -> None:
    """Check a COCO instances dict before pycocotools indexes it.

    Images need an integer ``id``, a ``file_name`` and a valid ``height`` / ``width``;
    annotations an integer ``id`` (unique), an ``image_id`` of a listed image, an integer
    ``category_id`` of a listed category (when categories are listed) and a valid
    ``segmentation`` for that image; ``bbox``, ``area`` and ``score`` when present must be
    finite. Raises :class:`InputError` naming ``where``, the annotation id and the problem.
    """
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: not a JSON object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{where}: no {key!r} list (not COCO instances)")
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(data["images"]):
        label = f"{where}: images[{i}]"
        if not isinstance(im, Mapping):
            raise InputError(f"{label} is not an object")
        try:
            iid = integer_id(im.get("id"), "id")
            if iid in sizes:
                raise InputError(f"image id {iid} appears twice")
            sizes[iid] = check_image_size(im.get("height"), im.get("width"))
            name = im.get("file_name")
            if not isinstance(name, str) or not name:
                raise InputError(f"file_name must be a non-empty string, got {_show(name)}")
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from None
    cats = data.get("categories")
    cat_ids: set[int] | None = None
    if cats is not None:
        if not isinstance(cats, list):
            raise InputError(f"{where}: 'categories' must be a list")
        cat_ids = set()
        for i, c in enumerate(cats):
            if not isinstance(c, Mapping):
                raise InputError(f"{where}: categories[{i}] is not an object")
            try:
                cat_ids.add(integer_id(c.get("id"), "id"))
            except InputError as exc:
                raise InputError(f"{where}: categories[{i}]: {exc}") from None
    seen: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, Mapping):
            raise InputError(f"{where}: annotations[{i}] is not an object")
        label = f"{where}: annotation {_show(a.get('id'))} (annotations[{i}])"
        try:
            aid = integer_id(a.get("id"), "id")
            if aid in seen:
                raise InputError(f"id {aid} appears twice")
            seen.add(aid)
            iid = integer_id(a.get("image_id"), "image_id")
            if iid not in sizes:
                raise InputError(f"image_id {iid} is not in 'images'")
            if "category_id" not in a:
                raise InputError("has no category_id")
            cid = integer_id(a["category_id"], "category_id")
            if cat_ids is not None and cid not in cat_ids:
                raise InputError(f"category_id {cid} is not in 'categories'")
            if "segmentation" not in a:
                raise InputError("has no segmentation")
            h, w = sizes[iid]
            _check_segmentation(a["segmentation"], h, w)
            if a.get("bbox") is not None:
                check_box_xywh(a["bbox"])
            for key in ("area", "score"):
                if a.get(key) is not None:
                    finite(a[key], key)
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from None


def _check_segmentation(seg: Any, h: int, w: int) -> None:
    """:func:`segmentation_to_rle`'s checks without building the RLE."""
    what = "segmentation"
    if isinstance(seg, Mapping):
        rh, rw = _rle_size(seg, what)
        if (rh, rw) != (h, w):
            raise InputError(f"{what}.size {[rh, rw]} does not match the image {[h, w]}")
        counts = seg.get("counts")
        if isinstance(counts, (str, bytes)):
            _check_runs(decode_rle_string(counts, f"{what}.counts"), h, w, f"{what}.counts")
            return
    elif isinstance(seg, (list, tuple)):
        _check_polygons(list(seg), h, w, what)
        return
    segmentation_to_rle(seg, h, w, what=what)


# -- output ----------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (also numpy's) replaced by ``None``, numpy
    scalars and arrays as Python values: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``: never writes NaN or Infinity."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _show(v: Any, limit: int = 60) -> str:
    try:
        text = repr(v)
    except ValueError:  # an int past Python's digit limit for str()
        return "a huge integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."
