"""SAM 2 (Ravi et al., 2024) for images, composed from injected parts.

What differs from :class:`~segany.models.sam.Sam` for a single image:

- the image encoder (:class:`~segany.models.neck.HieraImageEncoder`) gives three feature
  maps (strides 4, 8, 16); the stride-16 map plus the learned ``no_mem_embed`` is the
  image embedding, the two finer maps are projected once per image by the decoder's
  ``conv_s0`` / ``conv_s1`` and added inside its upscaling;
- the input is the whole image resized to a square (no aspect ratio kept, no padding),
  normalised in 0-1 units (``input_geometry = "square"``, see :mod:`segany.transforms`);
- box corners are prompt points placed before the clicks, a padding point always follows;
- IoU predictions pass through a sigmoid, an object-score head exists, and a single
  requested mask falls back to the best multimask output when unstable;
- the low-res logits handed back for refinement are clamped to ``+-32``.

The modules of the video model (memory attention, memory encoder, object pointers, ...)
are added by :class:`~segany.models.sam2_video.Sam2Video`, which the registry builds for
the official configs.
"""

from __future__ import annotations

import torch
from torch import nn

from .mask_decoder import MaskDecoder
from .neck import HieraImageEncoder
from .prompt_encoder import PromptEncoder
from .sam import Sam, run_in_dtype

PIXEL_MEAN = (0.485, 0.456, 0.406)  # 0-1 units
PIXEL_STD = (0.229, 0.224, 0.225)


class Sam2(Sam):
    """SAM 2's image path: image encoder + prompt encoder + mask decoder.

    Tensors are in the model frame: images ``(B, 3, S, S)`` resized to the square and
    normalised (see :mod:`segany.transforms`); point and box coordinates are ``(x, y)``
    pixels of that square.

    Args:
        image_encoder: ``(B, 3, S, S)`` -> maps of strides 4, 8, 16 with ``C`` channels.
        prompt_encoder: a :class:`PromptEncoder` with ``box_as_points=True``.
        mask_decoder: a :class:`MaskDecoder` with ``use_high_res_features=True``.
        pixel_mean, pixel_std: RGB normalisation in 0-1 units.

    The submodules carry the official names (``sam_prompt_encoder``, ``sam_mask_decoder``);
    ``prompt_encoder`` and ``mask_decoder`` name the same modules, as for SAM 1.
    """

    input_geometry: str = "square"
    #: logits of ``Prediction.low_res_logits`` are clamped to this (as the reference does)
    low_res_limit: float | None = 32.0

    def __init__(
        self,
        *,
        image_encoder: HieraImageEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        nn.Module.__init__(self)  # Sam's names differ: the parts are registered below
        if not prompt_encoder.box_as_points or not mask_decoder.use_high_res_features:
            raise ValueError("SAM 2 needs box_as_points prompts and high-res decoder features")
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = prompt_encoder
        self.sam_mask_decoder = mask_decoder
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, prompt_encoder.embed_dim))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def prompt_encoder(self) -> PromptEncoder:  # type: ignore[override]
        return self.sam_prompt_encoder

    @property
    def mask_decoder(self) -> MaskDecoder:  # type: ignore[override]
        return self.sam_mask_decoder

    def embed_image(
        self, images: torch.Tensor, *, valid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` -> the image embedding ``(B, C, S/16, S/16)`` (stride-16 map
        plus ``no_mem_embed``). ``valid`` is accepted for the SAM 1 signature (SAM 2's
        input has no padding)."""
        return self.embed_features(images)[0]

    def feature_state(self) -> dict[str, torch.Tensor]:
        """:meth:`Sam.feature_state` plus ``no_mem_embed`` and the decoder's ``conv_s0.*``,
        ``conv_s1.*`` (the projected high-res maps)."""
        state = super().feature_state()
        state["no_mem_embed"] = self.no_mem_embed
        for name in ("conv_s0", "conv_s1"):
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
        """``(B, 3, S, S)`` -> image embedding ``(B, C, S/16, S/16)`` and the projected
        high-resolution features ``(B, C/8, S/4, S/4)``, ``(B, C/4, S/8, S/8)`` that
        :meth:`decode` takes as ``high_res_features``. ``encoder``: as in
        :meth:`Sam.embed_features` (the trunk and neck in another dtype; the rest runs in
        the model's)."""
        if encoder is None:
            s0, s1, s2 = self.image_encoder(images)
        else:
            s0, s1, s2 = run_in_dtype(encoder, images, self.no_mem_embed.dtype)
        embedding = s2 + self.no_mem_embed.view(1, -1, 1, 1)
        return embedding, self.mask_decoder.project_high_res(s0, s1)

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
        embedding, high_res = self.embed_features(images)
        return self.decode(
            embedding,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
            high_res_features=high_res,
        )
