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


def test_small_inproject_golden(mobile_sam):
    """Runs without ../shared: a reduced golden kept in tests/data."""
    z = np.load(TEST_DATA / "golden_coffee_small.npz")
    cases = json.loads((TEST_DATA / "golden_coffee_small.json").read_text())
    p = Predictor(mobile_sam)
    p.set_image(z["image"])
    emb = p.embedding.numpy()
    np.testing.assert_allclose(emb[:, :8], z["embedding_head"], atol=EMB_ATOL)
    np.testing.assert_allclose(emb.mean(axis=(2, 3)), z["embedding_channel_mean"], atol=1e-5)
    for key, case in cases.items():
        check(run_case(p, case, z), z, key, z["image"].shape[1])
