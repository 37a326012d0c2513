"""The eval protocols' answers pinned: a predictor answering every prompt with its ground
truth mask scores mIoU 100, NoC 1, AR 100 and mask AP 100; one answering with empty masks
scores 0 and needs the click cap. Both plug in through the runners' public parameters (a
:class:`~segany.predictor.Predictor` subclass, a proposal ``generator``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segany import masks as M
from segany.eval import protocols as P
from segany.predictor import Prediction, Predictor, image_key

from .conftest import tiny_sam

MAX_CLICKS = 5


def _write_dataset(root: Path) -> Path:
    """Two noise images with non-overlapping objects, small (< 32^2 px) and medium, as COCO
    RLE with pycocotools' areas and boxes."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    shapes = {
        1: [(4, 6, 10, 8), (30, 40, 70, 70), (70, 10, 90, 30)],  # x0, y0, x1, y1 (exclusive)
        2: [(10, 10, 14, 30), ("disk", 60, 50, 12)],
    }
    (root / "images").mkdir(parents=True)
    for image_id, objs in shapes.items():
        h, w = 96, 128
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"{image_id}.png"
        )
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for obj in objs:
            m = np.zeros((h, w), np.uint8)
            if obj[0] == "disk":
                _, cx, cy, r = obj
                yy, xx = np.mgrid[:h, :w]
                m[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 1
            else:
                x0, y0, x1, y1 = obj
                m[y0:y1, x0:x1] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                }
            )
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> P.CocoDataset:
    return P.CocoDataset(_write_dataset(tmp_path_factory.mktemp("oracle")))


@pytest.fixture(scope="module")
def truth(dataset) -> dict[str, np.ndarray]:
    """image content key -> its ground-truth masks ``(M, H, W)``."""
    return {image_key(rgb): gts for _, rgb, _, gts in dataset.iter_images(dataset.images)}


class AnswerPredictor(Predictor):
    """Answers every prompt with the ground-truth mask it points at (the mask under the first
    positive click, or the mask whose tight box is the prompt box); ``empty``: with empty
    masks. The model (a tiny one) only embeds, as any predictor does."""

    def __init__(self, truth: dict[str, np.ndarray], *, empty: bool = False) -> None:
        super().__init__(tiny_sam())
        self.truth, self.empty = truth, empty
        self.gts = np.zeros((0, 1, 1), bool)

    def set_image(self, image):
        out = super().set_image(image)
        self.gts = self.truth[image_key(np.asarray(image))]
        return out

    def _target(self, coords=None, labels=None, box=None) -> np.ndarray:
        if self.empty:
            return np.zeros(self.gts.shape[1:], bool)
        if box is not None:
            hits = [g for g in self.gts if np.allclose(P.box_from_mask(g), box)]
        else:
            x, y = coords[list(labels).index(1)]
            hits = [g for g in self.gts if g[int(round(y)), int(round(x))]]
        assert len(hits) == 1, "the prompt names no single object"
        return hits[0]

    def predict_batch(
        self, *, point_coords=None, point_labels=None, boxes=None, mask_input=None,
        multimask_output=True, return_logits=False,
    ) -> Prediction:  # fmt: skip
        if boxes is not None:
            targets = [self._target(box=b) for b in boxes]
        else:
            targets = [self._target(c, lab) for c, lab in zip(point_coords, point_labels)]
        k = 3 if multimask_output else 1
        masks = np.repeat(np.stack(targets)[:, None], k, axis=1)
        side = self.model.prompt_encoder.mask_input_size
        return Prediction(
            masks, np.ones((len(targets), k)), np.zeros((len(targets), k, *side), np.float32)
        )


class AnswerGenerator:
    """Proposes exactly the ground-truth masks of each image (``empty``: nothing)."""

    def __init__(self, truth: dict[str, np.ndarray], *, empty: bool = False) -> None:
        self.truth, self.empty = truth, empty

    def generate(self, rgb: np.ndarray) -> list[dict]:
        gts = self.truth[image_key(rgb)]
        if self.empty:
            return []
        return [{"segmentation": r, "predicted_iou": 1.0} for r in M.masks_to_coco_rle(gts)]


def test_the_dataset_has_small_and_medium_objects(dataset):
    sizes = {P.MT.size_class(a["area"]) for a in dataset.coco.dataset["annotations"]}
    assert sizes == {"small", "medium"} and dataset.count_masks(dataset.images) == 5


def test_points_oracle_and_empty(dataset, truth):
    r = P.run_points(AnswerPredictor(truth), dataset, max_clicks=MAX_CLICKS)
    assert r["masks"] == 5
    assert r["miou_per_click"] == [100.0] * MAX_CLICKS and r["oracle_miou_1"] == 100.0
    assert r["noc85"] == 1.0 and r["noc90"] == 1.0
    by_size = {k: (v["miou"], v["masks"]) for k, v in r["miou_by_size_1"].items()}
    assert by_size == {"small": (100.0, 4), "medium": (100.0, 1), "large": (None, 0)}
    e = P.run_points(AnswerPredictor(truth, empty=True), dataset, max_clicks=MAX_CLICKS)
    assert e["miou_per_click"] == [0.0] * MAX_CLICKS and e["oracle_miou_1"] == 0.0
    assert e["noc85"] == MAX_CLICKS and e["noc90"] == MAX_CLICKS  # never reached: the cap
    # every later click of the empty answers is a positive click inside the object
    clicks = [c for m in e["per_mask"] for c in m["clicks"]]
    assert len(clicks) == 5 * MAX_CLICKS and all(c[2] == 1 for c in clicks)


def test_boxes_oracle_and_empty(dataset, truth):
    r = P.run_boxes(AnswerPredictor(truth), dataset)
    assert r["miou"] == 100.0 and r["iou_above_90"] == 100.0 and r["masks"] == 5
    e = P.run_boxes(AnswerPredictor(truth, empty=True), dataset)
    assert e["miou"] == 0.0 and e["iou_above_50"] == 0.0


def test_proposals_oracle_and_empty(dataset, truth):
    predictor = AnswerPredictor(truth)
    r = P.run_proposals(predictor, dataset, generator=AnswerGenerator(truth))
    assert r["preset"] == "custom" and r["proposals"] == 5
    assert [r[k] for k in ("ar_10", "ar_100", "ar_1000", "ar_small", "ar_medium")] == [100.0] * 5
    assert r["ar_large"] is None  # no large object: undefined, not 0
    assert r["best_proposal_miou"] == 100.0
    e = P.run_proposals(predictor, dataset, generator=AnswerGenerator(truth, empty=True))
    assert e["proposals"] == 0
    assert [e[k] for k in ("ar_10", "ar_100", "ar_1000", "ar_small", "ar_medium")] == [0.0] * 5
    assert e["best_proposal_miou"] == 0.0


def test_instances_oracle_and_empty(dataset, truth):
    dets = P.load_detections("gt", dataset)
    r = P.run_instances(AnswerPredictor(truth), dataset, dets)
    assert r["mask_ap"] == 100.0 and r["box_ap"] == 100.0
    e = P.run_instances(AnswerPredictor(truth, empty=True), dataset, dets)
    assert e["mask_ap"] == 0.0 and e["box_ap"] == 100.0  # the boxes were right, the masks not
