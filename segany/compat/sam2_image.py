"""``sam2`` 1.1.0's image API over segany: ``build_sam2`` (official config names),
``SAM2ImagePredictor``. Re-exported by :mod:`segany.compat`."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..models import build_model
from ..models.sam2 import Sam2
from ..predictor import ImageEmbedding
from ..weights import load_checkpoint
from .fast import FastPredictor

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
        self._fast = FastPredictor(sam_model)
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
