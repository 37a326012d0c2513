"""Predictor behaviour on a tiny random model: shapes, batching, caching, bad prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.predictor import EmbeddingCache, Predictor, PromptError, image_key


@pytest.fixture()
def predictor(tiny_model, rgb_image):
    p = Predictor(tiny_model)
    p.set_image(rgb_image)
    return p


def test_shapes_single_and_multi(predictor):
    one = predictor.predict(point_coords=[[50, 40]], point_labels=[1])
    assert one.masks.shape == (3, 96, 144) and one.masks.dtype == bool
    assert one.scores.shape == (3,) and one.low_res_logits.shape == (3, 32, 32)
    single = predictor.predict(box=[10, 10, 100, 80], multimask_output=False)
    assert single.masks.shape == (1, 96, 144)
    logits = predictor.predict(point_coords=[[50, 40]], point_labels=[1], return_logits=True)
    assert logits.masks.dtype == np.float32
    np.testing.assert_array_equal(logits.masks > 0, one.masks)


def test_mask_input_refinement_changes_result(predictor):
    first = predictor.predict(point_coords=[[50, 40]], point_labels=[1], multimask_output=False)
    again = predictor.predict(
        point_coords=[[50, 40]],
        point_labels=[1],
        mask_input=first.low_res_logits,
        multimask_output=False,
    )
    assert again.low_res_logits.shape == (1, 32, 32)
    assert not np.allclose(again.low_res_logits, first.low_res_logits)


def test_batch_equals_single(predictor):
    boxes = np.array([[10, 10, 100, 80], [0, 0, 50, 50], [60, 20, 140, 90]], float)
    batch = predictor.predict_batch(boxes=boxes, multimask_output=True)
    assert batch.masks.shape == (3, 3, 96, 144)
    for i, b in enumerate(boxes):
        one = predictor.predict(box=b)
        np.testing.assert_allclose(batch.low_res_logits[i], one.low_res_logits, atol=1e-4)
    pts = np.array([[[20, 20], [70, 50]], [[100, 60], [5, 5]]], float)
    labs = np.array([[1, 0], [1, 1]])
    pbatch = predictor.predict_batch(point_coords=pts, point_labels=labs)
    one = predictor.predict(point_coords=pts[1], point_labels=labs[1])
    np.testing.assert_allclose(pbatch.scores[1], one.scores, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(point_coords=[[np.nan, 3]], point_labels=[1]), "NaN"),
        (dict(point_coords=[[500, 3]], point_labels=[1]), "outside"),
        (dict(point_coords=[[-1, 3]], point_labels=[1]), "outside"),
        (dict(point_coords=[[5, 3]], point_labels=[2]), "labels must be"),
        (dict(point_coords=[[5, 3]]), "together"),
        (dict(point_coords=[5, 3], point_labels=[1]), "shape"),
        (dict(point_coords=[[5, 3], [6, 7]], point_labels=[1]), "does not match"),
        (dict(box=[10, 10, 5, 50]), "x0 <= x1"),
        (dict(box=[10, np.inf, 20, 50]), "NaN or infinity"),
        (dict(box=[500, 500, 600, 600]), "outside"),
        (dict(box=[1, 2, 3]), "reshape|size"),
        (
            dict(point_coords=[[5, 3]], point_labels=[1], mask_input=np.zeros((64, 64))),
            "mask_input",
        ),
    ],
)
def test_bad_prompts(predictor, kwargs, match):
    with pytest.raises((PromptError, ValueError), match=match):
        predictor.predict(**kwargs)


def test_box_partly_outside_is_clipped(predictor):
    clipped = predictor.predict(box=[-20, -10, 100, 80], multimask_output=False)
    inside = predictor.predict(box=[0, 0, 100, 80], multimask_output=False)
    np.testing.assert_array_equal(clipped.masks, inside.masks)


def test_batch_size_mismatch(predictor):
    with pytest.raises(PromptError, match="batch size"):
        predictor.predict_batch(
            boxes=np.zeros((2, 4)) + [0, 0, 10, 10],
            point_coords=np.ones((3, 1, 2)),
            point_labels=np.ones((3, 1)),
        )


def test_no_image_set(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(tiny_model).predict(point_coords=[[1, 1]], point_labels=[1])


def test_embedding_cache_on_disk(tiny_model, rgb_image, tmp_path, monkeypatch):
    first = Predictor(tiny_model, cache=EmbeddingCache(tmp_path), model_id="tiny")
    first.set_image(rgb_image)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].name == f"tiny-{image_key(rgb_image)}.pt"

    second = Predictor(tiny_model, cache=EmbeddingCache(tmp_path), model_id="tiny")

    def boom(*a, **k):
        raise AssertionError("embedding recomputed despite the cache")

    monkeypatch.setattr(second, "embed", boom)
    second.set_image(rgb_image.copy())
    torch.testing.assert_close(second.embedding, first.embedding)
    # another model id does not reuse it
    third = Predictor(tiny_model, cache=EmbeddingCache(tmp_path), model_id="other")
    monkeypatch.setattr(third, "embed", boom)
    with pytest.raises(AssertionError, match="recomputed"):
        third.set_image(rgb_image)


def test_damaged_cache_file_is_recomputed(tiny_model, rgb_image, tmp_path):
    p = Predictor(tiny_model, cache=EmbeddingCache(tmp_path), model_id="tiny")
    p.set_image(rgb_image)
    ref = p.embedding.clone()
    for f in tmp_path.glob("*.pt"):
        f.write_bytes(b"garbage")
    q = Predictor(tiny_model, cache=EmbeddingCache(tmp_path), model_id="tiny")
    q.set_image(rgb_image)
    torch.testing.assert_close(q.embedding, ref)


def test_memory_cache_is_bounded():
    cache = EmbeddingCache(max_items=2)
    from segany.predictor import ImageEmbedding

    for i in range(3):
        cache.put(str(i), ImageEmbedding(torch.zeros(1), (1, 1), (1, 1)))
    assert cache.get("0") is None and cache.get("2") is not None


def test_model_fingerprint_distinguishes_weights(rgb_image):
    from .conftest import tiny_sam

    a, b = Predictor(tiny_sam(0)), Predictor(tiny_sam(1))
    assert a.model_id != b.model_id and a.model_id == Predictor(tiny_sam(0)).model_id


def _model_frame_points(predictor, n=5, seed=0):
    from segany import transforms as T

    rng = np.random.default_rng(seed)
    h, w = predictor.original_size
    pts = rng.uniform([0, 0], [w, h], size=(n, 2))
    coords = T.coords_to_model(pts, (h, w), predictor.model.img_size)[:, None, :]
    return coords, torch.ones(n, 1, dtype=torch.int64)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_decode_chunks_give_the_same_logits(tiny_model, rgb_image, chunk):
    whole = Predictor(tiny_model, decode_chunk=100)
    whole.set_image(rgb_image)
    coords, labels = _model_frame_points(whole)
    parts = Predictor(tiny_model, decode_chunk=chunk)
    parts.set_image(rgb_image)
    a_low, a_iou = whole.decode_low_res(coords, labels)
    b_low, b_iou = parts.decode_low_res(coords, labels)
    assert a_low.shape == b_low.shape == (5, 3, 32, 32)
    torch.testing.assert_close(b_low, a_low, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_iou, a_iou, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="decode_chunk"):
        Predictor(tiny_model, decode_chunk=0)


def test_image_only_decoding_gives_the_same_masks_at_image_size(predictor):
    from segany import transforms as T

    st = predictor.state
    assert st.input_size[0] < predictor.model.img_size  # the image leaves padding rows
    coords, labels = _model_frame_points(predictor)
    full, iou = predictor.decode_low_res(coords, labels)
    part, iou_part = predictor.decode_low_res(coords, labels, image_only=True)
    torch.testing.assert_close(iou_part, iou)
    assert part.shape == full.shape
    rows = st.input_size[0] // (predictor.model.img_size // 8) + 2  # tiny model: 8x8 tokens
    assert rows * 4 < full.shape[-2]  # the crop does skip work
    torch.testing.assert_close(
        part[..., : rows * 4, :], full[..., : rows * 4, :], rtol=1e-4, atol=1e-4
    )  # noqa: E501
    assert (part[..., rows * 4 :, :] == 0).all()
    size = dict(input_size=st.input_size, original_size=st.original_size, img_size=128)
    torch.testing.assert_close(
        T.masks_to_image(part, **size), T.masks_to_image(full, **size), rtol=1e-4, atol=1e-4
    )
