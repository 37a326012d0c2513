"""DAVIS palette PNGs as a dataset of frames: one PNG per annotated frame, named after the
frame, each pixel the id of its object (0: background), as ``segany track`` (``OUT/masks/``),
the annotator's DAVIS export (``GET /api/export/davis``: a zip of
``Annotations/<video>/<frame>.png``) and DAVIS itself (``Annotations/480p/<seq>/``) have
them.

A source is one of:

- a folder with ``Annotations/``: every folder below it holding PNGs is a video, named by
  its path under ``Annotations/`` (``480p/blackswan``, ``clips/a``);
- that layout in a zip (the annotator's export as downloaded);
- a folder of PNGs only (``segany track``'s ``masks/``): one video, named after the folder.

The frames of a video ``<video>`` are found (:func:`segany.videos.find_video`) under
``images`` (a frames folder ``<video>/`` or a video file ``<video>.mp4`` ...; with one video,
``images`` may be the video itself), else in ``JPEGImages/<video>/`` beside
``Annotations/`` (DAVIS), else beside a zip. Each PNG becomes an
:class:`~.records.ImageRecord` keyed ``<video>/<frame name>``, its masks the ids present
(mask id = object id); frames without a PNG are not part of the dataset. The PNGs are read
when the images are listed; the frames are decoded when used
(:class:`~.video.VideoFrame`).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from .records import Dataset, DatasetError, ImageRecord, MaskRecord
from .video import VideoFrame, frames_of, open_frames

#: DAVIS's folders of annotations and of frames.
ANNOTATIONS = "Annotations"
FRAMES = "JPEGImages"

# (frame name, a reader of its PNG's (H, W) object ids)
_Png = tuple[str, Callable[[], np.ndarray]]


def _hidden(parts: Sequence[str]) -> bool:
    return any(s.startswith(".") for s in parts)


def _pngs(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir() if f.suffix.lower() == ".png" and f.is_file()
            and not f.name.startswith(".")]  # fmt: skip


def is_davis_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with ``Annotations/`` holding PNGs, or a folder of
    palette PNGs and no JSON (``segany track``'s ``masks/``)."""
    if not path.is_dir():
        return False
    if (path / ANNOTATIONS).is_dir():
        ann = path / ANNOTATIONS
        return any(not _hidden(f.relative_to(ann).parts) for f in ann.rglob("*.png"))
    pngs = sorted(_pngs(path))
    if not pngs or any(path.glob("*.json")):
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(pngs[0]) as img:
            return img.mode == "P"
    except (OSError, UnidentifiedImageError):
        return False


