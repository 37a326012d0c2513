"""Every registry variant builds, has the official key names and parameter counts, and runs
a forward pass on a tiny input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from segany.models import MODEL_REGISTRY, build_model, config_from_state_dict, model_from_state_dict
from segany.models.tiny_vit import offset_index

from .conftest import SHARED_REFERENCE

# Total parameters of the released checkpoints (millions), as published with SAM/MobileSAM.
PARAMS_M = {"vit_b": 93.7, "vit_l": 312.3, "vit_h": 641.1, "vit_t": 10.13}


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_t"])
def test_official_sizes(name):
    with torch.device("meta"):
        model = build_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(PARAMS_M[name], abs=0.06)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_t"])
def test_forward_tiny_input(name):
    torch.manual_seed(0)
    model = build_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    pts = torch.tensor([[[10.0, 20.0], [40.0, 30.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.inference_mode():
        emb = model.embed_image(x)
        assert emb.shape == (1, 256, 4, 4)
        low, iou = model.decode(emb, point_coords=pts, point_labels=labels, multimask_output=True)
        assert low.shape == (1, 3, 16, 16) and iou.shape == (1, 3)
        low1, iou1 = model.decode(
            emb, boxes=torch.tensor([[5.0, 5, 50, 60]]), multimask_output=False
        )
        assert low1.shape == (1, 1, 16, 16) and iou1.shape == (1, 1)
    assert torch.isfinite(low).all() and torch.isfinite(low1).all()


def test_vit_t_keys_match_mobile_sam(mobile_sam):
    from segany.weights import cached_path, load_checkpoint

    official = load_checkpoint(cached_path("mobile_sam"))
    assert set(build_model("vit_t").state_dict()) == set(official)
    assert config_from_state_dict(official) == ("vit_t", {})


def _official_vit_keys(depth: int) -> set[str]:
    sd = np.load(SHARED_REFERENCE / "vit_arch_state_dict.npz")
    keys = set()
    for k in sd.files:
        m = re.match(r"image_encoder\.blocks\.(\d+)\.(.*)", k)
        if m:
            keys.update(f"image_encoder.blocks.{i}.{m.group(2)}" for i in range(depth))
        else:
            keys.add(k)
    return keys


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason="../shared/reference not present")
@pytest.mark.parametrize("name,depth", [("vit_b", 12), ("vit_l", 24), ("vit_h", 32)])
def test_vit_keys_are_official(name, depth):
    with torch.device("meta"):
        model = build_model(name)
    assert set(model.state_dict()) == _official_vit_keys(depth)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_variant_recovered_from_state_dict(name):
    with torch.device("meta"):
        sd = build_model(name).state_dict()
    assert config_from_state_dict(sd) == (name, {})


def test_custom_vit_roundtrip():
    model = MODEL_REGISTRY["vit_custom"](
        embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(2,), window_size=5, img_size=128
    )
    name, dims = config_from_state_dict(model.state_dict())
    assert name == "vit_custom"
    assert dims == dict(
        embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(2,), window_size=5, img_size=128
    )
    again = model_from_state_dict(model.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(again.embed_image(x), model.eval().embed_image(x))


def test_not_a_sam_checkpoint():
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        config_from_state_dict({"backbone.weight": torch.zeros(1)})


def test_tinyvit_offset_index_counts_each_offset_once():
    idx = offset_index(7)
    assert idx.shape == (49, 49)
    assert idx.max() == 48 and len(idx.unique()) == 49
    assert idx[0, 8] == 1 * 7 + 1  # (0,0) -> (1,1)
    assert torch.equal(idx, idx.T)


def test_gradients_flow_through_decoder(tiny_model):
    emb = torch.randn(1, 256, 8, 8)
    low, iou = tiny_model.decode(
        emb,
        point_coords=torch.tensor([[[30.0, 40.0]]]),
        point_labels=torch.tensor([[1]]),
        multimask_output=True,
    )
    (low.mean() + iou.mean()).backward()
    grads = [p.grad for p in tiny_model.mask_decoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    tiny_model.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
def test_upscaling_as_products_equals_the_convolutions(tiny_model, fused):
    """The ONNX export's form of the upscaling (``upscale_as_products``) is the same
    function as the transposed convolutions, on a rectangular grid with several prompts."""
    import copy

    from segany.models.fuse import fuse_for_inference

    sam = copy.deepcopy(tiny_model).eval()
    if fused:
        fuse_for_inference(sam, onednn=False)
    md = sam.mask_decoder
    c = md.transformer_dim
    torch.manual_seed(0)
    with torch.no_grad():
        for p in md.output_upscaling.parameters():  # not the identity layer norm of a new model
            p.add_(0.3 * torch.randn_like(p))
        tokens = torch.randn(2, 5 * 7, c).view(2, 5, 7, c).permute(0, 3, 1, 2)
        hyper_in = torch.randn(2, 3, c // 8)
        convs = md.upscale(tokens, hyper_in)
        md.upscale_as_products = True
        products = md.upscale(tokens, hyper_in)
    assert products.shape == (2, 3, 20, 28)
    torch.testing.assert_close(products, convs, rtol=1e-4, atol=1e-5)
    # the comparison means something: the logits vary from pixel to pixel within each
    # 4x4 block of one token, so a wrong pixel order inside the blocks would not match
    block = convs[..., :4, :4].reshape(2, 3, -1)
    assert (block.std(-1) > 1e-2).all()
