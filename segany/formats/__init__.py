"""Writers (and readers) for generated masks: SA-1B JSON, COCO instances, PNG, YOLO-seg.

Every writer takes the records of :meth:`segany.everything.MaskGenerator.generate` in any
output mode (binary mask, uncompressed RLE or COCO RLE).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import masks as M

FORMATS = ("sa1b", "coco", "png", "yolo")


def to_mask(segmentation: Any) -> np.ndarray:
    """A record's ``segmentation`` (bool array, uncompressed or COCO RLE) -> ``(H, W)`` bool."""
    if isinstance(segmentation, dict):
        return M.rle_to_mask(segmentation)
    return np.asarray(segmentation, dtype=bool)


def to_coco_rle(segmentation: Any) -> dict[str, Any]:
    """A record's ``segmentation`` -> compressed COCO RLE with ``counts`` as str."""
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return M.uncompressed_to_coco_rle(segmentation)
        if isinstance(counts, bytes):
            return {"size": list(segmentation["size"]), "counts": counts.decode("ascii")}
        return {"size": list(segmentation["size"]), "counts": counts}
    return M.masks_to_coco_rle(np.asarray(segmentation, dtype=bool)[None])[0]


__all__ = ["FORMATS", "to_coco_rle", "to_mask"]
