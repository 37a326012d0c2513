"""ONNX export of HQ-SAM from the model code, run with onnxruntime, against the torch model
(the tiny HQ-SAM of tests/data/hq_sam_tiny_test_golden.npz) and against the reference
package's recorded outputs through ``Predictor(backend="onnx")``.

Tolerances: encoder outputs 1e-4, decoder logits and IoUs 1e-5 (the measured differences
are in docs/hq-sam.md); through the Predictor, the torch backend's tolerances of
test_hq_sam.py against the reference golden.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from segany import transforms as T  # noqa: E402
from segany.export.onnx import export_onnx, graphs_of  # noqa: E402
from segany.export.runtime import OnnxBackend  # noqa: E402
from segany.models import SamHQ  # noqa: E402
from segany.predictor import Predictor  # noqa: E402

from .conftest import HQ_GOLDEN  # noqa: E402
from .test_hq_sam import IOU_ATOL, LOWRES_ATOL, case_args, check_masks  # noqa: E402

ENC_ATOL = 1e-4
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    z = np.load(HQ_GOLDEN)
    return z, json.loads(str(z["meta"]))


@pytest.fixture(scope="module")
def exported(tiny_hq: SamHQ, tmp_path_factory) -> tuple[SamHQ, OnnxBackend, dict]:
    d = tmp_path_factory.mktemp("hqonnx")
    paths = export_onnx(tiny_hq, d)
    return tiny_hq, OnnxBackend.from_model(tiny_hq, directory=d), paths


def _model_input(model: SamHQ, rgb: np.ndarray) -> torch.Tensor:
    geom = T.geometry_of(model)
    return geom.to_model_input(rgb, pixel_mean=model.pixel_mean, pixel_std=model.pixel_std)[0]


def test_encoder_graph_matches_torch(exported, golden) -> None:
    model, backend, paths = exported
    z, _ = golden
    assert set(paths) == set(graphs_of(model)) == {"encoder", "decoder"}
    assert backend.hq and backend.high_res_inputs == ["hq_features"]
    x = _model_input(model, z["image"])
    with torch.inference_mode():
        emb, (hq,) = model.embed_features(x)
    got_emb, got_hq = backend.embed_features(x)
    assert len(got_hq) == 1 and got_hq[0].shape == hq.shape == (1, 4, 64, 64)
    assert float((got_emb - emb).abs().max()) < ENC_ATOL
    assert float((got_hq[0] - hq).abs().max()) < ENC_ATOL


def _cases(s: int) -> list[tuple[str, dict, bool]]:
    click = torch.tensor([[[0.4 * s, 0.55 * s]]])
    two = torch.tensor([[[0.4 * s, 0.55 * s], [0.7 * s, 0.2 * s]]])
    box = torch.tensor([[0.2 * s, 0.3 * s, 0.8 * s, 0.9 * s]])
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.7]]) * s
    torch.manual_seed(1)
    mask = torch.randn(1, 1, s // 4, s // 4) * 4
    one = {"point_coords": click, "point_labels": torch.ones(1, 1)}
    return [
        ("click, multimask", one, True),
        ("click, single", one, False),
        ("two clicks", {"point_coords": two, "point_labels": torch.tensor([[1, 0]])}, False),
        ("box", {"boxes": box}, False),
        ("box + click", {"boxes": box, **one}, True),
        ("batched boxes", {"boxes": boxes}, True),
        ("mask input", {**one, "mask_input": mask}, False),
    ]


@pytest.mark.parametrize("only", [False, True])
def test_decoder_graph_matches_torch(exported, golden, only) -> None:
    """Every prompt kind through the backend (prompt order, padding point, HQ features,
    SAM's chosen output added or not) against ``SamHQ.decode``."""
    model, backend, _ = exported
    z, _ = golden
    with torch.inference_mode():
        emb, hq = model.embed_features(_model_input(model, z["image"]))
    for name, prompts, mm in _cases(model.img_size):
        with torch.inference_mode():
            ref_low, ref_iou = model.decode(
                emb, multimask_output=mm, high_res_features=hq, hq_token_only=only, **prompts
            )
        low, iou = backend.decode(
            emb, multimask_output=mm, high_res_features=hq, hq_token_only=only, **prompts
        )
        assert low.shape == ref_low.shape and iou.shape == ref_iou.shape == (len(iou), 1), name
        assert float((low - ref_low).abs().max()) < LOGIT_ATOL, name
        assert float((iou - ref_iou).abs().max()) < LOGIT_ATOL, name


def test_predictor_onnx_matches_reference_golden(exported, golden, monkeypatch, tmp_path) -> None:
    """``Predictor(backend="onnx")``: the reference package's recorded outputs (the 14 cases
    of test_hq_sam.py, ``hq_token_only`` as recorded) and the torch backend's."""
    model, _, _ = exported
    z, meta = golden
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))  # the onnx backend's export cache
    p = Predictor(model, backend="onnx")
    torch_p = Predictor(model)
    p.set_image(z["image"])
    torch_p.set_image(z["image"])
    assert len(p.state.high_res) == 1
    for key, case in meta["cases"].items():
        p.hq_token_only = torch_p.hq_token_only = case["hq"]
        mm = case["multimask_output"]
        if key.startswith("batch"):
            kw = {"boxes": z["batch_boxes"], "multimask_output": mm, "return_logits": True}
            pred, ref = p.predict_batch(**kw), torch_p.predict_batch(**kw)
        else:
            kw = {**case_args(key, case, z), "multimask_output": mm, "return_logits": True}
            pred, ref = p.predict(**kw), torch_p.predict(**kw)
        ref_low = z[f"{key}_lowres"]
        low = pred.low_res_logits.reshape(ref_low.shape)
        np.testing.assert_allclose(low, ref_low, atol=LOWRES_ATOL, err_msg=key)
        np.testing.assert_allclose(pred.scores.reshape(-1), z[f"{key}_iou"].reshape(-1),
                                   atol=IOU_ATOL, err_msg=key)  # fmt: skip
        packed = z[f"{key}_masks"]
        check_masks(pred.masks.reshape(*packed.shape[:-1], -1), packed)
        np.testing.assert_allclose(pred.low_res_logits, ref.low_res_logits, atol=LOWRES_ATOL)
    assert list(Path(tmp_path, "onnx").glob("*/decoder.onnx"))
    with pytest.raises(ValueError, match="torch or onnx backend"):
        Predictor(model, backend="onnx-int8")


