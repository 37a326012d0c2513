"""Tracked videos as datasets of frames: what ``segany track`` (``OUT/track.json``),
``segany label`` on videos (``DS/videos/<name>.json``) and the annotator's video export
(``GET /api/export/video``, all videos in one file) write, in the YouTube-VIS layout: a
``videos`` list (``id``, ``name``, ``height``, ``width``, ``length``, ``file_names``,
``source``) and one annotation per object (``video_id``, ``track_id``, ``category_id``) with
a ``segmentations`` list holding one compressed RLE, or ``null``, per frame.

Each frame becomes an :class:`~.records.ImageRecord` keyed ``<video name>/<frame name>``
whose masks are the objects present in it (mask id = the object's ``track_id``; ``null``
entries are skipped); its pixels come from the video named by the entry's ``source``, or
found by its ``name`` under ``images`` (:func:`segany.videos.find_video`; for one video
``images`` may be the video itself), decoded on use (:class:`VideoFrame`, through
:func:`segany.videos.open_video`: frames are read one at a time, never the whole video).
So the trainer, the evaluator and the statistics read tracked videos like any dataset.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import validate as V
from .coco import load_json
from .records import DEFAULT_CATEGORIES, Dataset, DatasetError, ImageRecord, MaskRecord

#: The file ``segany track`` writes in its output folder.
TRACK_JSON = "track.json"
#: The folder of ``segany label``'s output holding one JSON per video.
VIDEOS_DIR = "videos"


def is_video_json(data: Any) -> bool:
    """Whether ``data`` is a YouTube-VIS style dict (``videos`` and per-frame
    ``segmentations``), as segany writes for tracked videos."""
    if not isinstance(data, Mapping) or "images" in data:
        return False
    anns = data.get("annotations")
    return (
        isinstance(data.get("videos"), list)
        and isinstance(anns, list)
        and all(isinstance(a, Mapping) and "segmentations" in a for a in anns)
    )


def video_jsons(folder: Path) -> list[Path]:
    """The tracked-video JSONs of a folder: its ``track.json`` (``segany track``) or the
    JSONs of its ``videos/`` folder (``segany label``), else none."""
    if (folder / TRACK_JSON).is_file():
        return [folder / TRACK_JSON]
    sub = folder / VIDEOS_DIR
    if sub.is_dir():
        return sorted(p for p in sub.glob("*.json") if not p.name.startswith("."))
    return []


@functools.lru_cache(maxsize=4)
def open_frames(path: str) -> Any:
    """The :class:`segany.videos.VideoSource` of a video file or frames folder, kept open
    for the next frames (a video file decodes forward from its last frame; at most four
    videos are kept, each with a few recent frames). :class:`DatasetError` when it cannot
    be opened."""
    from ..videos import VideoError, open_video

    try:
        return open_video(path)
    except (VideoError, OSError) as exc:
        raise DatasetError(f"cannot open the video {path}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class VideoFrame:
    """Frame ``index`` (0-based, in the video's order; named ``name``) of the video at
    ``video`` (a video file or a folder of frames); :meth:`read` decodes that one frame and
    gives it as PNG bytes (lossless, RGB)."""

    video: Path
    index: int
    name: str

    def read(self) -> bytes:
        from PIL import Image

        from ..videos import VideoError

        try:
            rgb = open_frames(os.fspath(self.video)).frame(self.index)
        except (VideoError, IndexError, OSError) as exc:
            raise DatasetError(f"{self}: {exc}") from None
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def __str__(self) -> str:
        return f"{self.video}#{self.name}"


def frames_of(
    name: str, images: Path | None, *, single: bool, where: str, source: Any = None
) -> Path:
    """Where the frames of the video called ``name`` are: under ``images`` by name
    (:func:`segany.videos.find_video`), or ``images`` itself when the dataset holds this
    one video only (``single``), else the recorded ``source``. :class:`DatasetError`
    naming ``where`` when none applies."""
    from ..videos import find_video

    if images is not None:
        found = find_video(images, name) if images.is_dir() else None
        if found is not None:
            return found
        if single:
            return images
        raise DatasetError(f"{where}: no video {name!r} under {images}")
    if not source or not isinstance(source, str):
        raise DatasetError(
            f"{where} does not name the video {name!r} (no 'source'); give the video file "
            "or frame folder, or the folder holding the videos, as the images (--images)"
        )
    return Path(source).expanduser()


def _entries(where: str, data: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], list]]:
    """``[(video entry, its annotations)]``: with one video every annotation is its; with
    several, each annotation names its ``video_id``."""
    vids, anns = data["videos"], data["annotations"]
    if not vids and anns:
        raise DatasetError(f"{where}: 'videos' is empty but there are {len(anns)} annotations")
    for i, v in enumerate(vids):
        if not isinstance(v, Mapping):
            raise DatasetError(f"{where}: videos[{i}] is not an object")
    out: list[tuple[Mapping[str, Any], list]] = [(v, []) for v in vids]
    if len(vids) == 1:
        out[0][1].extend(anns)
        return out
    index: dict[int | str, int] = {}
    for i, v in enumerate(vids):
        vid = v.get("id")
        if not isinstance(vid, (int, str)) or vid in index:
            raise DatasetError(f"{where}: videos[{i}] needs an id of its own, has {vid!r:.40}")
        index[vid] = i
    for j, a in enumerate(anns):
        vid = a.get("video_id")
        k = index.get(vid) if isinstance(vid, (int, str)) else None
        if k is None:
            raise DatasetError(
                f"{where}: annotation #{j} has video_id {a.get('video_id')!r}, which is "
                "not among the 'videos'"
            )
        out[k][1].append(a)
    return out


def _video_frames(
    where: str,
    v: Mapping[str, Any],
    anns: Sequence[Mapping[str, Any]],
    *,
    stem: str,
    images: Path | None,
    single: bool,
    start: int,
) -> list[ImageRecord]:
    """One video entry and its annotations -> one record per frame."""
    try:
        h, w, n = (V.integer_id(v[k], k) for k in ("height", "width", "length"))
        h, w = V.check_image_size(h, w)
    except (KeyError, V.InputError) as exc:
        raise DatasetError(
            f"{where}: the video entry needs height, width and length: {exc}"
        ) from None
    names = v.get("file_names") or [f"{i:05d}" for i in range(n)]
    if not isinstance(names, list) or len(names) != n:
        got = len(names) if isinstance(names, list) else repr(names)[:40]
        raise DatasetError(f"{where}: {got} file_names for a {n}-frame video")
    name = str(v.get("name") or stem)
    src = frames_of(name, images, single=single, where=where, source=v.get("source"))
    per_frame: list[list[MaskRecord]] = [[] for _ in range(n)]
    for j, a in enumerate(anns):
        segs = a.get("segmentations")
        if not isinstance(segs, list) or len(segs) != n:
            raise DatasetError(
                f"{where}: video {name!r}, annotation #{j} needs one segmentation per frame ({n})"
            )
        scores = a.get("scores")
        scores = scores if isinstance(scores, list) else []
        for t, seg in enumerate(segs):
            if seg is None:
                continue
            ann = {"segmentation": seg, "id": a.get("track_id", a.get("id", j + 1)),
                   "category_id": a.get("category_id", 1), "iscrowd": a.get("iscrowd", 0),
                   "score": scores[t] if t < len(scores) else None}  # fmt: skip
            try:
                per_frame[t].append(MaskRecord.from_annotation(ann, h, w, index=j))
            except V.InputError as exc:
                raise DatasetError(
                    f"{where}: video {name!r}, frame {names[t]!r}, object #{j}: {exc}"
                ) from None
    return [
        ImageRecord(
            key=f"{name}/{names[t]}",
            image_id=start + t,
            height=h,
            width=w,
            file_name=str(names[t]),
            source=VideoFrame(video=src, index=t, name=str(names[t])),
            annotations=tuple(per_frame[t]),
        )
        for t in range(n)
    ]


def load_video_json(path: Path) -> dict[str, Any]:
    """A tracked-video JSON's content, checked to be one (:func:`is_video_json`)."""
    data = load_json(path)
    if not is_video_json(data):
        raise DatasetError(
            f"{path}: not a tracked-video JSON (YouTube-VIS layout: 'videos' and "
            "'annotations' with per-frame 'segmentations')"
        )
    return data


def read_video_files(
    files: Sequence[Path],
    images: Path | None = None,
    *,
    start: int = 1,
    loaded: Mapping[Path, Mapping[str, Any]] | None = None,
    images_may_be_the_video: bool = True,
) -> Iterator[ImageRecord]:
    """The frames of every video of ``files`` (tracked-video JSONs), in file and video
    order, with image ids counting from ``start``; ``images``: see the module doc (with
    ``images_may_be_the_video`` false, only the folder holding the videos by name);
    ``loaded``: contents already read, by path."""
    loaded = loaded or {}
    for f in files:
        data = loaded.get(f) or load_video_json(f)
        entries = _entries(str(f), data)
        single = images_may_be_the_video and len(files) == 1 and len(entries) == 1
        stem = f.parent.name if f.name == TRACK_JSON else f.stem
        for v, anns in entries:
            frames = _video_frames(str(f), v, anns, stem=stem, images=images, single=single,
                                   start=start)  # fmt: skip
            start += len(frames)
            yield from frames


def read_video_dataset(
    source: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
) -> Dataset:
    """A tracked-video JSON, or a folder holding them (see :func:`video_jsons`), as a
    dataset of frames (kind ``"video"``); ``images``: the video when the JSON does not name
    it, or the folder holding the videos by name. One JSON is read and checked here (its
    categories are the dataset's); the JSONs of a folder when the images are read."""
    p = Path(os.fspath(source)).expanduser()
    files = video_jsons(p) if p.is_dir() else [p]
    if not files:
        raise DatasetError(f"{p}: no tracked-video JSON (track.json or videos/*.json)")
    video = Path(os.fspath(images)).expanduser() if images is not None else None
    loaded: dict[Path, Mapping[str, Any]] = {}
    categories: Sequence[Mapping[str, Any]] = DEFAULT_CATEGORIES
    if len(files) == 1:
        loaded[files[0]] = load_video_json(files[0])
        cats = loaded[files[0]].get("categories")
        if isinstance(cats, list) and cats and all(isinstance(c, Mapping) for c in cats):
            categories = cats
    name = p.parent.name if p.name == TRACK_JSON else p.stem if p.is_file() else p.name
    return Dataset(name=name, kind="video", source=p, categories=categories,
                   read=lambda: read_video_files(files, video, loaded=loaded))  # fmt: skip


__all__ = [
    "TRACK_JSON",
    "VIDEOS_DIR",
    "VideoFrame",
    "frames_of",
    "is_video_json",
    "load_video_json",
    "open_frames",
    "read_video_dataset",
    "read_video_files",
    "video_jsons",
]
