"""HQ-SAM's mask decoder (Ke et al., 2023): SAM's decoder plus a high-quality output token.

What it adds to :class:`~segany.models.mask_decoder.MaskDecoder` (whose modules and
weights it keeps, so SAM's outputs are still there):

- ``hf_token``, a fifth output token that goes through the two-way transformer with the
  others, and ``hf_mlp``, its hypernetwork MLP;
- the *HQ features* ``(B, C/8, 4h, 4w)``, computed once per image: the image embedding
  upscaled by ``embedding_encoder`` plus an early encoder feature map (ViT: the output of
  the first global-attention block; TinyViT: of the second stage) upscaled by
  ``compress_vit_feat``;
- the HQ mask: ``hf_mlp``'s output times (the upscaled decoder embedding refined by
  ``embedding_maskfeature``, plus the HQ features).

One mask per prompt comes out: the HQ mask alone (``hq_token_only``) or the HQ mask added
to SAM's mask (its single-mask output, or with ``multimask_output`` the multimask output
with the highest predicted IoU); the IoU prediction is that SAM mask's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .mask_decoder import MaskDecoder
from .transformer import DecoderContext, TwoWayTransformer


def _upscale_x4(in_dim: int, mid_dim: int, out_dim: int) -> nn.Sequential:
    """Two stride-2 transposed convolutions with a norm and GELU between them."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_dim, mid_dim, kernel_size=2, stride=2),
        LayerNorm2d(mid_dim),
        nn.GELU(),
        nn.ConvTranspose2d(mid_dim, out_dim, kernel_size=2, stride=2),
    )


