"""The typed records of the dataset layer: one :class:`MaskRecord` per mask, one
:class:`ImageRecord` per image, a :class:`Dataset` of them; and the one mask-to-box
convention of everything segany writes (:func:`rle_bbox`).

Every segmentation read or written goes through :mod:`segany.validate` (the one COCO codec);
a malformed one raises :class:`DatasetError` naming the file, the image and the annotation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .. import validate as V


class DatasetError(ValueError):
    """A dataset (file, folder, tar, store) that cannot be read or holds a malformed value;
    the message names where."""


# -- segmentations and boxes -----------------------------------------------------------------
def to_rle(segmentation: Any, height: int | None = None, width: int | None = None) -> dict:
    """Any segmentation (``(H, W)`` bool array, polygons, uncompressed or compressed RLE)
    -> a checked compressed RLE ``{"size": [H, W], "counts": bytes}``. Raises
    :class:`segany.validate.InputError`."""
    if isinstance(segmentation, (np.ndarray,)) or hasattr(segmentation, "numpy"):
        m = np.asarray(segmentation, dtype=bool)
        if m.ndim != 2:
            raise V.InputError(f"a mask must be (H, W), got shape {m.shape}")
        if height is not None and m.shape != (height, width):
            raise V.InputError(f"mask shape {m.shape} does not match the image {[height, width]}")
        return mask_utils.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]
    return V.segmentation_to_rle(segmentation, height, width)


def to_coco_rle(segmentation: Any) -> dict[str, Any]:
    """A segmentation in any form (see :func:`to_rle`) -> compressed COCO RLE with
    ``counts`` as str (JSON-ready)."""
    return json_rle(to_rle(segmentation))


def to_mask(segmentation: Any) -> np.ndarray:
    """A segmentation in any form with its size (bool array or RLE) -> ``(H, W)`` bool."""
    if isinstance(segmentation, Mapping):
        return V.segmentation_to_mask(segmentation)
    return np.asarray(segmentation, dtype=bool)


def json_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A compressed RLE with ``counts`` as str, for JSON."""
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def rle_bbox(rle: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """The box of a compressed RLE in COCO's convention, pycocotools' ``toBbox``:
    ``[x, y, w, h]`` with ``x + w`` one past the last column (and ``y + h`` one past the
    last row); ``[0, 0, 0, 0]`` for an empty mask. The one box every writer writes."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return (x, y, w, h)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Pixels in a compressed RLE."""
    return int(mask_utils.area(rle))


# -- records ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MaskRecord:
    """One mask, in the image frame of its image.

    ``rle`` is compressed COCO RLE (``{"size": [H, W], "counts": bytes}``); ``area`` its
    pixel count and ``bbox`` ``(x, y, w, h)`` by :func:`rle_bbox`. ``file_area`` /
    ``file_bbox`` are the values the source file gave, when it gave them (COCO ground truth
    measures areas on polygons; evaluation keeps them). Model outputs carry
    ``predicted_iou``, ``stability_score`` (at the generator's threshold offset, on the
    image-size mask), the prompt ``point_coords`` ``((x, y), ...)`` and the ``crop_box``
    ``(x, y, w, h)``; text prompts a ``label``, ``phrase``, detector ``score`` and the
    detector's ``box`` (XYXY).
    """

    id: int
    rle: dict[str, Any] = field(repr=False)
    area: int
    bbox: tuple[float, float, float, float]
    category_id: int = 1
    iscrowd: bool = False
    file_area: float | None = None
    file_bbox: tuple[float, float, float, float] | None = None
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: tuple[tuple[float, float], ...] = ()
    crop_box: tuple[float, float, float, float] | None = None
    label: str | None = None
    phrase: str | None = None
    score: float | None = None
    box: tuple[float, float, float, float] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the mask's image."""
        h, w = self.rle["size"]
        return int(h), int(w)

    def segmentation(self) -> dict[str, Any]:
        """The mask as JSON-ready compressed RLE (``counts`` a str)."""
        return json_rle(self.rle)

    def mask(self) -> np.ndarray:
        """``(H, W)`` bool."""
        return mask_utils.decode(self.rle).astype(bool)

    @classmethod
    def from_annotation(
        cls, ann: Mapping[str, Any], height: int, width: int, *, index: int = 0
    ) -> MaskRecord:
        """An annotation dict (COCO, SA-1B or a generator record: ``segmentation`` in any
        form, optional ``id`` (else ``index``), ``category_id``, ``iscrowd``, ``area``,
        ``bbox``, ``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``,
        ``label``, ``phrase``, ``score``, ``box``) -> a checked record. Raises
        :class:`segany.validate.InputError` (the caller names the file)."""
        if "segmentation" not in ann:
            raise V.InputError("has no segmentation")
        rle = to_rle(ann["segmentation"], height, width)
        return cls(
            id=V.integer_id(ann.get("id", index), "id"),
            rle=rle,
            area=rle_area(rle),
            bbox=rle_bbox(rle),
            category_id=V.integer_id(ann.get("category_id", 1), "category_id"),
            iscrowd=bool(ann.get("iscrowd", 0)),
            file_area=V.check_score(ann.get("area"), "area"),
            file_bbox=_box(ann.get("bbox"), "bbox", xywh=True),
            predicted_iou=V.check_score(ann.get("predicted_iou"), "predicted_iou"),
            stability_score=V.check_score(ann.get("stability_score"), "stability_score"),
            point_coords=_points(ann.get("point_coords")),
            crop_box=_box(ann.get("crop_box"), "crop_box", xywh=True),
            label=_text(ann.get("label"), "label"),
            phrase=_text(ann.get("phrase"), "phrase"),
            score=V.check_score(ann.get("score"), "score"),
            box=_box(ann.get("box"), "box", xywh=False),
        )


def _box(v: Any, what: str, *, xywh: bool) -> tuple[float, float, float, float] | None:
    if v is None:
        return None
    if xywh:
        x, y, w, h = V.check_box_xywh(v, what)
        return (x, y, w, h)
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise V.InputError(f"{what} must be [x0, y0, x1, y1], got {v!r:.60}")
    x0, y0, x1, y1 = (V.finite(c, what) for c in v)
    return (x0, y0, x1, y1)


def _points(v: Any) -> tuple[tuple[float, float], ...]:
    if v is None:
        return ()
    if not isinstance(v, (list, tuple)):
        raise V.InputError(f"point_coords must be a list of [x, y], got {v!r:.60}")
    out = []
    for p in v:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise V.InputError(f"point_coords must be a list of [x, y], got {p!r:.60}")
        out.append((V.finite(p[0], "point_coords"), V.finite(p[1], "point_coords")))
    return tuple(out)


def _text(v: Any, what: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise V.InputError(f"{what} must be a string, got {v!r:.60}")


# -- image sources ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ImageFile:
    """An image stored as a file."""

    path: Path

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read the image {self.path}: {exc}") from None

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True, kw_only=True)
class TarMember:
    """An image stored in a tar (an SA-1B shard): ``size`` bytes at ``offset`` of ``tar``
    (``offset`` ``None``: the tar has no such member)."""

    tar: Path
    name: str
    offset: int | None
    size: int = 0

    def read(self) -> bytes:
        if self.offset is None:
            raise DatasetError(f"{self.tar} holds no image {self.name!r}")
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise DatasetError(f"{self.tar}: the image {self.name!r} is cut short")
        return data

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One image and its masks.

    ``key`` names the image stably across runs (its file name, or its path relative to the
    dataset); ``image_id`` is the source's id; ``height`` / ``width`` the size the masks
    are at (the image must decode, EXIF-rotated, to that size); ``source`` where its bytes
    are (:class:`ImageFile`, :class:`TarMember`, or a video's frame,
    :class:`segany.datasets.video.VideoFrame`, decoded when read); ``annotations`` its masks
    in source order (crowd regions included, marked ``iscrowd``).
    """

    key: str
    image_id: int
    height: int
    width: int
    file_name: str
    source: ImageFile | TarMember | Any  # or a video frame (datasets.video.VideoFrame)
    annotations: tuple[MaskRecord, ...] = field(default=(), repr=False)

    @property
    def path(self) -> Path:
        """The image file (for a tar member: ``<tar>/<member>``, which names it in messages
        but is not a file)."""
        s = self.source
        if isinstance(s, ImageFile):
            return s.path
        return s.tar / s.name if isinstance(s, TarMember) else Path(str(s))

    @property
    def num_masks(self) -> int:
        return len(self.annotations)

    @property
    def rles(self) -> tuple[dict[str, Any], ...]:
        return tuple(a.rle for a in self.annotations)

    @property
    def ann_ids(self) -> tuple[int, ...]:
        return tuple(a.id for a in self.annotations)

    def read_bytes(self) -> bytes:
        return self.source.read()

    def load(self) -> np.ndarray:
        """The image as ``(H, W, 3)`` uint8 RGB (:func:`segany.transforms.load_image`);
        :class:`DatasetError` when it does not decode to ``height`` x ``width``."""
        from ..transforms import ImageError, load_image

        data = self.source.read()
        try:
            rgb = load_image(data)
        except ImageError as exc:
            raise DatasetError(f"{self.source}: {exc}") from None
        if rgb.shape[:2] != (self.height, self.width):
            raise DatasetError(
                f"{self.source} is {rgb.shape[1]}x{rgb.shape[0]} but the annotations say "
                f"{self.width}x{self.height}"
            )
        return rgb

    def masks(self, index: Sequence[int] | None = None) -> np.ndarray:
        """Decoded masks ``(M, H, W)`` bool (all, or those at ``index``)."""
        rles = self.rles if index is None else [self.annotations[i].rle for i in index]
        if not rles:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.moveaxis(mask_utils.decode(list(rles)), -1, 0).astype(bool)

    def boxes_xyxy(self, index: Sequence[int]) -> np.ndarray:
        """``(len(index), 4)`` XYXY boxes of the masks at ``index`` (:func:`rle_bbox`:
        ``x1 = x + w``, one past the last column)."""
        xywh = np.asarray([self.annotations[i].bbox for i in index], np.float64).reshape(-1, 4)
        return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def parse_annotations(
    anns: Any, height: int, width: int, *, where: str, image: str
) -> tuple[MaskRecord, ...]:
    """An image's annotation list -> records; :class:`DatasetError` naming ``where`` (the
    file), the image and the annotation on the first malformed one."""
    if not isinstance(anns, list):
        raise DatasetError(f"{where}: image {image!r}: 'annotations' must be a list")
    out = []
    for j, a in enumerate(anns):
        label = f"{where}: image {image!r}, annotation {_ann_name(a, j)}"
        if not isinstance(a, Mapping):
            raise DatasetError(f"{label} is not an object")
        try:
            out.append(MaskRecord.from_annotation(a, height, width, index=j))
        except V.InputError as exc:
            raise DatasetError(f"{label}: {exc}") from None
    return tuple(out)


def _ann_name(a: Any, j: int) -> str:
    if isinstance(a, Mapping) and "id" in a:
        return f"{a['id']!r:.40} (#{j})"
    return f"#{j}"


# -- datasets --------------------------------------------------------------------------------
DEFAULT_CATEGORIES = ({"id": 1, "name": "object", "supercategory": "object"},)


class Dataset:
    """Images with masks, read from one source.

    ``kind`` is ``"coco"``, ``"sa1b"``, ``"store"``, ``"video"`` or ``"davis"``; ``source``
    the file, folder or database read; ``categories`` COCO categories (one ``object`` class
    when the source names none). Images are read on first use of :attr:`images` (all at
    once) or streamed by :meth:`iter_images` (one at a time, for large SA-1B sets).
    """

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        source: str | os.PathLike[str],
        read: Callable[[], Iterator[ImageRecord]] | Iterable[ImageRecord],
        categories: Sequence[Mapping[str, Any]] = DEFAULT_CATEGORIES,
    ) -> None:
        self.name = name
        self.kind = kind
        self.source = os.fspath(source)
        self.categories = [dict(c) for c in categories]
        if callable(read):
            self._read, self._images = read, None
        else:
            self._read, self._images = None, list(read)

    @property
    def images(self) -> list[ImageRecord]:
        if self._images is None:
            assert self._read is not None
            self._images = list(self._read())
        return self._images

    def iter_images(self) -> Iterator[ImageRecord]:
        if self._images is not None or self._read is None:
            return iter(self.images)
        return self._read()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_masks(self) -> int:
        return sum(im.num_masks for im in self.images)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "images": len(self.images),
            "masks": self.num_masks,
        }

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, kind={self.kind!r}, source={self.source!r})"


__all__ = [
    "DEFAULT_CATEGORIES",
    "Dataset",
    "DatasetError",
    "ImageFile",
    "ImageRecord",
    "MaskRecord",
    "TarMember",
    "json_rle",
    "parse_annotations",
    "rle_area",
    "rle_bbox",
    "to_coco_rle",
    "to_mask",
    "to_rle",
]
