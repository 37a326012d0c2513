"""Zero-shot evaluation: simulated clicks, boxes, proposals and detector-box instances over
COCO-format datasets, with reports and plots (see ``docs/evaluation.md``)."""

from .clicks import Click, ClickSampler, first_click, next_click
from .metrics import batch_iou, mask_iou, miou, miou_by_size
from .protocols import (
    CocoDataset,
    DatasetError,
    run_boxes,
    run_instances,
    run_points,
    run_proposals,
)
from .report import write_report

__all__ = [
    "Click",
    "ClickSampler",
    "CocoDataset",
    "DatasetError",
    "batch_iou",
    "first_click",
    "mask_iou",
    "miou",
    "miou_by_size",
    "next_click",
    "run_boxes",
    "run_instances",
    "run_points",
    "run_proposals",
    "write_report",
]
