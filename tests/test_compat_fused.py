"""segany.compat runs the fused inference path while the user's model stays trainable."""

from __future__ import annotations

import copy

import numpy as np
import torch

from segany.compat import SamPredictor
from segany.models.fuse import InferenceView, is_fused
from segany.predictor import Predictor

from .conftest import TEST_DATA, tiny_sam


def test_inference_view_follows_weights_and_mode():
    model = tiny_sam(seed=3)
    view = InferenceView(model)
    fused = view.current()
    assert is_fused(fused) and not is_fused(model) and fused is not model
    assert view.current() is fused  # unchanged weights: the same copy
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(1.0)
    assert view.current() is not fused  # an in-place update makes a new copy
    model.train()
    assert view.current() is model and model.training
    model.eval()
    assert is_fused(view.current())


def test_compat_is_the_fused_path_and_leaves_the_model_alone(mobile_sam):
    z = np.load(TEST_DATA / "golden_coffee_small.npz")
    keys = set(mobile_sam.state_dict())
    sp = SamPredictor(mobile_sam)
    sp.set_image(z["image"])
    box = np.array([22.0, 194.0, 430.0, 279.0])
    masks, iou, low = sp.predict(box=box, multimask_output=False)
    fused = Predictor(copy.deepcopy(mobile_sam), fuse=True)
    fused.set_image(z["image"])
    ref = fused.predict(box=box, multimask_output=False)
    np.testing.assert_array_equal(sp.get_image_embedding().numpy(), fused.embedding.numpy())
    np.testing.assert_array_equal(masks, ref.masks)
    np.testing.assert_array_equal(iou, ref.scores)
    np.testing.assert_array_equal(low, ref.low_res_logits)
    plain = Predictor(copy.deepcopy(mobile_sam))
    plain.set_image(z["image"])  # the unfused model rounds differently
    assert not np.array_equal(plain.embedding.numpy(), fused.embedding.numpy())
    # the user's model is untouched: batch norms, parameters and state dict as loaded
    assert not is_fused(mobile_sam) and set(mobile_sam.state_dict()) == keys
    assert any(k.endswith("bn.running_mean") for k in keys)


def test_compat_sees_new_weights_and_keeps_training_mode(rgb_image):
    model = tiny_sam(seed=4)
    sp = SamPredictor(model)
    sp.set_image(rgb_image)
    _, before, _ = sp.predict(point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1]))
    with torch.no_grad():  # as an optimiser step would: in place
        model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(1.0)
    sp.set_image(rgb_image)
    _, after, _ = sp.predict(point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1]))
    np.testing.assert_allclose(after, before + 1.0, atol=1e-5)
    model.train()
    sp.set_image(rgb_image)  # training mode: the model itself, left in training mode
    assert model.training and not is_fused(model)
    _, trained, _ = sp.predict(point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1]))
    np.testing.assert_allclose(trained, after, atol=1e-4)  # no batch norms in this ViT
