"""Tracked videos as datasets of frames: what ``segany track`` (``OUT/track.json``) and
``segany label`` on videos (``DS/videos/<name>.json``) write, in YouTube-VIS layout (one
``videos`` entry, one annotation per object with a ``segmentations`` list holding one
compressed RLE, or ``null``, per frame).

Each frame becomes an :class:`~.records.ImageRecord` keyed ``<video name>/<frame name>``
whose masks are the objects present in it (mask id = the object's track id); its pixels
come from the video named by the entry's ``source`` (written by segany since the layer
reads videos; for older files, or a moved video, pass it as ``images``), decoded on use
(:class:`VideoFrame`). So the trainer, the evaluator and the statistics read tracked
videos like any other dataset.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import validate as V
from .coco import load_json
from .records import Dataset, DatasetError, ImageRecord, MaskRecord

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
def _open(path: str) -> Any:
    """An open video (kept: frames read in order decode once)."""
    from ..videos import VideoError, open_video

    try:
        return open_video(path)
    except (VideoError, OSError) as exc:
        raise DatasetError(f"cannot open the video {path}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class VideoFrame:
    """Frame ``index`` (named ``name``) of the video at ``video`` (a file or a folder of
    frames); :meth:`read` gives it as PNG bytes."""

    video: Path
    index: int
    name: str

    def read(self) -> bytes:
        from PIL import Image

        from ..videos import VideoError

        try:
            rgb = _open(os.fspath(self.video)).frame(self.index)
        except (VideoError, IndexError, OSError) as exc:
            raise DatasetError(f"{self}: {exc}") from None
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def __str__(self) -> str:
        return f"{self.video}#{self.name}"


def _frames(
    path: Path, data: Mapping[str, Any], video: Path | None, start: int
) -> list[ImageRecord]:
    where = str(path)
    vids = data["videos"]
    if len(vids) != 1 or not isinstance(vids[0], Mapping):
        raise DatasetError(f"{where}: expected one entry in 'videos', found {len(vids)}")
    v = vids[0]
    try:
        h, w, n = (V.integer_id(v[k], k) for k in ("height", "width", "length"))
    except (KeyError, V.InputError) as exc:
        raise DatasetError(
            f"{where}: the video entry needs height, width and length: {exc}"
        ) from None
    names = v.get("file_names") or [f"{i:05d}" for i in range(n)]
    if len(names) != n:
        raise DatasetError(f"{where}: {len(names)} file_names for a {n}-frame video")
    src = video if video is not None else v.get("source")
    if not src:
        raise DatasetError(
            f"{where} does not name its video (no 'source'); give the video file or frame "
            "folder as the images (--images)"
        )
    src = Path(os.fspath(src)).expanduser()
    per_frame: list[list[MaskRecord]] = [[] for _ in range(n)]
    for j, a in enumerate(data["annotations"]):
        segs = a.get("segmentations")
        if not isinstance(segs, list) or len(segs) != n:
            raise DatasetError(f"{where}: annotation #{j} needs one segmentation per frame")
        scores = a.get("scores") or [None] * n
        for t, seg in enumerate(segs):
            if seg is None:
                continue
            ann = {"segmentation": seg, "id": a.get("track_id", a.get("id", j + 1)),
                   "category_id": a.get("category_id", 1), "iscrowd": a.get("iscrowd", 0),
                   "score": scores[t] if t < len(scores) else None}  # fmt: skip
            try:
                per_frame[t].append(MaskRecord.from_annotation(ann, h, w, index=j))
            except V.InputError as exc:
                raise DatasetError(f"{where}: frame {names[t]!r}, object #{j}: {exc}") from None
    stem = str(v.get("name") or path.stem)
    return [
        ImageRecord(
            key=f"{stem}/{names[t]}",
            image_id=start + t,
            height=h,
            width=w,
            file_name=str(names[t]),
            source=VideoFrame(video=src, index=t, name=str(names[t])),
            annotations=tuple(per_frame[t]),
        )
        for t in range(n)
    ]


def read_video_dataset(
    source: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
) -> Dataset:
    """A tracked-video JSON, or a folder holding them (see :func:`video_jsons`), as a
    dataset of frames (kind ``"video"``); ``images`` is the video when the JSON does not
    name it (one JSON only)."""
    p = Path(os.fspath(source)).expanduser()
    files = video_jsons(p) if p.is_dir() else [p]
    if not files:
        raise DatasetError(f"{p}: no tracked-video JSON (track.json or videos/*.json)")
    if images is not None and len(files) > 1:
        raise DatasetError(f"{p} holds {len(files)} videos: give their JSONs one at a time "
                           "with --images, or let each name its video")  # fmt: skip
    video = Path(os.fspath(images)).expanduser() if images is not None else None

    def read() -> Iterator[ImageRecord]:
        start = 1
        for f in files:
            data = load_json(f)
            if not is_video_json(data):
                raise DatasetError(f"{f}: not a tracked-video JSON (YouTube-VIS layout)")
            frames = _frames(f, data, video, start)
            start += len(frames)
            yield from frames

    name = p.parent.name if p.name == TRACK_JSON else p.stem if p.is_file() else p.name
    return Dataset(name=name, kind="video", source=p, read=read)


__all__ = ["TRACK_JSON", "VIDEOS_DIR", "VideoFrame", "is_video_json", "read_video_dataset",
           "video_jsons"]  # fmt: skip
