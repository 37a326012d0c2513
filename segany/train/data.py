"""Training data: images with ground-truth masks from a COCO instances JSON, an SA-1B style
folder (one JSON per image) or the annotator's store, split into train and validation by
image, and the ground truth mapped into the decoder's low-res frame.

Every source gives a :class:`TrainData`: a list of :class:`TrainImage` (image path, size, and
its masks as compressed COCO RLE). Nothing is decoded until a batch needs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .. import transforms as T
from .. import validate as V


class DataError(ValueError):
    """A data source that cannot be read or holds no usable masks."""


@dataclass(frozen=True)
class TrainImage:
    """One image and its masks.

    ``key`` is stable across runs (the source's image id or path) and names the image in
    the split; ``rles`` are compressed COCO RLE (``counts`` as bytes); ``ann_ids`` the
    source's annotation ids; ``bboxes`` ``(M, 4)`` XYWH as given by the source.
    """

    key: str
    path: Path
    height: int
    width: int
    image_id: int
    rles: tuple[dict[str, Any], ...] = field(repr=False)
    ann_ids: tuple[int, ...] = field(repr=False)
    bboxes: np.ndarray = field(repr=False, compare=False)

    @property
    def num_masks(self) -> int:
        return len(self.rles)

    def masks(self, index: Sequence[int] | None = None) -> np.ndarray:
        """Decoded masks ``(M, H, W)`` bool (all, or those at ``index``)."""
        rles = self.rles if index is None else [self.rles[i] for i in index]
        if not rles:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.moveaxis(mask_utils.decode(list(rles)), -1, 0).astype(bool)

    def boxes_xyxy(self, index: Sequence[int]) -> np.ndarray:
        """Tight XYXY boxes of the masks at ``index`` (pixel edges: ``x + w``)."""
        xywh = mask_utils.toBbox([self.rles[i] for i in index]).reshape(-1, 4)
        return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


@dataclass
class TrainData:
    """Images with masks and a description of where they came from."""

    name: str
    source: str
    kind: str
    images: list[TrainImage]

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


def _image(
    key: str,
    path: Path,
    h: int,
    w: int,
    image_id: int,
    anns: Iterable[dict[str, Any]],
    min_area: int,
    where: str,
) -> TrainImage:
    """One image's masks; a malformed annotation raises :class:`DataError` naming ``where``
    (the file) and the annotation."""
    rles, ids, boxes = [], [], []
    for j, a in enumerate(anns):
        if a.get("iscrowd", 0):
            continue
        label = f"{where}: annotation {a.get('id', f'#{j}')!r} of image {key!r}"
        if "segmentation" not in a:
            raise DataError(f"{label} has no segmentation")
        try:
            rle = V.segmentation_to_rle(a["segmentation"], h, w)
            bbox = a.get("bbox")
            bbox = V.check_box_xywh(bbox) if bbox else None
        except V.InputError as exc:
            raise DataError(f"{label}: {exc}") from None
        area = int(mask_utils.area(rle))
        if area < max(1, min_area):
            continue
        rles.append(rle)
        ids.append(int(a.get("id", j)))
        boxes.append(bbox or mask_utils.toBbox(rle).tolist())
    return TrainImage(
        key=key,
        path=path,
        height=h,
        width=w,
        image_id=image_id,
        rles=tuple(rles),
        ann_ids=tuple(ids),
        bboxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
    )


# -- sources ---------------------------------------------------------------------------------
def coco_source(
    source: str | Path, images: str | Path | None = None, *, min_area: int = 1
) -> TrainData:
    """A COCO instances JSON (or a folder holding ``annotations.json``); images in
    ``images`` or ``images/`` beside the file (or beside it). Crowd masks are skipped."""
    src = Path(source)
    ann_file = src / "annotations.json" if src.is_dir() else src
    if not ann_file.is_file():
        raise DataError(f"no COCO annotations at {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {ann_file}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{ann_file} is not a COCO instances JSON (no 'images' list)")
    data.setdefault("annotations", [])
    try:
        V.check_coco(data, str(ann_file))
    except V.InputError as exc:
        raise DataError(str(exc)) from None
    root = ann_file.parent
    if images is not None:
        image_dir = Path(images)
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for a in data.get("annotations", []):
        by_image.setdefault(a.get("image_id"), []).append(a)
    out = []
    for im in data["images"]:
        iid, name, h, w = im["id"], im["file_name"], im["height"], im["width"]
        anns = by_image.get(iid, [])
        out.append(_image(name, image_dir / name, h, w, iid, anns, min_area, str(ann_file)))
    name = root.name if ann_file.name == "annotations.json" else ann_file.stem
    return TrainData(name=name, source=str(ann_file), kind="coco", images=out)


def sa1b_source(folder: str | Path, *, min_area: int = 1) -> TrainData:
    """An SA-1B style folder: ``<name>.json`` per image (``{"image": {file_name, width,
    height, image_id}, "annotations": [{segmentation (COCO RLE), ...}]}``) beside the image
    (``image.file_name``, else ``<name>.jpg``)."""
    root = Path(folder)
    files = sorted(root.rglob("*.json")) if root.is_dir() else [root]
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {f}: {exc}") from exc
        if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
            continue
        info = data["image"]
        try:
            if not isinstance(info, dict) or not isinstance(data["annotations"], list):
                raise V.InputError("'image' must be an object and 'annotations' a list")
            h, w = V.check_image_size(info.get("height"), info.get("width"))
            iid = V.integer_id(info.get("image_id", len(out)), "image_id")
        except V.InputError as exc:
            raise DataError(f"{f}: {exc}") from None
        path = f.parent / str(info.get("file_name") or f.with_suffix(".jpg").name)
        key = path.relative_to(root).as_posix() if root.is_dir() else path.name
        out.append(_image(key, path, h, w, iid, data["annotations"], min_area, str(f)))
    if not out:
        raise DataError(f"no SA-1B image JSON files under {folder}")
    return TrainData(name=root.stem, source=str(root), kind="sa1b", images=out)


def store_source(
    db: str | Path,
    images_dir: str | Path,
    *,
    statuses: Sequence[str] = ("accepted",),
    min_area: int = 1,
) -> TrainData:
    """The annotator's store: the objects with the given statuses (accepted ones by
    default) of the images registered from ``images_dir``."""
    from ..engine.store import Store

    root = Path(images_dir).expanduser().resolve()
    store = Store(db)
    try:
        anns = store.annotations(statuses=list(statuses))
        images = store.images()
    finally:
        store.close()
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        by_image.setdefault(a.image_id, []).append(
            {"id": a.id, "segmentation": a.segmentation, "bbox": a.bbox}
        )
    out = []
    for im in images:
        if im.status != "ok" or im.id not in by_image:
            continue
        out.append(
            _image(
                im.path,
                root / im.path,
                im.height,
                im.width,
                im.id,
                by_image[im.id],
                min_area,
                f"store {db}",
            )
        )
    return TrainData(name=root.name, source=str(db), kind="store", images=out)


def open_source(
    source: str | Path,
    *,
    images: str | Path | None = None,
    kind: str = "auto",
    min_area: int = 1,
) -> TrainData:
    """Open ``source`` as ``kind`` (``coco``, ``sa1b``, ``store`` or ``auto``).

    ``auto``: a database URL or ``.db``/``.sqlite`` file is the store (``images`` = the
    annotated folder, required); a folder with ``.segany/annotations.db`` is the store of
    that folder; a ``.json`` file or a folder with ``annotations.json`` is COCO; another
    folder is SA-1B.
    """
    text = str(source)
    path = Path(source).expanduser()
    if kind == "auto":
        if "://" in text or path.suffix in (".db", ".sqlite", ".sqlite3"):
            kind = "store"
        elif path.is_dir() and (path / ".segany" / "annotations.db").is_file():
            kind = "store"
        elif path.is_file() and path.suffix == ".json":
            kind = "coco" if _is_coco(path) else "sa1b"
        elif path.is_dir() and (path / "annotations.json").is_file():
            kind = "coco"
        elif path.is_dir():
            kind = "sa1b"
        else:
            raise DataError(f"data source not found: {source}")
    if kind == "coco":
        data = coco_source(path, images, min_area=min_area)
    elif kind == "sa1b":
        data = sa1b_source(path, min_area=min_area)
    elif kind == "store":
        if path.is_dir():
            db: str | Path = path / ".segany" / "annotations.db"
            images = images or path
        else:
            db = source
        if images is None:
            raise DataError("the store needs the annotated images folder (--images DIR)")
        data = store_source(db, images, min_area=min_area)
    else:
        raise DataError(f"unknown data kind {kind!r}; use coco, sa1b, store or auto")
    if data.num_masks == 0:
        raise DataError(f"{source} holds no usable masks")
    return data


def _is_coco(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return isinstance(data, dict) and isinstance(data.get("images"), list)


# -- split -----------------------------------------------------------------------------------
def split_by_image(
    images: Sequence[TrainImage], val_fraction: float, seed: int
) -> tuple[list[TrainImage], list[TrainImage]]:
    """``(train, val)``: a seeded permutation of the images (ordered by key, so the split
    does not depend on the source's order) cut at ``round(val_fraction * n)``; only images
    with masks take part. Both lists keep key order."""
    if not 0 <= val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    usable = sorted((im for im in images if im.num_masks), key=lambda im: im.key)
    n_val = int(round(val_fraction * len(usable)))
    if usable and n_val >= len(usable):
        n_val = len(usable) - 1
    order = np.random.default_rng(seed).permutation(len(usable))
    val_idx = set(order[:n_val].tolist())
    train = [im for i, im in enumerate(usable) if i not in val_idx]
    val = [im for i, im in enumerate(usable) if i in val_idx]
    return train, val


def to_coco(images: Sequence[TrainImage], *, absolute_paths: bool = False) -> dict[str, Any]:
    """A COCO instances JSON of ``images`` (e.g. the validation split, for ``segany eval``):
    image ids, annotation ids and boxes as in the source; ``file_name`` is the source's
    relative name (or the absolute path)."""
    imgs, anns = [], []
    for im in images:
        name = str(im.path.resolve()) if absolute_paths else im.key
        imgs.append({"id": im.image_id, "file_name": name, "width": im.width, "height": im.height})
        for rle, aid, box in zip(im.rles, im.ann_ids, im.bboxes):
            counts = rle["counts"]
            anns.append(
                {
                    "id": aid,
                    "image_id": im.image_id,
                    "category_id": 1,
                    "segmentation": {
                        "size": list(rle["size"]),
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                    },
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                }
            )
    return {
        "images": imgs,
        "annotations": anns,
        "categories": [{"id": 1, "name": "object"}],
    }


# -- low-res ground truth --------------------------------------------------------------------
def lowres_targets(
    masks: np.ndarray, input_size: tuple[int, int], img_size: int, grid: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth ``(M, H, W)`` at image size -> ``(M, grid, grid)`` in the decoder's
    low-res frame, and the ``(grid, grid)`` mask of cells over the image (not padding).

    Each cell takes the value of the image pixel under its centre: cell ``i`` covers model
    pixels ``[s i, s (i + 1))`` (``s = img_size / grid``); its centre ``s (i + 1/2)`` maps to
    image row ``floor(centre * H / h)`` (``(h, w)`` = ``input_size``). This is where the
    bilinear upsampling of the logits is exact, so the low-res loss matches the masks the
    predictor returns."""
    m, H, W = masks.shape
    h, w = input_size
    stride = img_size / grid
    centres = stride * (np.arange(grid) + 0.5)
    rows = np.minimum((centres[centres < h] * H / h).astype(np.int64), H - 1)
    cols = np.minimum((centres[centres < w] * W / w).astype(np.int64), W - 1)
    out = np.zeros((m, grid, grid), dtype=bool)
    out[:, : len(rows), : len(cols)] = masks[:, rows][:, :, cols]
    valid = np.zeros((grid, grid), dtype=bool)
    valid[: len(rows), : len(cols)] = True
    return out, valid


def model_input_size(image: TrainImage, img_size: int) -> tuple[int, int]:
    """``(h, w)`` of the image resized for the model (see :func:`transforms.preprocess_shape`)."""
    return T.preprocess_shape(image.height, image.width, img_size)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_source(source: str | Path, images: str | Path | None = None) -> TrainData:
    """Images without masks (e.g. for replay): the images of a COCO source, or every image
    file under a folder (searched recursively, hidden folders skipped)."""
    from PIL import Image

    path = Path(source).expanduser()
    if path.is_file() or (path / "annotations.json").is_file():
        data = coco_source(path, images)
        return TrainData(data.name, data.source, "images", data.images)
    if not path.is_dir():
        raise DataError(f"no images at {source}")
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            with Image.open(f) as im:
                w, h = im.size
        except OSError:
            continue
        out.append(TrainImage(key=rel.as_posix(), path=f, height=h, width=w,
                              image_id=len(out) + 1, rles=(), ann_ids=(),
                              bboxes=np.zeros((0, 4))))  # fmt: skip
    if not out:
        raise DataError(f"no images under {source}")
    return TrainData(name=path.name, source=str(path), kind="images", images=out)
