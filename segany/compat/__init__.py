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

import os
import re
import warnings
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from .. import transforms as T
from ..models import Sam, build_model
from ..models.fuse import InferenceView
from ..models.sam2 import Sam2
from ..predictor import EmbeddingCache, ImageEmbedding, Predictor
from ..weights import load_checkpoint


def _build(name: str, checkpoint: str | None = None) -> Sam:
    sam = build_model(name)
    if checkpoint is not None:
        sam.load_state_dict(load_checkpoint(checkpoint), strict=True)
    return sam.eval()


class _FastPredictor:
    """A :class:`Predictor` over the :class:`InferenceView` of a user's model: the fused
    copy in eval mode (a new predictor, and so a new embedding, when the weights changed),
    the model itself in training mode. Like the reference, it keeps no embedding cache:
    every ``set_image`` encodes (and no weights fingerprint is computed for cache keys)."""

    def __init__(self, model: Sam) -> None:
        self.view = InferenceView(model)
        self.predictor: Predictor | None = None

    def get(self) -> Predictor:
        model = self.view.current()
        if self.predictor is None or self.predictor.model is not model:
            training = self.view.model.training
            self.predictor = Predictor(
                model, cache=EmbeddingCache(max_items=0), model_id="compat-uncached"
            )
            self.view.model.train(training)  # Predictor puts its model in eval mode
        return self.predictor


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
        self._fast = _FastPredictor(sam_model)
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
        )
        if point_grids is not None:
            if len(point_grids) != crop_n_layers + 1:
                raise ValueError("point_grids needs one grid per crop layer")
            self._gen.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self.point_grids = self._gen.point_grids
        self.predictor = SamPredictor(model)
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict]:
        """Records for an ``(H, W, 3)`` uint8 RGB image, as Meta's generator returns them."""
        return self._gen.generate(image)


# -- SAM 2 (``sam2`` 1.1.0) --------------------------------------------------------------

_SAM2_CONFIG = re.compile(r"(?:.*/)?(sam2(?:\.1)?_hiera_(?:t|s|b\+|l))(?:\.yaml)?")


def sam2_variant(config_file: str | os.PathLike[str]) -> str:
    """Registry name of an official SAM 2 config as users write it:
    ``"configs/sam2.1/sam2.1_hiera_t.yaml"``, ``"sam2.1/sam2.1_hiera_b+.yaml"``,
    ``"sam2_hiera_l.yaml"``, ``"sam2.1_hiera_s"``... -> ``"sam2.1_hiera_t"`` etc."""
    text = os.fspath(config_file).replace("\\", "/").strip()
    match = _SAM2_CONFIG.fullmatch(text)
    if match is None:
        raise ValueError(
            f"unknown SAM 2 config {text!r}; use an official one such as "
            "'configs/sam2.1/sam2.1_hiera_t.yaml' (sizes t, s, b+, l; sam2 or sam2.1)"
        )
    return match.group(1)


def build_sam2(
    config_file: str,
    ckpt_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    mode: str = "eval",
    hydra_overrides_extra: Sequence[str] = (),
    apply_postprocessing: bool = True,
    **kwargs: object,
) -> Sam2:
    """``sam2.build_sam.build_sam2``: the model of an official config, with the weights
    of ``ckpt_path`` (a ``{"model": state_dict}`` file, strict keys) if given. The
    default device is the CPU (the reference's is ``"cuda"``). Hydra overrides are not
    read (the configs' numbers live in :mod:`segany.models.registry`); passing any is an
    error rather than silently ignored."""
    if hydra_overrides_extra:
        raise ValueError("hydra_overrides_extra is not supported by segany.compat.build_sam2")
    model = build_model(sam2_variant(config_file))
    if not apply_postprocessing:
        model.mask_decoder.dynamic_multimask_via_stability = False
    if ckpt_path is not None:
        model.load_state_dict(load_checkpoint(ckpt_path), strict=True)
    model = model.to(device)
    return model.eval() if mode == "eval" else model.train()


