"""The ``segment_anything_hq`` 0.3 package's names and signatures over segany's classes.

Code written for HQ-SAM runs by changing one import::

    from segany.compat.hq import sam_model_registry, SamPredictor, SamAutomaticMaskGenerator

    sam = sam_model_registry["vit_l"](checkpoint="sam_hq_vit_l.pth")
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    masks, scores, logits = predictor.predict(point_coords=..., point_labels=...,
                                              multimask_output=False, hq_token_only=False)

``"vit_tiny"`` is light HQ-SAM (TinyViT). What differs from the reference: checkpoints
load with ``weights_only=True`` and strict key checking (the reference prints the
mismatches of a non-strict load and carries on), the default device is the CPU, and the
predictor keeps the fused per-image HQ features rather than the list of intermediate
encoder maps (``interm_features``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ..models import SamHQ
from . import SamAutomaticMaskGenerator as _Sam1Generator
from . import SamPredictor as _Sam1Predictor
from . import _build  # the registry variant, with a checkpoint loaded strictly

sam_model_registry: dict[str, Callable[..., SamHQ]] = {
    "default": partial(_build, "sam_hq_vit_h"),
    "vit_h": partial(_build, "sam_hq_vit_h"),
    "vit_l": partial(_build, "sam_hq_vit_l"),
    "vit_b": partial(_build, "sam_hq_vit_b"),
    "vit_tiny": partial(_build, "sam_hq_vit_tiny"),
}


class SamPredictor(_Sam1Predictor):
    """``segment_anything_hq.SamPredictor``: Meta's predictor whose ``predict`` and
    ``predict_torch`` take ``hq_token_only`` (default ``False``: the HQ mask added to
    SAM's). One mask per prompt is returned whatever ``multimask_output`` says (with it,
    SAM's part is its best multimask output), as the reference does."""

    def __init__(self, sam_model: SamHQ) -> None:
        if not isinstance(sam_model, SamHQ):
            raise TypeError("segany.compat.hq.SamPredictor needs an HQ-SAM model")
        super().__init__(sam_model)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._predictor.hq_token_only = hq_token_only
        return super().predict(
            point_coords, point_labels, box, mask_input, multimask_output, return_logits
        )

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._predictor.hq_token_only = hq_token_only
        return super().predict_torch(
            point_coords, point_labels, boxes, mask_input, multimask_output, return_logits
        )


class SamAutomaticMaskGenerator(_Sam1Generator):
    """``segment_anything_hq.SamAutomaticMaskGenerator``: SAM 1's generator (same arguments
    and defaults) over an HQ-SAM model, one mask per grid point (``hq_token_only=False``,
    as the reference); ``generate`` takes the reference's ``multimask_output`` (SAM's part
    of each mask: its best multimask output, or its single-mask output)."""

    def __init__(self, model: SamHQ, *args, **kwargs) -> None:
        if not isinstance(model, SamHQ):
            raise TypeError("segany.compat.hq.SamAutomaticMaskGenerator needs an HQ-SAM model")
        super().__init__(model, *args, **kwargs)
        self.predictor = SamPredictor(model)

    @torch.no_grad()
    def generate(self, image: np.ndarray, multimask_output: bool = True) -> list[dict]:
        self._gen.settings = self._gen.settings.replace(multimask_output=multimask_output)
        return self._gen.generate(image)


__all__ = ["SamAutomaticMaskGenerator", "SamPredictor", "sam_model_registry"]
