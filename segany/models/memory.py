"""SAM 2's video memory: the memory encoder (a frame's features fused with its predicted
mask) and the memory attention (a frame's features attending to the stored memories and
object pointers), with the rotary position encoding the attention uses.

Token layouts are batch first: ``(B, N, C)``. Spatial memories of ``F`` frames are ``F``
grids of ``h x w`` tokens one after another, then the object-pointer tokens, which get no
rotary encoding. Key names are those of the official checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import BLAS_PRODUCTS, LayerNorm2d, attention, chunked_attention
from .neck import sine_position_encoding


def rotary_angles(
    head_dim: int, size: tuple[int, int], *, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial rotary encoding of an ``(h, w)`` grid in row-major token order: ``cos`` and
    ``sin`` ``(h * w, head_dim / 2)``, one angle per channel pair. The first half of the
    pairs turns with the column, the second half with the row, each with ``head_dim / 4``
    frequencies ``theta ** (-4 j / head_dim)``."""
    h, w = size
    n = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[:n].float() / head_dim))
    t = torch.arange(h * w, dtype=torch.float32)
    col, row = t % w, torch.div(t, w, rounding_mode="floor")
    angles = torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1)
    return torch.cos(angles), torch.sin(angles)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(2i, 2i+1)`` of ``x`` ``(B, heads, N, D)`` by the angles
    ``cos``/``sin`` ``(N, D/2)``."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RoPEAttention(nn.Module):
    """Multi-head attention whose queries and (the first) keys are rotated by their grid
    position (keys ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

    Args:
        embedding_dim: width of the queries and of the output.
        num_heads: attention heads.
        kv_in_dim: width of keys and values (``embedding_dim`` when ``None``).
        rope_theta: base of the rotary frequencies.
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int = 1,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        kv = embedding_dim if kv_in_dim is None else kv_in_dim
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv, embedding_dim)
        self.v_proj = nn.Linear(kv, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self._angles: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: the attention's matrix products (see common.Products)
        self.products = BLAS_PRODUCTS

    def angles(self, size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (int(size[0]), int(size[1]))
        if key not in self._angles:
            self._angles[key] = rotary_angles(self.head_dim, key, theta=self.rope_theta)
        return tuple(a.to(device) for a in self._angles[key])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        size: tuple[int, int],
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        """``q`` ``(B, h*w, C)`` on an ``(h, w)`` grid; ``k``, ``v`` ``(B, M, kv)`` where
        the first ``M - num_k_exclude_rope`` keys are whole ``h x w`` grids (each rotated
        like the queries) -> ``(B, h*w, C)``."""
        b = q.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        q, k = heads(self.q_proj(q)), heads(self.k_proj(k))
        cos, sin = self.angles(size, q.device)
        q = rotate(q, cos, sin)
        n_rot = k.shape[-2] - num_k_exclude_rope
        if n_rot > 0:
            grids = n_rot // cos.shape[0]
            rk = rotate(k[:, :, :n_rot], cos.repeat(grids, 1), sin.repeat(grids, 1))
            k = torch.cat([rk, k[:, :, n_rot:]], dim=2) if num_k_exclude_rope else rk
        fused = self.products.fused(q.dtype)
        if v.shape[-1] < self.head_dim and not fused:
            # Values narrower than a head (the memory's 64 channels): attend over the raw
            # values, then project (the product with the attention is head_dim / kv times
            # smaller; the value bias passes through the attention, whose rows sum to 1).
            w = self.v_proj.weight.unflatten(0, (self.num_heads, self.head_dim))
            out = chunked_attention(q, k, v.unsqueeze(1), products=self.products)
            out = torch.matmul(out, w.transpose(-2, -1))
            out = out + self.v_proj.bias.view(self.num_heads, 1, self.head_dim)
        else:
            out = attention(q, k, heads(self.v_proj(v)), products=self.products)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, self.num_heads * self.head_dim))


class MemoryAttentionLayer(nn.Module):
    """Pre-norm layer: self-attention of the frame's tokens, cross-attention to the
    memory (position encoding added to the keys), feed-forward with ReLU (keys
    ``self_attn``, ``cross_attn_image``, ``linear1``, ``linear2``, ``norm1..3``).

    Args:
        d_model: width of the frame's tokens.
        mem_dim: width of the memory tokens.
        dim_feedforward: hidden width of the feed-forward part.
        num_heads: heads of both attentions.
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        mem_dim: int = 64,
        dim_feedforward: int = 2048,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        self.self_attn = RoPEAttention(embedding_dim=d_model, num_heads=num_heads)
        self.cross_attn_image = RoPEAttention(
            embedding_dim=d_model, num_heads=num_heads, kv_in_dim=mem_dim
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        *,
        size: tuple[int, int],
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        """``x`` ``(B, h*w, C)``, ``memory`` / ``memory_pos`` ``(B, M, mem_dim)``."""
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y, size=size)
        y = self.norm2(x)
        x = x + self.cross_attn_image(
            y, memory + memory_pos, memory, size=size, num_k_exclude_rope=num_k_exclude_rope
        )
        y = self.norm3(x)
        return x + self.linear2(torch.relu(self.linear1(y)))