class SAM2ImagePredictor:
    """``sam2.sam2_image_predictor.SAM2ImagePredictor``: same methods, arguments and
    return values (numpy ``float32`` masks, IoUs and low-res logits; a leading axis for
    batched prompts), over :class:`segany.predictor.Predictor`.

    ``max_hole_area`` / ``max_sprinkle_area`` post-processing needs the reference's CUDA
    extension; like the reference without it, it is skipped with a warning."""

    def __init__(
        self,
        sam_model: Sam2,
        mask_threshold: float = 0.0,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
        **kwargs: object,
    ) -> None:
        self.model = sam_model
        self.mask_threshold = mask_threshold
        if max_hole_area > 0 or max_sprinkle_area > 0:
            warnings.warn(
                "max_hole_area / max_sprinkle_area post-processing is skipped (the reference "
                "skips it too without its CUDA extension)",
                UserWarning,
                stacklevel=2,
            )
        self._fast = _FastPredictor(sam_model)
        self._predictor = self._fast.get()
        self._states: list[ImageEmbedding] = []
        self._is_batch = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def _is_image_set(self) -> bool:
        return bool(self._states)

    @property
    def _orig_hw(self) -> list[tuple[int, int]] | None:
        return [st.original_size for st in self._states] or None

    @property
    def _features(self) -> dict[str, object] | None:
        """The reference's per-image features: ``image_embed`` ``(B, C, h, w)`` and
        ``high_res_feats`` (two maps with a leading ``B``)."""
        if not self._states:
            return None
        embed = torch.cat([st.embedding for st in self._states])
        high = [torch.cat(level) for level in zip(*(st.high_res for st in self._states))]
        return {"image_embed": embed, "high_res_feats": high}

    def set_image(self, image: np.ndarray | object) -> None:
        """Embed one RGB image (``(H, W, 3)`` array or PIL image)."""
        self.reset_predictor()
        self._predictor = self._fast.get()
        self._states = [self._predictor.set_image(image)]

    def set_image_batch(self, image_list: list[np.ndarray]) -> None:
        """Embed several RGB images for :meth:`predict_batch`."""
        self.reset_predictor()
        if not isinstance(image_list, list):
            raise TypeError("image_list must be a list of (H, W, 3) RGB arrays")
        self._predictor = self._fast.get()
        self._states = [self._predictor.set_image(img) for img in image_list]
        self._is_batch = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks ``(C, H, W)``, IoUs ``(C,)`` and low-res logits ``(C, S/4, S/4)`` for one
        prompt (``(B, C, ...)`` for ``B`` prompts: points ``(B, N, 2)``, boxes ``(B, 4)``).
        ``normalize_coords=False``: coordinates are fractions of the image size."""
        if not self._states:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        return self._predict(
            0,
            point_coords,
            point_labels,
            box,
            mask_input,
            multimask_output,
            return_logits,
            normalize_coords,
        )

    def predict_batch(
        self,
        point_coords_batch: list[np.ndarray] | None = None,
        point_labels_batch: list[np.ndarray] | None = None,
        box_batch: list[np.ndarray] | None = None,
        mask_input_batch: list[np.ndarray] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """One :meth:`predict` per image of :meth:`set_image_batch`; lists of results."""
        if not self._is_batch:
            raise RuntimeError("predict_batch needs images set with .set_image_batch(...)")
        pick = lambda seq, i: None if seq is None else seq[i]  # noqa: E731
        outs = [
            self._predict(
                i,
                pick(point_coords_batch, i),
                pick(point_labels_batch, i),
                pick(box_batch, i),
                pick(mask_input_batch, i),
                multimask_output,
                return_logits,
                normalize_coords,
            )
            for i in range(len(self._states))
        ]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]

    def _predict(
        self,
        index: int,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask_output: bool,
        return_logits: bool,
        normalize_coords: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        st = self._states[index]
        h, w = st.original_size
        coords = labels = boxes = masks_in = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            if not normalize_coords:
                coords = coords * np.array([w, h])
        if box is not None:
            boxes = np.asarray(box, dtype=np.float64).reshape(-1, 4)
            if not normalize_coords:
                boxes = boxes * np.array([w, h, w, h])
        if mask_input is not None:
            masks_in = np.asarray(mask_input, dtype=np.float32)
            if masks_in.ndim == 3:
                masks_in = masks_in[None]
        p = self._predictor
        if not p.is_image_set or p.state is not st:
            p.set_embedding(st)
        out = p.predict_batch(
            point_coords=coords,
            point_labels=labels,
            boxes=boxes,
            mask_input=masks_in,
            multimask_output=multimask_output,
            return_logits=True,
        )
        logits = out.masks
        masks = logits if return_logits else logits > self.mask_threshold
        arrays = (masks.astype(np.float32), out.scores, out.low_res_logits)
        if arrays[0].shape[0] == 1:  # the reference squeezes a batch of one
            arrays = tuple(a[0] for a in arrays)
        return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in arrays)

    def get_image_embedding(self) -> torch.Tensor:
        """The image embedding ``(B, C, h, w)`` of the image(s) set."""
        if not self._states:
            raise RuntimeError(
                "An image must be set with .set_image(...) to generate an embedding."
            )
        return self._features["image_embed"]  # type: ignore[index]

    def reset_predictor(self) -> None:
        self._states = []
        self._is_batch = False
        self._predictor.reset_image()


__all__ = [
    "ResizeLongestSide",
    "SAM2ImagePredictor",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "build_sam2",
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
