"""segany.compat keeps Meta's names, signatures and return values."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

from segany.compat import ResizeLongestSide, SamPredictor, sam_model_registry
from segany.predictor import Predictor

# Meta's segment_anything 1.0 signatures (parameter names in order).
META_SIGNATURES = {
    "set_image": ["image", "image_format"],
    "set_torch_image": ["transformed_image", "original_image_size"],
    "predict": [
        "point_coords",
        "point_labels",
        "box",
        "mask_input",
        "multimask_output",
        "return_logits",
    ],
    "predict_torch": [
        "point_coords",
        "point_labels",
        "boxes",
        "mask_input",
        "multimask_output",
        "return_logits",
    ],
    "get_image_embedding": [],
    "reset_image": [],
}


@pytest.mark.parametrize("method,params", META_SIGNATURES.items())
def test_signatures(method, params):
    sig = inspect.signature(getattr(SamPredictor, method))
    assert list(sig.parameters)[1:] == params


def test_registry_names():
    assert set(sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b", "vit_t"}
    assert type(sam_model_registry["vit_t"]().image_encoder).__name__ == "TinyViT"


def test_predict_matches_predictor(tiny_model, rgb_image):
    compat = SamPredictor(tiny_model)
    compat.set_image(rgb_image)
    # the native predictor on the fused inference path compat runs (a fused copy)
    native = Predictor(copy.deepcopy(tiny_model), fuse=True)
    native.set_image(rgb_image)
    masks, iou, low = compat.predict(
        point_coords=np.array([[30, 40]]), point_labels=np.array([1]), multimask_output=True
    )
    ref = native.predict(point_coords=[[30, 40]], point_labels=[1])
    np.testing.assert_array_equal(masks, ref.masks)
    np.testing.assert_array_equal(iou, ref.scores)
    assert low.shape == (3, 32, 32)
    assert compat.get_image_embedding().shape == (1, 256, 8, 8)
    assert compat.original_size == (96, 144) and compat.input_size == (85, 128)


def test_bgr_input(tiny_model, rgb_image):
    a, b = SamPredictor(tiny_model), SamPredictor(tiny_model)
    a.set_image(rgb_image)
    b.set_image(rgb_image[..., ::-1].copy(), image_format="BGR")
    torch.testing.assert_close(a.features, b.features)


def test_predict_torch_with_transformed_boxes(tiny_model, rgb_image):
    p = SamPredictor(tiny_model)
    p.set_image(rgb_image)
    boxes = torch.tensor([[10.0, 10, 100, 80], [0, 0, 40, 30]])
    tb = p.transform.apply_boxes_torch(boxes, rgb_image.shape[:2])
    masks, iou, low = p.predict_torch(None, None, boxes=tb, multimask_output=False)
    assert masks.shape == (2, 1, 96, 144) and masks.dtype == torch.bool
    single, _, _ = p.predict(box=boxes[1].numpy(), multimask_output=False)
    np.testing.assert_array_equal(masks[1].numpy(), single)


def test_set_torch_image(tiny_model, rgb_image):
    p = SamPredictor(tiny_model)
    t = ResizeLongestSide(128)
    x = torch.from_numpy(t.apply_image(rgb_image)).permute(2, 0, 1)[None]
    p.set_torch_image(x, rgb_image.shape[:2])
    q = SamPredictor(tiny_model)
    q.set_image(rgb_image)
    torch.testing.assert_close(p.features, q.features)
    p.reset_image()
    assert not p.is_image_set
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


def test_checkpoint_loading(tmp_path, tiny_model):
    path = tmp_path / "mobile.pt"
    ref = sam_model_registry["vit_t"]()
    torch.save(ref.state_dict(), path)
    loaded = sam_model_registry["vit_t"](checkpoint=str(path))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    torch.save(tiny_model.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(RuntimeError):
        sam_model_registry["vit_t"](checkpoint=str(tmp_path / "wrong.pt"))


def test_real_weights_one_case(mobile_sam):
    """The compat path with MobileSAM reproduces a recorded reference case."""
    from .conftest import TEST_DATA

    z = np.load(TEST_DATA / "golden_coffee_small.npz")
    p = SamPredictor(mobile_sam)
    p.set_image(z["image"])
    masks, iou, _ = p.predict(box=np.array([22.0, 194.0, 430.0, 279.0]), multimask_output=False)
    ref = np.unpackbits(z["c4_masks"], axis=-1, count=z["image"].shape[1]).astype(bool)
    assert (masks != ref).sum() <= 25
    np.testing.assert_allclose(iou, z["c4_iou"], atol=1e-3)
