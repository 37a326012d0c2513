"""Inference-only speed paths give the same results as the plain model.

- ``fuse_for_inference`` (batch norm folded, attention bias stored, channels-last) ==
  the unfused model, on a tiny random TinyViT SAM and on the MobileSAM goldens;
- the per-image decoder context (prompt-independent projections computed once) == the
  full decoder, for single and batched prompts;
- ``masks_to_image`` (crop before upsampling) == upsample-then-crop, bit for bit;
- the thread setting.
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segany import transforms as T
from segany.models.fuse import (
    ConvGELU,
    FusedMBConv,
    OneDNNLinear,
    fold_batch_norm,
    fuse_for_inference,
    is_fused,
    onednn_available,
)
from segany.models.registry import vit_t
from segany.predictor import ImageEmbedding, Predictor
from segany.runtime import available_cpus, get_threads, set_threads

from .conftest import SHARED_REFERENCE
from .golden import MOBILE_FILES, check_goldens


def tiny_tinyvit_sam(seed: int = 0, img_size: int = 128):
    """MobileSAM's architecture at ``img_size`` px with narrow stages and random BN
    statistics."""
    torch.manual_seed(seed)
    sam = vit_t(
        img_size=img_size,
        embed_dims=(16, 32, 40, 48),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 3),
        window_sizes=(7, 7, 7, 7),
        num_classes=0,
    )
    for m in sam.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    for m in sam.modules():
        if hasattr(m, "attention_biases"):
            nn.init.normal_(m.attention_biases, std=0.5)
    return sam.eval()


def test_fold_batch_norm_equals_conv_then_bn() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    bn = nn.BatchNorm2d(8).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    nn.init.normal_(bn.weight)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fold_batch_norm(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_fused_activations_equal_plain_operators() -> None:
    """The oneDNN conv+GELU (with and without the residual sum) and linear+GELU calls give
    what the plain operators give, and the encoder is rewritten to use them."""
    torch.manual_seed(0)
    for groups, k in ((1, 1), (24, 3)):
        conv = nn.Conv2d(24, 24, k, padding=k // 2, groups=groups).to(
            memory_format=torch.channels_last
        )
        x = torch.randn(1, 24, 13, 11).to(memory_format=torch.channels_last)
        r = torch.randn_like(x)
        fast, plain = ConvGELU(conv, onednn=True), ConvGELU(conv, onednn=False)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), F.gelu(conv(x)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast(x, r), plain(x, r), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(plain(x, r), F.gelu(conv(x) + r))
    # MBConv in row strips (maps taller than two strips) == all rows at once
    block = next(
        m for m in fuse_for_inference(tiny_tinyvit_sam()).modules() if isinstance(m, FusedMBConv)
    )
    x = torch.randn(1, block.conv1.weight.shape[1], 75, 9).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = block.conv3(block.conv2(block.conv1(x)), x)
        torch.testing.assert_close(block(x), whole, atol=1e-5, rtol=1e-5)
    assert x.shape[2] > 2 * block.strip_rows
    fused = fuse_for_inference(copy.deepcopy(tiny_tinyvit_sam()))
    kinds = {type(m) for m in fused.image_encoder.modules()}
    assert {ConvGELU, FusedMBConv, OneDNNLinear} <= kinds
    assert all(m.onednn for m in fused.modules() if isinstance(m, (ConvGELU, OneDNNLinear)))
    plain = fuse_for_inference(copy.deepcopy(tiny_tinyvit_sam()), onednn=False)
    assert not any(m.onednn for m in plain.modules() if isinstance(m, (ConvGELU, OneDNNLinear)))
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(fused.embed_image(x), plain.embed_image(x), atol=1e-5, rtol=1e-5)


def test_keep_freed_memory_is_a_process_setting() -> None:
    """On by default (glibc), off with SEGANY_KEEP_FREED_MEMORY=0; asked in fresh processes
    since the setting is process-wide."""
    import subprocess
    import sys

    code = "from segany.runtime import keep_freed_memory as k; print(k(), k())"
    env = {k: v for k, v in os.environ.items() if k != "SEGANY_KEEP_FREED_MEMORY"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "SEGANY_KEEP_FREED_MEMORY": "0"},
        capture_output=True,
        text=True,
    )
    assert off.stdout.split() == ["False", "False"], off.stderr
    import platform

    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert on.stdout.split() == [expected, expected], on.stderr


def test_fused_tiny_model_matches_unfused() -> None:
    plain = tiny_tinyvit_sam()
    fused = fuse_for_inference(copy.deepcopy(plain))
    assert is_fused(fused) and not is_fused(plain)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        a, b = plain.embed_image(x), fused.embed_image(x)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        pts = torch.tensor([[[30.0, 40.0], [90.0, 20.0]]])
        lab = torch.tensor([[1, 0]])
        ra = plain.decode(a, point_coords=pts, point_labels=lab)
        rb = fused.decode(a, point_coords=pts, point_labels=lab)
    for u, v in zip(ra, rb):
        torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4)


def test_decoder_context_matches_full_decoder() -> None:
    sam = tiny_tinyvit_sam(1)
    torch.manual_seed(2)
    emb = torch.randn(1, 256, 8, 8)
    ctx = sam.prepare_decoder(emb)
    cases = [
        dict(
            point_coords=torch.rand(1, 1, 2) * 128, point_labels=torch.ones(1, 1, dtype=torch.long)
        ),
        dict(point_coords=torch.rand(3, 2, 2) * 128, point_labels=torch.tensor([[1, 0]] * 3)),
        dict(boxes=torch.tensor([[10.0, 10.0, 80.0, 90.0], [0.0, 5.0, 30.0, 40.0]])),
        dict(
            boxes=torch.tensor([[10.0, 10.0, 80.0, 90.0]]),
            point_coords=torch.tensor([[[40.0, 50.0]]]),
            point_labels=torch.tensor([[0]]),
        ),
    ]
    for kw in cases:
        for multi in (True, False):
            full = sam.decode(emb, multimask_output=multi, **kw)  # autograd on: plain form
            with torch.inference_mode():
                fast = sam.decode(emb, multimask_output=multi, context=ctx, **kw)
            for u, v in zip(full, fast):
                torch.testing.assert_close(v, u.detach(), atol=1e-4, rtol=1e-4)


def test_mask_input_prompts_take_the_few_token_form_when_it_is_less_work() -> None:
    """Prompts with a mask input have no context; outside autograd their cross attentions
    run in the few-token form (same masks as the plain form), unless the tokens are too
    many for it to be less work (then the plain form, bit for bit)."""
    sam = tiny_tinyvit_sam(1)
    torch.manual_seed(3)
    emb = torch.randn(1, 256, 8, 8)
    mask_input = torch.randn(2, 1, 32, 32) * 4
    calls: list[bool] = []
    attend_image = type(sam.mask_decoder.transformer.final_attn_token_to_image).attend_image

    def spy(self, *a, **k):
        calls.append(True)
        return attend_image(self, *a, **k)

    t2i = sam.mask_decoder.transformer.final_attn_token_to_image
    limit = t2i.internal_dim // t2i.num_heads  # tokens allowed: 5 outputs + prompt tokens
    for n_points in (2, limit):  # few tokens, then more than the limit
        kw = dict(
            point_coords=torch.rand(2, n_points, 2) * 128,
            point_labels=torch.ones(2, n_points, dtype=torch.long),
            mask_input=mask_input,
        )
        full = sam.decode(emb, multimask_output=False, **kw)
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(t2i), "attend_image", spy)
            with torch.inference_mode():
                fast = sam.decode(emb, multimask_output=False, **kw)
        assert bool(calls) == (n_points + 5 <= limit), (n_points, limit)
        for u, v in zip(full, fast):
            if calls:
                torch.testing.assert_close(v, u.detach(), atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(v, u.detach())


@pytest.mark.parametrize("fused", [False, True])
def test_first_stages_under_padding_from_the_zero_run(fused: bool) -> None:
    """TinyViT's first stages on crops of the image plus a margin, the rest copied from
    their output for an all-zero input, equal the stages on the whole padded input; an
    image reaching into what ``valid`` calls padding does not (the check can fail)."""
    sam = tiny_tinyvit_sam(7, img_size=256)
    if fused:
        sam = fuse_for_inference(sam)
    enc = sam.image_encoder
    # stage 0: 3x3 s2, 3x3 s2, one 3x3 MBConv, 3x3 s2 (crops end on 16 px);
    # stage 1: one block (7-window attention, 3x3 local conv), 3x3 s2 merge (7-cell crops)
    assert enc._geometry(0) == (8, 11, 16)
    assert enc._geometry(1) == (2, 6 + 1 + 1, 7)
    fmt = torch.channels_last if fused else torch.contiguous_format
    seen: list[tuple[int, ...]] = []
    for i, first in enumerate([enc.patch_embed, *enc.layers[1:]]):
        first.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, *a[0].shape[-2:])))
    gen = torch.Generator().manual_seed(0)
    # (h, w, stages cropped): a 24-row image needs 48 input rows for stage 0 and 21 of the
    # 32 rows of stage 1's input; 100 or 220 rows need 128 or 240 of 256 in stage 0 and all
    # of stage 1; 230 rows all of stage 0
    for h, w, cropped in [
        (24, 256, 2),
        (256, 30, 2),
        (24, 30, 2),
        (100, 256, 1),
        (220, 256, 1),
        (230, 256, 0),
        (256, 256, 0),
    ]:
        x = torch.randn(2, 3, 256, 256, generator=gen)
        x[:, :, h:] = 0
        x[:, :, :, w:] = 0
        x = x.contiguous(memory_format=fmt)
        seen.clear()
        with torch.inference_mode():
            part, start = enc._run_cropped(x, (h, w))
            full = x
            for stage in enc._stages()[:start]:
                full = stage(full)
            torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(enc(x, valid=(h, w)), enc(x), atol=1e-5, rtol=1e-5)
        assert start == cropped
        crops = {(i, *hw) for i, *hw in seen if i < start and tuple(hw) != (256 >> 3 * i,) * 2}
        assert len({c[0] for c in crops}) == cropped, seen
    x = torch.randn(1, 3, 256, 256, generator=gen).contiguous(memory_format=fmt)
    with torch.inference_mode():
        part, start = enc._run_cropped(x, (24, 256))
        wrong = (part - enc._stages()[1](enc._stages()[0](x))).abs().max()
    assert start == 2 and wrong > 1e-3
    # the cached all-zero runs follow in-place changes of weights and batch-norm statistics
    x[:, :, 24:] = 0
    with torch.no_grad():
        if fused:
            enc.patch_embed.seq[0].weight.mul_(1.5)
        else:
            next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.add_(1.0)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x, valid=(24, 256)), enc(x), atol=1e-5, rtol=1e-5)
    if not fused:  # training mode ignores `valid` (batch statistics of a crop would differ)
        enc.train()
        seen.clear()
        with torch.no_grad():
            enc(x, valid=(24, 256))
        assert all(tuple(hw) == (256 >> 3 * i,) * 2 for i, *hw in seen if i < 2), seen
        enc.eval()


def _fake_cpu(monkeypatch, *flags: str) -> None:
    from segany import runtime

    info = {"model": "Fake CPU", "arch": "x86_64", "flags": frozenset(("avx2", *flags))}
    monkeypatch.setattr(runtime, "cpu_info", lambda: info)
    monkeypatch.delenv("SEGANY_FORCE_BF16", raising=False)


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16", "bf16"])
def test_bf16_allowed_with_native_bfloat16(monkeypatch, flag) -> None:
    _fake_cpu(monkeypatch, "avx512f", flag)
    assert Predictor(tiny_tinyvit_sam(7), precision="bf16").precision == "bf16"


def test_bf16_refused_without_bfloat16_instructions(monkeypatch, tmp_path, capsys, mobile_sam):
    """On an AVX2-only CPU bf16 is emulated, 4x slower than the reference: refused with a
    one-line reason (library and command line), unless forced for measuring."""
    from segany import runtime
    from segany.cli import main

    _fake_cpu(monkeypatch, "avx512f", "avx512bw")  # AVX-512 without its BF16 extension
    with pytest.raises(runtime.PrecisionError, match="this Fake CPU has none"):
        Predictor(tiny_tinyvit_sam(7), precision="bf16")
    assert Predictor(tiny_tinyvit_sam(7)).precision == "fp32"
    monkeypatch.setenv("SEGANY_FORCE_BF16", "1")
    assert Predictor(tiny_tinyvit_sam(7), precision="bf16").precision == "bf16"
    monkeypatch.delenv("SEGANY_FORCE_BF16")
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    argv = ["segment", str(img), "--point", "1,1", "--out", str(tmp_path / "m.png")]
    assert main([*argv, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segany: error: bf16 needs a CPU with native bfloat16")
    assert err.count("\n") == 1


def test_bf16_precision_embeds_with_a_bfloat16_encoder_copy(monkeypatch) -> None:
    """``precision="bf16"``: the embedding comes from a bfloat16 copy of the encoder (close
    to fp32, not equal), is cached apart from the fp32 one, and the model is untouched."""
    _fake_cpu(monkeypatch, "amx_bf16")  # the arithmetic is emulated here if need be
    sam = tiny_tinyvit_sam(7)
    image = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    fp32 = Predictor(sam, fuse=True)
    ref = fp32.set_image(image).embedding
    bf16 = Predictor(sam, precision="bf16", cache=fp32.cache, model_id=fp32.model_id)
    emb = bf16.set_image(image).embedding
    assert emb.dtype == torch.float32
    rel = ((emb - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel  # > 0: not the fp32 embedding from the shared cache
    assert torch.equal(fp32.set_image(image).embedding, ref)  # and it did not replace it
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    out = bf16.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
    assert out.masks.shape == (3, 96, 128)
    with pytest.raises(ValueError, match="precision"):
        Predictor(sam, precision="fp16")
    with pytest.raises(ValueError, match="torch backend"):
        Predictor(sam, precision="bf16", backend="onnx")


@pytest.mark.parametrize("family", ["sam2", "hq"])
def test_bf16_precision_for_sam2_and_hq(monkeypatch, request, family) -> None:
    """SAM 2 (Hiera trunk + neck) and HQ-SAM (ViT) embed with a bfloat16 copy of their
    image encoder too; the extra per-image features (SAM 2's high-res maps, HQ-SAM's fused
    features) are computed from its outputs in float32, close to the fp32 ones."""
    _fake_cpu(monkeypatch, "amx_bf16")
    sam = request.getfixturevalue("tiny_sam2" if family == "sam2" else "tiny_hq")
    image = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    ref = Predictor(sam).set_image(image)
    bf16 = Predictor(sam, precision="bf16")
    got = bf16.set_image(image)
    assert got.embedding.dtype == torch.float32 and len(got.high_res) == len(ref.high_res) > 0
    for a, b in zip((got.embedding, *got.high_res), (ref.embedding, *ref.high_res)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        rel = ((a - b).norm() / b.norm()).item()
        assert 0 < rel < 0.05, rel
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    out = bf16.predict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))
    assert out.masks.shape[1:] == (120, 160)
    with pytest.raises(ValueError, match="torch backend"):
        Predictor(sam, precision="bf16", backend="onnx")


def test_selected_outputs_equal_all_outputs() -> None:
    """Decoding only the needed mask outputs (the final attention over fewer tokens) gives
    those outputs of the full decode."""
    sam = tiny_tinyvit_sam(3)
    torch.manual_seed(4)
    emb = torch.randn(1, 256, 8, 8)
    pe = sam.prompt_encoder
    sparse, dense = pe((torch.rand(2, 3, 2) * 128, torch.tensor([[1, 0, 1]] * 2)), None, None)
    with torch.inference_mode():
        args = (emb, pe.get_dense_pe(), sparse, dense)
        m_all, iou_all = sam.mask_decoder.predict_masks(*args)
        for outputs in ([1, 2, 3], [0], [2]):
            m, iou = sam.mask_decoder.predict_masks(*args, outputs=outputs)
            torch.testing.assert_close(m, m_all[:, outputs], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou, iou_all[:, outputs], atol=1e-5, rtol=1e-5)


def _record_shape(seen: list, fn, tokens: torch.Tensor, hyper_in: torch.Tensor):
    seen.append(tokens.shape[-2:])
    return fn(tokens, hyper_in)


@pytest.mark.parametrize("size", [(64, 128), (128, 40), (100, 100)])
def test_single_click_upscales_image_tokens_and_fills_padding_on_demand(size) -> None:
    """A single click upscales only the tokens under the image; its low-res logits, read
    later, equal a full decode's everywhere (padding included), and so do its masks."""
    sam = tiny_tinyvit_sam(5)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    pred = Predictor(sam, fuse=True)
    pred.set_image(image)
    pt, lab = np.array([[size[1] * 0.3, size[0] * 0.6]]), np.array([1])
    for multi in (True, False):
        full = pred.predict_torch(
            T.coords_to_model(pt[None], pred.original_size, 128),
            torch.tensor([[1]]),
            multimask_output=multi,
        )
        seen = []
        orig = sam.mask_decoder.upscale
        sam.mask_decoder.upscale = functools.partial(_record_shape, seen, orig)
        try:
            out = pred.predict(point_coords=pt, point_labels=lab, multimask_output=multi)
            decoded_at_click = list(seen)
            low = out.low_res_logits
        finally:
            del sam.mask_decoder.upscale
        np.testing.assert_array_equal(out.masks, full[0][0].numpy())
        np.testing.assert_allclose(low, full[2][0].numpy(), atol=1e-5, rtol=1e-5)
        grid = (8, 8)
        crop = T.image_tokens(pred.input_size, 128, grid)
        assert decoded_at_click == [torch.Size(crop)]
        assert (crop != grid) == (len(seen) > 1)  # padding filled only when read


