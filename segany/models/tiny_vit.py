"""TinyViT-5M image encoder as distilled by MobileSAM.

Four stages: a convolutional stage of MBConv blocks, then three stages of windowed
attention blocks with a learned bias per relative offset and a depth-wise "local" conv;
patch merging between stages; SAM's convolutional neck at the end.

Input ``(B, 3, S, S)`` normalised pixels (``S = img_size``, 1024 for MobileSAM); output
``(B, 256, S / 16, S / 16)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import BLAS_PRODUCTS, LayerNorm2d, linear_plus, window_attention


class Conv2dBN(nn.Sequential):
    """Bias-free convolution followed by batch norm (keys ``c``, ``bn``)."""

    def __init__(
        self, in_ch: int, out_ch: int, *, kernel: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        )
        self.add_module("bn", nn.BatchNorm2d(out_ch))


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: ``(B, 3, S, S)`` -> ``(B, dim, S/4, S/4)``."""

    def __init__(self, *, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, dim // 2, kernel=3, stride=2),
            nn.GELU(),
            Conv2dBN(dim // 2, dim, kernel=3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depth-wise, 1x1 project, residual, GELU."""

    def __init__(self, *, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, kernel=3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """``(B, C, H, W)`` -> ``(B, C', H/stride, W/stride)`` via 1x1, depth-wise 3x3, 1x1."""

    def __init__(self, *, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, kernel=3, stride=stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


def offset_index(window: int) -> torch.Tensor:
    """``(window², window²)`` index of the learned bias for each (query, key) pair of a
    window: offsets ``(|dy|, |dx|)`` are numbered ``|dy| * window + |dx|``."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class Attention(nn.Module):
    """Pre-normed multi-head attention within one window of ``window`` x ``window`` tokens,
    with a learned bias per head and per relative offset."""

    def __init__(self, *, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", offset_index(window), persistent=False)
        #: the attention form's products (see :func:`~segany.models.common.window_attention`)
        self.products = BLAS_PRODUCTS

    def bias(self) -> torch.Tensor:
        """``(heads, N, N)`` attention bias gathered from the learned table; the gather is
        skipped when :func:`~segany.models.fuse.fuse_for_inference` stored it (``ab``)."""
        ab = getattr(self, "ab", None)
        return ab if ab is not None else self.attention_biases[:, self.bias_index]

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, N, dim)`` -> the heads' outputs ``(B, N, dim)`` before ``proj``."""
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = window_attention(q, k, v, self.bias().unsqueeze(0), products=self.products)
        return out.transpose(1, 2).reshape(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, N, dim)`` -> ``(B, N, dim)``."""
        return self.proj(self.attend(x))


class Mlp(nn.Module):
    """Pre-normed two-layer MLP (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., dim)`` -> ``(..., dim)``, plus ``residual`` if given."""
        y = self.act(self.fc1(self.norm(x)))
        return self.fc2(y) if residual is None else linear_plus(self.fc2, y, residual)


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), depth-wise 3x3 conv, MLP (residual).

    Works on ``(B, C, H, W)`` maps; windows are zero-padded at the bottom/right edge.
    """

    def __init__(self, *, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim=dim, num_heads=num_heads, window=window)
        self.local_conv = Conv2dBN(dim, dim, kernel=3, groups=dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        win = self.window
        ph, pw = (win - h % win) % win, (win - w % win) % win
        t = x.permute(0, 2, 3, 1)
        if ph or pw:
            t = F.pad(t, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        t = t.reshape(b, hp // win, win, wp // win, win, c).transpose(2, 3)
        t = self.attn.attend(t.reshape(-1, win * win, c))
        t = t.view(b, hp // win, wp // win, win, win, c).transpose(2, 3).reshape(b, hp, wp, c)
        # the output projection is per token: applied after dropping the padded windows'
        # extra tokens, with the residual added in the same step
        x = linear_plus(self.attn.proj, t[:, :h, :w], x.permute(0, 2, 3, 1))
        x = self.local_conv(x.permute(0, 3, 1, 2))
        t = x.permute(0, 2, 3, 1)
        return self.mlp(t, residual=t).permute(0, 3, 1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks then patch merging."""

    def __init__(self, *, dim: int, depth: int, expand_ratio: float, downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim=dim, expand_ratio=expand_ratio) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks, then patch merging if the stage has one."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim=dim, num_heads=num_heads, window=window, mlp_ratio=mlp_ratio)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck.

    Args:
        embed_dims, depths, num_heads, window_sizes: per-stage width, number of blocks,
            heads and attention window (stage 0 is convolutional; its heads/window unused).
        merge_strides: stride of the patch merging after stages 0..2; MobileSAM keeps the
            last one at 1 so that a 1024 input gives a 64x64 embedding.
        out_chans: channels of the output embedding.
        num_classes: size of the (unused) classification head kept so that released
            checkpoints load with strict key checking; 0 drops it.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans=in_chans, dim=embed_dims[0])
        n = len(embed_dims)
        layers: list[nn.Module] = []
        for i in range(n):
            merge = None
            if i < n - 1:
                merge = PatchMerging(
                    dim=embed_dims[i], out_dim=embed_dims[i + 1], stride=merge_strides[i]
                )
            if i == 0:
                layers.append(
                    ConvLayer(
                        dim=embed_dims[0],
                        depth=depths[0],
                        expand_ratio=mbconv_expand_ratio,
                        downsample=merge,
                    )
                )
            else:
                layers.append(
                    BasicLayer(
                        dim=embed_dims[i],
                        depth=depths[i],
                        num_heads=num_heads[i],
                        window=window_sizes[i],
                        mlp_ratio=mlp_ratio,
                        downsample=merge,
                    )
                )
        self.layers = nn.ModuleList(layers)
        if num_classes > 0:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(
        self, x: torch.Tensor, *, valid: tuple[int, int] | None = None, early: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, S, S)`` -> ``(B, out_chans, S/16, S/16)``.

        ``valid``: ``(h, w)`` of the images inside ``x``, the rest being zeros at the
        bottom/right (the padding of :func:`~segany.transforms.to_model_input`). The first
        stages are then computed on the image plus a margin wider than their receptive
        field, and their output under the rest of the padding is copied from their output
        for an all-zero input (computed once per size and weights): every output cell
        there reads only zeros in both. The same values up to float rounding, less work
        for images that are not square (see :meth:`_run_cropped`). Ignored in training mode
        (batch norms then normalise with the statistics of what they see).

        ``early`` (for HQ-SAM): also return the output of stage 1 (after its patch
        merging), ``(B, embed_dims[2], S/16, S/16)``."""
        stages = self._stages()
        start = 0
        if valid is not None and not self.training:
            # HQ-SAM reads stage 1's output: crop no further than that
            x, start = self._run_cropped(x, valid, last=2 if early else len(stages))
        second = x if start == 2 else None
        for i, stage in enumerate(stages[start:], start):
            x = stage(x)
            if i == 1:
                second = x
        out = self.neck(x)
        return (out, second) if early else out

    def _stages(self) -> list[nn.Module]:
        """The four stages as callables: patch embedding + stage 0, then stages 1-3 (each
        with the patch merging that ends it)."""
        return [nn.Sequential(self.patch_embed, self.layers[0]), *self.layers[1:]]

    def _geometry(self, i: int) -> tuple[int, int, int]:
        """``(stride, reach, align)`` of stage ``i``: its output cell ``r`` reads input
        cells ``stride * r - reach .. stride * r + reach`` (a convolution with kernel ``k``
        and stride ``s``, padded by ``k // 2``, reads ``s * j +- k // 2``; windowed
        attention reads up to ``window - 1`` cells away); a crop of the input must end on a
        multiple of ``align`` input cells to keep the stage's windows and strides where
        they are on the whole input."""
        stride, reach, align = 1, 0, 1
        if i == 0:
            convs = [*self.patch_embed.modules(), *self.layers[0].modules()]
        else:
            layer = self.layers[i]
            for blk in layer.blocks:
                reach += blk.window - 1
                align = math.lcm(align, blk.window)
            convs = [m for blk in layer.blocks for m in blk.local_conv.modules()]
            if layer.downsample is not None:
                convs += list(layer.downsample.modules())
        for m in convs:
            w = getattr(m, "weight", None)
            if w is not None and w.dim() == 4 and hasattr(m, "stride"):
                reach += (w.shape[-1] // 2) * stride
                stride *= int(m.stride[0])
        return stride, reach, math.lcm(align, 2 * stride) if i == 0 else align

    def _run_cropped(
        self, x: torch.Tensor, valid: tuple[int, int], last: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """Run the first stages on crops of their input; returns the output of the last
        cropped stage (the same values as without crops, up to float rounding) and the
        index of the next stage to run in full.

        Stage ``i``'s input equals its input for an all-zero image in every cell at or
        below row ``z_r`` or at or right of column ``z_c`` (for the image: the padding).
        Output cells whose reach lies there are copied from the stage's output for an
        all-zero image; the others are computed from the top-left crop of the input that
        holds their reach, rounded up to the stage's alignment. Cropping stops at the
        first stage whose crop would be the whole input (stage 2's six 14-token windows
        spread the image over the whole map) or at stage ``last``."""
        stages = self._stages()[:last]
        image, runs = x, self._zero_runs(x)
        zero_from = valid
        for i, stage in enumerate(stages):
            stride, reach, align = self._geometry(i)
            sizes = x.shape[-2:]
            crop, keep = [], []
            for z, size in zip(zero_from, sizes):
                n_out = (size - 1) // stride + 1
                first_zero = -(-(z + reach) // stride)  # cells r with stride*r - reach >= z
                extent = (first_zero - 1) * stride + reach + 1
                extent = -(-extent // align) * align
                if first_zero >= n_out or extent >= size:
                    crop.append(size)
                    keep.append(n_out)
                else:  # every cell r with stride * r + reach < extent is exact
                    crop.append(extent)
                    keep.append((extent - 1 - reach) // stride + 1)
            if tuple(crop) == tuple(sizes):
                return x, i
            zero = self._zero_run(runs, i, image)
            out = zero.expand(x.shape[0], -1, -1, -1).clone(memory_format=torch.channels_last)
            part = stage(x[:, :, : crop[0], : crop[1]])
            out[:, :, : keep[0], : keep[1]] = part[:, :, : keep[0], : keep[1]]
            x, zero_from = out, tuple(keep)
        return x, len(stages)

    def _zero_runs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stages' outputs (batch 1) for an all-zero encoder input like ``x``, as far
        as computed so far (extend with :meth:`_zero_run`); cached per size, device, dtype
        and the in-place versions of the weights and buffers (batch-norm statistics)."""
        state = [*self.parameters(), *self.buffers()]
        key = (x.shape[1:], x.device, x.dtype, tuple(t._version for t in state))
        hit = getattr(self, "_zero_cache", None)
        if hit is None or hit[0] != key:
            hit = (key, [])
            self._zero_cache = hit
        return hit[1]

    def _zero_run(self, runs: list[torch.Tensor], i: int, like: torch.Tensor) -> torch.Tensor:
        """Stage ``i``'s output in ``runs``, computing the missing ones (each from the one
        before; stage 0's from zeros shaped like the encoder input ``like``)."""
        stages = self._stages()
        while len(runs) <= i:
            if runs:
                prev = runs[-1]
            else:
                prev = torch.zeros(1, *like.shape[1:], device=like.device, dtype=like.dtype)
            runs.append(stages[len(runs)](prev.contiguous(memory_format=torch.channels_last)))
        return runs[i]
