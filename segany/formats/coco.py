"""Moved to :mod:`segany.datasets.coco`."""

from ..datasets.coco import CATEGORY, CocoWriter

__all__ = ["CATEGORY", "CocoWriter"]
