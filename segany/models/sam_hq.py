"""HQ-SAM (Ke et al., 2023): SAM 1 whose decoder is :class:`MaskDecoderHQ`.

Same image geometry, prompt encoder and image encoder as SAM 1 (ViT-B/L/H, or MobileSAM's
TinyViT for light HQ-SAM). Per image, the encoder's early feature map and the embedding
are fused into the HQ features (:meth:`MaskDecoderHQ.hq_features`), which
:meth:`embed_features` returns as the extra per-image features and :meth:`decode` takes as
``high_res_features`` (so a :class:`~segany.predictor.Predictor` caches them with the
embedding). One mask comes out per prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from .mask_decoder_hq import MaskDecoderHQ
from .prompt_encoder import PromptEncoder
from .sam import PIXEL_MEAN, PIXEL_STD, Sam, run_in_dtype


class SamHQ(Sam):
    """Image encoder + prompt encoder + HQ mask decoder (see :class:`Sam` for frames).

    Args:
        image_encoder: maps ``(B, 3, S, S)`` to ``(B, C, S/16, S/16)``, and with
            ``early=True`` also to the early map ``(B, vit_dim, S/16, S/16)``.
        prompt_encoder: SAM 1's.
        mask_decoder: a :class:`MaskDecoderHQ`.
        pixel_mean, pixel_std: RGB normalisation in 0-255 units.
    """

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoderHQ,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        if not isinstance(mask_decoder, MaskDecoderHQ):
            raise TypeError("SamHQ needs a MaskDecoderHQ")
        super().__init__(
            image_encoder=image_encoder,
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )

    def feature_state(self) -> dict[str, torch.Tensor]:
        """:meth:`Sam.feature_state` plus the decoder modules that fuse the HQ features
        (``compress_vit_feat.*``, ``embedding_encoder.*``)."""
        state = super().feature_state()
        for name in ("compress_vit_feat", "embedding_encoder"):
            for k, v in getattr(self.mask_decoder, name).state_dict().items():
                state[f"{name}.{k}"] = v
        return state

    def embed_features(
        self,
        images: torch.Tensor,
        *,
        valid: tuple[int, int] | None = None,
        encoder: nn.Module | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(B, 3, S, S)`` -> image embedding ``(B, C, S/16, S/16)`` and ``(hq_features,)``,
        ``(B, C/8, S/4, S/4)``, that :meth:`decode` takes as ``high_res_features``.
        ``encoder``: as in :meth:`Sam.embed_features` (the HQ fusion runs in the model's
        dtype on its cast outputs)."""
        if encoder is None:
            embedding, early = self.image_encoder(images, valid=valid, early=True)
        else:
            dtype = self.pixel_mean.dtype
            embedding, early = run_in_dtype(encoder, images, dtype, valid=valid, early=True)
        return embedding, (self.mask_decoder.hq_features(embedding, early),)

    def forward(
        self,
        images: torch.Tensor,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode one image ``(1, 3, S, S)`` and decode its prompts (see :meth:`decode`);
        logits ``(B, 1, S/4, S/4)``, IoUs ``(B, 1)``."""
        embedding, hq = self.embed_features(images)
        return self.decode(
            embedding,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
            high_res_features=hq,
            hq_token_only=hq_token_only,
        )
