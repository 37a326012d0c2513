"""The dataset layer: one reader of everything segany writes and of the common formats,
with one sniffing rule (:func:`open_dataset`), one typed record per image and per mask, and
the writers.

- :mod:`.records`: :class:`MaskRecord`, :class:`ImageRecord`, :class:`Dataset`, the box
  convention (:func:`rle_bbox`, pycocotools' ``toBbox``) and segmentation conversions
  (through :mod:`segany.validate`, the one COCO codec);
- :mod:`.coco`: COCO instances JSON, read (polygons, RLE, compressed RLE) and written;
- :mod:`.sa1b`: SA-1B per-image JSON, loose or in tar shards (``segany label``'s output);
- :mod:`.store`: the annotator's store (read-only);
- :mod:`.video`: tracked videos (``segany track``, ``segany label`` on videos, the
  annotator's video export; YouTube-VIS JSON) as frames, decoded one at a time;
- :mod:`.davis`: DAVIS palette PNGs (``segany track``'s ``masks/``, the annotator's DAVIS
  export, DAVIS itself) as frames;
- :mod:`.open`: the sniffing rule;
- :mod:`.png`, :mod:`.yolo`: write-only outputs of ``segany everything``.
"""

from __future__ import annotations

from .coco import CATEGORY, CocoWriter, read_coco, to_coco
from .davis import read_davis_dataset
from .open import KINDS, open_dataset, sniff
from .records import (
    Dataset,
    DatasetError,
    ImageFile,
    ImageRecord,
    MaskRecord,
    TarMember,
    rle_bbox,
    to_coco_rle,
    to_mask,
    to_rle,
)
from .sa1b import read_sa1b, read_sa1b_dataset, to_sa1b, write_sa1b
from .video import VideoFrame, read_video_dataset

#: Output formats of ``segany everything``.
FORMATS = ("sa1b", "coco", "png", "yolo")

__all__ = [
    "CATEGORY",
    "FORMATS",
    "KINDS",
    "CocoWriter",
    "Dataset",
    "DatasetError",
    "ImageFile",
    "ImageRecord",
    "MaskRecord",
    "TarMember",
    "VideoFrame",
    "open_dataset",
    "read_coco",
    "read_davis_dataset",
    "read_sa1b",
    "read_sa1b_dataset",
    "read_video_dataset",
    "rle_bbox",
    "sniff",
    "to_coco",
    "to_coco_rle",
    "to_mask",
    "to_rle",
    "to_sa1b",
    "write_sa1b",
]
