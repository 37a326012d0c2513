"""Moved to :mod:`segany.datasets`; these names stay until the annotator
(``engine/service.py``) imports from there."""

from ..datasets import FORMATS, to_coco_rle, to_mask

__all__ = ["FORMATS", "to_coco_rle", "to_mask"]
