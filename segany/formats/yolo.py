"""Moved to :mod:`segany.datasets.yolo`."""

from ..datasets.yolo import read_yolo, write_yolo, yolo_lines

__all__ = ["read_yolo", "write_yolo", "yolo_lines"]
