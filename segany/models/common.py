"""Small layers shared by several boxes of the model."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def linear_plus(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer(x)``. Layers that add a residual themselves (the inference-only
    :class:`~segany.models.fuse.OneDNNLinear`, ``adds_residual = True``) get it passed, so
    that the sum happens inside their product instead of in a separate pass."""
    if getattr(layer, "adds_residual", False):
        return layer(x, residual)
    return residual + layer(x)


class Products:
    """The attention layers' matrix products whose right-hand sides are activations, not
    weights (the mask decoder's few-token products with the 4,096 image tokens, SAM 2's
    Hiera and memory attention through :func:`attention`), and which attention form is
    the faster one: torch's BLAS and its fused kernel here.
    :func:`segany.models.fuse.fuse_for_inference` gives the layers oneDNN's products
    instead on CPUs where those are faster (see
    :func:`segany.runtime.prefer_onednn_products`), and sets :attr:`fused_bf16` from the
    flags."""

    #: whether :func:`F.scaled_dot_product_attention` (whose float32 kernel runs on torch's
    #: BLAS) is the faster float32 attention; with oneDNN's products the chunked form is
    fused_attention = True

    def __init__(self, *, fused_bf16: bool = False, fused_windows: bool = True) -> None:
        #: whether the fused kernel is the faster bfloat16 attention: measured so on the AMX
        #: Xeon (2026-12-07), not on the AMD EPYC with AVX512-BF16 only (the chunked form
        #: was 3x faster there); fuse_for_inference sets it from the CPU's flags
        self.fused_bf16 = fused_bf16
        #: whether the fused kernel is the faster float32 attention over many small
        #: windows (:func:`window_attention`): not on AMD CPUs with AVX-512 (the encoder
        #: 7% faster with batched products on the Zen 5 EPYC; equal when capped to AVX2,
        #: so AVX2 CPUs keep the kernel); fuse_for_inference sets it from the CPU
        self.fused_windows = fused_windows

    def fused(self, dtype: torch.dtype) -> bool:
        """Whether the fused attention kernel is the faster form for ``dtype`` here."""
        return self.fused_bf16 if dtype == torch.bfloat16 else self.fused_attention

    def linear(
        self, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``a @ w.T + bias``: ``a`` ``(..., K)``, ``w`` ``(N, K)`` (any strides),
        ``bias`` ``(N,)`` -> ``(..., N)``."""
        return F.linear(a, w, bias)


#: the products every attention layer uses unless fused otherwise
BLAS_PRODUCTS = Products()


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk: int = 512,
    products: Products = BLAS_PRODUCTS,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` as plain matrix products, ``chunk`` queries at a time:
    ``q`` ``(B, H, L, D)``, ``k`` ``(B, H, M, D)``, ``v`` ``(B, H or 1, M, Dv)`` -> ``(B, H,
    L, Dv)``; ``Dv`` may differ from ``D``. Used where the fused kernel
    (:func:`F.scaled_dot_product_attention`) is the slower one: bfloat16 (it gains little
    from bfloat16 on the AMD EPYC, Zen 5, of docs/video.md, while these products run as
    bfloat16 matrix products; the softmax rounds its float32 result to bfloat16, as the
    products need it), and float32 with oneDNN's ``products`` (the fused kernel's float32
    products are torch's BLAS's). With at most 16 ``(B, H)`` slices each slice's products
    go through ``products``; more (windowed attention) run batched."""
    kt = k.transpose(-2, -1)
    q = q * q.shape[-1] ** -0.5
    b, h, n = q.shape[0], q.shape[1], q.shape[-2]
    if b * h > 16 or products.fused_attention:
        out = []
        for i in range(0, n, chunk):
            out.append(
                torch.matmul(torch.softmax(torch.matmul(q[..., i : i + chunk, :], kt), -1), v)
            )
        return torch.cat(out, dim=-2)
    v = v.expand(b, h, -1, -1)
    res = q.new_empty(b, h, n, v.shape[-1])
    for x in range(b):
        for y in range(h):
            # oneDNN takes plain and transposed layouts at speed, other strides (q, k, v
            # sliced out of one qkv projection) on a slow path: copies are cheaper
            kk, vt = k[x, y].contiguous(), v[x, y].contiguous().t()
            for i in range(0, n, chunk):
                s = torch.softmax(products.linear(q[x, y, i : i + chunk].contiguous(), kk), -1)
                res[x, y, i : i + chunk] = products.linear(s, vt)
    return res


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    products: Products = BLAS_PRODUCTS,
    group: int = 16,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v`` within each of many windows: ``q``, ``k``,
    ``v`` ``(W, H, N, D)`` (any strides), ``bias`` ``(1, H, N, N)`` -> ``(W, H, N, D)``.
    The fused kernel, unless ``products`` says batched matrix products are faster here
    (:attr:`Products.fused_windows`) for float32 windows of at most 64 tokens: then
    ``group`` windows at a time, so that their scores stay in the cache (measured on the
    AMD EPYC, Zen 5, of docs/performance.md: 35-38% less time than the fused kernel for
    TinyViT's 7x7 windows; its 14x14 windows gained nothing and keep the kernel)."""
    n = q.shape[-2]
    if products.fused_windows or n > 64 or q.dtype != torch.float32:
        # a 4-D mask: with it the CPU takes SDPA's flash kernel (a 3-D one, the slower
        # "math" path)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = q.new_empty(q.shape)
    scale = q.shape[-1] ** -0.5
    for i in range(0, q.shape[0], group):
        s = torch.matmul(q[i : i + group], k[i : i + group].transpose(-1, -2))
        torch.matmul(s.mul_(scale).add_(bias).softmax(-1), v[i : i + group], out=out[i : i + group])
    return out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, products: Products = BLAS_PRODUCTS
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` (shapes as :func:`chunked_attention`) by the faster
    form here: :func:`chunked_attention` for bfloat16 (unless ``products`` says the fused
    kernel is faster for it on this CPU), for float32 with oneDNN's ``products`` over at
    most 16 ``(B, H)`` slices, and when ``Dv`` differs from ``D``; the fused kernel
    otherwise."""
    few = q.shape[0] * q.shape[1] <= 16 or q.dtype == torch.bfloat16
    if (few and not products.fused(q.dtype)) or v.shape[-1] != q.shape[-1]:
        return chunked_attention(q, k, v, products=products)
    return F.scaled_dot_product_attention(q, k, v)


class LayerNorm2d(nn.Module):
    """Layer norm over the channel axis of a ``(B, C, H, W)`` tensor."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # channels innermost: one fused layer-norm kernel over a free (B, H, W, C) view
            shape = (self.num_channels,)
            t = F.layer_norm(x.permute(0, 2, 3, 1), shape, self.weight, self.bias, self.eps)
            return t.permute(0, 3, 1, 2)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (keys ``lin1``, ``lin2``)."""

    def __init__(self, *, dim: int, hidden_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ``activation`` (ReLU) between them (key
    ``layers.i``), optionally followed by a sigmoid."""

    def __init__(
        self,
        *,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
    ) -> None:
        super().__init__()
        self.activation = activation
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.activation(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
