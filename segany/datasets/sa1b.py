"""SA-1B: per-image JSON ``{"image": {image_id, width, height, file_name}, "annotations":
[{id, segmentation (COCO RLE), bbox (XYWH), area, predicted_iou, stability_score, crop_box,
point_coords}]}``, loose in a folder (``segany everything --format sa1b``), in a zip (the
annotator's export) or in tar shards beside the images (SA-1B itself, and ``segany label``'s
output: ``manifest.json`` naming ``shards/sa_*.tar``).

Writer (:func:`to_sa1b`, :func:`write_sa1b`): records without ``crop_box`` /
``point_coords`` (masks prompted by a box, e.g. from text prompts) get the whole image and
no points; ``extra_keys`` copies more record keys into each annotation as they are (e.g.
``category_id``, ``label``, ``phrase``, ``score`` of text prompts). Areas and boxes are
measured on the mask (:func:`~.records.rle_bbox`).
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import validate as V
from ..files import atomic_write
from .coco import as_mask_record, load_json
from .records import (
    Dataset,
    DatasetError,
    ImageFile,
    ImageRecord,
    MaskRecord,
    TarMember,
    parse_annotations,
)

#: ``segany label``'s dataset index (see :mod:`segany.engine.label`).
MANIFEST = "manifest.json"
#: JSON files of a labeled folder that are not per-image SA-1B files.
NOT_IMAGE_JSON = frozenset({MANIFEST, "plan.json", "report.json", "instances.json"})


# -- writing ---------------------------------------------------------------------------------
def to_sa1b(
    records: Iterable[Mapping[str, Any] | MaskRecord],
    *,
    image_id: int,
    file_name: str,
    width: int,
    height: int,
    extra_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One image's records -> its SA-1B JSON (a dict); see the module doc."""
    h, w = V.check_image_size(height, width)
    full = [0.0, 0.0, float(w), float(h)]
    anns = []
    for i, r in enumerate(records):
        m = as_mask_record(r, h, w, index=i, where=file_name)
        ann = {
            "id": i,
            "segmentation": m.segmentation(),
            "bbox": list(m.bbox),
            "area": m.area,
            "predicted_iou": m.predicted_iou,
            "stability_score": m.stability_score,
            "crop_box": list(m.crop_box) if m.crop_box is not None else full,
            "point_coords": [list(p) for p in m.point_coords],
        }
        if isinstance(r, Mapping):
            ann.update({k: r[k] for k in extra_keys if k in r})
        anns.append(ann)
    return {
        "image": {"image_id": int(image_id), "width": w, "height": h, "file_name": file_name},
        "annotations": anns,
    }


def write_sa1b(
    path: str | os.PathLike[str], records: Iterable[Mapping[str, Any] | MaskRecord], **image: Any
) -> Path:
    """Write one image's masks (atomically); ``image``: image_id, file_name, width, height
    (and ``extra_keys``)."""
    return atomic_write(path, V.dumps(to_sa1b(records, **image)))


