"""Pure mask helpers: grids, crops, stability, NMS, boxes, RLE, cleanup, polygons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany import masks as M


def test_point_grid():
    g = M.point_grid(4)
    assert g.shape == (16, 2)
    np.testing.assert_allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(g[::4, 1], [0.125, 0.375, 0.625, 0.875])
    assert (g[:4, 1] == 0.125).all()  # row-major: x varies fastest
    assert [len(x) for x in M.layer_point_grids(16, 2, 2)] == [256, 64, 16]
    with pytest.raises(ValueError):
        M.point_grid(0)


def test_crop_boxes():
    boxes, layers = M.crop_boxes((400, 600), 1, 512 / 1500)
    assert boxes[0] == [0, 0, 600, 400] and layers == [0, 1, 1, 1, 1]
    for x0, y0, x1, y1 in boxes[1:]:
        assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 400
    # the four crops cover the image and overlap
    assert min(b[0] for b in boxes[1:]) == 0 and max(b[2] for b in boxes[1:]) == 600
    assert boxes[1][2] > boxes[3][0]
    boxes2, layers2 = M.crop_boxes((100, 100), 2, 0.3)
    assert layers2.count(2) == 16


def test_stability_score():
    logits = torch.zeros(2, 10, 10) - 5
    logits[0, 2:8, 2:8] = 5  # crisp: stable
    logits[1, 2:8, 2:8] = 0.5  # soft interior: only in the low threshold mask
    logits[1, 4:6, 4:6] = 5
    s = M.stability_score(logits, 0.0, 1.0)
    assert s[0] == 1.0
    assert s[1] == pytest.approx(4 / 36)


def _greedy(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    iou = M.box_iou(boxes, boxes)
    keep = []
    for i in order:
        if all(iou[i, j] <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_matches_greedy():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 60
        xy = torch.rand(n, 2, generator=g) * 50
        wh = torch.rand(n, 2, generator=g) * 30 + 1
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(n, generator=g)
        assert M.nms(boxes, scores, 0.5).tolist() == _greedy(boxes, scores, 0.5)
    assert M.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_batched_nms_groups_do_not_interact():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert M.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert M.nms(boxes, scores, 0.5).tolist() == [0]


def test_masks_to_boxes():
    m = torch.zeros(3, 8, 9, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    m[1, 0, 0] = True
    assert M.masks_to_boxes(m).tolist() == [[3, 2, 6, 4], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert M.masks_to_boxes(m[None]).shape == (1, 3, 4)


def test_box_near_crop_edge():
    boxes = torch.tensor([[0, 0, 50, 50], [100, 10, 150, 60], [150, 10, 195, 60]])
    near = M.box_near_crop_edge(boxes, [0, 0, 200, 200], [0, 0, 400, 400])
    assert near.tolist() == [False, False, True]


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 13, 17)) > 0.6
    masks[1] = True
    masks[2] = False
    rles = M.masks_to_rle(masks)
    for m, r in zip(masks, rles, strict=True):
        np.testing.assert_array_equal(M.rle_to_mask(r), m)
        assert M.rle_area(r) == m.sum()
        coco = M.uncompressed_to_coco_rle(r)
        np.testing.assert_array_equal(mask_utils.decode({**coco, "counts": coco["counts"]}), m)
    cocos = M.masks_to_coco_rle(masks)
    for m, c in zip(masks, cocos, strict=True):
        assert isinstance(c["counts"], str)
        np.testing.assert_array_equal(M.rle_to_mask(c), m)
        assert M.rle_area(c) == m.sum()
    assert rles[1]["counts"][0] == 0  # starts with an (empty) run of zeros
    assert M.mask_iou_matrix(rles, cocos).diagonal()[[0, 1, 3]].tolist() == [1.0, 1.0, 1.0]


def test_remove_small_regions():
    m = np.zeros((40, 40), bool)
    m[5:30, 5:30] = True
    m[10:12, 10:12] = False  # small hole
    m[35:37, 35:37] = True  # small island
    out, changed = M.remove_small_regions(m, 10, "holes")
    assert changed and out[10:12, 10:12].all() and out[35:37, 35:37].all()
    out, changed = M.remove_small_regions(out, 10, "islands")
    assert changed and not out[35:37, 35:37].any() and out[5:30, 5:30].all()
    same, changed = M.remove_small_regions(out, 10, "holes")
    assert not changed
    tiny = np.zeros((10, 10), bool)
    tiny[1, 1] = tiny[5:7, 5:7] = True
    kept, _ = M.remove_small_regions(tiny, 100, "islands")  # all small: keep the largest
    assert kept.sum() == 4
    cleaned, changed = M.clean_mask(m, 10)
    assert changed and cleaned.sum() == 25 * 25


def test_polygons():
    m = np.zeros((30, 30), bool)
    m[5:15, 5:25] = True
    m[20:25, 20:25] = True
    polys = M.mask_to_polygons(m)
    assert len(polys) == 2 and polys[0].shape[1] == 2
    assert polys[0][:, 0].min() == 5 and polys[0][:, 0].max() == 24


def test_cover_fraction():
    m = torch.zeros(3, 10, 10, dtype=torch.bool)
    m[0, :5, :4] = True  # 20 px
    m[1, :5, 2:6] = True  # 20 px, overlapping 10 of them
    m[2] = True  # the whole frame
    assert M.cover_fraction(m[:2]) == pytest.approx(0.30)
    assert M.cover_fraction(m) == pytest.approx(1.0)
    assert M.cover_fraction(m, max_fraction=0.95) == pytest.approx(0.30)  # frame mask left out
    assert M.cover_fraction(m[2:], max_fraction=0.95) == 0.0
    assert M.cover_fraction(m[:0]) == 0.0