def test_cli_export_and_segment_on_onnx(tiny_hq_file, monkeypatch, tmp_path, capsys) -> None:
    """``segany export`` of an HQ-SAM file writes both graphs and their description;
    ``segany segment --backend onnx`` answers as the torch backend does."""
    from PIL import Image

    from segany.cli import main

    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tiny_hq_file), "--out", str(out)]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["family"] == "SamHQ" and summary["img_size"] == 256
    enc, dec = summary["graphs"]["encoder"], summary["graphs"]["decoder"]
    assert {k: v[1] for k, v in enc["outputs"].items()} == {"image_embeddings": 32,
                                                             "hq_features": 4}  # fmt: skip
    assert list(dec["inputs"])[:2] == ["image_embeddings", "hq_features"]
    assert dec["outputs"]["hq_masks"][0] == "batch" and len(dec["outputs"]["hq_masks"]) == 4
    assert sorted(p.name for p in out.glob("*.onnx")) == ["decoder.onnx", "encoder.onnx"]
    capsys.readouterr()
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "k.png"
    Image.fromarray(np.load(HQ_GOLDEN)["image"]).save(image)
    masks = {}
    for backend in ("torch", "onnx"):
        argv = ["segment", str(image), "--box", "50,30,140,128", "--model", str(tiny_hq_file)]
        argv += ["--backend", backend, "--hq-token-only", "--out", str(tmp_path / f"{backend}.png")]
        assert main(argv) == 0
        (rec,) = json.loads(capsys.readouterr().out)["masks"]
        masks[backend] = (np.asarray(Image.open(tmp_path / f"{backend}.png")) > 0, rec["score"])
    (a, sa), (b, sb) = masks["torch"], masks["onnx"]
    assert (a != b).sum() <= 2 and sa == pytest.approx(sb, abs=1e-4) and a.sum() > 0
