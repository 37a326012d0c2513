"""What the trainer reads from the model family, so that SAM 1 / MobileSAM and SAM 2 share
one trainer (:mod:`.trainer`):

- the geometry (:func:`segany.transforms.geometry_of`): how images, points and boxes map to
  the model frame and its size;
- the per-image features (:meth:`~segany.models.Sam.embed_features`): the image embedding
  and, for SAM 2, the stride-4 and stride-8 maps already projected by the decoder's
  ``conv_s0`` / ``conv_s1``. Both are cached together (an
  :class:`~segany.predictor.ImageEmbedding`); so that the cache stays true, the modules
  that make them (the image encoder, and for SAM 2 ``no_mem_embed``, ``conv_s0``,
  ``conv_s1``) are frozen in every mode but ``full`` and named in the cache key;
- the decoding for the loss: SAM 2's decoder runs in training mode (the single-mask token
  is trained, as in SAM 2's training, not the stability fallback used at inference), takes
  the high-resolution features and gives object-score logits;
- the loss recipe (:func:`.losses.sam_loss`): SAM's (IoU squared error) or SAM 2's (IoU
  absolute error, object-score cross-entropy);
- the checkpoint layout: SAM 1's plain state dict, SAM 2's ``{"model": state_dict}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import transforms as T
from ..models import Sam
from ..models.sam2 import Sam2
from ..predictor import ImageEmbedding
from .losses import LossOutput, sam_loss


def is_sam2(model: Sam) -> bool:
    return isinstance(model, Sam2)


def for_training(model: Sam) -> Sam:
    """``model`` in evaluation mode except its mask decoder (in training mode: SAM 2's
    single-mask output is then its own token; SAM 1's decoder does not depend on the mode)."""
    model.eval()
    model.mask_decoder.train()
    return model


def feature_state(model: Sam) -> dict[str, torch.Tensor]:
    """The weights that make the cached per-image features (their hash names the cache):
    the image encoder's (under its own key names, as before SAM 2, so that SAM 1 caches
    keep their names) and SAM 2's ``no_mem_embed``, ``conv_s0.*``, ``conv_s1.*``."""
    state = dict(model.image_encoder.state_dict())
    if is_sam2(model):
        md = model.mask_decoder
        state["no_mem_embed"] = model.no_mem_embed
        for name in ("conv_s0", "conv_s1"):
            for k, v in getattr(md, name).state_dict().items():
                state[f"{name}.{k}"] = v
    return state


def trainable(model: Sam, parts: Iterable[nn.Module], mode: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the parameters of ``parts`` only, leaving out those of
    :func:`feature_state` unless ``mode == "full"``; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    frozen: set[int] = set()
    if mode != "full" and is_sam2(model):
        md = model.mask_decoder
        frozen = {id(p) for m in (md.conv_s0, md.conv_s1) for p in m.parameters()}
    params = []
    for part in parts:
        for p in part.parameters():
            if id(p) not in frozen:
                p.requires_grad_(True)
                params.append(p)
    return params


def model_input(model: Sam, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB uint8 image -> the normalised model input ``(1, 3, S, S)`` and its size in the
    model frame."""
    geom = T.geometry_of(model)
    return geom.to_model_input(rgb, pixel_mean=model.pixel_mean, pixel_std=model.pixel_std)


def embed(model: Sam, rgb: np.ndarray) -> ImageEmbedding:
    """The cached features of one image (no gradients, on the CPU)."""
    x, input_size = model_input(model, rgb)
    with torch.no_grad():
        emb, high_res = model.embed_features(x)
    return ImageEmbedding(
        embedding=emb.cpu(),
        original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
        input_size=input_size,
        high_res=tuple(t.cpu() for t in high_res),
    )


def iou_loss(model: Sam, setting: str) -> str:
    """``TrainConfig.iou_loss``: ``"auto"`` is ``"l1"`` for SAM 2, ``"mse"`` for SAM 1."""
    if setting != "auto":
        return setting
    return "l1" if is_sam2(model) else "mse"


def decode_loss(
    model: Sam,
    embeddings: torch.Tensor,
    high_res: tuple[torch.Tensor, ...],
    target: torch.Tensor,
    valid: torch.Tensor,
    cfg: Any,
    *,
    multimask: bool,
    **prompts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, LossOutput]:
    """Decode ``B`` prompts (model frame, see :meth:`~segany.models.Sam.decode`) against
    their images' features ``(B, C, h, w)`` and ``high_res`` (each ``(B, ...)``; empty for
    SAM 1) and score them with the family's recipe (``cfg``: a ``TrainConfig``). Returns
    the low-res logits ``(B, K, 4h, 4w)``, the predicted IoUs ``(B, K)`` and the loss."""
    keep: dict | None = {} if is_sam2(model) else None
    logits, iou = model.decode(
        embeddings,
        multimask_output=multimask,
        keep=keep,
        high_res_features=tuple(high_res) or None,
        **prompts,
    )
    out = sam_loss(
        logits,
        iou,
        target,
        valid,
        focal_weight=cfg.focal_weight,
        dice_weight=cfg.dice_weight,
        iou_weight=cfg.iou_weight,
        iou_loss=iou_loss(model, cfg.iou_loss),
        object_logits=None if keep is None else keep["object_score_logits"],
        object_weight=cfg.object_weight,
    )
    return logits, iou, out


def checkpoint(model: Sam) -> dict[str, Any]:
    """What a trained model's weights file holds: the official layout of its family."""
    state = model.state_dict()
    return {"model": state} if is_sam2(model) else state
