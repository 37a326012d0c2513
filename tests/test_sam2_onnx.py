"""ONNX export of SAM 2 from the model code, run with onnxruntime, against the torch model
(tiny SAM 2 config with the weights of tests/data/sam2_tiny_test_golden.npz, its DAVIS
photo), and the reference package's recorded outputs through ``Predictor(backend="onnx")``.

Tolerances (measured on this CPU in brackets): encoder outputs 1e-4 (3.1e-6 on the
embedding, 6e-7 on the high-res maps), decoder logits 1e-5 (2.7e-7), IoUs and object scores
1e-5 (9e-8); through ``Predictor(backend="onnx")`` against the reference golden the torch
backend's tolerances of test_sam2.py (low-res logits 1e-5: 3.4e-7; IoUs 9e-8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from segany.export.onnx import export_onnx, graphs_of  # noqa: E402
from segany.export.runtime import OnnxBackend  # noqa: E402
from segany.models.registry import sam2_custom  # noqa: E402
from segany.models.sam2 import Sam2  # noqa: E402
from segany.predictor import Predictor  # noqa: E402

from .test_sam2 import GOLDEN, IOU_ATOL, OBJ_ATOL, case_args, check_masks  # noqa: E402

ENC_ATOL = 1e-4
LOGIT_ATOL = 1e-5
PRED_LOWRES_ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"]))


@pytest.fixture(scope="module")
def tiny_sam2(golden) -> Sam2:
    """The tiny config of the golden with its weights (as in test_sam2.py)."""
    z, meta = golden
    model = sam2_custom(**meta["segany_config"]).eval()
    state = {k[2:]: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k[:2] == "w:"}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def exported(tiny_sam2: Sam2, tmp_path_factory) -> tuple[Sam2, OnnxBackend, dict]:
    d = tmp_path_factory.mktemp("sam2onnx")
    return tiny_sam2, OnnxBackend.from_model(tiny_sam2, directory=d), export_onnx(tiny_sam2, d)


def _model_input(model: Sam2, rgb: np.ndarray) -> torch.Tensor:
    from segany import transforms as T

    geom = T.geometry_of(model)
    return geom.to_model_input(rgb, pixel_mean=model.pixel_mean, pixel_std=model.pixel_std)[0]


def test_encoder_graph_matches_torch(exported, golden) -> None:
    model, backend, paths = exported
    z, _ = golden
    assert set(paths) == set(graphs_of(model)) == {"encoder", "decoder"}
    x = _model_input(model, z["image0"])
    with torch.inference_mode():
        emb, high_res = model.embed_features(x)
    got_emb, got_high = backend.embed_features(x)
    assert len(got_high) == 2
    for got, ref in zip((got_emb, *got_high), (emb, *high_res)):
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < ENC_ATOL


def _cases(model: Sam2) -> list[tuple[str, dict, bool]]:
    s = model.img_size
    click = torch.tensor([[[0.4 * s, 0.55 * s]]])
    two = torch.tensor([[[0.4 * s, 0.55 * s], [0.7 * s, 0.2 * s]]])
    box = torch.tensor([[0.2 * s, 0.3 * s, 0.8 * s, 0.9 * s]])
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.7]]) * s
    torch.manual_seed(1)
    mask = torch.randn(1, 1, *model.prompt_encoder.mask_input_size) * 4
    return [
        ("click, multimask", {"point_coords": click, "point_labels": torch.ones(1, 1)}, True),
        ("click, single", {"point_coords": click, "point_labels": torch.ones(1, 1)}, False),
        ("two clicks", {"point_coords": two, "point_labels": torch.tensor([[1, 0]])}, False),
        ("box", {"boxes": box}, False),
        (
            "box + click",
            {"boxes": box, "point_coords": click, "point_labels": torch.ones(1, 1)},
            True,
        ),
        ("batched boxes", {"boxes": boxes}, True),
        (
            "mask input",
            {"point_coords": click, "point_labels": torch.ones(1, 1), "mask_input": mask},
            False,
        ),
    ]


def test_decoder_graph_matches_torch(exported, golden) -> None:
    """Every prompt kind through the backend (prompt order, padding point, high-res maps,
    stability fallback) against ``Sam2.decode``, and the object scores of the graph."""
    import onnxruntime as ort

    model, backend, paths = exported
    z, _ = golden
    x = _model_input(model, z["image0"])
    with torch.inference_mode():
        emb, high_res = model.embed_features(x)
    fallback = 0
    for name, prompts, mm in _cases(model):
        keep: dict = {}
        with torch.inference_mode():
            ref_low, ref_iou = model.decode(
                emb, multimask_output=mm, high_res_features=high_res, keep=keep, **prompts
            )
            full, _ = model.mask_decoder.predict_masks(
                emb, model.prompt_encoder.get_dense_pe(),
                *model.prompt_encoder(
                    (prompts["point_coords"], prompts["point_labels"])
                    if "point_coords" in prompts else None,
                    prompts.get("boxes"), prompts.get("mask_input"),
                ),
                high_res_features=high_res,
            )  # fmt: skip
        if not mm and not torch.equal(ref_low[:, 0], full[:, 0]):
            fallback += 1  # the stability fallback picked a multimask output
        low, iou = backend.decode(emb, multimask_output=mm, high_res_features=high_res, **prompts)
        assert low.shape == ref_low.shape and iou.shape == ref_iou.shape, name
        assert float((low - ref_low).abs().max()) < LOGIT_ATOL, name
        assert float((iou - ref_iou).abs().max()) < IOU_ATOL, name
    assert fallback >= 1  # the fallback is exercised (random weights: unstable masks)
    # the object-score output of the graph (one click, SAM 2's sparse order)
    sess = ort.InferenceSession(str(paths["decoder"]), providers=["CPUExecutionProvider"])
    click = [[0.4 * model.img_size, 0.55 * model.img_size], [0.0, 0.0]]
    feeds = {
        "image_embeddings": emb.numpy(),
        "high_res_feats_0": high_res[0].numpy(),
        "high_res_feats_1": high_res[1].numpy(),
        "point_coords": np.array([click], np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, *model.prompt_encoder.mask_input_size), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    keep = {}
    one = {"point_coords": torch.tensor([click[:1]]), "point_labels": torch.ones(1, 1)}
    with torch.inference_mode():
        model.decode(emb, high_res_features=high_res, keep=keep, **one)
    ref_obj = keep["object_score_logits"].numpy()
    assert out["object_score_logits"].shape == (1, 1)
    np.testing.assert_allclose(out["object_score_logits"], ref_obj, atol=OBJ_ATOL)


def test_predictor_onnx_matches_reference_golden(exported, golden, monkeypatch, tmp_path) -> None:
    """``Predictor(backend="onnx")`` on the DAVIS photo: the reference package's recorded
    outputs (the same cases as the torch backend's test in test_sam2.py), and the torch
    backend's predictions."""
    model, _, _ = exported
    z, meta = golden
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))  # the onnx backend's export cache
    p = Predictor(model, backend="onnx")
    torch_p = Predictor(model)
    assert p.backend is not None and p.backend.high_res_inputs
    p.set_image(z["image0"])
    torch_p.set_image(z["image0"])
    assert len(p.state.high_res) == 2
    for key, case in meta["cases"].items():
        args = case_args(key, case, z)
        mm = case["multimask_output"]
        if key in ("batch", "batch_points"):
            args = {"boxes": args.pop("box"), **args} if "box" in args else args
            pred = p.predict_batch(**args, multimask_output=mm, return_logits=True)
            ref = torch_p.predict_batch(**args, multimask_output=mm, return_logits=True)
        else:
            pred = p.predict(**args, multimask_output=mm, return_logits=True)
            ref = torch_p.predict(**args, multimask_output=mm, return_logits=True)
        ref_low = z[f"{key}_lowres"]
        low = pred.low_res_logits.reshape(ref_low.shape)
        np.testing.assert_allclose(low, ref_low, atol=PRED_LOWRES_ATOL, err_msg=key)
        np.testing.assert_allclose(pred.scores.reshape(-1), z[f"{key}_iou"].reshape(-1),
                                   atol=IOU_ATOL, err_msg=key)  # fmt: skip
        packed = z[f"{key}_masks"]
        check_masks(pred.masks.reshape(*packed.shape[:-1], -1), packed)
        np.testing.assert_allclose(pred.low_res_logits, ref.low_res_logits, atol=PRED_LOWRES_ATOL)
    assert list(Path(tmp_path, "onnx").glob("*/decoder.onnx"))
    with pytest.raises(ValueError, match="torch or onnx backend"):
        Predictor(model, backend="onnx-int8")


