"""Mask decoder: a two-way transformer over prompt tokens and the image embedding, then
upscaling and per-token hypernetwork MLPs that produce mask logits, and an IoU head.

SAM 2's decoder is the same with a few options: high-resolution encoder features added
inside the upscaling, a sigmoid on the IoU head, an object-score token and head, and the
single-mask output falling back to the best multimask output when it is unstable."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
        use_high_res_features: SAM 2: ``conv_s0`` / ``conv_s1`` project the stride-4 and
            stride-8 encoder features (``transformer_dim`` channels) to the widths of the
            two upscaling steps, whose outputs they are added to (see :meth:`project_high_res`).
        iou_prediction_use_sigmoid: SAM 2: IoU predictions pass through a sigmoid.
        pred_obj_scores: SAM 2: an object-score token (first of the output tokens) and
            head (an MLP with ``pred_obj_scores_mlp``) predict whether the object is present.
        dynamic_multimask_via_stability: SAM 2 at inference: when one mask is asked for and
            the single-mask output's stability score (IoU of the masks thresholded at
            ``+-dynamic_multimask_stability_delta``) is below
            ``dynamic_multimask_stability_thresh``, the multimask output with the highest
            predicted IoU is returned instead.
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        #: run :meth:`upscale` as per-token matrix products (:meth:`upscale_by_products`):
        #: set for the ONNX export, whose runtimes run them faster than transposed
        #: convolutions in channels-first layout; torch's fused convolutions are faster.
        self.upscale_as_products = False
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
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
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(in_dim=transformer_dim, hidden_dim=transformer_dim, out_dim=1, num_layers=3)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

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
                :meth:`upscale` gives any other part of the masks later; with
                ``pred_obj_scores`` also ``"object_score_logits"`` ``(B, 1)``; and
                ``"mask_tokens"``, the mask tokens of the returned outputs after the
                transformer ``(B, K', C)`` (SAM 2's object pointers are made from them).
            high_res_features: SAM 2: the projected stride-4 and stride-8 features
                ``(1 or B, C/8, 4h, 4w)``, ``(1 or B, C/4, 2h, 2w)`` (:meth:`project_high_res`).

        Returns:
            mask logits ``(B, 3 or 1, 4h, 4w)`` and predicted IoUs ``(B, 3 or 1)``.
        """
        dynamic = not multimask_output and self.dynamic_multimask_via_stability
        dynamic = dynamic and not self.training
        if multimask_output:
            outputs = range(1, self.num_mask_tokens)
        else:
            outputs = range(self.num_mask_tokens) if dynamic else range(1)
        masks, iou = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            context=context,
            crop_tokens=None if dynamic else crop_tokens,  # stability reads the whole mask
            outputs=outputs,
            keep=keep,
            high_res_features=high_res_features,
        )
        if dynamic:
            masks, iou = self.select_stable(masks, iou)
            if keep is not None:
                keep.pop("hyper_in", None)  # the masks are complete: nothing to fill
        return masks, iou

    def stability(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, K, H, W)`` logits -> ``(B, K)`` IoU of the masks thresholded at
        ``+delta`` and ``-delta`` (1 when both are empty)."""
        return stability(logits, self.dynamic_multimask_stability_delta)

    def select_stable(
        self, masks: torch.Tensor, iou: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All outputs ``(B, 4, H, W)``, ``(B, 4)`` -> the single-mask output where it is
        stable, else the multimask output with the highest predicted IoU: ``(B, 1, H, W)``,
        ``(B, 1)``."""
        return select_stable(
            masks,
            iou,
            delta=self.dynamic_multimask_stability_delta,
            thresh=self.dynamic_multimask_stability_thresh,
        )

    def high_res_shapes(self, grid: tuple[int, int]) -> tuple[tuple[int, int, int], ...]:
        """``(C, h, w)`` of each projected high-resolution map for an image-embedding grid
        ``(h, w)`` (those :meth:`project_high_res` returns; none without them)."""
        if not self.use_high_res_features:
            return ()
        gh, gw = int(grid[0]), int(grid[1])
        return (
            (int(self.conv_s0.out_channels), 4 * gh, 4 * gw),
            (int(self.conv_s1.out_channels), 2 * gh, 2 * gw),
        )

    def project_high_res(
        self, feat_s0: torch.Tensor, feat_s1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2: the encoder's stride-4 and stride-8 maps -> their projections used in
        the upscaling (computed once per image)."""
        return self.conv_s0(feat_s0), self.conv_s1(feat_s1)

    def upscale(
        self,
        tokens: torch.Tensor,
        hyper_in: torch.Tensor,
        high_res_features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Image tokens after the transformer ``(B, C, h, w)`` (any rectangle of the token
        grid) and hypernetwork outputs ``(B, K, C/8)`` -> mask logits ``(B, K, 4h, 4w)``.
        Works per token: a part of the grid gives the same part of the masks (given the
        same part of ``high_res_features``)."""
        if high_res_features is None and self.upscale_as_products:
            return self.upscale_by_products(tokens, hyper_in)
        if high_res_features is None:
            upscaled = self.output_upscaling(tokens)
        else:
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(tokens) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)
        return self.project_masks(hyper_in, upscaled)

    def upscale_by_products(self, tokens: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """:meth:`upscale` without high-res features, as matrix products over the tokens:
        same arguments and result (up to float rounding).

        A stride-2 transposed convolution with a 2x2 kernel maps each input pixel to its
        own 2x2 block of output pixels, i.e. it is one ``(C_in, 4 C_out)`` product per
        pixel. So both upscaling steps, the layer norm and the GELUs run on rows in token
        order (pixel ``(4i + 2a + c, 4j + 2b + d)`` is row ``(i, j, a, b, c, d)``), and
        one permutation of the final ``(B, K, 4h, 4w)`` logits puts them in image order."""
        dc1, ln1, _, dc2, _ = self.output_upscaling
        dc2 = getattr(dc2, "conv", dc2)  # fused with its GELU by fuse_for_inference
        b, c, h, w = tokens.shape
        c1, c2, k = dc1.out_channels, dc2.out_channels, hyper_in.shape[1]
        # (C_in, C_out, a, b) kernels -> (C_in, a, b, C_out) columns
        w1 = dc1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
        w2 = dc2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        x = tokens.permute(0, 2, 3, 1).reshape(b * h * w, c)
        y = torch.addmm(dc1.bias.repeat(4), x, w1).view(-1, c1)
        y = F.gelu(F.layer_norm(y, (c1,), ln1.weight, ln1.bias, ln1.eps))
        z = F.gelu(torch.addmm(dc2.bias.repeat(4), y, w2)).view(b, h * w * 16, c2)
        m = (z @ hyper_in.transpose(1, 2)).view(b, h, w, 2, 2, 2, 2, k)
        return m.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, k, 4 * h, 4 * w)

    @staticmethod
    def project_masks(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Hypernetwork outputs ``(B, K, C')`` times the upscaled embedding ``(B, C', H,
        W)`` -> mask logits ``(B, K, H, W)``."""
        b, c2, h2, w2 = upscaled.shape
        if upscaled.is_contiguous(memory_format=torch.channels_last):
            flat = upscaled.permute(0, 2, 3, 1).reshape(b, h2 * w2, c2)
            return (hyper_in @ flat.transpose(1, 2)).reshape(b, -1, h2, w2)
        return (hyper_in @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)

    def fill_outside_crop(self, masks: torch.Tensor, keep: dict, crop: tuple[int, int]) -> None:
        """Write into ``masks`` ``(B, K, 4h, 4w)``, decoded with ``crop_tokens=crop`` and
        ``keep``, the logits outside the crop (the same values an uncropped decode gives)."""
        if "hyper_in" not in keep:
            return
        tokens, hyper_in = keep["tokens"], keep["hyper_in"]
        r, c = crop
        h, w = tokens.shape[-2:]
        if (r < h or c < w) and self.use_high_res_features:
            raise ValueError("decoders with high-resolution features do not crop")
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

    def attend(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor | None,
        tokens: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        *,
        context: DecoderContext | None = None,
        few_tokens: bool | None = None,
        final_tokens: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer between ``tokens`` ``(B, T, C)`` (output tokens then
        prompt tokens) and the image embedding plus the dense prompt embedding (or the
        prepared ``context``). Returns the tokens after it, ``(B, len(final_tokens) or T,
        C)``, and the image tokens as a ``(B, C, h, w)`` map (a channels-last view)."""
        b = tokens.shape[0]
        if context is None:
            src = image_embeddings + dense_prompt_embeddings
            if src.shape[0] != b:
                src = src.expand(b, -1, -1, -1)
            pos_src = image_pe.expand(b, -1, -1, -1)
            _, c, h, w = src.shape
            hs, src = self.transformer(
                src, pos_src, tokens, few_tokens=few_tokens, final_tokens=final_tokens
            )
        else:
            c, (h, w) = context.keys.shape[-1], context.size
            hs, src = self.transformer(
                None, None, tokens, context=context, final_tokens=final_tokens
            )
        # (B, h*w, C) tokens seen as a channels-last (B, C, h, w) map: no copy.
        return hs, src.expand(b, -1, -1).reshape(b, h, w, c).permute(0, 3, 1, 2)

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
        high_res_features: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask outputs numbered ``outputs`` (default all ``num_mask_tokens``):
        logits ``(B, K, 4h, 4w)``, IoUs ``(B, K)``. Only the tokens read afterwards (the
        IoU token and those mask tokens) go through the final token-to-image attention.
        ``few_tokens``: see :meth:`TwoWayTransformer.forward`; ``crop_tokens``: see
        :meth:`forward`; ``keep``, ``high_res_features``: see :meth:`forward`."""
        outputs = list(range(self.num_mask_tokens) if outputs is None else outputs)
        b = sparse_prompt_embeddings.shape[0]
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        s = 0  # SAM 2: the object-score token comes first
        if self.pred_obj_scores:
            parts.insert(0, self.obj_score_token.weight)
            s = 1
        output_tokens = torch.cat(parts, dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        # final attention only for the tokens read below: IoU token, chosen mask tokens
        # (and the object-score token when it is asked for)
        final = [s, *(s + 1 + i for i in outputs)]
        scored = self.pred_obj_scores and keep is not None
        if scored:
            final.insert(0, 0)
        hs, src = self.attend(
            image_embeddings,
            image_pe,
            tokens,
            dense_prompt_embeddings,
            context=context,
            few_tokens=few_tokens,
            final_tokens=final,
        )
        if scored:
            keep["object_score_logits"] = self.pred_obj_score_head(hs[:, 0, :])
            hs = hs[:, 1:]
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:, :]
        mlps = self.output_hypernetworks_mlps
        hyper_in = torch.stack(
            [mlps[i](mask_tokens_out[:, j, :]) for j, i in enumerate(outputs)], dim=1
        )
        if keep is not None:
            keep["tokens"], keep["hyper_in"] = src, hyper_in
            keep["mask_tokens"] = mask_tokens_out  # (B, len(outputs), C): SAM 2's pointers
        if crop_tokens is not None:
            src = src[:, :, : crop_tokens[0], : crop_tokens[1]]
            if high_res_features is not None:
                r, c = crop_tokens
                s0, s1 = high_res_features
                high_res_features = (s0[..., : 4 * r, : 4 * c], s1[..., : 2 * r, : 2 * c])
        if high_res_features is None:
            masks = self.upscale(src, hyper_in)
        else:
            masks = self.upscale(src, hyper_in, high_res_features)
        iou = self.iou_prediction_head(iou_token_out)
        return masks, (iou if len(outputs) == self.num_mask_tokens else iou[:, outputs])


def stability(logits: torch.Tensor, delta: float) -> torch.Tensor:
    """``(B, K, H, W)`` logits -> ``(B, K)`` IoU of the masks thresholded at ``+delta`` and
    ``-delta`` (1 when both are empty)."""
    flat = logits.flatten(-2)
    inter = (flat > delta).sum(-1).float()
    union = (flat > -delta).sum(-1).float()
    return torch.where(union > 0, inter / union, 1.0)


def select_stable(
    masks: torch.Tensor, iou: torch.Tensor, *, delta: float, thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM 2's choice when one mask is asked for: of all outputs ``(B, 4, H, W)``,
    ``(B, 4)``, the single-mask output (index 0) where its :func:`stability` at ``delta``
    is at least ``thresh``, else the multimask output with the highest predicted IoU;
    returns ``(B, 1, H, W)``, ``(B, 1)`` (used by :class:`MaskDecoder` and by the ONNX
    backend, whose graph gives all four outputs)."""
    best = iou[:, 1:].argmax(-1) + 1
    rows = torch.arange(masks.shape[0], device=masks.device)
    stable = stability(masks[:, :1], delta) >= thresh
    pick = torch.where(stable[:, 0], torch.zeros_like(best), best)
    return masks[rows, pick].unsqueeze(1), iou[rows, pick].unsqueeze(1)
