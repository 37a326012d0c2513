"""Inference-only rewrites of a loaded model.

:func:`fuse_for_inference` is the one place where the model is changed for speed. It is
never applied silently by the model classes: a fused model gives the same outputs (up to
float rounding) but has no batch-norm statistics left to train, so training code must use
an unfused model.
"""

from __future__ import annotations

import torch
from torch import nn

from .tiny_vit import Attention as TinyViTAttention
from .tiny_vit import Conv2dBN


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


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Rewrite ``model`` in place for fast CPU inference and return it (in eval mode).

    - every convolution + batch norm pair (TinyViT's ``Conv2dBN``) becomes one convolution
      with a bias (the ``bn`` entries leave the state dict);
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
    model.requires_grad_(False)
    model._segany_fused = True
    return model
