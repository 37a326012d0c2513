"""Meta's ``segment_anything`` 1.0 and ``sam2`` 1.1 names and signatures over segany's
classes.

Existing code runs by changing one import::

    from segany.compat import sam_model_registry, SamPredictor
    from segany.compat import build_sam2, SAM2ImagePredictor, SAM2AutomaticMaskGenerator
    from segany.compat import build_sam2_video_predictor   # SAM2VideoPredictor
    from segany.compat.hq import sam_model_registry, SamPredictor  # segment_anything_hq

``sam_model_registry["vit_t"]`` is MobileSAM. Checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from .. import transforms as T
from ..models import Sam, build_model
from ..predictor import ImageEmbedding
from ..weights import load_checkpoint
from .fast import FastPredictor
from .sam2_image import SAM2ImagePredictor, build_sam2, sam2_variant


def _build(name: str, checkpoint: str | None = None) -> Sam:
    sam = build_model(name)
    if checkpoint is not None:
        sam.load_state_dict(load_checkpoint(checkpoint), strict=True)
    return sam.eval()


sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": partial(_build, "vit_h"),
    "vit_h": partial(_build, "vit_h"),
    "vit_l": partial(_build, "vit_l"),
    "vit_b": partial(_build, "vit_b"),
    "vit_t": partial(_build, "vit_t"),
}


class ResizeLongestSide:
    """Meta's transform object, over :mod:`segany.transforms`."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return T.resize_image(image, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        size = (int(original_size[0]), int(original_size[1]))
        return T.coords_to_model(coords, size, self.target_length).numpy()

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        size = (int(original_size[0]), int(original_size[1]))
        return T.boxes_to_model(boxes, size, self.target_length).numpy()

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        return T.resize_tensor(image.float(), self.target_length)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        size = (int(original_size[0]), int(original_size[1]))
        return T.coords_to_model(coords, size, self.target_length).to(coords.device)

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        size = (int(original_size[0]), int(original_size[1]))
        return T.boxes_to_model(boxes, size, self.target_length).to(boxes.device)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return T.preprocess_shape(oldh, oldw, long_side_length)


class SamPredictor:
    """``segment_anything.SamPredictor`` with the same methods and return values."""

    def __init__(self, sam_model: Sam) -> None:
        if sam_model.input_geometry != "longest_side":  # HQ-SAM (SamHQ) is welcome here
            raise ValueError("SamPredictor does not support SAM 2 models (use SAM2ImagePredictor)")
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.img_size)
        self._fast = FastPredictor(sam_model)
        self._predictor = self._fast.get()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        self._predictor = self._fast.get()
        self._predictor.set_image(np.ascontiguousarray(image))

    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        m = self.model
        x = T.normalize_and_pad(
            transformed_image.float().to(m.device),
            img_size=m.img_size,
            pixel_mean=m.pixel_mean,
            pixel_std=m.pixel_std,
        )
        size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        self._predictor = self._fast.get()
        with torch.inference_mode():
            # the rest is the zero padding added above; extra: HQ-SAM's per-image features
            emb, extra = self._predictor.model.embed_features(x, valid=size)
        self._predictor.set_embedding(
            ImageEmbedding(
                embedding=emb,
                original_size=(int(original_image_size[0]), int(original_image_size[1])),
                input_size=size,
                high_res=tuple(extra),
            )
        )

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self._predictor.predict(
            point_coords=point_coords,
            point_labels=point_labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask_output,
            return_logits=return_logits,
        )
        return out.masks, out.scores, out.low_res_logits

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._predictor.predict_torch(
            point_coords, point_labels, boxes, mask_input, multimask_output, return_logits
        )

    def get_image_embedding(self) -> torch.Tensor:
        if not self.is_image_set:
            raise RuntimeError(
                "An image must be set with .set_image(...) to generate an embedding."
            )
        return self._predictor.embedding

    def reset_image(self) -> None:
        self._predictor.reset_image()

    @property
    def is_image_set(self) -> bool:
        return self._predictor.is_image_set

    @property
    def features(self) -> torch.Tensor:
        return self._predictor.embedding

    @property
    def original_size(self) -> tuple[int, int]:
        return self._predictor.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self._predictor.input_size

    @property
    def device(self) -> torch.device:
        return self.model.device


class SamAutomaticMaskGenerator:
    """``segment_anything.SamAutomaticMaskGenerator``: same constructor arguments and
    defaults, same records, over :class:`segany.everything.MaskGenerator` in its
    reference-compatible mode."""

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        from ..everything import MaskGenerator

        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        self._gen = MaskGenerator(
            model,
            preset="reference",
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
            min_mask_region_area=min_mask_region_area,
            point_grids=point_grids,
        )
        self.point_grids = self._gen.point_grids
        self.predictor = SamPredictor(model)
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict]:
        """Records for an ``(H, W, 3)`` uint8 RGB image, as Meta's generator returns them."""
        return self._gen.generate(image)


__all__ = [
    "ResizeLongestSide",
    "SAM2ImagePredictor",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "build_sam2",
    "sam2_variant",
    "sam_model_registry",
]

# SAM 2's video predictor (its own module: the session and tracker glue)
from .sam2_video import (  # noqa: E402
    InferenceState,
    SAM2VideoPredictor,
    build_sam2_video_predictor,
)

__all__ += ["InferenceState", "SAM2VideoPredictor", "build_sam2_video_predictor"]

# SAM 2's automatic mask generator (its own module: over segany.everything)
from .sam2_amg import SAM2AutomaticMaskGenerator  # noqa: E402

__all__ += ["SAM2AutomaticMaskGenerator"]
