"""Evaluation: click sampler, metrics, protocols end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segany import masks as M
from segany.cli import main
from segany.eval import clicks as C
from segany.eval import metrics as MT
from segany.eval import protocols as P
from segany.predictor import Predictor

from .conftest import tiny_sam


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's small ops run fastest on one thread (and far faster on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- clicks ----------------------------------------------------------------------------------
def _rect(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_first_click_is_the_centre_of_a_rectangle():
    gt = _rect(20, 30, 5, 12, 10, 17)  # 7 x 7: centre row 8, column 13
    c = C.first_click(gt)
    assert (c.x, c.y, c.positive, c.label) == (13, 8, True, 1)
    # 7 x 11: columns 13..17 of row 8 tie at distance 4; argmax takes the first
    c = C.first_click(_rect(20, 30, 5, 12, 10, 21))
    assert (c.x, c.y) == (13, 8)


def test_first_click_farthest_from_boundary_of_an_l_shape():
    gt = np.zeros((30, 30), dtype=bool)
    gt[2:28, 2:8] = True  # a thin vertical bar (half-width 3)
    gt[18:28, 2:28] = True  # a thick foot (10 rows): its middle is deepest
    c = C.first_click(gt)
    assert gt[c.y, c.x]
    dist = cv2.distanceTransform(np.pad(gt.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    assert dist[c.y, c.x] == dist.max()
    assert 18 <= c.y < 28  # in the foot
    yy, xx = np.mgrid[:41, :41]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 400) & ((yy - 20) ** 2 + (xx - 20) ** 2 >= 144)
    c = C.first_click(ring)  # the centroid lies outside a ring; the click does not
    assert ring[c.y, c.x] and 12 <= np.hypot(c.y - 20, c.x - 20) <= 20


def test_image_border_counts_as_boundary():
    gt = np.ones((11, 11), dtype=bool)  # the whole image: its centre, not a corner
    c = C.first_click(gt)
    assert (c.x, c.y) == (5, 5)
    c = C.first_click(_rect(11, 11, 0, 11, 0, 5))  # touching the left border
    assert c.x == 2  # without the padding the border column would be deepest


def test_cropped_transform_equals_the_whole_image_transform():
    rng = np.random.default_rng(1)
    for _ in range(20):
        blob = cv2.GaussianBlur(rng.random((40, 50)), (0, 0), 3) > 0.5
        found = C.farthest_point(blob)
        if found is None:
            continue
        dist = C.distance_to_boundary(blob)
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        assert found[:2] == (x, y) and found[2] == pytest.approx(dist.max())


def test_next_click_positive_in_missed_part():
    gt = _rect(20, 40, 4, 16, 4, 36)
    pred = _rect(20, 40, 4, 16, 4, 20)  # right half missed
    c = C.next_click(gt, pred)
    assert c is not None and c.positive and c.label == 1
    assert gt[c.y, c.x] and not pred[c.y, c.x]
    assert (c.x, c.y) == (25, 9)  # first of the deepest pixels of the missed 12x16 block


def test_next_click_negative_in_false_part():
    gt = _rect(30, 30, 5, 15, 5, 15)
    pred = gt | _rect(30, 30, 18, 28, 18, 28)  # a false blob elsewhere
    c = C.next_click(gt, pred)
    assert c is not None and not c.positive and c.label == 0
    assert pred[c.y, c.x] and not gt[c.y, c.x]
    assert 21 <= c.y <= 23 and 21 <= c.x <= 23


def test_next_click_picks_the_deeper_error_and_none_when_exact():
    gt = _rect(40, 40, 0, 20, 0, 40)
    pred = _rect(40, 40, 2, 20, 0, 40) | _rect(40, 40, 25, 39, 5, 35)  # thin miss, big false
    c = C.next_click(gt, pred)
    assert c is not None and not c.positive
    assert C.next_click(gt, gt) is None


def test_random_clicks_are_seeded_and_in_the_right_region():
    gt = _rect(20, 20, 2, 12, 2, 12)
    pred = _rect(20, 20, 2, 12, 2, 6)
    a, b = C.ClickSampler("random", seed=3), C.ClickSampler("random", seed=3)
    for _ in range(5):
        ca, cb = a.first(gt), b.first(gt)
        assert ca == cb and gt[ca.y, ca.x]
        na = a.next(gt, pred)
        assert na == b.next(gt, pred) and na.positive and gt[na.y, na.x] and not pred[na.y, na.x]
    with pytest.raises(ValueError):
        C.ClickSampler("nearest")
    with pytest.raises(ValueError):
        C.first_click(np.zeros((4, 4), dtype=bool))


# -- metrics ---------------------------------------------------------------------------------
def test_iou_on_hand_computed_cases():
    a = _rect(10, 10, 0, 4, 0, 4)  # 16 px
    b = _rect(10, 10, 2, 6, 2, 6)  # 16 px, overlap 4 -> 4 / 28
    assert MT.mask_iou(a, b) == pytest.approx(4 / 28)
    assert MT.mask_iou(a, a) == 1.0
    assert MT.mask_iou(a, ~a) == 0.0
    empty = np.zeros((10, 10), dtype=bool)
    assert MT.mask_iou(empty, empty) == 1.0
    assert MT.mask_iou(a, empty) == 0.0
    cand = np.stack([a, b, empty])[None]  # (1, 3, H, W) against (1, 1, H, W)
    np.testing.assert_allclose(MT.batch_iou(cand, a[None, None]), [[1.0, 4 / 28, 0.0]])
    with pytest.raises(ValueError):
        MT.mask_iou(a, a[:5])


def test_miou_sizes_and_noc():
    assert MT.miou([0.5, 1.0]) == pytest.approx(75.0)
    assert np.isnan(MT.miou([]))
    assert [MT.size_class(a) for a in (1023, 1024, 9215, 9216)] == [
        "small",
        "medium",
        "medium",
        "large",
    ]
    by = MT.miou_by_size([0.2, 0.4, 0.9], [100, 2000, 20000])
    assert by["small"] == {"miou": pytest.approx(20.0), "masks": 1}
    assert by["large"]["miou"] == pytest.approx(90.0)
    ious = np.array([[0.5, 0.86, 0.95], [0.9, 0.9, 0.9], [0.1, 0.2, 0.3]])
    assert MT.noc(ious, 0.85) == pytest.approx((2 + 1 + 3) / 3)
    assert MT.noc(ious, 0.90, max_clicks=20) == pytest.approx((3 + 1 + 20) / 3)
    assert MT.fraction_above([0.4, 0.5, 0.8, 1.0], 0.5) == pytest.approx(75.0)


def test_box_jitter():
    boxes = np.array([[10.0, 20.0, 110.0, 70.0]])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(P.jitter_boxes(boxes, rng, 0.0), boxes)
    moved = P.jitter_boxes(np.repeat(boxes, 50, 0), rng, 0.5, max_shift=5, size=(80, 200))
    assert np.abs(moved - boxes).max() <= 5 + 1e-9 and (moved != boxes).any()
    assert (moved[:, 3] <= 80).all() and (moved[:, 0] <= moved[:, 2]).all()
    edge = P.jitter_boxes(np.array([[99.5, 10, 100, 11.0]] * 20), rng, 5.0, size=(60, 100))
    assert (edge[:, 2] - edge[:, 0] >= 1 - 1e-9).all() and (edge[:, 2] <= 100).all()
    np.testing.assert_array_equal(M.xywh_to_xyxy([1, 2, 3, 4]), [1, 2, 4, 6])
    np.testing.assert_array_equal(P.box_from_mask(_rect(9, 9, 2, 5, 1, 4)), [1, 2, 4, 5])


# -- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two images with three objects: RLE (compressed), polygon and uncompressed RLE."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    shapes = [
        [(8, 40, 10, 50), (50, 80, 60, 110)],
        [(20, 70, 30, 90)],
    ]
    for i, rects in enumerate(shapes, start=1):
        h, w = 96, 128
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for r0, r1, c0, c1 in rects:
            img[r0:r1, c0:c1] = (220, 200, 30)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": w, "height": h})
        for r0, r1, c0, c1 in rects:
            m = _rect(h, w, r0, r1, c0, c1)
            k = len(anns)
            if k == 1:
                seg = [[c0, r0, c1, r0, c1, r1, c0, r1]]
            elif k == 2:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                runs = mask_utils.decode(rle).T.reshape(-1)  # uncompressed: column-major runs
                change = np.flatnonzero(np.diff(runs)) + 1
                bounds = [0, *change.tolist(), runs.size]
                seg = {"size": [h, w], "counts": np.diff(bounds).tolist()}
            else:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                seg = {"size": [h, w], "counts": rle["counts"].decode()}
            anns.append(
                {
                    "id": k + 1,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": seg,
                    "area": int(m.sum()),
                    "bbox": [c0, r0, c1 - c0, r1 - r0],
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        path = d / f"tiny{seed}.pt"
        torch.save(tiny_sam(seed).state_dict(), path)
        paths.append(str(path))
    return paths


def test_dataset_decodes_every_segmentation_kind(dataset):
    ds = P.CocoDataset(dataset)
    assert len(ds) == 2 and ds.name == dataset.name
    got = [
        (im.image_id, gts.shape, [int(g.sum()) for g in gts])
        for im, _, _, gts in ds.iter_images(ds.images)
    ]
    assert got == [(1, (2, 96, 128), [32 * 40, 30 * 50]), (2, (1, 96, 128), [50 * 60])]
    with pytest.raises(P.DatasetError):
        P.CocoDataset(dataset / "missing")


def test_click_image_records_clicks_and_feedback(dataset):
    ds = P.CocoDataset(dataset)
    pred = Predictor(tiny_sam())
    im, rgb, _, gts = next(ds.iter_images(ds.images))
    pred.set_image(rgb)
    r = P.click_image(pred, gts, max_clicks=3, batch_size=1)
    assert r["iou"].shape == (2, 3) and r["clicks"].shape == (2, 3, 3)
    np.testing.assert_allclose(r["oracle_iou_1"], r["ious_1"].max(1))
    assert (r["oracle_iou_1"] >= r["iou"][:, 0] - 1e-12).all()
    first = r["clicks"][:, 0]
    assert (first[:, 2] == 1).all() and all(gts[i, y, x] for i, (x, y, _) in enumerate(first))
    # batching does not change the result
    again = P.click_image(pred, gts, max_clicks=3, batch_size=16)
    np.testing.assert_allclose(again["iou"], r["iou"], atol=1e-6)


def test_cli_points_two_models(dataset, checkpoints, tmp_path, capsys):
    out = tmp_path / "points"
    argv = ["eval", "points", str(dataset), "--out", str(out), "--max-clicks", "3"]
    argv += ["--model", checkpoints[0], "--model", checkpoints[1]]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["models"] == ["tiny0", "tiny1"] and len(res["runs"]) == 2
    run = res["runs"][0]
    assert run["dataset"] == dataset.name and run["masks"] == 3
    assert set(run["miou"]) == {"1", "2", "3"} and run["oracle_miou_1"] >= run["miou"]["1"]
    assert run["seconds"] > 0
    for name in ("report.md", "miou_vs_clicks.png", "iou_hist.png", "per_mask.json"):
        assert (out / name).is_file()
    report = (out / "report.md").read_text()
    assert "| tiny0 |" in report and "| tiny1 |" in report and "segany eval points" in report
    assert Image.open(out / "miou_vs_clicks.png").size[0] > 100


def test_cli_points_single_model_flat_results(dataset, checkpoints, tmp_path):
    out = tmp_path / "one"
    argv = ["eval", "points", str(dataset), "--model", checkpoints[0], "--out", str(out)]
    assert main([*argv, "--max-clicks", "2", "--clicks", "random", "--limit", "1", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"dataset", "model", "masks", "miou", "oracle_miou_1"} <= set(res)
    assert res["model"] == "tiny0" and res["masks"] == 2 and res["seed"] == 0


def test_cli_boxes_proposals_instances(dataset, checkpoints, tmp_path):
    base = [str(dataset), "--model", checkpoints[0], "--quiet"]
    assert main(["eval", "boxes", *base, "--out", str(tmp_path / "b"), "--jitter", "0.1"]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["masks"] == 3 and res["jitter"] == 0.1
    # the command's figure is the library's on the same model (as the CLI loads it)
    from segany.loader import load_predictor

    lib = P.run_boxes(load_predictor(checkpoints[0], progress=False), P.CocoDataset(dataset),
                      jitter=0.1)  # fmt: skip
    assert res["miou"] == pytest.approx(lib["miou"], abs=1e-6)
    assert sum(v["masks"] for v in res["miou_by_size"].values()) == 3
    assert (tmp_path / "b" / "iou_hist.png").is_file()

    argv = ["eval", "proposals", *base, "--out", str(tmp_path / "p"), "--points-per-side", "4"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["preset"] == "reference" and res["settings"]["points_per_side"] == 4
    assert {"ar_10", "ar_100", "ar_1000", "ar_small", "ar_medium", "ar_large"} <= set(res)
    assert (tmp_path / "p" / "recall_vs_iou.png").is_file()

    assert main(["eval", "instances", *base, "--out", str(tmp_path / "i"), "--boxes", "gt"]) == 0
    res = json.loads((tmp_path / "i" / "results.json").read_text())
    assert res["detections"] == 3 and res["box_ap"] == pytest.approx(100.0)
    lib = P.run_instances(
        load_predictor(checkpoints[0], progress=False),
        P.CocoDataset(dataset),
        P.load_detections("gt", P.CocoDataset(dataset)),
    )
    assert res["mask_ap"] == pytest.approx(lib["mask_ap"], abs=1e-6)


def test_proposals_recall_with_every_mask_kept(dataset):
    ds = P.CocoDataset(dataset)
    keep_all = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "points_per_side": 4}
    res = P.run_proposals(Predictor(tiny_sam()), ds, overrides=keep_all)
    assert res["proposals"] > 0 and res["masks"] == 3
    assert 0 <= res["ar_1000"] <= 100 and res["ar_10"] <= res["ar_100"] <= res["ar_1000"]
    assert 0 <= res["best_proposal_miou"] <= 100
    assert len(res["recall_vs_iou"]["iou"]) == 10
    assert sum(r["proposals"] for r in res["per_image"]) == res["proposals"]


def test_detections_file_is_filtered(dataset, tmp_path):
    ds = P.CocoDataset(dataset)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 8, 40, 32], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.1},
        {"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    got = P.load_detections(path, ds, score_thresh=0.5)
    assert got == [{"image_id": 1, "category_id": 1, "bbox": [10.0, 8.0, 40.0, 32.0], "score": 0.9}]
    res = P.run_instances(Predictor(tiny_sam()), ds, got, boxes_source=str(path))
    assert res["detections"] == 1 and res["masks"] == 3


def test_cli_errors(dataset, tmp_path, capsys):
    assert main(["eval", "points", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "data source not found" in capsys.readouterr().err
    bad = tmp_path / "dets.json"
    bad.write_text('{"not": "a list"}')
    argv = ["eval", "instances", str(dataset), "--out", str(tmp_path), "--boxes", str(bad)]
    assert main(argv) == 2
    assert "expected a COCO results list" in capsys.readouterr().err
