"""HQ-SAM: registry variants, official checkpoint layouts, compat names, and parity with
the reference package (``segment-anything-hq==0.3``) on seeded random weights.

``tests/data/hq_sam_tiny_test_golden.npz`` is made by ``benchmarks/make_hq_goldens.py``
(reference python): a reduced ViT (256 px input, 32-wide embedding and decoder) composed
from the reference's modules, its weights (float16-exact), and the reference predictor's
outputs on ``examples/kitchen.jpg`` for points, box, point+box, mask input and batched
boxes, each with ``hq_token_only`` False and True. ``hq_sam_official_keys.json`` holds the
key names and shapes of the four official builds (``sam_model_registry``).

Tolerances (measured differences are below 1e-6; docs/hq-sam.md): embedding 1e-5, low-res
logits 1e-5, IoUs 1e-5, masks equal wherever our logit at image size is at least
``MASK_MARGIN`` away from the threshold.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.compat import hq as compat_hq
from segany.loader import load_model
from segany.models import SamHQ, build_model, config_from_state_dict, model_from_state_dict
from segany.models.mask_decoder_hq import MaskDecoderHQ
from segany.models.registry import vit_t
from segany.predictor import EmbeddingCache, Predictor

from .conftest import REPO, TEST_DATA

GOLDEN = TEST_DATA / "hq_sam_tiny_test_golden.npz"
KEYS = TEST_DATA / "hq_sam_official_keys.json"
EMB_ATOL = 1e-5
LOWRES_ATOL = 1e-5
IOU_ATOL = 1e-5
MASK_MARGIN = 1e-3
REFERENCE_PY = Path.home() / ".cache/segany-reference/venv/bin/python"
HQ_VARIANTS = ["sam_hq_vit_tiny", "sam_hq_vit_b", "sam_hq_vit_l", "sam_hq_vit_h"]


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"]))


def golden_state(z) -> dict[str, torch.Tensor]:
    return {k[2:]: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k[:2] == "w:"}


@pytest.fixture(scope="module")
def tiny_hq(golden) -> SamHQ:
    z, _ = golden
    return model_from_state_dict(golden_state(z))  # strict keys


def case_args(key: str, case: dict, z) -> dict:
    """The recorded prompt of ``key`` as Predictor.predict() arguments (image frame)."""
    args = {k: np.asarray(case[k]) for k in ("point_coords", "point_labels", "box") if k in case}
    if case.get("mask_input"):
        args["mask_input"] = z[f"{key}_mask_input"]
    return args


def check_masks(logits: np.ndarray, packed: np.ndarray) -> None:
    """Masks agree with the reference wherever our logit is clearly away from 0 (random
    weights put some pixels near it), and that covers most pixels."""
    ref = np.unpackbits(packed, axis=-1, count=logits.shape[-1]).astype(bool)
    assert ref.shape == logits.shape
    sure = np.abs(logits) > MASK_MARGIN
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(logits[sure] > 0, ref[sure])


# -- registry and checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("name", HQ_VARIANTS)
def test_variant_builds_and_runs(name):
    """Each official variant, on a 64 px input (the ViTs cut to two blocks to keep the test
    fast; their full builds are checked on the meta device below), encodes, fuses its HQ
    features and decodes one mask per prompt, with and without ``hq_token_only``."""
    torch.manual_seed(0)
    cut = {} if name == "sam_hq_vit_tiny" else {"depth": 2, "global_attn_indexes": (1,)}
    model = build_model(name, img_size=64, **cut).eval()
    assert isinstance(model, SamHQ) and isinstance(model.mask_decoder, MaskDecoderHQ)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        emb, (hq,) = model.embed_features(x)
        assert emb.shape == (1, 256, 4, 4) and hq.shape == (1, 32, 16, 16)
        outs = {}
        for only in (False, True):
            low, iou = model.decode(
                emb,
                point_coords=torch.tensor([[[30.0, 20.0]], [[10.0, 50.0]]]),
                point_labels=torch.tensor([[1], [1]]),
                high_res_features=(hq,),
                hq_token_only=only,
            )
            assert low.shape == (2, 1, 16, 16) and iou.shape == (2, 1)
            assert torch.isfinite(low).all()
            outs[only] = low
        assert not torch.equal(outs[False], outs[True])  # SAM's mask is added or not
        assert torch.equal(model.embed_image(x), emb)  # SAM 1's entry point unchanged


def test_sam1_encoders_unchanged_by_early_features():
    """``early=True`` adds a map and changes nothing else; without it the encoders return
    one tensor as before (SAM 1 and MobileSAM outputs are unchanged)."""
    torch.manual_seed(0)
    vit = build_model("vit_b", img_size=256, depth=2, global_attn_indexes=(1,)).eval()
    tiny = vit_t(img_size=256).eval()
    x = torch.randn(1, 3, 256, 256)
    x[..., 96:, :] = 0  # the padding under a 96x256 image
    with torch.inference_mode():
        for enc, width in ((vit.image_encoder, 768), (tiny.image_encoder, 160)):
            plain = enc(x, valid=(96, 256))
            emb, early = enc(x, valid=(96, 256), early=True)
            assert isinstance(plain, torch.Tensor) and torch.allclose(plain, emb, atol=1e-5)
            assert early.shape == (1, width, 16, 16)
            # TinyViT computes its first stages on crops when given ``valid``: the early
            # map (stage 1's output) is the same as without cropping
            _, full = enc(x, early=True)
            torch.testing.assert_close(early, full, atol=1e-4, rtol=1e-4)


def _official_keys() -> dict[str, dict[str, list[int]]]:
    return json.loads(KEYS.read_text())


@pytest.mark.parametrize("name", HQ_VARIANTS)
def test_official_layout_loads_strictly(name):
    """Key names and shapes equal those of the reference builder; the variant is read
    back from the keys (``mask_decoder.hf_token.weight`` and the encoder's size); a strict
    load accepts exactly that state dict."""
    ref = _official_keys()[name]
    with torch.device("meta"):
        model = build_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    state = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert config_from_state_dict(state) == (name, {})
    model.load_state_dict(state, strict=True, assign=True)
    missing = {k: v for k, v in state.items() if not k.startswith("mask_decoder.hf_mlp.")}
    with pytest.raises(RuntimeError, match="Missing"):
        model.load_state_dict(missing, strict=True, assign=True)


def test_sam1_keys_still_build_sam1(golden):
    """Without the HQ keys, the same encoder sizes give SAM 1 models."""
    ref = _official_keys()["sam_hq_vit_b"]
    state = {
        k: torch.empty(s, device="meta")
        for k, s in ref.items()
        if not k.startswith(
            (
                "mask_decoder.hf_",
                "mask_decoder.compress_vit_feat",
                "mask_decoder.embedding_",
            )
        )
    }
    assert config_from_state_dict(state) == ("vit_b", {})
    z, _ = golden
    name, overrides = config_from_state_dict(golden_state(z))
    assert name == "vit_custom" and overrides["hq"] is True and overrides["prompt_dim"] == 32


def test_checkpoint_file_loads_with_model_path(golden, tmp_path):
    """A checkpoint saved as the official files are (a bare state dict) loads through
    ``load_model(path)`` (weights_only, strict) as an HQ model."""
    z, _ = golden
    path = tmp_path / "hq.pth"
    torch.save(golden_state(z), path)
    model = load_model(path, progress=False)
    assert isinstance(model, SamHQ)


def test_catalogue_entries(monkeypatch, tmp_path):
    """The four HQ-SAM files, on lkeab/hq-sam, each for its registry variant; the hashes
    found in public sources are pinned, the others are refused without an explicit one
    (and nothing is downloaded)."""
    from segany import weights as W

    for size in ("vit_tiny", "vit_b", "vit_l", "vit_h"):
        spec = W.get_spec(f"sam_hq_{size}")
        assert spec.variant == f"sam_hq_{size}" and spec.variant in HQ_VARIANTS
        assert spec.filename == f"sam_hq_{size}.pth" and spec.licence == "Apache-2.0"
        assert spec.sources == (
            W.UrlSource(f"https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_{size}.pth"),
        )
    h = W.get_spec("sam_hq_vit_h")
    assert h.sha256 == "a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35"
    assert h.size == 2_570_940_653
    assert W.get_spec("sam_hq_vit_tiny").sha256 == (
        "0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196"
    )
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    for name in ("sam_hq_vit_b", "sam_hq_vit_l"):
        assert W.get_spec(name).sha256 is None
        with pytest.raises(W.WeightsError, match="refusing an unverified download"):
            load_model(name, progress=False)
    assert not (tmp_path / "weights").exists()


# -- parity on the committed golden ------------------------------------------------------


@pytest.mark.parametrize("fuse", [False, True])
def test_predictor_matches_reference(golden, fuse):
    """Every recorded prompt through segany's Predictor, with ``hq_token_only`` as recorded;
    the fused model (loader default) too."""
    z, meta = golden
    p = Predictor(model_from_state_dict(golden_state(z)), fuse=fuse)
    p.set_image(z["image"])
    np.testing.assert_allclose(p.embedding.numpy(), z["image_embed"], atol=EMB_ATOL)
    assert len(meta["cases"]) == 14
    for key, case in meta["cases"].items():
        p.hq_token_only = case["hq"]
        mm = case["multimask_output"]
        if key.startswith("batch"):
            pred = p.predict_batch(boxes=z["batch_boxes"], multimask_output=mm, return_logits=True)
        else:
            pred = p.predict(**case_args(key, case, z), multimask_output=mm, return_logits=True)
        ref_low = z[f"{key}_lowres"]
        np.testing.assert_allclose(
            pred.low_res_logits.reshape(ref_low.shape), ref_low, atol=LOWRES_ATOL, err_msg=key
        )
        ref_iou = z[f"{key}_iou"].reshape(-1)
        np.testing.assert_allclose(pred.scores.reshape(-1), ref_iou, atol=IOU_ATOL, err_msg=key)
        packed = z[f"{key}_masks"]
        check_masks(pred.masks.reshape(*packed.shape[:-1], -1), packed)


def test_compat_names_match_reference(tiny_hq, golden):
    """``segany.compat.hq.SamPredictor``: the reference's return values (one mask per
    prompt, ``hq_token_only`` per call) for the single-prompt and batched-box cases."""
    z, meta = golden
    p = compat_hq.SamPredictor(tiny_hq)
    p.set_image(z["image"])
    for key, case in meta["cases"].items():
        if key.startswith("batch"):
            boxes = p.transform.apply_boxes_torch(
                torch.as_tensor(z["batch_boxes"]), p.original_size
            )
            masks, iou, low = p.predict_torch(
                None, None, boxes=boxes, multimask_output=True, hq_token_only=case["hq"]
            )
            masks, iou, low = masks.numpy(), iou.numpy(), low.numpy()
        else:
            masks, iou, low = p.predict(
                **case_args(key, case, z),
                multimask_output=case["multimask_output"],
                hq_token_only=case["hq"],
            )
        assert masks.shape[-3] == 1 and masks.dtype == bool
        np.testing.assert_allclose(iou, z[f"{key}_iou"], atol=IOU_ATOL, err_msg=key)
        np.testing.assert_allclose(low, z[f"{key}_lowres"], atol=LOWRES_ATOL, err_msg=key)


def test_compat_registry_and_checkpoint(golden, tmp_path):
    z, _ = golden
    assert set(compat_hq.sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b", "vit_tiny"}
    with pytest.raises(TypeError, match="HQ-SAM"):
        compat_hq.SamPredictor(build_model("vit_t", img_size=64))
    # the registry's builders load strictly: a checkpoint of another size is refused
    path = tmp_path / "tiny.pth"
    torch.save(golden_state(z), path)
    with pytest.raises(RuntimeError, match="size mismatch|Missing|Unexpected"):
        compat_hq.sam_model_registry["vit_tiny"](checkpoint=str(path))


def test_cached_embedding_keeps_hq_features(tiny_hq, golden, tmp_path):
    """The HQ features are part of the cached embedding: a predictor reading the disk
    cache gives the same logits without running the encoder."""
    z, meta = golden
    case = meta["cases"]["point_box_hq"]
    first = Predictor(tiny_hq, cache=EmbeddingCache(tmp_path), hq_token_only=True)
    first.set_image(z["image"])
    assert len(first.state.high_res) == 1 and first.state.high_res[0].shape == (1, 4, 64, 64)
    second = Predictor(tiny_hq, cache=EmbeddingCache(tmp_path), hq_token_only=True)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran despite the cache")

    second.embed = no_encoder  # type: ignore[method-assign]
    second.set_image(z["image"])
    out = second.predict(**case_args("point_box_hq", case, z), multimask_output=False)
    np.testing.assert_allclose(out.low_res_logits, z["point_box_hq_lowres"], atol=LOWRES_ATOL)


def test_backends_and_modes_that_refuse_hq(tiny_hq):
    """Where HQ-SAM has no path, a clear error rather than wrong results: the int8 ONNX
    graphs (the torch and float ONNX backends run it: test_hq_onnx.py) and the SAM 1-only
    ONNX context/prompt graphs (training SAM's own heads: test_hq_train.py)."""
    from segany.export.onnx import export_context

    with pytest.raises(ValueError, match="HQ-SAM"):
        Predictor(tiny_hq, backend="onnx-int8")
    with pytest.raises(ValueError, match="HQ-SAM"):
        export_context(tiny_hq, "context.onnx")


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("only", [False, True])
def test_segment_command_with_model_path(golden, tmp_path, capsys, only):
    """``segany segment --model PATH`` runs an HQ checkpoint: one mask, the Predictor's
    (with ``--hq-token-only`` the HQ output's alone)."""
    from PIL import Image

    from segany.cli import main

    z, _ = golden
    ckpt, image, out = tmp_path / "hq.pth", tmp_path / "img.png", tmp_path / "m.png"
    torch.save(golden_state(z), ckpt)
    Image.fromarray(z["image"]).save(image)
    args = ["segment", str(image), "--box", "50,30,140,128", "--model", str(ckpt)]
    code = main([*args, "--out", str(out), *(["--hq-token-only"] if only else [])])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["masks"]) == 1
    p = Predictor(model_from_state_dict(golden_state(z)), hq_token_only=only)
    p.set_image(z["image"])
    want = p.predict(box=np.array([50.0, 30, 140, 128]), multimask_output=False).masks[0]
    mask = np.asarray(Image.open(out)) > 0
    assert mask.shape == want.shape and (mask != want).sum() <= 2  # fused vs unfused rounding


