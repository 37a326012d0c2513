"""oneDNN products where they beat torch's BLAS (MKL on AMD CPUs): the CPU rule, what the
fused model takes, and that the results are the BLAS path's to float rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segany import runtime
from segany.models import fuse
from segany.models.common import Products, attention, chunked_attention, window_attention
from segany.models.fuse import (
    ONEDNN_PRODUCTS,
    OneDNNLinear,
    OneDNNProducts,
    fuse_for_inference,
    set_onednn,
)
from segany.models.tiny_vit import Attention as TinyViTAttention
from segany.models.transformer import Attention
from segany.predictor import Predictor

from .test_speed_paths import tiny_tinyvit_sam

needs_onednn = pytest.mark.skipif(not fuse.onednn_available(), reason="no oneDNN in this torch")


def _cpu(vendor: str, arch: str = "x86_64", *flags: str) -> dict:
    return {"model": "Fake", "vendor": vendor, "arch": arch, "flags": frozenset(flags)}


@pytest.mark.parametrize(
    "info,onednn",
    [
        (_cpu("AuthenticAMD", "x86_64", "avx2", "avx512f"), True),  # Zen 4 / Zen 5
        (_cpu("AuthenticAMD", "x86_64", "avx2"), True),  # Zen 2 / 3: oneDNN's AVX2 is faster
        (_cpu("AuthenticAMD", "x86_64", "sse4_2"), False),  # no AVX2: keep the BLAS
        (_cpu("GenuineIntel", "x86_64", "avx2"), False),
        (_cpu("GenuineIntel", "x86_64", "avx2", "avx512f"), False),
        (_cpu("HygonGenuine", "x86_64", "avx2", "avx512f"), True),
        (_cpu("", "aarch64", "asimd", "bf16"), False),
        (_cpu("", "x86_64", "avx512f"), False),  # vendor unknown: keep the BLAS
    ],
)
def test_prefer_onednn_products_reads_vendor_and_flags(monkeypatch, info, onednn):
    monkeypatch.delenv("SEGANY_PRODUCTS", raising=False)
    assert runtime.prefer_onednn_products(info) is onednn
    monkeypatch.setenv("SEGANY_PRODUCTS", "onednn")
    assert runtime.prefer_onednn_products(info) is True
    monkeypatch.setenv("SEGANY_PRODUCTS", "BLAS")
    assert runtime.prefer_onednn_products(info) is False


def test_cpu_info_reads_the_vendor():
    info = runtime.cpu_info()
    assert set(info) == {"model", "vendor", "arch", "flags"}
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        vendors = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")}
    assert info["vendor"] in (vendors or {""})


def _fused(model, monkeypatch, lacks: bool):
    monkeypatch.setattr(fuse, "prefer_onednn_products", lambda: lacks)
    return fuse_for_inference(copy.deepcopy(model))


@needs_onednn
def test_fused_model_takes_onednn_products_only_where_preferred(monkeypatch):
    sam = tiny_tinyvit_sam(3)
    on = _fused(sam, monkeypatch, True)
    off = _fused(sam, monkeypatch, False)
    attn_on = [m for m in on.mask_decoder.modules() if isinstance(m, Attention)]
    attn_off = [m for m in off.mask_decoder.modules() if isinstance(m, Attention)]
    assert attn_on and all(isinstance(m.products, OneDNNProducts) for m in attn_on)
    assert attn_off and all(type(m.products) is Products for m in attn_off)
    lin_on = [m for m in on.mask_decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert lin_on == []  # every decoder linear packed for oneDNN
    assert any(isinstance(m, OneDNNLinear) for m in on.mask_decoder.modules())
    assert not any(isinstance(m, OneDNNLinear) for m in off.mask_decoder.modules())
    # the ONNX export switches oneDNN off: plain products again (traceable)
    set_onednn(on, False)
    assert all(type(m.products) is Products for m in attn_on)


def test_bf16_attention_form_follows_the_cpu(monkeypatch):
    """bf16 attention: the fused kernel on CPUs with AMX (as measured on the AMX Xeon),
    chunked matrix products elsewhere (3x faster on the AMD EPYC with AVX512-BF16)."""
    sam = tiny_tinyvit_sam(2)
    for flags, fused in ((frozenset({"avx512f", "amx_bf16"}), True), (frozenset({"avx2"}), False)):
        monkeypatch.setattr(fuse, "cpu_info", lambda flags=flags: {"flags": flags})
        model = _fused(sam, monkeypatch, False)
        products = {m.products for m in model.modules() if hasattr(m, "products")}
        assert len(products) == 1
        (p,) = products
        assert p.fused(torch.bfloat16) is fused and p.fused(torch.float32) is True


def test_window_attention_form_follows_the_cpu(monkeypatch):
    """TinyViT's windows: batched products on AMD CPUs with AVX-512 (7% off the encoder on
    the Zen 5 EPYC), the fused kernel elsewhere (equal when capped to AVX2)."""
    sam = tiny_tinyvit_sam(2)
    cases = (
        (True, frozenset({"avx2", "avx512f"}), False),
        (True, frozenset({"avx2"}), True),
        (False, frozenset({"avx2", "avx512f"}), True),
    )
    for onednn, flags, fused in cases:
        monkeypatch.setattr(fuse, "cpu_info", lambda flags=flags: {"flags": flags})
        model = _fused(sam, monkeypatch, onednn)
        windows = [m for m in model.modules() if isinstance(m, TinyViTAttention)]
        assert windows and all(m.products.fused_windows is fused for m in windows)
    set_onednn(model, False)  # the export: the fused kernel, which it traces
    assert all(m.products.fused_windows for m in windows)


@pytest.mark.parametrize("n", [49, 100])
def test_window_attention_equals_the_fused_kernel(n):
    """Batched products over groups of windows (the last group short) on q, k, v sliced
    out of one qkv tensor, as TinyViT makes them; windows of more than 64 tokens take the
    fused kernel itself."""
    torch.manual_seed(0)
    w, h, d = 37, 3, 16
    qkv = torch.randn(w, n, h, 3, d)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    bias = torch.randn(1, h, n, n)
    windows = Products(fused_windows=False)
    with torch.inference_mode():
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ours = window_attention(q, k, v, bias, products=windows, group=16)
    torch.testing.assert_close(ours, fused, rtol=1e-5, atol=1e-5)
    assert ours.shape == (w, h, n, d)
    if n > 64:
        assert torch.equal(ours, fused)
    # the bias is not dropped: without it the result moves
    assert not torch.allclose(ours, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


@needs_onednn
def test_onednn_products_give_the_blas_paths_masks(monkeypatch, rgb_image):
    sam = tiny_tinyvit_sam(5)
    outs = {}
    for lacks in (True, False):
        pred = Predictor(_fused(sam, monkeypatch, lacks))
        pred.set_image(rgb_image)
        first = pred.predict(point_coords=[[30, 40]], point_labels=[1])
        box = pred.predict(box=[10, 12, 60, 50], multimask_output=False)
        refine = pred.predict(
            point_coords=[[30, 40], [50, 20]],
            point_labels=[1, 0],
            mask_input=first.low_res_logits[np.argmax(first.scores)][None],
            multimask_output=False,
        )
        outs[lacks] = [first, box, refine]
    for a, b in zip(outs[True], outs[False], strict=True):
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        assert (a.masks != b.masks).mean() < 1e-3


@needs_onednn
@pytest.mark.parametrize("slices", [(1, 1), (2, 3), (3, 7)])  # B x H: per slice / batched
def test_chunked_attention_with_onednn_products_equals_the_fused_kernel(slices):
    torch.manual_seed(0)
    b, h = slices
    q, k, v = torch.randn(b, h, 70, 16), torch.randn(b, h, 90, 16), torch.randn(b, h, 90, 16)
    want = F.scaled_dot_product_attention(q, k, v)
    with torch.inference_mode():
        got = chunked_attention(q, k, v, chunk=32, products=ONEDNN_PRODUCTS)
        picked = attention(q, k, v, products=ONEDNN_PRODUCTS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(picked, want, rtol=1e-5, atol=1e-5)
    # narrower values than keys (SAM 2's memory) run the chunked form, any products
    v8 = v[..., :8]
    torch.testing.assert_close(
        attention(q, k, v8), F.scaled_dot_product_attention(q, k, v)[..., :8], rtol=1e-5, atol=1e-5
    )