@pytest.mark.parametrize(
    "size", [(512, 512), (400, 600), (333, 1000), (1000, 17), (3000, 2000), (5, 7), (1024, 768)]
)
def test_masks_to_image_matches_upsample_crop_resize(size: tuple[int, int]) -> None:
    """Crop-first is exact; the composed-matrix path (images below the model size) equals
    the two resizings up to float rounding."""
    torch.manual_seed(0)
    low = 5 * torch.randn(2, 3, 256, 256)
    input_size = T.preprocess_shape(*size, 1024)
    naive = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    naive = naive[..., : input_size[0], : input_size[1]]
    naive = F.interpolate(naive, size, mode="bilinear", align_corners=False)
    fast = T.masks_to_image(low, input_size=input_size, original_size=size, img_size=1024)
    assert fast.shape == naive.shape
    if size[0] * size[1] >= input_size[0] * input_size[1]:
        assert torch.equal(fast, naive)
    torch.testing.assert_close(fast, naive, atol=5e-4, rtol=1e-5)
    assert ((fast > 0) != (naive > 0)).float().mean() < 1e-4


def test_set_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1 and get_threads() == 1
        with pytest.raises(ValueError, match="oversubscribe"):
            set_threads(available_cpus() + 1)
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        set_threads(before)


@pytest.mark.weights
@pytest.mark.skipif(not (SHARED_REFERENCE / "index.json").exists(), reason="no goldens")
def test_fused_mobile_sam_on_goldens(mobile_sam) -> None:
    """The fused model (every speed path on: oneDNN calls, strips, cropped stages) on every
    case of the three MobileSAM goldens, same tolerances as the model as loaded."""
    model = fuse_for_inference(copy.deepcopy(mobile_sam))
    for fname in MOBILE_FILES:
        check_goldens(Predictor(model), fname)