class MaskDecoderHQ(MaskDecoder):
    """SAM's mask decoder with HQ-SAM's output token and feature fusion.

    Args:
        transformer_dim, transformer, num_multimask_outputs, iou_head_depth,
            iou_head_hidden_dim: as for :class:`MaskDecoder` (SAM 1's settings).
        vit_dim: channels of the early encoder feature map (the ViT's width; 160 for the
            TinyViT of light HQ-SAM).
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        vit_dim: int,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        d = transformer_dim
        self.hf_token = nn.Embedding(1, d)
        self.hf_mlp = MLP(in_dim=d, hidden_dim=d, out_dim=d // 8, num_layers=3)
        self.compress_vit_feat = _upscale_x4(vit_dim, d, d // 8)
        self.embedding_encoder = _upscale_x4(d, d // 4, d // 8)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(d // 8, d // 4, kernel_size=3, padding=1),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.Conv2d(d // 4, d // 8, kernel_size=3, padding=1),
        )

    def hq_modules(self) -> list[nn.Module]:
        """What HQ-SAM adds to SAM's decoder, the only parts its training learns (SAM's own
        weights stay frozen there)."""
        return [
            self.hf_token,
            self.hf_mlp,
            self.compress_vit_feat,
            self.embedding_encoder,
            self.embedding_maskfeature,
        ]

    def hq_features(self, image_embeddings: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        """The per-image HQ features: image embedding ``(B, C, h, w)`` and the early encoder
        map ``(B, vit_dim, h, w)`` -> ``(B, C/8, 4h, 4w)``."""
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(early)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        context: DecoderContext | None = None,
        crop_tokens: tuple[int, int] | None = None,
        keep: dict | None = None,
        high_res_features: Sequence[torch.Tensor] | None = None,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompts against one image.

        Args:
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                context: as for :meth:`MaskDecoder.forward`.
            multimask_output: add the best of SAM's three multimask outputs (by predicted
                IoU) to the HQ mask instead of SAM's single-mask output.
            crop_tokens, keep: accepted for the common interface and not used: the 3x3
                convolutions of ``embedding_maskfeature`` mix neighbouring cells, so the
                whole ``(B, 1, 4h, 4w)`` grid is always decoded.
            high_res_features: ``(hq_features,)``, :meth:`hq_features` of this image
                ``(1 or B, C/8, 4h, 4w)``.
            hq_token_only: return the HQ mask alone.

        Returns:
            mask logits ``(B, 1, 4h, 4w)`` and predicted IoUs ``(B, 1)``.
        """
        if not high_res_features:
            raise ValueError("HQ-SAM decoding needs the image's HQ features")
        (hq,) = high_res_features
        outputs = [] if hq_token_only else ([1, 2, 3] if multimask_output else [0])
        hyper_in, upscaled, iou_all, masks = self._decode_hq(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            hq, outputs, context=context,
        )  # fmt: skip

        def sam_masks(best: torch.Tensor) -> torch.Tensor:
            rows = torch.arange(best.shape[0], device=best.device)
            chosen = hyper_in[rows, best - outputs[0]].unsqueeze(1)  # position in `outputs`
            return self.project_masks(chosen, upscaled)

        return hq_output(masks, iou_all, sam_masks, multimask_output, hq_token_only)

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq: torch.Tensor,
        few_tokens: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every output at once, for the ONNX graph (no control flow; the choice is
        :func:`hq_output` on the caller's side): SAM's four mask logits
        ``(B, 4, 4h, 4w)``, their IoUs ``(B, 4)`` and the HQ mask ``(B, 1, 4h, 4w)``."""
        outputs = list(range(self.num_mask_tokens))
        hyper_in, upscaled, iou_all, masks = self._decode_hq(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            hq, outputs, few_tokens=few_tokens,
        )  # fmt: skip
        return self.project_masks(hyper_in, upscaled), iou_all, masks

    def _decode_hq(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq: torch.Tensor,
        outputs: Sequence[int],
        context: DecoderContext | None = None,
        few_tokens: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transformer over SAM's output tokens, the HQ token and the prompts (the
        final attention only for the IoU token, SAM's mask tokens ``outputs`` and the HQ
        token). Returns the hypernetwork outputs of ``outputs`` ``(B, K, C/8)``, SAM's
        upscaled image tokens ``(B, C/8, 4h, 4w)``, SAM's four IoUs ``(B, 4)`` and the HQ
        mask logits ``(B, 1, 4h, 4w)``."""
        b = sparse_prompt_embeddings.shape[0]
        hf = self.num_mask_tokens + 1  # index of the HQ token among the output tokens
        output_tokens = torch.cat(
            [self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0
        )
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        hs, src = self.attend(
            image_embeddings,
            image_pe,
            tokens,
            dense_prompt_embeddings,
            context=context,
            few_tokens=few_tokens,
            final_tokens=[0, *(1 + i for i in outputs), hf],
        )
        iou_all = self.iou_prediction_head(hs[:, 0, :])
        upscaled = self.output_upscaling(src)
        upscaled_hq = self.embedding_maskfeature(upscaled) + hq
        masks = self.project_masks(self.hf_mlp(hs[:, -1, :]).unsqueeze(1), upscaled_hq)
        mlps = self.output_hypernetworks_mlps
        hyper_in = (
            torch.stack([mlps[i](hs[:, 1 + j, :]) for j, i in enumerate(outputs)], dim=1)
            if outputs
            else hs.new_zeros(b, 0, upscaled.shape[1])
        )
        return hyper_in, upscaled, iou_all, masks


def hq_output(
    hq_masks: torch.Tensor,
    iou: torch.Tensor,
    sam_masks: Callable[[torch.Tensor], torch.Tensor],
    multimask_output: bool,
    hq_token_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQ-SAM's answer from its HQ mask logits ``(B, 1, H, W)`` and SAM's four predicted
    IoUs ``(B, 4)``: the HQ mask plus the SAM output chosen by the IoUs (with
    ``multimask_output`` the multimask output with the highest, else the single-mask
    output 0; ``sam_masks(indices (B,))`` gives its logits ``(B, 1, H, W)``), or with
    ``hq_token_only`` the HQ mask alone; the IoU is the chosen output's ``(B, 1)``. The
    one rule for :class:`MaskDecoderHQ` and the ONNX backend (whose graph gives SAM's four
    outputs and the HQ mask)."""
    if multimask_output:
        best = iou[:, 1:].argmax(dim=1) + 1
    else:
        best = torch.zeros(iou.shape[0], dtype=torch.long, device=iou.device)
    rows = torch.arange(iou.shape[0], device=iou.device)
    chosen_iou = iou[rows, best].unsqueeze(1)
    if hq_token_only:
        return hq_masks, chosen_iou
    return hq_masks + sam_masks(best), chosen_iou
