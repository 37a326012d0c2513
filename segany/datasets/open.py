"""The one sniffing rule: which reader opens a source (:func:`open_dataset`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .coco import is_coco, load_json, read_coco
from .davis import ANNOTATIONS, is_davis_folder, is_davis_zip, read_davis_dataset
from .records import Dataset, DatasetError, ImageRecord, TarMember
from .sa1b import (
    MANIFEST,
    NOT_IMAGE_JSON,
    is_sa1b,
    labeled_shards,
    read_sa1b_dataset,
    tar_images,
)
from .store import read_store
from .video import VIDEOS_DIR, is_video_json, read_video_dataset, read_video_files, video_jsons

KINDS = ("auto", "coco", "sa1b", "store", "video", "davis")
#: Where the annotator keeps its store inside the annotated folder.
STORE_IN_FOLDER = Path(".segany") / "annotations.db"
STORE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def sniff(source: str | os.PathLike[str]) -> tuple[str, Path]:
    """``(kind, path)`` of ``source`` by the rule, first match wins:

    1. a database URL (``...://...``) or a ``.db`` / ``.sqlite`` file: the annotator's store;
    2. a folder with ``.segany/annotations.db``: the store of that annotated folder;
    3. a folder with ``manifest.json`` (``segany label``'s output): SA-1B shards, and the
       tracked videos of its ``videos/`` when it has them (:func:`open_dataset`);
    4. a ``.tar`` file: one SA-1B shard; a ``.zip``: DAVIS PNGs if it holds
       ``Annotations/<video>/<frame>.png`` (the annotator's DAVIS export), else SA-1B JSONs
       (the annotator's SA-1B export);
    5. a ``.json`` file: COCO if it has an ``images`` list, SA-1B if ``image`` and
       ``annotations``, tracked videos if ``videos`` and per-frame ``segmentations``
       (``segany track``, ``segany label``, the annotator's video export);
    6. a folder with ``annotations.json``: COCO;
    7. a folder with ``track.json`` (``segany track``'s output) or with ``videos/*.json``
       (``segany label`` run on videos only): tracked videos;
    8. a folder with ``Annotations/`` holding PNGs (DAVIS, the annotator's DAVIS export
       unzipped): DAVIS palette PNGs;
    9. a folder whose only JSON file is COCO: that file;
    10. a folder of palette PNGs and no JSON (``segany track``'s ``masks/``): DAVIS PNGs;
    11. another folder: SA-1B (tars, else per-image JSON files, searched recursively).

    ``path`` is what the reader opens (the file of rule 9)."""
    text = os.fspath(source)
    p = Path(text).expanduser()
    if "://" in text or p.suffix in STORE_SUFFIXES:
        return "store", p
    if p.is_dir():
        if (p / STORE_IN_FOLDER).is_file():
            return "store", p
        if (p / MANIFEST).is_file():
            return "sa1b", p
        if (p / "annotations.json").is_file():
            return "coco", p
        if video_jsons(p):
            return "video", p
        if (p / ANNOTATIONS).is_dir() and is_davis_folder(p):
            return "davis", p
        if not any(p.rglob("*.tar")):
            jsons = [f for f in p.rglob("*.json") if f.name not in NOT_IMAGE_JSON][:2]
            if len(jsons) == 1 and is_coco(load_json(jsons[0])):
                return "coco", jsons[0]
            if not jsons and is_davis_folder(p):
                return "davis", p
        return "sa1b", p
    if p.is_file() and p.suffix == ".zip" and is_davis_zip(p):
        return "davis", p
    if p.is_file() and p.suffix in (".tar", ".zip"):
        return "sa1b", p
    if p.is_file():
        data = load_json(p)
        if is_coco(data):
            return "coco", p
        if is_sa1b(data):
            return "sa1b", p
        if is_video_json(data):
            return "video", p
        raise DatasetError(
            f"{p}: neither a COCO instances JSON, an SA-1B image JSON nor a tracked-video "
            "JSON (YouTube-VIS layout)"
        )
    raise DatasetError(f"data source not found: {source}")


def _in_tars(images: str | os.PathLike[str] | None) -> Callable[[str], TarMember] | None:
    """When ``images`` is a ``segany label`` output or a tar: a lookup of its images by
    file name (so a COCO split of a labeled dataset finds its images in the shards)."""
    if images is None:
        return None
    p = Path(images).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        members = tar_images(labeled_shards(p))
    elif p.is_file() and p.suffix == ".tar":
        members = tar_images([p])
    else:
        return None
    return lambda name: members.get(name) or TarMember(tar=p, name=name, offset=None)


def with_videos(shards: Dataset, root: Path, images: str | os.PathLike[str] | None) -> Dataset:
    """A ``segany label`` output read as one dataset: the images of its shards
    (``shards``), then the frames of its tracked videos (``root/videos/*.json``; their
    videos where the JSONs say, or by name under ``images``), whose image ids follow the
    largest of the shards'; ``shards`` itself when it has no video."""
    files = sorted(f for f in (root / VIDEOS_DIR).glob("*.json") if not f.name.startswith("."))
    if not files:
        return shards
    video = Path(os.fspath(images)).expanduser() if images is not None else None

    def read() -> Iterator[ImageRecord]:
        last = 0
        for im in shards.iter_images():
            last = max(last, im.image_id)
            yield im
        yield from read_video_files(files, video, start=last + 1,
                                    images_may_be_the_video=False)  # fmt: skip

    return Dataset(name=shards.name, kind=shards.kind, source=root, read=read,
                   categories=shards.categories)  # fmt: skip


def open_dataset(
    source: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    kind: str = "auto",
    statuses: Sequence[str] = ("accepted",),
) -> Dataset:
    """Open ``source`` as ``kind`` (``coco``, ``sa1b``, ``store``, ``video`` or ``auto``:
    the rule of :func:`sniff`). ``images`` is the image folder when the images are not where
    the annotations say (COCO, loose SA-1B JSON; for COCO also a ``segany label`` output or
    a tar holding them, e.g. for a training run's ``.val.json``), the annotated folder for
    a store given as a database (required then), and for tracked videos (JSON or DAVIS
    PNGs) the video, or the folder holding the videos by name, when the source does not
    say where they are; ``statuses`` the store's objects to read. A ``segany label``
    output (``manifest.json``) gives its images and then the frames of its labeled videos
    (:func:`with_videos`)."""
    if kind not in KINDS:
        raise DatasetError(f"unknown data kind {kind!r}; use {', '.join(KINDS)}")
    if kind == "auto":
        kind, path = sniff(source)
    else:
        path = Path(os.fspath(source)).expanduser()
    if kind == "coco":
        return read_coco(path, images, locate=_in_tars(images))
    if kind == "sa1b":
        shards = read_sa1b_dataset(path, images)
        return with_videos(shards, path, images) if (path / MANIFEST).is_file() else shards
    if kind == "video":
        return read_video_dataset(path, images)
    if kind == "davis":
        return read_davis_dataset(path, images)
    if path.is_dir():
        db: str | Path = path / STORE_IN_FOLDER
        images = images if images is not None else path
    else:
        db = os.fspath(source)
    if images is None:
        raise DatasetError("the store needs the annotated images folder (--images DIR)")
    return read_store(db, images, statuses=statuses)


__all__ = ["KINDS", "open_dataset", "sniff", "with_videos"]