def read_sa1b(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One SA-1B image JSON as a dict (checked to have ``image`` and ``annotations``)."""
    data = load_json(Path(path))
    if not is_sa1b(data):
        raise DatasetError(f"{path} is not an SA-1B image JSON (needs 'image' and 'annotations')")
    return data


def is_sa1b(data: Any) -> bool:
    return isinstance(data, dict) and "image" in data and "annotations" in data


# -- reading ---------------------------------------------------------------------------------
def image_record(
    data: Any, *, where: str, source: ImageFile | TarMember, key: str, fallback_id: int
) -> ImageRecord:
    """One SA-1B image JSON (its content) -> :class:`ImageRecord` with its image at
    ``source``; :class:`DatasetError` naming ``where``."""
    if not is_sa1b(data):
        raise DatasetError(f"{where}: an SA-1B image JSON needs 'image' and 'annotations'")
    info = data["image"]
    try:
        if not isinstance(info, dict):
            raise V.InputError("'image' must be an object")
        h, w = V.check_image_size(info.get("height"), info.get("width"))
        iid = V.integer_id(info.get("image_id", fallback_id), "image_id")
    except V.InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    anns = parse_annotations(data["annotations"], h, w, where=where, image=key)
    name = info.get("file_name") if isinstance(info.get("file_name"), str) else None
    return ImageRecord(
        key=key,
        image_id=iid,
        height=h,
        width=w,
        file_name=name or Path(key).name,
        source=source,
        annotations=anns,
    )


def read_json_files(
    root: Path, files: list[Path], images: Path | None, *, strict: bool
) -> Iterator[ImageRecord]:
    """Loose SA-1B JSONs under ``root``: each image is ``file_name`` beside its JSON (or
    under ``images``), else ``<json stem>.jpg``. JSON files that are not SA-1B are skipped
    unless ``strict``."""
    for k, f in enumerate(files):
        data = load_json(f)
        if not is_sa1b(data):
            if strict:
                raise DatasetError(
                    f"{f}: not an SA-1B image JSON (needs 'image' and 'annotations')"
                )
            continue
        info = data["image"] if isinstance(data["image"], dict) else {}
        name = info.get("file_name")
        name = name if isinstance(name, str) and name else f.with_suffix(".jpg").name
        folder = images if images is not None else f.parent
        path = folder / name
        try:
            key = path.relative_to(root).as_posix()
        except ValueError:
            key = Path(name).as_posix() if images is not None else path.name
        yield image_record(data, where=str(f), source=ImageFile(path=path), key=key, fallback_id=k)


def read_tar(path: Path) -> Iterator[ImageRecord]:
    """The images of one SA-1B tar (``<stem>.json`` + its image per image), in tar order;
    images are read from the tar when loaded."""
    try:
        with tarfile.open(path, "r") as tar:
            members = [m for m in tar if m.isfile()]
            by_name = {m.name: m for m in members}
            jsons = [(m.name, tar.extractfile(m).read()) for m in members  # type: ignore[union-attr]
                     if m.name.endswith(".json")]  # fmt: skip
    except (OSError, tarfile.TarError) as exc:
        raise DatasetError(f"cannot read the tar {path}: {exc}") from None
    for k, (jname, raw) in enumerate(jsons):
        where = f"{path}:{jname}"
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        info = data.get("image") if isinstance(data, dict) else None
        name = info.get("file_name") if isinstance(info, dict) else None
        if not isinstance(name, str) or not name:
            name = jname[: -len(".json")] + ".jpg"
        member = by_name.get(name)
        source = TarMember(
            tar=path,
            name=name,
            offset=member.offset_data if member is not None else None,
            size=member.size if member is not None else 0,
        )
        yield image_record(data, where=where, source=source, key=name, fallback_id=k)


def read_zip(path: Path, images: Path | None) -> Iterator[ImageRecord]:
    """A zip of SA-1B image JSONs (the annotator's SA-1B export, ``<image path>.json``), in
    zip order; each image is its ``file_name`` under ``images`` (the annotated folder), else
    beside the zip."""
    try:
        with zipfile.ZipFile(path) as z:
            blobs = [(n, z.read(n)) for n in z.namelist() if n.endswith(".json")]
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read the zip {path}: {exc}") from None
    folder = images if images is not None else path.parent
    for k, (jname, raw) in enumerate(blobs):
        where = f"{path}:{jname}"
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        info = data.get("image") if isinstance(data, dict) else None
        name = info.get("file_name") if isinstance(info, dict) else None
        if not isinstance(name, str) or not name:
            name = jname[: -len(".json")]
        source = ImageFile(path=folder / name)
        yield image_record(data, where=where, source=source, key=name, fallback_id=k)


def tar_images(tars: Iterable[Path]) -> dict[str, TarMember]:
    """The members of ``tars`` that are not JSON (the images), by name; headers only."""
    out: dict[str, TarMember] = {}
    for t in tars:
        try:
            with tarfile.open(t, "r") as tar:
                for m in tar:
                    if m.isfile() and not m.name.endswith(".json"):
                        out[m.name] = TarMember(tar=t, name=m.name, offset=m.offset_data,
                                                size=m.size)  # fmt: skip
        except (OSError, tarfile.TarError) as exc:
            raise DatasetError(f"cannot read the tar {t}: {exc}") from None
    return out


def labeled_shards(root: Path) -> list[Path]:
    """The shard tars of a ``segany label`` output, in manifest order."""
    manifest = load_json(root / MANIFEST)
    try:
        return [root / s["path"] for s in manifest["shards"]]
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{root / MANIFEST}: not a segany label manifest ({exc})") from None


def read_sa1b_dataset(source: str | os.PathLike[str], images: Any = None) -> Dataset:
    """An SA-1B dataset: a ``segany label`` output (``manifest.json``), a folder of tars, a
    tar, a zip of per-image JSONs (the annotator's export; images under ``images``), a
    folder of per-image JSONs or one such JSON (see the module doc). Images are read
    lazily, one tar at a time."""
    p = Path(source).expanduser()
    img_dir = Path(images).expanduser() if images is not None else None
    if p.is_dir():
        if (p / MANIFEST).is_file():
            tars = labeled_shards(p)
        else:
            tars = sorted(f for f in p.rglob("*.tar") if not f.name.startswith("."))
        if tars:
            return Dataset(name=p.name, kind="sa1b", source=p,
                           read=lambda: (im for t in tars for im in read_tar(t)))  # fmt: skip
        files = sorted(f for f in p.rglob("*.json") if f.name not in NOT_IMAGE_JSON
                       and not any(s.startswith(".") for s in f.relative_to(p).parts))  # fmt: skip
        if not files:
            raise DatasetError(f"no SA-1B tars or image JSON files under {p}")
        return Dataset(name=p.name, kind="sa1b", source=p,
                       read=lambda: read_json_files(p, files, img_dir, strict=False))  # fmt: skip
    if p.is_file() and p.suffix == ".zip":
        return Dataset(name=p.stem, kind="sa1b", source=p, read=lambda: read_zip(p, img_dir))
    if p.is_file() and p.suffix == ".tar":
        return Dataset(name=p.stem, kind="sa1b", source=p, read=lambda: read_tar(p))
    if p.is_file():

        def read_one() -> Iterator[ImageRecord]:
            return read_json_files(p.parent, [p], img_dir, strict=True)

        return Dataset(name=p.stem, kind="sa1b", source=p, read=read_one)
    raise DatasetError(f"data source not found: {source}")


__all__ = [
    "MANIFEST",
    "image_record",
    "is_sa1b",
    "labeled_shards",
    "read_json_files",
    "read_sa1b",
    "read_sa1b_dataset",
    "read_tar",
    "read_zip",
    "tar_images",
    "to_sa1b",
    "write_sa1b",
]
