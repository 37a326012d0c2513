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


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int = 512
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` as plain matrix products, ``chunk`` queries at a time:
    ``q`` ``(B, H, L, D)``, ``k`` ``(B, H, M, D)``, ``v`` ``(B, H or 1, M, Dv)`` -> ``(B, H,
    L, Dv)``; ``Dv`` may differ from ``D``. The bfloat16 models' attention: the fused kernel
    (:func:`F.scaled_dot_product_attention`) gains little from bfloat16 on the AMD EPYC
    (Zen 5, AVX512-BF16) measured in docs/video.md, while these two products run as
    bfloat16 matrix products (the softmax rounds its float32 result to bfloat16, as the
    products need it)."""
    kt = k.transpose(-2, -1)
    q = q * q.shape[-1] ** -0.5
    out = []
    for i in range(0, q.shape[-2], chunk):
        out.append(torch.matmul(torch.softmax(torch.matmul(q[..., i : i + chunk, :], kt), -1), v))
    return torch.cat(out, dim=-2)


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
