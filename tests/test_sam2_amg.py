"""``segany.compat.SAM2AutomaticMaskGenerator`` against the reference generator
(``sam2==1.1.0``) on the same random weights.

``tests/data/sam2_amg_tiny_golden.json.gz`` is made by ``benchmarks/make_sam2_amg_golden.py``
(reference python): the reduced SAM 2.1 of ``sam2_tiny_test_golden.npz`` (whose weights and
photos are in that file), six runs of the reference generator with small grids (every mask;
filters and NMS at work; ``use_m2m`` with and without filters; ``multimask_output=False``;
one crop layer). Random weights give logits of magnitude ~0.1 and predicted IoUs near 0.5,
so the runs lower the thresholds (and the stability offset to 0.01) to keep masks.

Tolerances: the same number of records in the same order; per record mask IoU >= 0.999
(measured: 1.0, every mask bit-equal), ``predicted_iou`` within 1e-5 (measured 1.2e-7),
``stability_score`` within 1e-4 (measured 0), points within 1e-4 (the reference's are
float32), box and crop box equal.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from segany import compat
from segany.masks import rle_to_mask

from .conftest import SAM2_GOLDEN, TEST_DATA

AMG_GOLDEN = TEST_DATA / "sam2_amg_tiny_golden.json.gz"
MASK_IOU_MIN = 0.999
IOU_ATOL = 1e-5
STABILITY_ATOL = 1e-4


def _golden() -> dict:
    with gzip.open(AMG_GOLDEN, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    z = np.load(SAM2_GOLDEN)
    return [z["image0"], z["image1"]]


@pytest.mark.parametrize("run", sorted(_golden()["runs"]))
def test_generator_matches_reference(run, tiny_sam2, images):
    spec = _golden()["runs"][run]
    gen = compat.SAM2AutomaticMaskGenerator(tiny_sam2, output_mode="coco_rle", **spec["options"])
    ours, ref = gen.generate(images[spec["image"]]), spec["records"]
    assert len(ref) > 0 and len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert set(a) == set(b)
        ma, mb = rle_to_mask(a["segmentation"]), rle_to_mask(b["segmentation"])
        assert (ma & mb).sum() / max((ma | mb).sum(), 1) >= MASK_IOU_MIN
        assert a["area"] == pytest.approx(b["area"], rel=1e-3)
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=IOU_ATOL)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=STABILITY_ATOL)
        # (the reference's points are float32, ours float64)
        np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-4)
        assert a["bbox"] == b["bbox"] and a["crop_box"] == b["crop_box"]


def test_m2m_changes_the_masks_as_the_reference_does():
    """The golden's m2m run differs from the plain run on the same grid (so matching both
    needs the refinement), and a refined mask's IoU is the refinement's."""
    runs = _golden()["runs"]
    plain = {tuple(r["point_coords"][0]): r for r in runs["all_masks"]["records"]}
    refined = runs["m2m"]["records"]
    assert runs["m2m"]["options"]["use_m2m"] and not runs["all_masks"]["options"].get("use_m2m")
    assert {tuple(r["point_coords"][0]) for r in refined} == set(plain)
    assert sorted(r["predicted_iou"] for r in refined) != sorted(
        r["predicted_iou"] for r in runs["all_masks"]["records"]
    )


def test_output_modes_and_options(tiny_sam2, images):
    opts = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    by_mode = {
        mode: compat.SAM2AutomaticMaskGenerator(tiny_sam2, output_mode=mode, **opts).generate(
            images[0]
        )
        for mode in ("binary_mask", "uncompressed_rle", "coco_rle")
    }
    n = len(by_mode["coco_rle"])
    assert n > 0 and all(len(v) == n for v in by_mode.values())
    for b, u, c in zip(*by_mode.values(), strict=True):
        assert b["segmentation"].dtype == bool and b["segmentation"].shape == (112, 200)
        assert isinstance(c["segmentation"]["counts"], str)
        assert isinstance(u["segmentation"]["counts"], list)
        np.testing.assert_array_equal(rle_to_mask(u["segmentation"]), b["segmentation"])
        np.testing.assert_array_equal(rle_to_mask(c["segmentation"]), b["segmentation"])
        assert b["area"] == int(b["segmentation"].sum())
    gen = compat.SAM2AutomaticMaskGenerator(tiny_sam2)
    assert gen.point_grids[0].shape == (32 * 32, 2) and not gen.use_m2m and gen.multimask_output
    assert gen._gen.settings.pred_iou_thresh == 0.8
    grid = [np.array([[0.5, 0.5], [0.25, 0.75]])]
    gen = compat.SAM2AutomaticMaskGenerator(
        tiny_sam2, points_per_side=None, point_grids=grid, pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )  # fmt: skip
    assert {tuple(r["point_coords"][0]) for r in gen.generate(images[0])} <= {
        (100.0, 56.0),
        (50.0, 84.0),
    }
    with pytest.raises(ValueError, match="exactly one"):
        compat.SAM2AutomaticMaskGenerator(tiny_sam2, points_per_side=None)
    with pytest.raises(ValueError, match="mask_threshold"):
        compat.SAM2AutomaticMaskGenerator(tiny_sam2, mask_threshold=0.5)
    with pytest.warns(UserWarning, match="skipped"):
        compat.SAM2AutomaticMaskGenerator(tiny_sam2, min_mask_region_area=20)
