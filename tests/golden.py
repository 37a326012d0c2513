"""The reference goldens and their tolerances, shared by the tests that claim parity
(``test_parity``: the model as loaded; ``test_speed_paths``: the fused model;
``test_onnx``: the onnxruntime backend).

Tolerances reached (see docs/parity.md): embeddings within 5e-4 absolute; predicted IoUs
within 1e-3; low-res logits within 2e-2; masks differ in at most a handful of boundary
pixels (<= 0.1% of the mask and <= 25 pixels).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from segany.predictor import Predictor

from .conftest import SHARED_REFERENCE

EMB_ATOL = 5e-4
IOU_ATOL = 1e-3
LOWRES_ATOL = 2e-2
MAX_MASK_PIXELS = 25

MOBILE_FILES = ["mobilesam_astronaut.npz", "mobilesam_coffee.npz", "mobilesam_bike_trial.npz"]
needs_shared = pytest.mark.skipif(
    not (SHARED_REFERENCE / "index.json").exists(), reason="../shared/reference not present"
)


def unpack(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def check(out, z, key: str, width: int) -> None:
    ref_masks = unpack(z[f"{key}_masks"], width)
    assert out.masks.shape == ref_masks.shape
    np.testing.assert_allclose(out.scores, z[f"{key}_iou"], atol=IOU_ATOL)
    np.testing.assert_allclose(
        out.low_res_logits, z[f"{key}_lowres"].astype(np.float32), atol=LOWRES_ATOL
    )
    flat_ours = out.masks.reshape(-1, *out.masks.shape[-2:])
    flat_ref = ref_masks.reshape(-1, *ref_masks.shape[-2:])
    for ours, ref in zip(flat_ours, flat_ref):
        diff = int((ours != ref).sum())
        assert diff <= MAX_MASK_PIXELS and diff <= max(1, 0.001 * ref.sum()), (key, diff)


def run_case(p: Predictor, case: dict, z) -> object:
    get = lambda k: np.asarray(case[k]) if k in case else None  # noqa: E731
    mask_input = z["refine_mask_input"] if "mask_input" in case else None
    return p.predict(
        point_coords=get("point_coords"),
        point_labels=get("point_labels"),
        box=get("box"),
        mask_input=mask_input,
        multimask_output=case["multimask_output"],
    )


def check_goldens(p: Predictor, fname: str) -> None:
    """Every recorded case of the golden ``fname`` (clicks, boxes, the refinement with a
    mask input, the batch of boxes) through ``p``, within the tolerances above."""
    index = json.loads((SHARED_REFERENCE / "index.json").read_text())[fname]
    z = np.load(SHARED_REFERENCE / fname)
    p.set_image(z["image"])
    np.testing.assert_allclose(p.embedding.numpy(), z["embedding"], atol=EMB_ATOL)
    width = z["image"].shape[1]
    for key, case in index["cases"].items():
        check(run_case(p, case, z), z, key, width)
    check(run_case(p, index["refine"], z), z, "refine", width)
    batch = p.predict_batch(boxes=z["batch_boxes"], multimask_output=True)
    check(batch, z, "batch", width)
