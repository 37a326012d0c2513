"""``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`` (``sam2==1.1.0``) over
:class:`segany.everything.MaskGenerator` in its reference mode: the same constructor
arguments and defaults and the same records."""

from __future__ import annotations

import numpy as np
import torch

from ..everything import MaskGenerator
from ..models.sam2 import Sam2
from .sam2_image import SAM2ImagePredictor


class SAM2AutomaticMaskGenerator:
    """The SAM 2 package's automatic mask generator.

    ``use_m2m`` is the reference's mask-to-mask step (each grid mask decoded once more with
    its point and its low-res logits as mask input, one output; see
    ``GeneratorSettings.use_m2m``); ``multimask_output=False`` prompts one mask per point.
    ``min_mask_region_area`` is, as in the reference, handed to the image predictor as
    ``max_hole_area`` / ``max_sprinkle_area``, a step that needs the reference's CUDA
    extension and is skipped with a warning (as the reference does without it).
    ``mask_threshold`` must be the model's (0.0). ``generate(image)`` takes an ``(H, W, 3)``
    uint8 RGB array and returns one dict per mask: ``segmentation`` (``(H, W)`` bool, or
    RLE with ``output_mode`` ``"uncompressed_rle"`` / ``"coco_rle"``), ``area``, ``bbox``
    (XYWH), ``predicted_iou``, ``point_coords`` (``[[x, y]]``, image pixels),
    ``stability_score``, ``crop_box`` (XYWH), in the reference's order.
    """

    def __init__(
        self,
        model: Sam2,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        if mask_threshold != model.mask_threshold:
            raise ValueError(
                f"mask_threshold {mask_threshold} is not supported (the model thresholds "
                f"its logits at {model.mask_threshold})"
            )
        self.predictor = SAM2ImagePredictor(
            model, max_hole_area=min_mask_region_area, max_sprinkle_area=min_mask_region_area
        )
        self._gen = MaskGenerator(
            model,
            preset="sam2",
            output_mode=output_mode,  # type: ignore[arg-type]
            points_per_side=points_per_side or 1,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            use_m2m=use_m2m,
            multimask_output=multimask_output,
            point_grids=point_grids,
        )
        self.point_grids = self._gen.point_grids
        self.output_mode = output_mode
        self.use_m2m = use_m2m
        self.multimask_output = multimask_output
        self.min_mask_region_area = min_mask_region_area

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict]:
        """Records for an ``(H, W, 3)`` uint8 RGB image, as the reference returns them."""
        return self._gen.generate(image)