def is_davis_zip(path: Path) -> bool:
    """Whether the zip at ``path`` holds ``Annotations/<video>/<frame>.png`` files."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(_zip_png(n) is not None for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _zip_png(member: str) -> tuple[str, str] | None:
    """``(video, frame name)`` of a zip member ``Annotations/<video>/<frame>.png``."""
    p = PurePosixPath(member)
    if p.suffix.lower() != ".png" or len(p.parts) < 3 or p.parts[0] != ANNOTATIONS:
        return None
    if _hidden(p.parts):
        return None
    return PurePosixPath(*p.parts[1:-1]).as_posix(), p.stem


def _folder_videos(root: Path) -> dict[str, list[_Png]]:
    from ..videos import read_davis_png

    def reader(f: Path) -> Callable[[], np.ndarray]:
        return lambda: read_davis_png(f)

    ann = root / ANNOTATIONS
    if not ann.is_dir():
        return {root.name: [(f.stem, reader(f)) for f in _pngs(root)]}
    out: dict[str, list[_Png]] = {}
    for d in sorted([ann, *(d for d in ann.rglob("*") if d.is_dir())]):
        rel = d.relative_to(ann)
        if _hidden(rel.parts):
            continue
        pngs = _pngs(d)
        if pngs and rel.parts:
            out[rel.as_posix()] = [(f.stem, reader(f)) for f in pngs]
    return out


def _zip_videos(path: Path) -> dict[str, list[_Png]]:
    from ..videos import read_davis_png

    def reader(member: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                with zipfile.ZipFile(path) as z:
                    return read_davis_png(io.BytesIO(z.read(member)))
            except (OSError, zipfile.BadZipFile, KeyError) as exc:
                raise DatasetError(f"cannot read {path}:{member}: {exc}") from None

        return read

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read the zip {path}: {exc}") from None
    out: dict[str, list[_Png]] = {}
    for n in names:
        hit = _zip_png(n)
        if hit is not None:
            out.setdefault(hit[0], []).append((hit[1], reader(n)))
    return dict(sorted(out.items()))


def _labels(read: Callable[[], np.ndarray], where: str) -> np.ndarray:
    from PIL import UnidentifiedImageError

    try:
        return read()
    except DatasetError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"{where}: not a readable PNG: {exc}") from None


def _sequence(
    video: str, pngs: list[_Png], frames: Path, *, where: str, start: int
) -> list[ImageRecord]:
    """One video's PNGs -> a record per PNG, in the video's frame order."""
    src = open_frames(os.fspath(frames))
    index = {n: i for i, n in enumerate(src.names)}
    files = getattr(src, "files", None)
    order = []
    for name, read in pngs:
        if name not in index:
            raise DatasetError(
                f"{where}/{video}/{name}.png: the video {frames} has no frame {name!r} "
                f"(its frames are {src.names[0]!r} ... {src.names[-1]!r})"
            )
        order.append((index[name], name, read))
    out = []
    for k, (t, name, read) in enumerate(sorted(order)):
        lab = _labels(read, f"{where}/{video}/{name}.png")
        h, w = lab.shape
        anns = []
        for obj in np.unique(lab):
            if obj == 0:
                continue
            anns.append(MaskRecord.from_annotation({"segmentation": lab == obj,
                                                    "id": int(obj)}, h, w))  # fmt: skip
        out.append(
            ImageRecord(
                key=f"{video}/{name}",
                image_id=start + k,
                height=h,
                width=w,
                file_name=files[t].name if files else name,
                source=VideoFrame(video=frames, index=t, name=name),
                annotations=tuple(anns),
            )
        )
    return out


def read_davis_dataset(
    source: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
) -> Dataset:
    """DAVIS palette PNGs (see the module doc) as a dataset of frames (kind ``"davis"``);
    ``images``: the folder holding the videos (or frame folders) by name, or the one
    video."""
    p = Path(os.fspath(source)).expanduser()
    img = Path(os.fspath(images)).expanduser() if images is not None else None
    if p.is_file() and p.suffix.lower() == ".zip":
        videos, beside = _zip_videos(p), p.parent
    elif p.is_dir():
        videos, beside = _folder_videos(p), None
    else:
        raise DatasetError(f"data source not found: {source}")
    if not any(videos.values()):
        raise DatasetError(f"{p}: no DAVIS annotation PNGs (Annotations/<video>/<frame>.png)")

    def frames(video: str) -> Path:
        from ..videos import find_video  # lazily: segany.videos imports torch

        if img is not None:
            return frames_of(video, img, single=len(videos) == 1, where=str(p))
        if beside is None and (p / FRAMES / video).is_dir():
            return p / FRAMES / video
        found = find_video(beside, video) if beside is not None else None
        if found is None:
            where = f"beside {p}" if beside is not None else f"in {p / FRAMES / video}"
            raise DatasetError(
                f"{p}: no frames of the video {video!r} {where}; give the folder holding "
                "the videos (or frame folders) by name, or the one video, as the images "
                "(--images)"
            )
        return found

    def read() -> Iterator[ImageRecord]:
        start = 1
        for video, pngs in videos.items():
            records = _sequence(video, pngs, frames(video), where=str(p), start=start)
            start += len(records)
            yield from records

    name = p.stem if p.is_file() else p.name
    return Dataset(name=name, kind="davis", source=p, read=read)


__all__ = ["ANNOTATIONS", "FRAMES", "is_davis_folder", "is_davis_zip", "read_davis_dataset"]
