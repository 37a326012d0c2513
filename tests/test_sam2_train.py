"""Training with SAM 2: the SAM 2 loss terms, decoder fine-tuning on cached multi-level
features (tiny SAM 2 config, the nuclei photos of tests/data), and the checkpoint in the
official layout through ``segany train`` and back through ``segany.load_model``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.models.registry import sam2_custom
from segany.models.sam2 import Sam2
from segany.train import data as D
from segany.train import family as FAM
from segany.train.losses import sam_loss
from segany.train.trainer import TrainConfig, Trainer, output_paths

from .conftest import TEST_DATA

NUCLEI = TEST_DATA / "nuclei"
#: the reduced Hiera of tests/data/sam2_tiny_test_golden.npz (256 px input, width 32)
TINY = dict(embed_dim=16, num_heads=1, stages=(1, 2, 3, 1), window_spec=(8, 4, 6, 3),
            global_att_blocks=(4,), window_pos_embed_bkg_spatial_size=(7, 7), d_model=32,
            img_size=256)  # fmt: skip


def tiny_sam2(seed: int = 0) -> Sam2:
    torch.manual_seed(seed)
    return sam2_custom(**TINY).eval()


def test_sam2_loss_terms_hand_computed() -> None:
    logits = torch.zeros(2, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    pred_iou = torch.tensor([[0.75], [0.5]])
    obj = torch.tensor([[0.0], [2.0]])
    out = sam_loss(logits, pred_iou, target, iou_loss="l1", object_logits=obj, object_weight=3.0)
    # true IoUs: mask 0 predicts nothing over a 1-pixel target -> 0; mask 1: both empty -> 1
    assert out.true_iou.flatten().tolist() == [0.0, 1.0]
    ln2 = math.log(2.0)
    focal0 = (0.25 * 0.25 * ln2 + 3 * 0.75 * 0.25 * ln2) / 4  # alpha 0.25, gamma 2
    dice0 = 1 - (2 * 0.5 + 1) / (2 + 1 + 1)
    bce0, bce1 = ln2, math.log1p(math.exp(2.0))  # towards "present", "absent"
    # mask 0: focal x20 + dice + |0.75 - 0| + 3 x BCE; mask 1 (empty target): 3 x BCE only
    want = (20 * focal0 + dice0 + 0.75 + 3 * bce0 + 3 * bce1) / 2
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.object.item() == pytest.approx((bce0 + bce1) / 2, rel=1e-6)
    assert out.iou_mse.item() == pytest.approx((0.75 + 0.5) / 2)
    # SAM 1's recipe on the same input: squared IoU error, no object term, every mask counts
    sam1 = sam_loss(logits, pred_iou, target)
    focal1, dice1 = 0.75 * 0.25 * ln2, 1 - 1 / 3
    want1 = (20 * focal0 + dice0 + 0.75**2 + 20 * focal1 + dice1 + 0.5**2) / 2
    assert sam1.loss.item() == pytest.approx(want1, rel=1e-6) and sam1.object.item() == 0
    with pytest.raises(ValueError, match="iou_loss"):
        sam_loss(logits, pred_iou, target, iou_loss="huber")


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=8, lr=3e-3, warmup_steps=1, images_per_step=1, masks_per_image=2,
                point_rounds=1, empty_rounds=0, val_fraction=0.25, log_every=1)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


#: the fixed batch's loss must fall at least this much in 8 steps (measured: 4.97 -> 2.71,
#: a factor 0.55)
LOSS_FACTOR = 0.7


def test_sam2_decoder_training_lowers_the_loss(tmp_path: Path) -> None:
    data = D.open_source(NUCLEI)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    model = tiny_sam2()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tr, va, _cfg(), tmp_path / "m.pt", progress=False,
                      embedding_cache=tmp_path / "emb")  # fmt: skip
    trainer.embeddings.prepare(tr, progress=False)
    item = trainer.embeddings.get(tr[0])
    # the cache holds the embedding and both projected high-res maps
    assert item.embedding.shape == (1, 32, 16, 16) and item.input_size == (256, 256)
    assert [tuple(t.shape) for t in item.high_res] == [(1, 4, 64, 64), (1, 8, 32, 32)]
    assert model.mask_decoder.training and not model.image_encoder.training

    def fixed_loss() -> float:
        rng = np.random.default_rng(123)
        batch = trainer.sample_batch(rng)
        with torch.no_grad():
            return trainer.simulate(batch, rng, train=False).loss

    before = fixed_loss()
    meta = trainer.run()
    after = fixed_loss()
    assert after < LOSS_FACTOR * before, (before, after)
    rows = [json.loads(line) for line in output_paths(tmp_path / "m.pt")["jsonl"].open()]
    assert len(rows) == 8 and all(r["object"] > 0 for r in rows)
    assert meta["steps_done"] == 8
    # what made the cached features is frozen; the decoder learnt
    sd = model.state_dict()
    for k, v in start.items():
        same = torch.equal(v, sd[k])
        if k.startswith(("image_encoder.", "no_mem_embed", "sam_mask_decoder.conv_s")):
            assert same, k
    assert not torch.equal(start["sam_mask_decoder.iou_token.weight"],
                           sd["sam_mask_decoder.iou_token.weight"])  # fmt: skip
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(saved) == {"model"} and set(saved["model"]) == set(sd)


@pytest.mark.parametrize("mode", ["decoder+prompt", "full"])
def test_sam2_other_modes_train_their_parts(mode: str, tmp_path: Path) -> None:
    """``decoder+prompt`` also moves the prompt encoder, on cached features (``conv_s0``
    frozen); ``full`` runs the encoder each step and moves it and ``conv_s0`` too."""
    data = D.open_source(NUCLEI)
    tr = D.split_by_image(data.images, 0.0, 0)[0][:1]
    model = tiny_sam2()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tr, [], _cfg(steps=1, train=mode, masks_per_image=2),
                      tmp_path / "f.pt", progress=False)  # fmt: skip
    trainer.run()
    sd = model.state_dict()
    moved = {k for k in start if not torch.equal(start[k], sd[k])}
    assert "sam_prompt_encoder.not_a_point_embed.weight" in moved  # the padding point: always
    encoder = {"image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.conv_s0.weight"}
    if mode == "full":
        assert encoder <= moved
    else:
        assert not moved & encoder and not any(k.startswith("image_encoder.") for k in moved)


def test_sam2_replay_uses_the_high_res_maps_and_starts_at_zero(tmp_path: Path) -> None:
    """Replay distillation with SAM 2: teacher and student decode with the cached high-res
    maps in the same (training) mode, so the loss is 0 before any update."""
    data = D.open_source(NUCLEI)
    tr = D.split_by_image(data.images, 0.0, 0)[0][:1]
    replay = D.image_source(NUCLEI / "images").images[1:2]
    trainer = Trainer(tiny_sam2(), tr, [], _cfg(steps=1, replay_points=2), tmp_path / "r.pt",
                      progress=False, replay_images=replay)  # fmt: skip
    trainer.embeddings.prepare(replay, progress=False)
    assert trainer.teacher[1].training  # the student's mode (no stability fallback)
    assert trainer.replay_loss(np.random.default_rng(0), train=False) == pytest.approx(0, abs=1e-5)
    trainer.run()
    assert trainer.replay_loss(np.random.default_rng(0), train=False) > 0  # the student moved


def test_cli_train_sam2_checkpoint_loads_back(tmp_path: Path) -> None:
    """``segany train --model`` an official-layout SAM 2.1 Hiera-T file (random weights):
    the fine-tune is ``{"model": state_dict}`` and loads with ``segany.load_model``."""
    from segany.cli import main
    from segany.loader import load_model
    from segany.models import build_model

    torch.manual_seed(0)
    base = tmp_path / "random_sam2.1_hiera_t.pt"
    torch.save({"model": build_model("sam2.1_hiera_t").state_dict()}, base)
    src = json.loads((NUCLEI / "annotations.json").read_text())  # one image keeps it short
    first = src["images"][0]
    src["images"] = [first]
    src["annotations"] = [a for a in src["annotations"] if a["image_id"] == first["id"]]
    (tmp_path / "one.json").write_text(json.dumps(src))
    out = tmp_path / "run" / "ft.pt"
    args = ["train", "--data", str(tmp_path / "one.json"), "--images", str(NUCLEI / "images"),
            "--model", str(base), "--out", str(out), "--steps", "1", "--val-fraction", "0",
            "--masks-per-image", "1", "--images-per-step", "1", "--point-rounds", "0",
            "--empty-rounds", "0", "--lr", "1e-3", "--embedding-cache", str(tmp_path / "emb"),
            "--quiet", "--rehearse", "none"]  # fmt: skip
    assert main(args) == 0
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"model"}
    loaded = load_model(out, progress=False)
    assert isinstance(loaded, Sam2)
    a, b = loaded.state_dict(), torch.load(base, weights_only=True)["model"]
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("sam_mask_decoder.") for k in changed)
    assert not any(".conv_s" in k for k in changed)
    # the cache is named by the weights that made the features (encoder, conv_s0/s1, ...)
    assert list((tmp_path / "emb").glob("enc*.pt"))
    assert FAM.feature_state(loaded).keys() >= {"no_mem_embed", "conv_s0.weight"}
