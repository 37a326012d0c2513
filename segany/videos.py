"""Video sources: a video file (PyAV, no system ffmpeg needed), a folder of frames, or a
DAVIS sequence. Frames are read lazily, one at a time, as RGB uint8 ``(H, W, 3)``. Also
the reader of DAVIS annotation PNGs (:func:`read_davis_png`) and the lookup of a video by
the name its outputs give it (:func:`find_video`).

Every source names its frames (``00017`` for ``00017.jpg``; ``00000``, ``00001``, ... for
the frames of a video file), so that outputs can be named after them as DAVIS does.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from .files import IMAGE_SUFFIXES
from .transforms import ImageError, load_image

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
#: Image suffixes read as frames: :data:`segany.files.IMAGE_SUFFIXES` but GIF (an animated GIF
#: is opened as a video).
FRAME_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".gif")


class VideoError(ValueError):
    """A video or frames folder that cannot be read; the message says which and why."""


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class VideoSource:
    """Frames by index; ``len(source)`` frames named ``source.names``; all of one size
    ``(H, W)`` (:attr:`size`), the size of the first frame."""

    names: list[str]
    fps: float | None
    path: Path

    def __len__(self) -> int:
        return len(self.names)

    def frame(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.frame(i)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames."""
        if not hasattr(self, "_size"):
            self._size = tuple(self.frame(0).shape[:2])
        return self._size  # type: ignore[return-value]

    def _check_size(self, index: int, img: np.ndarray) -> np.ndarray:
        if index == 0:
            self._size = tuple(img.shape[:2])
        elif img.shape[:2] != self.size:
            h, w = self.size
            raise VideoError(
                f"{self.path}: frame {self.names[index]} is {img.shape[1]}x{img.shape[0]}, "
                f"the first frame {w}x{h}; frames must share one size"
            )
        return img


class FrameFolder(VideoSource):
    """Image files in a folder, in natural order of their names (``2.jpg`` before
    ``10.jpg``); hidden files are ignored."""

    def __init__(self, folder: str | os.PathLike[str], *, cache: int = 4) -> None:
        self.path = Path(folder)
        files = [
            f
            for f in self.path.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in FRAME_SUFFIXES
        ]
        if not files:
            raise VideoError(f"{self.path}: no frames ({', '.join(FRAME_SUFFIXES)}) found")
        files.sort(key=lambda f: _natural_key(f.name))
        self.files = files
        self.names = [f.stem for f in files]
        if len(set(self.names)) != len(self.names):
            raise VideoError(f"{self.path}: two frames share a name (e.g. 1.jpg and 1.png)")
        self.fps = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache

    def frame(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        try:
            img = load_image(self.files[index])
        except ImageError as exc:
            raise VideoError(f"{self.path}: frame {self.files[index].name}: {exc}") from None
        img = self._check_size(index, img)
        self._cache[index] = img
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return img


class VideoFile(VideoSource):
    """A video file decoded with PyAV. Frames are decoded in order; going back re-opens
    the file and decodes forward again (trackers read frames in order, forward or back in
    chunks, so this stays cheap); a few recent frames are kept."""

    def __init__(self, path: str | os.PathLike[str], *, cache: int = 16) -> None:
        import av

        self.path = Path(path)
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else None
                count = sum(1 for _ in container.decode(stream))
        except (av.FFmpegError, IndexError, OSError) as exc:
            raise VideoError(f"{self.path}: not a readable video: {exc}") from None
        if count == 0:
            raise VideoError(f"{self.path}: the video holds no frames")
        self.names = [f"{i:05d}" for i in range(count)]
        self._container = None
        self._frames: Iterator | None = None
        self._next = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache

    def _reopen(self) -> None:
        import av

        self.close()
        self._container = av.open(str(self.path))
        self._frames = self._container.decode(self._container.streams.video[0])
        self._next = 0

    def frame(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame video")
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        if self._frames is None or index < self._next:
            self._reopen()
        while self._next <= index:
            frame = next(self._frames)  # type: ignore[arg-type]
            img = self._check_size(self._next, frame.to_ndarray(format="rgb24"))
            self._cache[self._next] = img
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self._next += 1
        return self._cache[index]

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._frames = None, None


class FrameRange(VideoSource):
    """Frames ``start``, ``start + 1``, ... of another source, as a video of their own
    (frame 0 is the source's frame ``start``): a tracker started there follows objects
    from a frame on without touching the frames before it."""

    def __init__(self, source: VideoSource, start: int) -> None:
        if not 0 <= start < len(source):
            raise IndexError(f"frame {start} of a {len(source)}-frame video")
        self.source, self.start = source, start
        self.path, self.fps = source.path, source.fps
        self.names = source.names[start:]

    def frame(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame range")
        return self.source.frame(self.start + index)

    @property
    def size(self) -> tuple[int, int]:
        return self.source.size


def davis_sequences(root: str | os.PathLike[str], resolution: str = "480p") -> list[str]:
    """The sequences of a DAVIS root (``JPEGImages/<resolution>/<seq>/``), sorted."""
    base = Path(root) / "JPEGImages" / resolution
    if not base.is_dir():
        raise VideoError(f"{root}: not a DAVIS root (no JPEGImages/{resolution}/)")
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def open_video(source: str | os.PathLike[str]) -> VideoSource:
    """A video file, a folder of frames, or a DAVIS sequence folder
    (``.../JPEGImages/480p/<seq>``, which is a folder of frames)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return FrameFolder(path)
    if path.is_file():
        if path.suffix.lower() in FRAME_SUFFIXES:
            raise VideoError(f"{path} is one image; give a video or a folder of frames")
        return VideoFile(path)
    raise VideoError(f"{path}: no such video or folder")


def find_video(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The video called ``name`` under ``folder``: ``folder/name`` (a frames folder or a
    video file), else ``folder/name<suffix>`` for a suffix of :data:`VIDEO_SUFFIXES` (the
    outputs name a video file without its suffix: ``segany label``'s JSON, the annotator's
    DAVIS export); ``None`` when there is none."""
    base = Path(folder).expanduser()
    path = base / name
    if path.is_dir() or path.is_file():
        return path
    for suffix in VIDEO_SUFFIXES:
        for s in (suffix, suffix.upper()):
            if (cand := base / f"{name}{s}").is_file():
                return cand
    return None


def read_davis_png(path: str | os.PathLike[str] | IO[bytes]) -> np.ndarray:
    """A DAVIS annotation PNG (a path or a binary file) -> ``(H, W)`` uint8 object ids.
    Palette PNGs give their indices; a grayscale mask (DAVIS-2016: 0 / 255) gives 1 where
    the value is above 127."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode == "P":
            return np.asarray(img, dtype=np.uint8)
        arr = np.asarray(img.convert("L"))
    return (arr > 127).astype(np.uint8)
