"""Parity with the reference implementations on recorded goldens (helpers and tolerances
in ``tests/golden.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segany.models import model_from_state_dict
from segany.predictor import Predictor

from .conftest import SHARED_REFERENCE, TEST_DATA
from .golden import EMB_ATOL, MOBILE_FILES, check, check_goldens, needs_shared, run_case


@needs_shared
@pytest.mark.parametrize("fname", MOBILE_FILES)
def test_mobile_sam_matches_reference(fname, mobile_sam):
    check_goldens(Predictor(mobile_sam), fname)


@needs_shared
def test_vit_architecture_matches_reference():
    sd = np.load(SHARED_REFERENCE / "vit_arch_state_dict.npz")
    model = model_from_state_dict({k: torch.from_numpy(sd[k]) for k in sd.files})
    enc = model.image_encoder
    assert type(enc).__name__ == "ImageEncoderViT"
    assert (
        len(enc.blocks) == 4 and enc.blocks[1].window_size == 0 and enc.blocks[0].window_size == 14
    )
    check_goldens(Predictor(model), "vit_arch_chelsea.npz")


@pytest.mark.parametrize("path", ["model", "load_predictor"])
def test_small_inproject_golden(mobile_sam, path):
    """Runs without ../shared: a reduced golden kept in tests/data (a click, several points,
    a box, a box with a point, the refinement with a mask input, a batch of boxes), through
    the plain model and through ``load_predictor``'s default path (fused, auto backend)."""
    z = np.load(TEST_DATA / "golden_coffee_small.npz")
    cases = json.loads((TEST_DATA / "golden_coffee_small.json").read_text())
    if path == "model":
        p = Predictor(mobile_sam)
    else:
        from segany.loader import load_predictor
        from segany.models.fuse import is_fused
        from segany.predictor import EmbeddingCache

        p = load_predictor("mobile_sam", progress=False, cache=EmbeddingCache(max_items=0))
        assert is_fused(p.model)
    p.set_image(z["image"])
    emb = p.embedding.numpy()
    np.testing.assert_allclose(emb[:, :8], z["embedding_head"], atol=EMB_ATOL)
    np.testing.assert_allclose(emb.mean(axis=(2, 3)), z["embedding_channel_mean"], atol=1e-5)
    assert set(cases) == {"c0", "c2", "c4", "c6", "refine"}
    for key, case in cases.items():
        check(run_case(p, case, z), z, key, z["image"].shape[1])
    assert len(z["batch_boxes"]) == 2
    check(
        p.predict_batch(boxes=z["batch_boxes"], multimask_output=True),
        z,
        "batch",
        z["image"].shape[1],
    )
