"""Mask decoder: a two-way transformer over prompt tokens and the image embedding, then
upscaling and per-token hypernetwork MLPs that produce mask logits, and an IoU head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import DecoderContext, TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts masks from an image embedding and prompt embeddings.

    Args:
        transformer_dim: channel width of tokens and image embedding (256).
        transformer: the two-way transformer.
        num_multimask_outputs: masks returned in multimask mode (3); one more token is
            learned for the single-mask output.
        iou_head_depth, iou_head_hidden_dim: size of the IoU prediction MLP.
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(
                in_dim=transformer_dim,
                hidden_dim=transformer_dim,
                out_dim=transformer_dim // 8,
                num_layers=3,
            )
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            in_dim=transformer_dim,
            hidden_dim=iou_head_hidden_dim,
            out_dim=self.num_mask_tokens,
            num_layers=iou_head_depth,
        )

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompts against one image.

        Args:
            image_embeddings: ``(1, C, h, w)`` (shared by all prompts) or ``(B, C, h, w)``.
            image_pe: ``(1, C, h, w)`` positional encoding of the embedding grid.
            sparse_prompt_embeddings: ``(B, N, C)``.
            dense_prompt_embeddings: ``(B, C, h, w)``.
            multimask_output: return the 3 multimask outputs instead of the single one.
            context: from :meth:`prepare` for this image and this ``dense_prompt_embeddings``
                (then ``image_embeddings``, ``image_pe`` and the dense embeddings are unused).
            crop_tokens: ``(rows, cols)``: upscale only that top-left part of the ``h x w``
                token grid (the image without its padding); the masks are then
                ``(B, K, 4 rows, 4 cols)`` and equal the uncropped masks' top-left part (the
                upscaling works per pixel; the transformer still sees every token).
            keep: if given, receives ``"tokens"`` (the image tokens after the transformer,
                ``(B, C, h, w)``) and ``"hyper_in"`` (``(B, K, C/8)``), from which
                :meth:`upscale` gives any other part of the masks later.

        Returns:
            mask logits ``(B, 3 or 1, 4h, 4w)`` and predicted IoUs ``(B, 3 or 1)``.
        """
        outputs = range(1, self.num_mask_tokens) if multimask_output else range(1)
        return self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            context=context,
            crop_tokens=crop_tokens,
            outputs=outputs,
            keep=keep,
        )

    def upscale(self, tokens: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """Image tokens after the transformer ``(B, C, h, w)`` (any rectangle of the token
        grid) and hypernetwork outputs ``(B, K, C/8)`` -> mask logits ``(B, K, 4h, 4w)``.
        Works per token: a part of the grid gives the same part of the masks."""
        b = tokens.shape[0]
        upscaled = self.output_upscaling(tokens)
        _, c2, h2, w2 = upscaled.shape
        if upscaled.is_contiguous(memory_format=torch.channels_last):
            flat = upscaled.permute(0, 2, 3, 1).reshape(b, h2 * w2, c2)
            return (hyper_in @ flat.transpose(1, 2)).reshape(b, -1, h2, w2)
        return (hyper_in @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)

    def fill_outside_crop(self, masks: torch.Tensor, keep: dict, crop: tuple[int, int]) -> None:
        """Write into ``masks`` ``(B, K, 4h, 4w)``, decoded with ``crop_tokens=crop`` and
        ``keep``, the logits outside the crop (the same values an uncropped decode gives)."""
        tokens, hyper_in = keep["tokens"], keep["hyper_in"]
        r, c = crop
        h, w = tokens.shape[-2:]
        if r < h:
            masks[..., 4 * r :, :] = self.upscale(tokens[:, :, r:, :], hyper_in)
        if c < w:
            masks[..., : 4 * r, 4 * c :] = self.upscale(tokens[:, :, :r, c:], hyper_in)

    def prepare(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> DecoderContext:
        """Prompt-independent work for one image ``(1, C, h, w)`` and one dense prompt
        embedding (the no-mask one, shared by all prompts without a mask input)."""
        return self.transformer.prepare(image_embeddings + dense_prompt_embeddings, image_pe)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        context: DecoderContext | None = None,
        few_tokens: bool | None = None,
        crop_tokens: tuple[int, int] | None = None,
        outputs: Sequence[int] | None = None,
        keep: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask outputs numbered ``outputs`` (default all ``num_mask_tokens``):
        logits ``(B, K, 4h, 4w)``, IoUs ``(B, K)``. Only the tokens read afterwards (the
        IoU token and those mask tokens) go through the final token-to-image attention.
        ``few_tokens``: see :meth:`TwoWayTransformer.forward`; ``crop_tokens``: see
        :meth:`forward`; ``keep``: see :meth:`forward`."""
        outputs = list(range(self.num_mask_tokens) if outputs is None else outputs)
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        # final attention only for the tokens read below: IoU token, chosen mask tokens
        final = [0, *(1 + i for i in outputs)]
        if context is None:
            src = image_embeddings + dense_prompt_embeddings
            if src.shape[0] != b:
                src = src.expand(b, -1, -1, -1)
            pos_src = image_pe.expand(b, -1, -1, -1)
            _, c, h, w = src.shape
            hs, src = self.transformer(
                src, pos_src, tokens, few_tokens=few_tokens, final_tokens=final
            )
        else:
            c, (h, w) = context.keys.shape[-1], context.size
            hs, src = self.transformer(None, None, tokens, context=context, final_tokens=final)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:, :]
        # (B, h*w, C) tokens seen as a channels-last (B, C, h, w) map: no copy.
        src = src.expand(b, -1, -1).reshape(b, h, w, c).permute(0, 3, 1, 2)
        mlps = self.output_hypernetworks_mlps
        hyper_in = torch.stack(
            [mlps[i](mask_tokens_out[:, j, :]) for j, i in enumerate(outputs)], dim=1
        )
        if keep is not None:
            keep["tokens"], keep["hyper_in"] = src, hyper_in
        if crop_tokens is not None:
            src = src[:, :, : crop_tokens[0], : crop_tokens[1]]
        masks = self.upscale(src, hyper_in)
        iou = self.iou_prediction_head(iou_token_out)
        return masks, (iou if len(outputs) == self.num_mask_tokens else iou[:, outputs])
