"""What a track is written as: DAVIS palette PNGs (one per frame, named after it, pixel value
= object id), a COCO-style video JSON (the YouTube-VIS layout: per-frame RLE per track),
and an overlay video (H.264 through PyAV). The reader of DAVIS annotation PNGs is
:func:`segany.videos.read_davis_png` (the I/O layer the dataset reader uses too), also
importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from .. import validate as V
from ..files import atomic_write
from ..videos import VideoSource, read_davis_png
from ..viz import overlay_masks
from .tracker import TrackResult


def davis_palette() -> list[int]:
    """The 256-colour palette of DAVIS (and PASCAL VOC) annotations, flat RGB: colour ``i``
    spreads the bits of ``i`` over the high bits of R, G and B in turn."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_davis_png(path: str | os.PathLike[str] | IO[bytes], labels: np.ndarray) -> None:
    """``(H, W)`` object ids (0..255) as a palette PNG (to a path or a binary file)."""
    if labels.max(initial=0) > 255:
        raise ValueError("DAVIS PNGs hold object ids up to 255")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(davis_palette())
    img.save(path, format="PNG")


def write_davis(result: TrackResult, out: str | os.PathLike[str]) -> list[Path]:
    """One palette PNG per frame into ``out``, named after the frames."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(result.names):
        p = out / f"{name}.png"
        write_davis_png(p, result.label_map(i))
        paths.append(p)
    return paths


def to_video_json(
    result: TrackResult, *, name: str, file_names: list[str], source: str | None = None
) -> dict[str, Any]:
    """The track as a YouTube-VIS style dict: one video, one annotation per object with a
    segmentation (compressed RLE, ``None`` where absent), area, bbox and score per frame.
    ``source``: the video file or frame folder (absolute), recorded so that
    :func:`segany.datasets.open_dataset` finds the frames."""
    h, w = result.size
    from pycocotools import mask as mask_utils

    anns = []
    for obj in result.object_ids:
        segs, areas, boxes, scores = [], [], [], []
        for i in range(len(result.names)):
            rle = result.masks.get(i, {}).get(obj)
            if rle is None or not mask_utils.area(V.segmentation_to_rle(rle)):
                segs.append(None)
                areas.append(None)
                boxes.append(None)
                scores.append(None)
                continue
            enc = V.segmentation_to_rle(rle)
            segs.append({"size": [h, w], "counts": enc["counts"].decode("ascii")})
            areas.append(int(mask_utils.area(enc)))
            boxes.append([float(v) for v in mask_utils.toBbox(enc)])
            scores.append(result.scores.get(i, {}).get(obj))
        anns.append(
            {
                "id": obj,
                "video_id": 1,
                "track_id": obj,
                "category_id": 1,
                "iscrowd": 0,
                "segmentations": segs,
                "areas": areas,
                "bboxes": boxes,
                "scores": scores,
            }
        )
    return {
        "videos": [
            {
                "id": 1,
                "name": name,
                "width": w,
                "height": h,
                "length": len(result.names),
                "file_names": file_names,
                **({"source": source} if source is not None else {}),
            }
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "object"}],
    }


def write_video_json(result: TrackResult, path: str | os.PathLike[str], **kw: Any) -> Path:
    return atomic_write(path, V.dumps(to_video_json(result, **kw)) + "\n")


def write_overlay_video(
    video: VideoSource, result: TrackResult, path: str | os.PathLike[str], *, fps: float = 24.0
) -> Path:
    """The frames with each object's mask drawn over them, as an H.264 MP4 (frames of odd
    size are padded by one pixel: the codec's colour subsampling needs even sides)."""
    import av

    path = Path(path)
    h, w = result.size
    eh, ew = h + h % 2, w + w % 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps) or 24)
        stream.width, stream.height, stream.pix_fmt = ew, eh, "yuv420p"
        for i in range(len(result.names)):
            frame = video.frame(i)
            masks = [result.mask(i, o) for o in result.object_ids]
            pic = overlay_masks(frame, np.stack(masks)) if masks else frame
            if (eh, ew) != (h, w):
                pic = np.pad(pic, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(pic, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


__all__ = [
    "davis_palette",
    "read_davis_png",
    "to_video_json",
    "write_davis",
    "write_davis_png",
    "write_overlay_video",
    "write_video_json",
]
