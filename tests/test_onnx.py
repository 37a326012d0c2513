"""ONNX export + onnxruntime backend == the torch model.

Tolerances: on a tiny random model, embeddings and logits within 1e-4 (float rounding);
on the MobileSAM golden (astronaut) the same parity tolerances as the torch backend
(embedding 5e-4, IoU 1e-3, low-res logits 2e-2, <= 25 mask pixels).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("onnxruntime")

from segany.export.onnx import export_onnx  # noqa: E402
from segany.export.runtime import OnnxBackend  # noqa: E402
from segany.models.fuse import fuse_for_inference, onednn_available  # noqa: E402
from segany.predictor import Predictor  # noqa: E402

from .conftest import SHARED_REFERENCE  # noqa: E402
from .golden import MOBILE_FILES, check_goldens  # noqa: E402
from .test_speed_paths import tiny_tinyvit_sam  # noqa: E402


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    sam = tiny_tinyvit_sam(3)
    # exported, as the predictor does, from a fused model that has run on the CPU (its
    # oneDNN modules and packed weights must give way to plain operators in the graph)
    fused = fuse_for_inference(copy.deepcopy(sam))
    with torch.inference_mode():
        fused.embed_image(torch.randn(1, 3, 128, 128))
    paths = export_onnx(fused, tmp_path_factory.mktemp("onnx"))
    assert all(m.onednn for m in fused.modules() if hasattr(m, "onednn")) or not (
        onednn_available()
    ), "exporting must not change the caller's model"
    size = sam.prompt_encoder.mask_input_size
    full = OnnxBackend(paths["encoder"], paths["decoder"], mask_input_size=size)
    split = OnnxBackend(
        paths["encoder"],
        paths["decoder"],
        context=paths["context"],
        prompt=paths["prompt"],
        mask_input_size=size,
    )
    return sam, full, split


def test_encoder_matches_torch(tiny_onnx) -> None:
    sam, backend, _ = tiny_onnx
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        ref = sam.embed_image(x)
    torch.testing.assert_close(backend.embed(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("graphs", ["decoder", "context+prompt"])
@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_matches_torch_dynamic_prompts(
    tiny_onnx, multimask: bool, graphs: str, monkeypatch
) -> None:
    """Both ways of decoding (the one graph; the per-image context graph + the prompt
    graph, used for prompts without a mask input) give the torch model's outputs."""
    sam, full, split = tiny_onnx
    backend = full if graphs == "decoder" else split
    used = []
    for name in ("decoder", "context", "prompt"):
        sess = getattr(backend, name)
        if sess is not None:
            monkeypatch.setattr(
                sess, "run", functools.partial(_counted, used, name, type(sess).run, sess)
            )
    torch.manual_seed(4)
    emb = torch.randn(1, 256, 8, 8)
    cases = [
        dict(point_coords=torch.rand(1, 1, 2) * 128, point_labels=torch.tensor([[1]])),
        dict(point_coords=torch.rand(3, 4, 2) * 128, point_labels=torch.tensor([[1, 0, 1, 0]] * 3)),
        dict(boxes=torch.tensor([[10.0, 10.0, 80.0, 90.0], [0.0, 5.0, 30.0, 40.0]])),
        dict(
            boxes=torch.tensor([[10.0, 10.0, 80.0, 90.0]]),
            point_coords=torch.tensor([[[40.0, 50.0]]]),
            point_labels=torch.tensor([[0]]),
        ),
        dict(
            point_coords=torch.tensor([[[40.0, 50.0], [70.0, 20.0]]]),
            point_labels=torch.tensor([[1, 0]]),
            mask_input=torch.randn(1, 1, 32, 32),
        ),
    ]
    for kw in cases:
        with torch.inference_mode():
            ref = sam.decode(emb, multimask_output=multimask, **kw)
        got = backend.decode(emb, multimask_output=multimask, **kw)
        for u, v in zip(ref, got):
            torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4)
    if graphs == "decoder":
        assert used == ["decoder"] * 5
    else:  # the context once for the embedding, the full graph only for the mask input
        assert used == ["context", "prompt", "prompt", "prompt", "prompt", "decoder"]


def _counted(used: list, name: str, run, sess, *args, **kwargs):
    used.append(name)
    return run(sess, *args, **kwargs)


@pytest.mark.weights
@pytest.mark.skipif(not (SHARED_REFERENCE / "index.json").exists(), reason="no goldens")
def test_onnx_backend_on_golden(mobile_sam, tmp_path) -> None:
    """The onnxruntime backend on every case of the three MobileSAM goldens, same
    tolerances as the torch model (tests/golden.py)."""
    pred = Predictor(mobile_sam, backend=OnnxBackend.from_model(mobile_sam, directory=tmp_path))
    for fname in MOBILE_FILES:
        check_goldens(pred, fname)
