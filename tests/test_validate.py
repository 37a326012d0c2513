"""The validation layer: every malformed segmentation or number is refused before pycocotools."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segany import masks as M
from segany import validate as V


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    out = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 6)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            out[i, y : y + rng.integers(1, h), x : x + rng.integers(1, w)] ^= True
    out[1] = True  # one full mask (a run of zeros of length 0 first)
    return out


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 12, 37, 53)
    compressed = M.masks_to_coco_rle(masks)
    plain = M.masks_to_rle(masks)
    for c, p in zip(compressed, plain, strict=True):
        runs = V.decode_rle_string(c["counts"])
        assert runs.tolist() == p["counts"]
    # large runs (several 5-bit groups) and the delta coding of runs 3 onwards
    big = np.zeros((1, 1000, 1000), dtype=bool)
    big[0, 10:900, 300:700] = True
    (c,) = M.masks_to_coco_rle(big)
    assert V.decode_rle_string(c["counts"]).tolist() == M.masks_to_rle(big)[0]["counts"]


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ("", "runs sum to 0"),
        ("1", "runs sum to 1"),
        ("0c0", "runs sum to"),  # 0, 51, 0: short
        ("zz", "outside the COCO RLE alphabet"),
        ("P", "ends in the middle of a run"),  # 'P' = 48 + 32: continuation bit set
        ("0@", "negative run length"),  # "@" = 48 + 16: one group with the sign bit
    ],
)
def test_bad_compressed_rle_refused(counts, message):
    with pytest.raises(V.InputError, match=message):
        V.segmentation_to_rle({"size": [4, 5], "counts": counts}, 4, 5)


def test_compressed_rle_with_too_many_pixels_refused():
    (c,) = M.masks_to_coco_rle(np.ones((1, 8, 8), dtype=bool))
    with pytest.raises(V.InputError, match="runs sum to 64, expected height \\* width = 16"):
        V.segmentation_to_rle({"size": [4, 4], "counts": c["counts"]})


def test_rle_size_must_match_the_image():
    (c,) = M.masks_to_coco_rle(np.ones((1, 8, 8), dtype=bool))
    with pytest.raises(V.InputError, match="does not match the image"):
        V.segmentation_to_rle(c, 8, 9)
    with pytest.raises(V.InputError, match="size must be"):
        V.segmentation_to_rle({"size": [8], "counts": c["counts"]})
    with pytest.raises(V.InputError, match="height must be between 1"):
        V.segmentation_to_rle({"size": [0, 8], "counts": c["counts"]})


def test_good_segmentations_decode_as_pycocotools_does():
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, 5, 20, 30)
    for m, c, p in zip(masks, M.masks_to_coco_rle(masks), M.masks_to_rle(masks), strict=True):
        assert np.array_equal(V.segmentation_to_mask(c, 20, 30), m)
        assert np.array_equal(V.segmentation_to_mask(p), m)
        assert np.array_equal(V.segmentation_to_mask({**c, "counts": c["counts"].encode()}), m)
    poly = [[2.0, 2.0, 20.0, 2.0, 20.0, 15.0, 2.0, 15.0]]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 20, 30)))
    assert np.array_equal(V.segmentation_to_mask(poly, 20, 30), expected.astype(bool))
    assert V.segmentation_to_mask([], 20, 30).shape == (20, 30)
    assert not V.segmentation_to_mask([], 20, 30).any()


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        ([[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]], "NaN or infinity"),
        ([[1.0, 2.0, float("inf"), 4.0, 5.0, 6.0]], "NaN or infinity"),
        ([[1.0, 2.0, 1e9, 4.0, 5.0, 6.0]], "far outside the 30x20 image"),
        ([[1.0, 2.0, 3.0]], "has 3 numbers"),
        ([[1.0, 2.0, 3.0, 4.0]], "has 4 numbers"),  # pycocotools would read it as a box
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "must be a list of polygons"),
        ([[1, 2, "3", 4, 5, 6]], "not a number"),
        ([[1, 2, True, 4, 5, 6]], "not a number"),
        ({"size": [20, 30], "counts": [1, -1, 600]}, "outside 0..600"),
        ({"size": [20, 30], "counts": [1, 2]}, "runs sum to 3"),
        ({"size": [20, 30], "counts": [1.5, 598.5]}, "must be integers"),
        ({"size": [20, 30], "counts": [10**30]}, "outside 0..600"),
        ({"size": [20, 30]}, "counts must be"),
        ("abc", "must be polygons or an RLE dict"),
    ],
)
def test_bad_segmentations_refused(seg, message):
    with pytest.raises(V.InputError, match=message):
        V.segmentation_to_rle(seg, 20, 30)


def test_polygon_path_bounded():
    zigzag = [[float(v) for v in np.tile([0, 0, 29, 19], 300_000)[:600_000]]]
    with pytest.raises(V.InputError, match="too long to rasterise"):
        V.segmentation_to_rle(zigzag, 20, 30)


def test_numbers_and_ids():
    assert V.finite(3, "x") == 3.0
    for bad in (float("nan"), float("inf"), -math.inf):
        with pytest.raises(V.InputError, match="x must be finite"):
            V.finite(bad, "x")
    with pytest.raises(V.InputError, match="must be a number"):
        V.finite("1", "x")
    assert V.check_score(None) is None
    with pytest.raises(V.InputError, match="score must be finite"):
        V.check_score(1e400)
    assert V.integer_id((1 << 63) - 1, "id") == (1 << 63) - 1
    with pytest.raises(V.InputError, match="does not fit a 64-bit integer"):
        V.integer_id(1 << 63, "id")
    with pytest.raises(V.InputError, match="must be an integer"):
        V.integer_id([1], "id")
    with pytest.raises(V.InputError) as err:  # a 4000-digit id is not echoed whole
        V.integer_id(10**4000, "id")
    assert len(str(err.value)) < 120 and str(err.value).endswith("does not fit a 64-bit integer")
    with pytest.raises(V.InputError, match="more than the"):
        V.check_image_size(1 << 15, 1 << 15)
    with pytest.raises(V.InputError, match="negative width or height"):
        V.check_box_xywh([0, 0, -1, 2])


def test_json_output_never_holds_nan():
    obj = {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.arange(2), "d": "x"}
    text = V.dumps(obj)
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [0, 1], "d": "x"}
    assert "NaN" not in text and "Infinity" not in text


def _coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["annotations"][0].update(id=[7]), "annotation \\[7\\].*id must be"),
        (lambda d: d["annotations"][0].pop("segmentation"), "annotation 7.*no segmentation"),
        (lambda d: d["annotations"][0].pop("category_id"), "annotation 7.*no category_id"),
        (lambda d: d["annotations"][0].update(category_id=9), "category_id 9 is not in"),
        (lambda d: d["annotations"][0].update(image_id=2), "image_id 2 is not in 'images'"),
        (
            lambda d: d["annotations"][0].update(segmentation=[[1, 1, math.nan, 1, 9, 9]]),
            "annotation 7.*NaN or infinity",
        ),
        (
            lambda d: d["annotations"][0].update(segmentation={"size": [20, 30], "counts": ""}),
            "annotation 7.*runs sum to 0",
        ),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, math.inf, 1]), "bbox must be finite"),
        (lambda d: d["annotations"][0].update(score=math.nan), "score must be finite"),
        (lambda d: d["images"][0].update(width=0), "images\\[0\\].*width must be between"),
        (lambda d: d["images"][0].update(id="1"), "images\\[0\\].*id must be an integer"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "id 7 appears twice"),
        (lambda d: d.pop("annotations"), "no 'annotations' list"),
    ],
)
def test_check_coco(change, message):
    data = _coco()
    V.check_coco(data, "x.json")  # the unchanged file passes
    change(data)
    with pytest.raises(V.InputError, match=f"x.json: .*{message}"):
        V.check_coco(data, "x.json")