class MemoryAttention(nn.Module):
    """Conditions a frame's stride-16 features on the memory (keys ``layers.i``, ``norm``).

    Args:
        d_model: width of the frame's tokens (the neck's width).
        mem_dim: width of the memory tokens.
        num_layers: :class:`MemoryAttentionLayer` count (4 in the released models).
        dim_feedforward: feed-forward width of each layer (2048).
        num_heads: attention heads (1).
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        mem_dim: int = 64,
        num_layers: int = 4,
        dim_feedforward: int = 2048,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(
                d_model=d_model,
                mem_dim=mem_dim,
                dim_feedforward=dim_feedforward,
                num_heads=num_heads,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        *,
        size: tuple[int, int],
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """Frame tokens ``x`` and their position encoding ``pos`` ``(B, h*w, C)`` on an
        ``(h, w)`` grid; ``memory``, ``memory_pos`` ``(B, M, mem_dim)`` whose last
        ``num_obj_ptr_tokens`` are object pointers -> conditioned tokens ``(B, h*w, C)``."""
        x = x + 0.1 * pos
        for layer in self.layers:
            x = layer(x, memory, memory_pos, size=size, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(x)


class MaskDownSampler(nn.Module):
    """A mask ``(B, 1, S, S)`` -> ``(B, embed_dim, S/16, S/16)``: four stride-2 3x3
    convolutions (channels x4 each) with layer norm and GELU, then a 1x1 projection
    (key ``encoder.i``: convolutions at 0, 3, 6, 9, norms at 1, 4, 7, 10, projection 12)."""

    def __init__(self, *, embed_dim: int = 256, steps: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(steps):
            layers += [
                nn.Conv2d(c, 4 * c, kernel_size=3, stride=2, padding=1),
                LayerNorm2d(4 * c),
                nn.GELU(),
            ]
            c *= 4
        layers.append(nn.Conv2d(c, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 convolution, layer norm, 4x pointwise MLP with GELU,
    layer scale ``gamma``, residual (keys ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``,
    ``gamma``). ``(B, dim, h, w)`` -> same."""

    def __init__(self, *, dim: int = 256, kernel_size: int = 7) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """ConvNeXt blocks over the fused features (key ``layers.i``)."""

    def __init__(self, *, dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim=dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """A frame's stride-16 features and its mask -> the frame's memory (keys
    ``mask_downsampler``, ``pix_feat_proj``, ``fuser``, ``out_proj``).

    Args:
        in_dim: width of the frame features (the neck's width).
        out_dim: width of the memory (``mem_dim``).
    """

    def __init__(self, *, in_dim: int = 256, out_dim: int = 64) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.mask_downsampler = MaskDownSampler(embed_dim=in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(dim=in_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(
        self, features: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` ``(B, C, h, w)``, ``masks`` ``(B, 1, 16h, 16w)`` already mapped to
        the encoder's input scale -> memory ``(B, out_dim, h, w)`` and its sine position
        encoding ``(1, out_dim, h, w)``."""
        x = self.pix_feat_proj(features) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        pos = sine_position_encoding(tuple(x.shape[-2:]), channels=self.out_dim).to(x)
        return x, pos


def sine_1d(positions: torch.Tensor, dim: int, *, temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine encoding of scalar positions ``(N,)`` -> ``(N, dim)`` (all sines,
    then all cosines)."""
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    angles = positions.float()[:, None] / dim_t
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


__all__ = [
    "CXBlock",
    "Fuser",
    "MaskDownSampler",
    "MemoryAttention",
    "MemoryAttentionLayer",
    "MemoryEncoder",
    "RoPEAttention",
    "rotary_angles",
    "rotate",
    "sine_1d",
]
