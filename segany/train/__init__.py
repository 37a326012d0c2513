"""Training: SAM's simulated interactive recipe (prompts, losses), the trainer (decoder-only
on cached embeddings, or the full model), data sources and the model-in-the-loop retrain.
See ``docs/training.md``."""

from .data import (
    DataError,
    TrainData,
    TrainImage,
    coco_source,
    open_source,
    sa1b_source,
    split_by_image,
    store_source,
)
from .losses import dice_loss, focal_loss, iou_mse, mask_iou, sam_loss
from .trainer import TrainConfig, Trainer, output_paths

__all__ = [
    "DataError",
    "TrainConfig",
    "TrainData",
    "TrainImage",
    "Trainer",
    "coco_source",
    "dice_loss",
    "focal_loss",
    "iou_mse",
    "mask_iou",
    "open_source",
    "output_paths",
    "sa1b_source",
    "sam_loss",
    "split_by_image",
    "store_source",
]