def test_segment_hq_flag_refuses_other_models(golden, tmp_path, capsys):
    from PIL import Image

    from segany.cli import main

    z, _ = golden
    sam1 = {
        k: v
        for k, v in golden_state(z).items()
        if not k.startswith(
            ("mask_decoder.hf_", "mask_decoder.compress", "mask_decoder.embedding_")
        )
    }
    ckpt, image = tmp_path / "sam1.pth", tmp_path / "img.png"
    torch.save(sam1, ckpt)
    Image.fromarray(z["image"]).save(image)
    args = ["segment", str(image), "--point", "20,20", "--model", str(ckpt), "--hq-token-only"]
    assert main([*args, "--out", str(tmp_path / "m.png")]) == 2
    assert "HQ-SAM" in capsys.readouterr().err


# -- light HQ-SAM against the reference (slow, needs the reference venv) -----------------


@pytest.mark.skipif(
    not REFERENCE_PY.exists() or not os.environ.get("SEGANY_SLOW"),
    reason="set SEGANY_SLOW=1 with the reference venv to compare light HQ-SAM (TinyViT)",
)
def test_light_hq_matches_reference(tmp_path):
    ckpt, out = tmp_path / "light.pth", tmp_path / "light.npz"
    subprocess.run(
        [
            str(REFERENCE_PY),
            str(REPO / "benchmarks/make_hq_goldens.py"),
            "goldens",
            "--config",
            "tinyvit-test",
            "--out",
            str(out),
            "--checkpoint",
            str(ckpt),
        ],
        check=True,
        cwd=tmp_path,
    )
    z = np.load(out)
    meta = json.loads(str(z["meta"]))
    model = vit_t(hq=True, **meta["overrides"]).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True), strict=True)
    p = compat_hq.SamPredictor(model)
    p.set_image(z["image"])
    # measured: embedding 1.1e-5, low-res logits 1.8e-5, IoUs 4e-7 (docs/hq-sam.md)
    np.testing.assert_allclose(p.get_image_embedding().numpy(), z["image_embed"], atol=1e-4)
    for key, case in meta["cases"].items():
        if key.startswith("batch"):
            boxes = p.transform.apply_boxes_torch(
                torch.as_tensor(z["batch_boxes"]), p.original_size
            )
            out = p.predict_torch(
                None, None, boxes=boxes, multimask_output=True, hq_token_only=case["hq"]
            )
            masks, iou, low = (t.numpy() for t in out)
        else:
            masks, iou, low = p.predict(
                **case_args(key, case, z),
                multimask_output=case["multimask_output"],
                hq_token_only=case["hq"],
            )
        np.testing.assert_allclose(iou, z[f"{key}_iou"], atol=1e-5, err_msg=key)
        np.testing.assert_allclose(low, z[f"{key}_lowres"], atol=1e-4, err_msg=key)
        ref = np.unpackbits(z[f"{key}_masks"], axis=-1, count=masks.shape[-1]).astype(bool)
        assert (ref != masks).sum() <= 4, key  # pixels whose logit is within float noise of 0