def test_onnx_backend_of_a_fused_model(exported, golden, monkeypatch, tmp_path) -> None:
    """``load_predictor(..., backend="onnx")`` fuses the model first (oneDNN Hiera linears
    that have run on the CPU): the export still traces plain operators and agrees."""
    import copy

    model, backend, _ = exported
    z, _ = golden
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    fused = copy.deepcopy(model)
    p = Predictor(fused, fuse=True)
    p.set_image(z["image0"])  # runs the fused encoder once
    po = Predictor(fused, backend="onnx")
    po.set_image(z["image0"])
    x = _model_input(model, z["image0"])
    emb, high_res = backend.embed_features(x)
    assert float((po.embedding - emb).abs().max()) < ENC_ATOL
    for a, b in zip(po.state.high_res, high_res):
        assert float((a - b).abs().max()) < ENC_ATOL
    click = {"point_coords": np.array([[80.0, 60.0]]), "point_labels": np.array([1])}
    a, b = p.predict(**click, return_logits=True), po.predict(**click, return_logits=True)
    np.testing.assert_allclose(b.low_res_logits, a.low_res_logits, atol=PRED_LOWRES_ATOL)


def test_cli_export_sam2(tiny_sam2, monkeypatch, tmp_path) -> None:
    """``segany export`` with a SAM 2 model writes both graphs and their description (the
    model loading is the tiny model's here; official files load as in test_sam2.py)."""
    import segany.loader
    from segany.cli import main

    monkeypatch.setattr(segany.loader, "load_model", lambda *a, **k: tiny_sam2)
    out = tmp_path / "onnx"
    assert main(["export", "--model", "tiny-sam2", "--out", str(out)]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["family"] in ("Sam2", "Sam2Video") and summary["img_size"] == 256
    enc, dec = summary["graphs"]["encoder"], summary["graphs"]["decoder"]
    channels = {k: v[1] for k, v in enc["outputs"].items()}  # the sides are left symbolic
    assert channels == {"image_embeddings": 32, "high_res_feats_0": 4, "high_res_feats_1": 8}
    assert list(dec["inputs"])[:3] == ["image_embeddings", "high_res_feats_0", "high_res_feats_1"]
    assert dec["inputs"]["point_coords"] == ["batch", "num_points", 2]
    assert dec["outputs"]["object_score_logits"] == ["batch", 1]
    assert sorted(p.name for p in out.glob("*.onnx")) == ["decoder.onnx", "encoder.onnx"]


@pytest.mark.skipif(not os.environ.get("SEGANY_SLOW"), reason="set SEGANY_SLOW=1 (minutes)")
def test_official_tiny_onnx_matches_torch(tmp_path) -> None:
    """The official Hiera-T config at 1024 px (random weights moved by seeded noise) through
    ``Predictor(backend="onnx")`` against the torch backend on examples/kitchen.jpg.
    Measured: embedding 5.9e-5, high-res maps 7.2e-6, low-res logits 1.7e-5 (mean magnitude
    1.2-2.3), IoUs 1.8e-7, masks equal where the logit is 1e-3 away from 0."""
    from segany.models import build_model

    from .conftest import REPO

    torch.manual_seed(0)
    model = build_model("sam2.1_hiera_t").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    po = Predictor(model, backend=OnnxBackend.from_model(model, directory=tmp_path))
    pt = Predictor(model)
    image = REPO / "examples" / "kitchen.jpg"
    pt.set_image(image)
    po.set_image(image)
    assert float((pt.embedding - po.embedding).abs().max()) < 1e-3
    for a, b in zip(pt.state.high_res, po.state.high_res):
        assert float((a - b).abs().max()) < 1e-4
    h, w = pt.original_size
    for args in (
        {"point_coords": np.array([[w * 0.4, h * 0.6]]), "point_labels": np.array([1])},
        {"box": np.array([w * 0.2, h * 0.2, w * 0.7, h * 0.8])},
    ):
        for mm in (True, False):
            a = pt.predict(**args, multimask_output=mm, return_logits=True)
            b = po.predict(**args, multimask_output=mm, return_logits=True)
            np.testing.assert_allclose(b.low_res_logits, a.low_res_logits, atol=1e-3)
            np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
            sure = np.abs(a.masks) > 1e-3
            np.testing.assert_array_equal(b.masks[sure] > 0, a.masks[sure] > 0)
