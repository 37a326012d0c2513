"""Inference-only rewrites of a loaded model.

:func:`fuse_for_inference` is the one place where the model is changed for speed. It is
never applied silently by the model classes: a fused model gives the same outputs (up to
float rounding) but has no batch-norm statistics left to train, so training code must use
an unfused model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tiny_vit import Attention as TinyViTAttention
from .tiny_vit import Conv2dBN, MBConv, Mlp, PatchEmbed, PatchMerging


def onednn_available() -> bool:
    """Whether torch's oneDNN (mkldnn) fused CPU operators can be used here."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


class ConvGELU(nn.Module):
    """Inference-only ``gelu(conv(x) [+ residual])`` with the folded weights of a
    convolution. On the CPU (float32) it is one oneDNN call whose GELU (exact, erf) and
    residual sum run in the convolution's epilogue, so the activation never makes a
    separate pass over memory; elsewhere, or with ``onednn=False`` (ONNX export), the
    same plain operators. Input and output ``(B, C, H, W)``."""

    def __init__(self, conv: nn.Conv2d, *, onednn: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.onednn = onednn

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn and x.device.type == "cpu" and x.dtype == torch.float32:
            args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "gelu", [], "none")
            # oneDNN has no sum + GELU epilogue here: the sum is fused, GELU runs in place
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *args, "add", None, None, [], None
            )
            return torch.ops.aten.gelu_(y)
        w, b = self.weight, self.bias
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return F.gelu(y if residual is None else y + residual)


class ConvTransposeGELU(nn.Module):
    """Inference-only ``gelu(conv_transpose(x))`` (the mask decoder's last upscaling
    step), one oneDNN call on the CPU like :class:`ConvGELU`."""

    def __init__(self, conv: nn.ConvTranspose2d, *, onednn: bool) -> None:
        super().__init__()
        self.conv = conv
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.onednn and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x,
                c.weight,
                c.bias,
                list(c.padding),
                list(c.output_padding),
                list(c.stride),
                list(c.dilation),
                c.groups,
                "gelu",
                [],
                "none",
            )
        return F.gelu(c(x))


class FusedMlp(nn.Module):
    """:class:`~segany.models.tiny_vit.Mlp` whose first linear layer and GELU are one
    oneDNN call on the CPU (plain operators elsewhere or with ``onednn=False``)."""

    def __init__(self, mlp: Mlp, *, onednn: bool) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = mlp.norm, mlp.fc1, mlp.fc2
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.onednn and x.device.type == "cpu" and x.dtype == torch.float32:
            w, b = self.fc1.weight, self.fc1.bias
            x = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        else:
            x = F.gelu(self.fc1(x))
        return self.fc2(x)


class FusedMBConv(nn.Module):
    """:class:`~segany.models.tiny_vit.MBConv` with each convolution and its GELU as one
    :class:`ConvGELU` (the last one also adds the shortcut)."""

    def __init__(self, block: MBConv, *, onednn: bool) -> None:
        super().__init__()
        self.conv1 = ConvGELU(block.conv1.c, onednn=onednn)
        self.conv2 = ConvGELU(block.conv2.c, onednn=onednn)
        self.conv3 = ConvGELU(block.conv3.c, onednn=onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)), x)


class FusedPatchMerging(nn.Module):
    """:class:`~segany.models.tiny_vit.PatchMerging` with its two activated
    convolutions as :class:`ConvGELU`."""

    def __init__(self, merge: PatchMerging, *, onednn: bool) -> None:
        super().__init__()
        self.conv1 = ConvGELU(merge.conv1.c, onednn=onednn)
        self.conv2 = ConvGELU(merge.conv2.c, onednn=onednn)
        self.conv3 = merge.conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode (running stats)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def is_fused(model: nn.Module) -> bool:
    """True when :func:`fuse_for_inference` has been applied to ``model``."""
    return bool(getattr(model, "_segany_fused", False))


def _replace_children(model: nn.Module, onednn: bool) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MBConv):
                setattr(parent, name, FusedMBConv(child, onednn=onednn))
            elif isinstance(child, Mlp):
                setattr(parent, name, FusedMlp(child, onednn=onednn))
            elif isinstance(child, PatchMerging):
                setattr(parent, name, FusedPatchMerging(child, onednn=onednn))
        if isinstance(parent, nn.Sequential):
            # (convolution, GELU) pairs: PatchEmbed's stem, the decoder's last upscaling
            for i in range(len(parent) - 1):
                conv, act = parent[i], parent[i + 1]
                if not (isinstance(act, nn.GELU) and act.approximate == "none"):
                    continue
                if isinstance(conv, Conv2dBN) and isinstance(conv.bn, nn.Identity):
                    parent[i] = ConvGELU(conv.c, onednn=onednn)
                elif isinstance(conv, nn.ConvTranspose2d):
                    parent[i] = ConvTransposeGELU(conv, onednn=onednn)
                else:
                    continue
                parent[i + 1] = nn.Identity()


def fuse_for_inference(model: nn.Module, *, onednn: bool | None = None) -> nn.Module:
    """Rewrite ``model`` in place for fast CPU inference and return it (in eval mode).

    - every convolution + batch norm pair (TinyViT's ``Conv2dBN``) becomes one convolution
      with a bias (the ``bn`` entries leave the state dict);
    - TinyViT's convolutions followed by a GELU (and the MBConv's residual sum) become one
      :class:`ConvGELU`, its MLPs' first layer and GELU :class:`FusedMlp`, the decoder's
      last transposed convolution and GELU :class:`ConvTransposeGELU`: with ``onednn``
      (default: when available) single oneDNN calls on the CPU, so the large stage-0
      activations are written once instead of three times;
      ``onednn=False`` keeps plain operators (for ONNX export);
    - TinyViT's per-window attention bias is gathered once and stored (``ab``);
    - 4-D weights of the image encoder use the channels-last layout, which the oneDNN
      convolutions on the CPU run several times faster (depth-wise ones especially).

    Outputs match the unfused model to float rounding (see ``tests/test_speed_paths.py``).
    Gradients are switched off: the result is for inference only.
    """
    if is_fused(model):
        return model
    model.eval()
    for mod in list(model.modules()):
        if isinstance(mod, Conv2dBN) and isinstance(mod.bn, nn.BatchNorm2d):
            mod.c = fold_batch_norm(mod.c, mod.bn)
            mod.bn = nn.Identity()
        elif isinstance(mod, TinyViTAttention):
            with torch.no_grad():
                ab = mod.attention_biases[:, mod.bias_index].detach().clone()
            mod.register_buffer("ab", ab, persistent=False)
    encoder = getattr(model, "image_encoder", model)
    encoder.to(memory_format=torch.channels_last)
    _replace_children(model, onednn_available() if onednn is None else onednn)
    model.requires_grad_(False)
    model._segany_fused = True
    return model
