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

HQ-SAM follows its official training (``train/train.py`` of SysCV/sam-hq): SAM's weights
stay frozen and only what HQ-SAM adds learns (:meth:`MaskDecoderHQ.hq_modules`; ``decoder``
mode; ``decoder+prompt`` adds the prompt encoder, ``full`` everything); the loss is on the
HQ mask alone (``hq_token_only``, one output), sigmoid cross-entropy + dice 1:1, no IoU term
(:data:`HQ_LOSS`; the official loss samples 112x112 points by uncertainty, segany takes every
valid low-res pixel). Since the HQ features come from trained modules, the cache holds
what the frozen encoder gives, the embedding and the early map
(:func:`features`), and each step fuses them (:func:`decoder_features`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import transforms as T
from ..fingerprint import state_fingerprint
from ..models import Sam, SamHQ
from ..models.mask_decoder_hq import MaskDecoderHQ
from ..models.sam2 import Sam2
from ..predictor import ImageEmbedding
from .losses import LossOutput, sam_loss

#: HQ-SAM's loss (:func:`.losses.sam_loss` arguments): sigmoid cross-entropy (the focal
#: term with ``alpha < 0``, ``gamma = 0``) + dice, 1:1, no IoU term (its IoU head is SAM's,
#: frozen); TrainConfig's loss weights do not apply
HQ_LOSS = dict(focal_weight=1.0, dice_weight=1.0, iou_weight=0.0, alpha=-1.0, gamma=0.0)


def is_sam2(model: Sam) -> bool:
    return isinstance(model, Sam2)


def is_hq(model: Sam) -> bool:
    return isinstance(model, SamHQ)


def for_training(model: Sam) -> Sam:
    """``model`` in evaluation mode except its mask decoder (in training mode: SAM 2's
    single-mask output is then its own token; SAM 1's decoder does not depend on the mode)."""
    model.eval()
    model.mask_decoder.train()
    return model


def feature_state(model: Sam) -> dict[str, torch.Tensor]:
    """The weights that make the cached per-image features (their hash names the cache):
    :meth:`~segany.models.Sam.feature_state` (the image encoder's, under its own key
    names, as before SAM 2, so that SAM 1 caches keep their names; SAM 2's
    ``no_mem_embed``, ``conv_s0.*``, ``conv_s1.*``), for HQ-SAM the image encoder's alone
    (the trainer keeps its two outputs, :func:`features`)."""
    if is_hq(model):
        return dict(model.image_encoder.state_dict())
    return model.feature_state()


def cache_prefix(model: Sam) -> str:
    """The name of the cached features' model part in the trainer's cache keys: the hash of
    :func:`feature_state` (HQ-SAM's entries, embedding plus early map, are told apart from
    SAM 1's of the same encoder)."""
    return f"enc{state_fingerprint(feature_state(model))[:24]}" + ("-early" if is_hq(model) else "")


def trainable(model: Sam, parts: Iterable[nn.Module], mode: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the parameters of ``parts`` only, leaving out those of
    :func:`feature_state` unless ``mode == "full"`` (and, for HQ-SAM, SAM's own decoder
    weights); returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    frozen: set[int] = set()
    md = model.mask_decoder
    if mode != "full" and is_sam2(model):
        frozen = {id(p) for m in (md.conv_s0, md.conv_s1) for p in m.parameters()}
    if mode != "full" and isinstance(md, MaskDecoderHQ):
        if mode not in ("decoder", "decoder+prompt"):
            raise ValueError(f"HQ-SAM trains what it adds to SAM's decoder (train='decoder', "
                             f"'decoder+prompt' or 'full'), not {mode!r}")  # fmt: skip
        hq = {id(p) for m in md.hq_modules() for p in m.parameters()}
        frozen = {id(p) for p in md.parameters() if id(p) not in hq}
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


def features(model: Sam, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The per-image features the trainer keeps: :meth:`~segany.models.Sam.embed_features`,
    but for HQ-SAM the encoder's embedding and early map (fused by
    :func:`decoder_features`, whose modules learn)."""
    if is_hq(model):
        emb, early = model.image_encoder(images, early=True)
        return emb, (early,)
    return model.embed_features(images)


def decoder_features(
    decoder: nn.Module, embeddings: torch.Tensor, high_res: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """What ``decoder`` takes as ``high_res_features`` from the kept :func:`features`:
    HQ-SAM's fused HQ features (with gradients where its modules learn); the rest as kept."""
    if isinstance(decoder, MaskDecoderHQ) and high_res:
        return (decoder.hq_features(embeddings, high_res[0]),)
    return high_res


def embed(model: Sam, rgb: np.ndarray) -> ImageEmbedding:
    """The cached features of one image (no gradients, on the CPU)."""
    x, input_size = model_input(model, rgb)
    with torch.no_grad():
        emb, high_res = features(model, x)
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
    SAM 1; HQ-SAM: :func:`decoder_features`) and score them with the family's recipe
    (``cfg``: a ``TrainConfig``). Returns the low-res logits ``(B, K, 4h, 4w)``, the
    predicted IoUs ``(B, K)`` and the loss. HQ-SAM: its HQ mask alone, one output."""
    keep: dict | None = {} if is_sam2(model) else None
    if is_hq(model):
        logits, iou = model.decode(embeddings, multimask_output=False, high_res_features=high_res,
                                   hq_token_only=True, **prompts)  # fmt: skip
        return logits, iou, sam_loss(logits, iou, target, valid, **HQ_LOSS)
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
