"""Hiera trunk of SAM 2's image encoder (Ryali et al., 2023; Bolya et al., 2023).

A hierarchical vision transformer: a 7x7 / stride-4 patch embedding, then four stages whose
resolution halves and width doubles at each stage change. The first block of a new stage
pools its queries 2x2 (max pooling inside each attention window) so that the tokens after
it are on the coarser grid; most blocks attend inside non-overlapping windows, a few
attend globally. Absolute positions are a background embedding resized (bicubic) to the
token grid plus a window embedding tiled over it.

Input ``(B, 3, S, S)`` normalised pixels; outputs one ``(B, C_i, S / 4 / 2^i, S / 4 / 2^i)``
map per stage, finest first (``C_i = embed_dim * 2^i``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import BLAS_PRODUCTS, MLP, attention, linear_plus
from .image_encoder import window_partition, window_unpartition


def _pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """2-D max pooling of ``(B, H, W, C)`` tokens with kernel = stride."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Attention from ``dim`` to ``dim_out`` channels over ``(B, H, W, dim)`` tokens (one
    window per batch item); with ``q_stride`` the queries are max-pooled first, so the
    output is ``(B, H / q_stride, W / q_stride, dim_out)``."""

    def __init__(self, *, dim: int, dim_out: int, num_heads: int, q_stride: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)
        #: the attention's matrix products (see common.Products)
        self.products = BLAS_PRODUCTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # (B, HW, heads, d)
        if self.q_stride:
            q = _pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = attention(q, k, v, products=self.products)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm block: (windowed) attention with optional query pooling, then a GELU MLP.

    Args:
        dim, dim_out: channels in and out (they differ at a stage change, where the
            shortcut is projected by ``proj`` and pooled like the queries).
        num_heads: attention heads.
        q_stride: query pooling stride (0: none).
        window_size: attention window side in input tokens (0: global attention).
        mlp_ratio: hidden width of the MLP relative to ``dim_out``.
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_out: int,
        num_heads: int,
        q_stride: int = 0,
        window_size: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(
            dim=dim, dim_out=dim_out, num_heads=num_heads, q_stride=q_stride
        )
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(
            in_dim=dim_out,
            hidden_dim=int(dim_out * mlp_ratio),
            out_dim=dim_out,
            num_layers=2,
            activation=F.gelu,
        )
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, dim)`` -> ``(B, H', W', dim_out)`` (``H' = H / q_stride``)."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = _pool(shortcut, self.q_stride)
        window = self.window_size
        if window > 0:
            x, _ = window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:
                window //= self.q_stride
            h, w = shortcut.shape[1:3]
            padded = (h + (-h) % window, w + (-w) % window)
            x = window_unpartition(x, window, padded, (h, w))
        x = shortcut + x
        # the MLP with its residual: x + lin2(gelu(lin1(norm2(x)))); the inference-only
        # fused layers (segany.models.fuse) apply the GELU and the sum in their products
        lin1, lin2 = self.mlp.layers
        h = lin1(self.norm2(x))
        if not getattr(lin1, "gelu", False):
            h = self.mlp.activation(h)
        return linear_plus(lin2, h, x)


class Hiera(nn.Module):
    """The Hiera trunk.

    Args:
        embed_dim: channels of the first stage (doubled at every stage change).
        num_heads: heads of the first stage (doubled at every stage change).
        stages: blocks per stage.
        window_spec: attention window side per stage (the first block of a stage still
            uses the previous stage's window, on the finer grid it pools from).
        global_att_blocks: indexes of the blocks that attend globally.
        window_pos_embed_bkg_spatial_size: ``(h, w)`` of the background position
            embedding (resized to the token grid).
        q_pool: number of stage changes that pool (3: all of them).
        q_stride: pooling stride at a stage change.
        img_size: side of the square input in pixels (1024).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        q_pool: int = 3,
        q_stride: int = 2,
        img_size: int = 1024,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError("stages and window_spec need one entry per stage")
        self.img_size = img_size
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(
            torch.zeros(1, embed_dim, window_spec[0], window_spec[0])
        )
        self.blocks = nn.ModuleList()
        stage, dim = 0, embed_dim
        for i in range(sum(stages)):
            window = 0 if i in global_att_blocks else window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out, num_heads, stage = 2 * dim, 2 * num_heads, stage + 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    q_stride=q_stride if i in pool_blocks else 0,
                    window_size=window,
                )
            )
            dim = dim_out
        self._pos_cache: tuple | None = None
        #: channels of the outputs, coarsest first (the neck's order)
        self.channel_list = [self.blocks[i].dim_out for i in self.stage_ends[::-1]]

    def pos_embed_at(self, size: tuple[int, int]) -> torch.Tensor:
        """Absolute position embedding of an ``(h, w)`` token grid: ``(1, h, w, C)``.
        Outside autograd it is computed once per size and kept until either embedding
        changes (their in-place version counters)."""
        key = (tuple(size), self.pos_embed._version, self.pos_embed_window._version)
        if torch.is_grad_enabled():
            return self._pos_embed_at(size)
        if self._pos_cache is None or self._pos_cache[0] != key:
            self._pos_cache = (key, self._pos_embed_at(size))
        return self._pos_cache[1]

    def _pos_embed_at(self, size: tuple[int, int]) -> torch.Tensor:
        pos = F.interpolate(self.pos_embed, size=size, mode="bicubic")
        win = self.pos_embed_window
        pos = pos + win.tile(1, 1, size[0] // win.shape[-2], size[1] // win.shape[-1])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, S, S)`` -> one ``(B, C_i, h_i, w_i)`` map per stage, finest first."""
        x = self.patch_embed(x)
        x = x + self.pos_embed_at(tuple(x.shape[1:3]))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class PatchEmbed(nn.Module):
    """7x7 convolution with stride 4 and padding 3 -> tokens laid out ``(B, H, W, C)``."""

    def __init__(self, *, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
