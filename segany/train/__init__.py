"""Training: SAM's simulated interactive recipe (prompts, losses), the trainer (decoder-only
on cached embeddings, or the full model), data sources and the model-in-the-loop retrain.
See ``docs/training.md``."""

from .data import (
    DataError,
    TrainData,
    TrainImage,
    for_training,
    open_source,
    split_by_image,
)
from .losses import dice_loss, focal_loss, iou_mse, mask_iou, sam_loss
from .trainer import TrainConfig, Trainer, output_paths

__all__ = [
    "DataError",
    "TrainConfig",
    "TrainData",
    "TrainImage",
    "Trainer",
    "dice_loss",
    "focal_loss",
    "for_training",
    "iou_mse",
    "mask_iou",
    "open_source",
    "output_paths",
    "sam_loss",
    "split_by_image",
]
