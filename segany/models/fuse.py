"""Inference-only rewrites of a loaded model.

:func:`fuse_for_inference` is the one place where the model is changed for speed. It is
never applied silently by the model classes: a fused model gives the same outputs (up to
float rounding) but has no batch-norm statistics left to train, so training code must use
an unfused model.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import batched_windows, cpu_info, prefer_onednn_products
from .common import Products
from .hiera import MultiScaleBlock
from .mask_decoder import MaskDecoder
from .tiny_vit import Attention as TinyViTAttention
from .tiny_vit import Conv2dBN, MBConv, Mlp, PatchMerging


def onednn_available() -> bool:
    """Whether torch's oneDNN (mkldnn) fused CPU operators can be used here."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


class ConvGELU(nn.Module):
    """Inference-only ``gelu(conv(x) [+ residual])`` with the folded weights of a
    convolution. On the CPU (float32) it is one oneDNN call whose GELU (exact, erf), or
    residual sum, runs in the convolution's epilogue (with both, GELU follows in place),
    so the activation makes no separate out-of-place pass over memory; elsewhere, or with
    ``onednn=False`` (ONNX export, other dtypes), the same plain operators. Input and
    output ``(B, C, H, W)``."""

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


class OneDNNLinear(nn.Module):
    """Inference-only linear layer (optionally followed by GELU) as one oneDNN call on
    the CPU: the bias and the activation are applied in the product's epilogue (a plain
    ``addmm`` first copies the broadcast bias over the whole output, an extra pass over
    memory). Inputs ``(..., in)`` are flattened to 2-D for the call. Plain operators
    elsewhere or with ``onednn=False``."""

    adds_residual = True  # see segany.models.common.linear_plus

    def __init__(self, linear: nn.Linear, *, onednn: bool, gelu: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        b = linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach(), requires_grad=False)
        self.onednn, self.gelu = onednn, gelu
        self._packed: torch.Tensor | None = None  # oneDNN's blocked copy of the weight

    def __getstate__(self) -> dict:
        # the packed weight is an opaque oneDNN tensor (no storage): rebuilt on demand
        return {**self.__dict__, "_packed": None}

    def _weight(self, rows: int) -> torch.Tensor:
        """The weight reordered once into oneDNN's blocked layout for ``rows`` input rows
        (the first call's; any other row count works with it too)."""
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
        return self._packed

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)``; ``residual`` ``(..., out)`` is added after the
        activation (in the epilogue too when there is no activation)."""
        if self.onednn and x.device.type == "cpu" and x.dtype == torch.float32:
            x2 = x.reshape(-1, x.shape[-1])
            w = self._weight(x2.shape[0])
            if residual is not None and not self.gelu:
                # (a copy only if the residual is not laid out row by row already)
                other = residual.reshape(x2.shape[0], -1)
                y = torch.ops.mkldnn._linear_pointwise.binary(x2, other, w, self.bias, "add")
                return y.view(*x.shape[:-1], -1)
            attr, algo = ("gelu", "none") if self.gelu else ("none", "")
            y = torch.ops.mkldnn._linear_pointwise(x2, w, self.bias, attr, [], algo)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight, self.bias)
            y = F.gelu(y) if self.gelu else y
        return y if residual is None else residual + y


class FusedMBConv(nn.Module):
    """:class:`~segany.models.tiny_vit.MBConv` with each convolution and its GELU as one
    :class:`ConvGELU` (the last one also adds the shortcut)."""

    # rows per strip: 32 and 64 measured alike (within the machine's noise) on stage 0 of
    # MobileSAM (256x256 maps, 256 expanded channels); 16 and whole maps were slower
    strip_rows = 32

    def __init__(self, block: MBConv, *, onednn: bool) -> None:
        super().__init__()
        self.conv1 = ConvGELU(block.conv1.c, onednn=onednn)
        self.conv2 = ConvGELU(block.conv2.c, onednn=onednn)
        self.conv3 = ConvGELU(block.conv3.c, onednn=onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        if h <= 2 * self.strip_rows or self.conv2.weight.shape[-1] != 3:
            return self.conv3(self.conv2(self.conv1(x)), x)
        # Large maps in horizontal strips (one row of halo for the 3x3 depth-wise conv):
        # the expanded activations of a strip stay in cache between the three convs.
        # Each output row is computed from the same inputs as without strips.
        parts = []
        for r0 in range(0, h, self.strip_rows):
            r1 = min(h, r0 + self.strip_rows)
            lo, hi = max(0, r0 - 1), min(h, r1 + 1)
            y = self.conv2(self.conv1(x[:, :, lo:hi]))[:, :, r0 - lo : r1 - lo]
            parts.append(self.conv3(y, x[:, :, r0:r1]))
        return torch.cat(parts, 2)


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


class OneDNNProducts(Products):
    """:class:`~segany.models.common.Products` as oneDNN calls on the CPU (float32,
    outside autograd; torch's BLAS otherwise). The right-hand side is read with its own
    strides (a transposed view is not copied)."""

    fused_attention = False

    def linear(
        self, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if a.device.type != "cpu" or a.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(a, w, bias)
        a2 = a.reshape(-1, a.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(a2, w, bias, "none", [], "")
        return y.view(*a.shape[:-1], -1)


ONEDNN_PRODUCTS = OneDNNProducts()


def _replace_children(model: nn.Module, onednn: bool) -> None:
    # SAM 2's decoder adds the high-res features between the upscaling's convolutions and
    # their GELUs: that Sequential keeps its five separate steps
    keep_apart = {
        id(m.output_upscaling)
        for m in model.modules()
        if isinstance(m, MaskDecoder) and m.use_high_res_features
    }
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiScaleBlock):
                attn, (lin1, lin2) = child.attn, child.mlp.layers
                attn.qkv = OneDNNLinear(attn.qkv, onednn=onednn)
                attn.proj = OneDNNLinear(attn.proj, onednn=onednn)
                child.mlp.layers[0] = OneDNNLinear(lin1, onednn=onednn, gelu=True)
                child.mlp.layers[1] = OneDNNLinear(lin2, onednn=onednn)
                if hasattr(child, "proj"):
                    child.proj = OneDNNLinear(child.proj, onednn=onednn)
            elif isinstance(child, MBConv):
                setattr(parent, name, FusedMBConv(child, onednn=onednn))
            elif isinstance(child, Mlp):
                child.fc1 = OneDNNLinear(child.fc1, onednn=onednn, gelu=True)
                child.act = nn.Identity()
                child.fc2 = OneDNNLinear(child.fc2, onednn=onednn)
            elif isinstance(child, TinyViTAttention):
                child.qkv = OneDNNLinear(child.qkv, onednn=onednn)
                child.proj = OneDNNLinear(child.proj, onednn=onednn)
            elif isinstance(child, PatchMerging):
                setattr(parent, name, FusedPatchMerging(child, onednn=onednn))
        if isinstance(parent, nn.Sequential) and id(parent) not in keep_apart:
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


def _decoder_linears(model: nn.Module) -> None:
    """The mask decoders' linear layers as :class:`OneDNNLinear` (their weights packed
    once): on CPUs where oneDNN's products beat torch's BLAS
    (:func:`segany.runtime.prefer_onednn_products`)."""
    for decoder in [m for m in model.modules() if isinstance(m, MaskDecoder)]:
        for parent in list(decoder.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, OneDNNLinear(child, onednn=True))


def set_onednn(model: nn.Module, enabled: bool) -> None:
    """Switch the fused modules of ``model`` between oneDNN calls and plain operators."""
    enabled = enabled and onednn_available()
    for m in model.modules():
        if isinstance(m, (ConvGELU, ConvTransposeGELU, OneDNNLinear)):
            m.onednn = enabled
    _set_products(model, enabled)


def _set_products(model: nn.Module, onednn: bool) -> None:
    """The attention layers' products (the decoder's few-token form, SAM 2's memory and
    Hiera attention, TinyViT's windows): oneDNN's where they beat torch's BLAS
    (:func:`segany.runtime.prefer_onednn_products`), and the attention forms this CPU
    runs faster (:class:`~segany.models.common.Products`)."""
    kind = OneDNNProducts if onednn and prefer_onednn_products() else Products
    flags = cpu_info()["flags"]
    products = kind(
        fused_bf16="amx_bf16" in flags,  # type: ignore[operator]
        fused_windows=not (kind is OneDNNProducts and batched_windows(flags)),  # type: ignore[arg-type]
    )
    for m in model.modules():
        if isinstance(getattr(m, "products", None), Products):
            m.products = products


def fuse_for_inference(model: nn.Module, *, onednn: bool | None = None) -> nn.Module:
    """Rewrite ``model`` in place for fast CPU inference and return it (in eval mode).

    - every convolution + batch norm pair (TinyViT's ``Conv2dBN``) becomes one convolution
      with a bias (the ``bn`` entries leave the state dict);
    - TinyViT's convolutions followed by a GELU (and the MBConv's residual sum) become one
      :class:`ConvGELU`, its linear layers :class:`OneDNNLinear` (with the MLPs' GELU and
      the residual sums in the same call), the decoder's
      last transposed convolution and GELU :class:`ConvTransposeGELU`: with ``onednn``
      (default: when available) single oneDNN calls on the CPU, so the large stage-0
      activations are written once instead of three times;
      ``onednn=False`` keeps plain operators (for ONNX export);
    - Hiera's (SAM 2) linear layers become :class:`OneDNNLinear` (the MLPs' GELU and
      residual sums in the same calls);
    - TinyViT's per-window attention bias is gathered once and stored (``ab``);
    - 4-D weights of the image encoder use the channels-last layout, which the oneDNN
      convolutions on the CPU run several times faster (depth-wise ones especially).

    Outputs match the unfused model to float rounding (see ``tests/test_speed_paths.py``).
    Gradients are switched off: the result is for inference only.
    """
    if is_fused(model):
        if onednn is not None:  # e.g. a predictor's model copied for ONNX export
            set_onednn(model, onednn)
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
    onednn = onednn_available() if onednn is None else onednn
    _replace_children(model, onednn)
    if onednn and prefer_onednn_products():
        _decoder_linears(model)
    _set_products(model, onednn)
    model.requires_grad_(False)
    model._segany_fused = True
    return model


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every parameter and buffer of ``model``:
    changes whenever a weight is replaced or updated in place (optimiser steps,
    ``load_state_dict``, ``.to()``), and only then."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return tuple((id(t), t._version) for t in tensors)


class InferenceView:
    """The fast inference form of a model that stays the user's to train.

    :meth:`current` returns a fused deep copy (:func:`fuse_for_inference`) of ``model``
    while it is in eval mode, rebuilt whenever its weights change (see
    :func:`weights_version`); in training mode, the model itself (batch norms then use
    batch statistics, as the unfused model does). ``model`` is never rewritten: its
    parameters, state dict and ``.train()`` keep working. The copy costs the model's
    memory once more."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key: tuple | None = None
        self._copy: nn.Module | None = None

    def current(self) -> nn.Module:
        if self.model.training:
            return self.model
        key = weights_version(self.model)
        if self._copy is None or key != self._key:
            self._copy = None  # the old copy's memory is free before the new one is made
            self._copy = fuse_for_inference(copy.deepcopy(self.model))
            self._key = key
        return self._copy