def test_decoder_context_shared_by_predictors_and_refreshed_after_training() -> None:
    """Predictors on the same embedding (one per server thread) share its decoder context;
    an in-place weight change (an optimizer step) makes the shared context stale."""
    sam = tiny_tinyvit_sam(3)
    rgb = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    a, b = Predictor(sam), Predictor(sam)
    emb = a.set_image(rgb)
    b.set_embedding(emb)
    assert b._decoder_context() is a._decoder_context()
    pt, lab = np.array([[40.0, 30.0]]), np.array([1])
    before = b.predict(point_coords=pt, point_labels=lab).low_res_logits
    with torch.no_grad():
        sam.mask_decoder.output_upscaling[0].weight.mul_(0.5)
        sam.prompt_encoder.no_mask_embed.weight.add_(1.0)
    c = Predictor(sam)
    c.set_embedding(emb)
    assert c._decoder_context() is not a._decoder_context()
    after = c.predict(point_coords=pt, point_labels=lab).low_res_logits
    fresh = Predictor(sam)
    fresh.set_embedding(
        ImageEmbedding(
            embedding=emb.embedding, original_size=emb.original_size, input_size=emb.input_size
        )
    )
    expected = fresh.predict(point_coords=pt, point_labels=lab).low_res_logits
    assert not np.allclose(before, after, atol=1e-3)
    np.testing.assert_allclose(after, expected, atol=1e-5)


def test_decode_slots_bound_calls_and_set_each_decodes_threads() -> None:
    """One thread per decode by default; with ``threads=None`` a decode alone gets every
    core and two at once one each; never more than ``concurrency`` slots held; the thread
    count is restored after each decode."""
    from segany.runtime import DecodeSlots

    before = torch.get_num_threads()
    fixed = DecodeSlots(2, cores=4)
    with fixed.decode() as n:
        assert n == 1 and torch.get_num_threads() == 1
    adaptive = DecodeSlots(2, threads=None, cores=4)
    with adaptive.decode() as n1:
        assert n1 == 4 and torch.get_num_threads() == 4
        with adaptive.decode() as n2:  # a second decode while the first runs
            assert n2 == 2 and adaptive.running == adaptive.concurrency == 2
    assert adaptive.running == 0 and torch.get_num_threads() == before
    with adaptive as running:  # a slot without touching the threads (pre-fill)
        assert running == 1 and torch.get_num_threads() == before
