"""SAM 2 for video: :class:`~segany.models.sam2.Sam2` plus the memory modules of the
official checkpoints, and the per-frame steps the tracker composes
(:mod:`segany.video.sam2_tracker` keeps the memory bank and decides what each frame sees).

One frame, one object batch ``B``:

- :meth:`Sam2Video.frame_features`: the image encoder's stride-16 map (raw, without
  ``no_mem_embed``), its sine position encoding, and the projected stride-4 / stride-8
  maps the decoder adds during upscaling;
- :meth:`Sam2Video.condition`: the stride-16 map attends to the memory (spatial memories
  of earlier frames, then object pointers); the first prompted frame instead gets
  ``no_mem_embed`` added, as for single images;
- :meth:`Sam2Video.heads`: prompt encoder + mask decoder on the conditioned map: mask
  logits (pinned to ``NO_OBJ_SCORE`` where the object-score head says the object is
  absent), the object pointer (projected output token, or ``no_obj_ptr`` when absent);
- :meth:`Sam2Video.mask_as_output`: a given mask taken as the prediction (logits +-10),
  its pointer from decoding the mask alone;
- :meth:`Sam2Video.encode_memory`: the frame's memory from its map and predicted mask
  (``no_obj_embed_spatial`` added when the object is absent).

Frames: images ``(1, 3, S, S)`` in the model frame; low-res logits ``(B, 1, S/4, S/4)``;
"high-res" logits ``(B, 1, S, S)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP
from .mask_decoder import MaskDecoder
from .memory import MemoryAttention, MemoryEncoder, sine_1d
from .neck import HieraImageEncoder, sine_position_encoding
from .prompt_encoder import PromptEncoder
from .sam import run_in_dtype
from .sam2 import Sam2

#: logit given to every pixel of a mask whose object is predicted absent
NO_OBJ_SCORE = -1024.0


@dataclass
class HeadsOutput:
    """What :meth:`Sam2Video.heads` gives for ``B`` objects: ``low_res_multimasks``
    ``(B, K, S/4, S/4)`` and ``ious`` ``(B, K)`` (``K`` = 3 or 1), the chosen
    ``low_res`` ``(B, 1, S/4, S/4)`` and ``high_res`` ``(B, 1, S, S)`` logits, ``obj_ptr``
    ``(B, C)`` and ``object_score_logits`` ``(B, 1)``."""

    low_res_multimasks: torch.Tensor
    ious: torch.Tensor
    low_res: torch.Tensor
    high_res: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor


class Sam2Video(Sam2):
    """SAM 2 with its video memory (official key names: ``memory_attention``,
    ``memory_encoder``, ``maskmem_tpos_enc``, ``no_mem_pos_enc``, ``mask_downsample``,
    ``no_obj_ptr``, ``obj_ptr_proj``, and for SAM 2.1 ``obj_ptr_tpos_proj`` and
    ``no_obj_embed_spatial``).

    Args:
        image_encoder, prompt_encoder, mask_decoder: as for :class:`Sam2`.
        memory_attention: conditions a frame on the memory (``d_model`` wide tokens,
            ``mem_dim`` wide memory).
        memory_encoder: makes a frame's ``mem_dim`` wide memory.
        num_maskmem: spatial memories a frame sees: the conditioning frames plus up to
            ``num_maskmem - 1`` frames before it (7).
        version: "2.1" (temporal encoding of the object pointers, projected by
            ``obj_ptr_tpos_proj``; ``no_obj_embed_spatial``) or "2" (pointers without
            temporal encoding).
        max_obj_ptrs: object pointers a frame attends to at most (16).
        sigmoid_scale, sigmoid_bias: mask probabilities are mapped by ``p * scale + bias``
            before the memory encoder (20, -10).
    """

    def __init__(
        self,
        *,
        image_encoder: HieraImageEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        memory_attention: MemoryAttention,
        memory_encoder: MemoryEncoder,
        num_maskmem: int = 7,
        version: str = "2.1",
        max_obj_ptrs: int = 16,
        sigmoid_scale: float = 20.0,
        sigmoid_bias: float = -10.0,
    ) -> None:
        super().__init__(
            image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder
        )
        if version not in ("2", "2.1"):
            raise ValueError(f"version must be '2' or '2.1', not {version!r}")
        c, m = prompt_encoder.embed_dim, memory_encoder.out_dim
        self.hidden_dim, self.mem_dim = c, m
        self.version = version
        self.num_maskmem = num_maskmem
        self.max_obj_ptrs = max_obj_ptrs
        self.sigmoid_scale, self.sigmoid_bias = sigmoid_scale, sigmoid_bias
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(num_maskmem, 1, 1, m))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c))
        self.obj_ptr_proj = MLP(in_dim=c, hidden_dim=c, out_dim=c, num_layers=3)
        if version == "2.1":
            self.obj_ptr_tpos_proj = nn.Linear(c, m)
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, m))

    # -- image ---------------------------------------------------------------------------
    def frame_features(
        self, images: torch.Tensor, *, encoder: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(1, 3, S, S)`` -> stride-16 map ``(1, C, S/16, S/16)``, its position encoding
        ``(1, C, S/16, S/16)``, projected high-res maps (see :meth:`Sam2.embed_features`).
        ``encoder``: as in :meth:`Sam2.embed_features` (e.g. a bfloat16 copy of the trunk
        and neck; the rest runs in the model's dtype)."""
        if encoder is None:
            s0, s1, s2 = self.image_encoder(images)
        else:
            s0, s1, s2 = run_in_dtype(encoder, images, self.no_mem_embed.dtype)
        pos = sine_position_encoding(tuple(s2.shape[-2:]), channels=s2.shape[1]).to(s2)
        return s2, pos, self.mask_decoder.project_high_res(s0, s1)

    # -- memory attention ----------------------------------------------------------------
    def condition(
        self,
        features: torch.Tensor,
        pos: torch.Tensor,
        memory: torch.Tensor | None,
        memory_pos: torch.Tensor | None,
        num_obj_ptr_tokens: int = 0,
        *,
        attention: nn.Module | None = None,
    ) -> torch.Tensor:
        """Stride-16 map ``(B, C, h, w)`` and its encoding -> the map conditioned on
        ``memory`` / ``memory_pos`` ``(B, M, mem_dim)``; without memory (the first
        prompted frame) the map plus ``no_mem_embed``. ``attention``: runs instead of
        :attr:`memory_attention` (e.g. a bfloat16 copy: the inputs are cast to its dtype,
        the output back to the map's)."""
        if memory is None:
            return features + self.no_mem_embed.view(1, -1, 1, 1)
        b, c, h, w = features.shape
        att = self.memory_attention if attention is None else attention
        dt = next(att.parameters()).dtype
        x = features.flatten(2).transpose(1, 2).to(dt)
        p = pos.flatten(2).transpose(1, 2).expand(b, -1, -1).to(dt)
        out = att(
            x,
            p,
            memory.to(dt),
            memory_pos.to(dt),
            size=(h, w),
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )
        return out.to(features.dtype).transpose(1, 2).reshape(b, c, h, w)

    def memory_tokens(
        self, features: torch.Tensor, pos: torch.Tensor, t_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A stored memory ``(B, mem_dim, h, w)`` and its spatial encoding ``(1, mem_dim,
        h, w)`` at temporal slot ``t_pos`` (0 for conditioning frames, ``k`` for the frame
        ``num_maskmem - k`` steps away) -> tokens and encodings ``(B, h*w, mem_dim)``."""
        b = features.shape[0]
        tokens = features.float().flatten(2).transpose(1, 2)
        enc = pos.flatten(2).transpose(1, 2).expand(b, -1, -1)
        enc = enc + self.maskmem_tpos_enc[self.num_maskmem - t_pos - 1].view(1, 1, -1)
        return tokens, enc

    def pointer_tokens(
        self, ptrs: torch.Tensor, offsets: list[int], max_ptrs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Object pointers ``(P, B, C)`` at signed frame ``offsets`` from the current frame
        -> tokens and encodings ``(B, P * C / mem_dim, mem_dim)`` (each pointer split into
        ``C / mem_dim`` tokens sharing its temporal encoding)."""
        p, b, c = ptrs.shape
        m = self.mem_dim
        if self.version == "2.1":
            rel = torch.tensor(offsets, device=ptrs.device) / max(max_ptrs - 1, 1)
            enc = self.obj_ptr_tpos_proj(sine_1d(rel, c))
            enc = enc.unsqueeze(1).expand(-1, b, m)
        else:
            enc = ptrs.new_zeros(p, b, m)
        if m < c:
            ptrs = ptrs.reshape(p, b, c // m, m).permute(0, 2, 1, 3).flatten(0, 1)
            enc = enc.repeat_interleave(c // m, dim=0)
        return ptrs.transpose(0, 1), enc.transpose(0, 1)

    # -- heads ---------------------------------------------------------------------------
    def heads(
        self,
        features: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor],
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> HeadsOutput:
        """Decode the (conditioned) map ``(B, C, h, w)`` with model-frame prompts (as
        :meth:`Sam2.decode`; ``mask_input`` of any size is resized to ``(4h, 4w)``). With
        no point and no box a single padding point is the prompt."""
        b = features.shape[0]
        if point_coords is None and boxes is None:
            point_coords = features.new_zeros(b, 1, 2)
            point_labels = -torch.ones(b, 1, dtype=torch.int32, device=features.device)
        if mask_input is not None:
            size = self.prompt_encoder.mask_input_size
            if tuple(mask_input.shape[-2:]) != tuple(size):
                mask_input = F.interpolate(
                    mask_input.float(),
                    size=size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
        keep: dict = {}
        masks, ious = self.decode(
            features,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
            keep=keep,
            high_res_features=high_res_features,
        )
        score = keep["object_score_logits"]
        present = score > 0
        masks = torch.where(present[:, :, None, None], masks, NO_OBJ_SCORE).float()
        tokens = keep["mask_tokens"]  # (B, outputs, C): multimask: outputs 1..3, else 0..
        rows = torch.arange(b, device=masks.device)
        if multimask_output:
            best = ious.argmax(-1)
            low = masks[rows, best].unsqueeze(1)
            token = tokens[rows, best]
        else:
            low, token = masks, tokens[:, 0]
        high = F.interpolate(low, size=self.image_size, mode="bilinear", align_corners=False)
        ptr = self.pointer(self.obj_ptr_proj(token), present.float())
        return HeadsOutput(masks, ious, low, high, ptr, score)

    def pointer(self, ptr: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` pointers of objects ``present`` ``(B, 1)`` (0/1) -> ``no_obj_ptr``
        where absent."""
        return present * ptr + (1 - present) * self.no_obj_ptr

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s)

    def mask_as_output(
        self,
        features: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor],
        masks: torch.Tensor,
    ) -> HeadsOutput:
        """Given binary masks ``(B, 1, S, S)`` taken as the prediction on the raw map
        ``(B, C, h, w)``: logits +-10, IoU 1, object score +-10 by whether the mask is
        empty, pointer from decoding the (downsampled) mask alone."""
        m = masks.float()
        high = m * 20.0 - 10.0
        s = high.shape[-1] // 4
        low = F.interpolate(high, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        decoded = self.heads(features, high_res_features, mask_input=self.mask_downsample(m))
        present = (m.flatten(1) > 0).any(1, keepdim=True).float()
        score = present * 20.0 - 10.0
        ptr = self.pointer(decoded.obj_ptr, present)
        return HeadsOutput(low, m.new_ones(m.shape[0], 1), low, high, ptr, score)

    # -- memory encoder --------------------------------------------------------------------
    def encode_memory(
        self,
        features: torch.Tensor,
        high_res: torch.Tensor,
        object_score_logits: torch.Tensor,
        *,
        binarize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw stride-16 map ``(B, C, h, w)``, mask logits ``(B, 1, S, S)``, object scores
        ``(B, 1)`` -> memory ``(B, mem_dim, h, w)`` and its encoding ``(1, mem_dim, h,
        w)``. ``binarize``: the mask enters as 0/1 (masks from clicks) instead of its
        sigmoid."""
        prob = (high_res > 0).float() if binarize else torch.sigmoid(high_res)
        mem, pos = self.memory_encoder(features, prob * self.sigmoid_scale + self.sigmoid_bias)
        if self.version == "2.1":
            absent = 1.0 - (object_score_logits > 0).float()
            mem = mem + absent[..., None, None] * self.no_obj_embed_spatial[..., None, None]
        return mem, pos
