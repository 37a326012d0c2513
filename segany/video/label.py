"""Stage-3 labeling of videos: segment everything on the first frame, follow every object.

``segany label SRC --out DS`` hands the video files of ``SRC`` to :func:`label_videos`
(the images go to the SA-1B labeler as before). For each video, the mask generator finds
the objects of its first frame (the same preset and settings as for images); each mask then
starts a track of :class:`~segany.video.tracker.PropagationTracker` (SAM 1 / MobileSAM) or
of the SAM 2 tracker when the model has a video memory, and the tracks are written as one
YouTube-VIS style JSON per video (``DS/videos/<name>.json``, see
:func:`segany.video.outputs.to_video_json`): object id, per-frame compressed RLE, area,
bbox (pycocotools' convention) and predicted IoU.

Each video's file is written atomically when its tracking is done, so an interrupted run
loses at most the video in progress and ``--resume`` (or running the same command again)
skips the videos already written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import validate as V
from ..files import atomic_write, find_images
from ..videos import VideoError, open_video
from .outputs import to_video_json
from .tracker import ObjectPrompt, TrackResult

#: File suffixes read as videos (PyAV decodes them).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")
#: Objects of the first frame that are tracked, largest predicted IoU first.
DEFAULT_MAX_OBJECTS = 64


def find_videos(
    source: str | os.PathLike[str], *, exclude: str | os.PathLike[str] | None = None
) -> list[Path]:
    """The video files of ``source`` (a folder, searched as for images by
    :func:`segany.files.find_images`, or one video file); none when it does not exist."""
    try:
        return find_images(source, exclude=exclude, suffixes=VIDEO_SUFFIXES)
    except FileNotFoundError:
        return []


def video_json_path(out: Path, video: Path, source: Path) -> Path:
    """``out/videos/<path of the video under source, '/' as '__'>.json``."""
    try:
        rel = video.relative_to(source.resolve() if source.is_dir() else video.parent)
    except ValueError:
        rel = Path(video.name)
    return out / "videos" / ("__".join(rel.parts) + ".json")


def first_frame_objects(
    generator: Any, rgb: np.ndarray, max_objects: int
) -> list[tuple[np.ndarray, float]]:
    """``[(mask (H, W) bool, predicted IoU)]`` of segment-everything on ``rgb``, best
    predicted IoU first, at most ``max_objects``."""
    records = generator.generate(rgb)
    records.sort(key=lambda r: -float(r["predicted_iou"]))
    return [(np.asarray(r["segmentation"], bool), float(r["predicted_iou"])) for r in records][
        :max_objects
    ]


def label_video(
    tracker: Any, generator: Any, path: Path, *, max_objects: int, progress: bool
) -> tuple[dict[str, Any], int]:
    """One video -> (its YouTube-VIS dict, frames)."""
    video = open_video(path)
    objects = first_frame_objects(generator, video.frame(0), max_objects)
    prompts = {0: {i + 1: ObjectPrompt(mask=m) for i, (m, _) in enumerate(objects)}}
    if not objects:
        result = TrackResult(names=list(video.names), size=video.size, object_ids=[])
    else:
        with tqdm(total=len(video), unit="frame", desc=path.name, disable=not progress) as bar:
            result = tracker.track(video, prompts, progress=bar.update)
    for i, (_, iou) in enumerate(objects):
        result.scores.setdefault(0, {})[i + 1] = iou  # the generator's, not the given mask's
    data = to_video_json(
        result, name=path.stem, file_names=list(video.names), source=str(path.resolve())
    )
    return data, len(video)


def label_videos(
    videos: list[Path],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tracker: Any,
    generator: Any,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Label ``videos`` (found under ``source``) into ``out/videos/``; videos whose JSON
    exists are skipped. Returns ``{"videos", "skipped", "errors", "objects", "frames",
    "seconds", "frames_per_second", "files"}``; a video that cannot be read is reported in
    ``errors`` and the others go on."""
    say = log or (lambda msg: print(f"segany label: {msg}", file=sys.stderr))
    out, src = Path(out), Path(source).expanduser()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"videos": 0, "skipped": 0, "errors": [], "objects": 0}
    report["frames"], files = 0, []
    for path in videos:
        target = video_json_path(out, path, src)
        if target.is_file():
            report["skipped"] += 1
            files.append(str(target))
            continue
        try:
            data, frames = label_video(
                tracker, generator, path, max_objects=max_objects, progress=progress
            )
        except (VideoError, OSError, ValueError) as exc:
            report["errors"].append({"video": str(path), "error": str(exc)})
            say(f"{path.name}: skipped: {exc}")
            continue
        atomic_write(target, V.dumps(data) + "\n")
        report["videos"] += 1
        report["objects"] += len(data["annotations"])
        report["frames"] += frames
        files.append(str(target))
        say(f"{path.name}: {len(data['annotations'])} object(s) over {frames} frame(s)")
    secs = time.perf_counter() - t0
    report.update(
        seconds=round(secs, 3),
        frames_per_second=round(report["frames"] / secs, 3) if report["frames"] else 0.0,
        files=files,
    )
    return report
