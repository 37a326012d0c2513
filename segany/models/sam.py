"""The Segment Anything model, composed from injected parts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import DecoderContext

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def run_in_dtype(encoder: nn.Module, images: torch.Tensor, dtype: torch.dtype, **kw: Any) -> Any:
    """``encoder(images, **kw)`` with the images cast to the encoder's dtype and every
    tensor of the output (a tensor or a tuple / list of them) cast to ``dtype``."""
    out = encoder(images.to(next(encoder.parameters()).dtype), **kw)
    if isinstance(out, torch.Tensor):
        return out.to(dtype)
    return type(out)(t.to(dtype) for t in out)


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder.

    All tensors are in the *model frame*: images ``(B, 3, S, S)`` already resized (longest
    side ``S``), normalised and padded (see :mod:`segany.transforms`); point and box
    coordinates are ``(x, y)`` pixels of that resized image.

    Args:
        image_encoder: maps ``(B, 3, S, S)`` to ``(B, C, S/16, S/16)``; exposes ``img_size``.
        prompt_encoder, mask_decoder: the prompt and decoding boxes.
        pixel_mean, pixel_std: RGB normalisation in 0-255 units.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    #: how images and prompts map to the model input (:func:`segany.transforms.geometry_of`)
    input_geometry: str = "longest_side"
    #: clamp of the low-res logits handed back for refinement (``None``: not clamped)
    low_res_limit: float | None = None

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def img_size(self) -> int:
        """Side of the square model input in pixels (1024 for the released models)."""
        return int(self.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def embed_image(
        self, images: torch.Tensor, *, valid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised, padded images -> ``(B, C, S/16, S/16)``.
        ``valid``: ``(h, w)`` covered by the images in the model frame, the rest being the
        zero padding :func:`~segany.transforms.to_model_input` adds; encoders that can
        skip work under the padding (TinyViT's first two stages) use it."""
        return self.image_encoder(images, valid=valid)

    def require_sam1(self, what: str) -> None:
        """Raise ``ValueError`` unless this is a SAM 1 geometry model (parts of segany that
        are not adapted to SAM 2 yet call this instead of giving wrong results)."""
        if self.input_geometry != "longest_side":
            raise ValueError(f"{what} does not support SAM 2 models yet")

    def embed_features(
        self,
        images: torch.Tensor,
        *,
        valid: tuple[int, int] | None = None,
        encoder: nn.Module | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`embed_image` and the extra per-image features :meth:`decode` takes as
        ``high_res_features`` (none for SAM 1). ``encoder``: a copy of the image encoder
        in another dtype (the predictor's bfloat16 one) run instead of the model's own; the
        images are cast to its dtype and its outputs back to the model's."""
        if encoder is None:
            return self.embed_image(images, valid=valid), ()
        return run_in_dtype(encoder, images, self.pixel_mean.dtype, valid=valid), ()

    def feature_state(self) -> dict[str, torch.Tensor]:
        """The weights that make :meth:`embed_features`' output (what a cached embedding
        depends on): the image encoder's, under its own key names."""
        return dict(self.image_encoder.state_dict())

    def prepare_decoder(self, image_embeddings: torch.Tensor) -> DecoderContext:
        """The prompt-independent part of decoding for one image ``(1, C, h, w)``: compute
        once per image and pass as ``context`` to :meth:`decode` (prompts without a mask
        input use it; the results are the same as without it)."""
        pe = self.prompt_encoder
        h, w = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        return self.mask_decoder.prepare(image_embeddings, pe.get_dense_pe(), dense)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        context: DecoderContext | None = None,
        crop_tokens: tuple[int, int] | None = None,
        keep: dict | None = None,
        high_res_features: tuple[torch.Tensor, ...] | None = None,
        hq_token_only: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompts against one image embedding.

        Args:
            image_embeddings: ``(1, C, h, w)``.
            point_coords: ``(B, N, 2)`` model-frame pixels; ``point_labels``: ``(B, N)``,
                1 foreground, 0 background, -1 ignored.
            boxes: ``(B, 4)`` model-frame XYXY.
            mask_input: ``(B, 1, 4h, 4w)`` low-res logits from an earlier call.
            context: :meth:`prepare_decoder` of ``image_embeddings``: with no
                ``mask_input`` the first layer's image-side work comes from it; with one,
                only its positional encoding.
            crop_tokens: upscale only the top-left ``(rows, cols)`` of the token grid
                (:meth:`MaskDecoder.forward`); logits ``(B, K, 4 rows, 4 cols)``.
            keep: receives what :meth:`MaskDecoder.fill_outside_crop` needs (and SAM 2's
                ``"object_score_logits"``).
            high_res_features: the second item of :meth:`embed_features` (SAM 2, HQ-SAM).
            hq_token_only: HQ-SAM only (``None`` for other models): return the HQ output's
                mask alone instead of its sum with SAM's (see
                :class:`~segany.models.mask_decoder_hq.MaskDecoderHQ`).

        Returns:
            low-res mask logits ``(B, K, 4h, 4w)`` and predicted IoUs ``(B, K)``,
            ``K = 3`` with ``multimask_output`` else 1.
        """
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            points = (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        hq = {} if hq_token_only is None else {"hq_token_only": hq_token_only}
        if context is not None and mask_input is None:
            return self.mask_decoder(
                image_embeddings,
                None,
                sparse,
                None,
                multimask_output,
                context=context,
                crop_tokens=crop_tokens,
                keep=keep,
                high_res_features=high_res_features or None,
                **hq,
            )
        if context is not None:  # its positional encoding, as a (1, C, h, w) view
            image_pe = context.key_pe.transpose(1, 2).unflatten(2, context.size)
        else:
            image_pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder(
            image_embeddings,
            image_pe,
            sparse,
            dense,
            multimask_output,
            crop_tokens=crop_tokens,
            keep=keep,
            high_res_features=high_res_features or None,
            **hq,
        )

    def forward(
        self,
        images: torch.Tensor,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode one image ``(1, 3, S, S)`` and decode its prompts (see :meth:`decode`)."""
        return self.decode(
            self.embed_image(images),
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
        )
