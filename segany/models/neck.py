"""SAM 2's image encoder: the Hiera trunk followed by a feature-pyramid neck.

The neck projects every trunk stage to ``d_model`` channels with a 1x1 convolution; the
levels listed in ``fpn_top_down_levels`` also add the (nearest-upsampled) level below them.
SAM 2 drops the coarsest level afterwards (``scalp``), so the image predictor sees three
maps of strides 4, 8 and 16. Their sinusoidal position encodings are used by the video
memory only and are computed on request (:meth:`FpnNeck.position_encodings`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import Hiera


def sine_position_encoding(
    size: tuple[int, int], *, channels: int = 256, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR-style sine/cosine encoding of an ``(h, w)`` grid with positions normalised to
    ``(0, 2 pi]``: ``(1, channels, h, w)``, the y half first, then the x half."""
    h, w = size
    half = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32).view(-1, 1).expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32).view(1, -1).expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(half, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=-1).flatten(-2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((py, px), dim=-1).permute(2, 0, 1).unsqueeze(0)


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk's stages (keys ``convs.i.conv``).

    Args:
        d_model: output channels (256).
        backbone_channel_list: the trunk's channels, coarsest first.
        fpn_top_down_levels: levels (0 = finest) that add the upsampled coarser level.
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        backbone_channel_list: Sequence[int],
        fpn_top_down_levels: Sequence[int] = (2, 3),
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for dim in backbone_channel_list:
            level = nn.Module()
            level.conv = nn.Conv2d(dim, d_model, kernel_size=1)
            self.convs.append(level)
        self.fpn_top_down_levels = tuple(fpn_top_down_levels)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Trunk outputs (finest first) -> ``(B, d_model, h_i, w_i)`` per level, finest
        first, computed coarsest first."""
        n = len(self.convs) - 1
        out: list[torch.Tensor] = [xs[0]] * len(xs)
        prev = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i].conv(xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                prev = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            else:
                prev = lateral
            out[i] = prev
        return out

    def position_encodings(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sine position encodings ``(1, d_model, h_i, w_i)`` of each feature map."""
        return [
            sine_position_encoding(tuple(f.shape[-2:]), channels=self.d_model).to(f)
            for f in features
        ]


class HieraImageEncoder(nn.Module):
    """Trunk + neck (keys ``trunk.*``, ``neck.*``).

    Args:
        trunk: a :class:`~segany.models.hiera.Hiera`.
        neck: a :class:`FpnNeck` whose ``backbone_channel_list`` is the trunk's.
        scalp: coarsest levels dropped from the output (1 for SAM 2).
    """

    def __init__(self, *, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk channels {trunk.channel_list} differ from the neck's "
                f"{neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    @property
    def img_size(self) -> int:
        return int(self.trunk.img_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, S, S)`` -> feature maps of strides 4, 8, 16 (``d_model`` channels)."""
        feats = self.neck(self.trunk(x))
        return feats[: len(feats) - self.scalp]
