"""Training with HQ-SAM, as its official recipe does (``train/train.py`` of SysCV/sam-hq):
SAM's weights frozen, only what HQ-SAM adds learns, the loss (cross-entropy + dice) on the
HQ mask alone; the encoder's embedding and early map cached (tiny HQ-SAM of
hq_sam_tiny_test_golden.npz, the nuclei photos of tests/data), and the checkpoint in the
official layout through ``segany train`` and back through ``segany.load_model``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segany.models import SamHQ, model_from_state_dict
from segany.train import data as D
from segany.train import family as FAM
from segany.train.losses import dice_loss
from segany.train.trainer import TrainConfig, Trainer, output_paths

from .conftest import TEST_DATA, tiny_hq_state

NUCLEI = TEST_DATA / "nuclei"
HQ_PREFIXES = tuple(
    f"mask_decoder.{m}."
    for m in (
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
    )
)


def tiny() -> SamHQ:
    return model_from_state_dict(tiny_hq_state()).eval()


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=8, lr=3e-3, warmup_steps=1, images_per_step=1, masks_per_image=2,
                point_rounds=1, empty_rounds=0, val_fraction=0.25, log_every=1)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_hq_loss_is_cross_entropy_plus_dice_on_the_hq_mask() -> None:
    """decode_loss on HQ-SAM: the HQ mask alone (hq_token_only), one output, loss =
    mean sigmoid cross-entropy + dice, no IoU term."""
    model = tiny()
    torch.manual_seed(0)
    emb, early = torch.randn(2, 32, 16, 16), torch.randn(2, 32, 16, 16)
    target = torch.rand(2, 64, 64) > 0.6
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, 48:] = False
    prompts = {"point_coords": torch.tensor([[[60.0, 90.0]], [[200.0, 30.0]]]),
               "point_labels": torch.tensor([[1], [1]])}  # fmt: skip
    hr = FAM.decoder_features(model.mask_decoder, emb, (early,))
    logits, iou, out = FAM.decode_loss(model, emb, hr, target, valid, _cfg(), multimask=True,
                                       **prompts)  # fmt: skip
    with torch.no_grad():
        want, _ = model.decode(emb, multimask_output=False, high_res_features=hr,
                               hq_token_only=True, **prompts)  # fmt: skip
    assert logits.shape == (2, 1, 64, 64) and iou.shape == (2, 1)
    torch.testing.assert_close(logits, want)
    t = target[:, None].float()
    v = valid[:, None].float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    bce = (bce * v).sum((-1, -2)) / v.sum((-1, -2))
    dice = dice_loss(logits, t, v)
    assert out.loss.detach().item() == pytest.approx(float((bce + dice).mean()), rel=1e-5)
    assert out.iou_mse.item() > 0  # reported, not trained (IoU weight 0)


def test_hq_decoder_training_trains_only_the_hq_parts(tmp_path: Path) -> None:
    data = D.open_source(NUCLEI)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    model = tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tr, va, _cfg(), tmp_path / "m.pth", progress=False,
                      embedding_cache=tmp_path / "emb")  # fmt: skip
    trainer.embeddings.prepare(tr, progress=False)
    item = trainer.embeddings.get(tr[0])
    # the cache holds the encoder's two outputs, the embedding and the early map
    assert item.embedding.shape == (1, 32, 16, 16)
    assert [tuple(t.shape) for t in item.high_res] == [(1, 32, 16, 16)]
    assert trainer.embeddings.prefix.endswith("-early")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(HQ_PREFIXES) for n in trainable)
    assert len(trainable) == sum(
        1 for n, _ in model.named_parameters() if n.startswith(HQ_PREFIXES)
    )

    def fixed_loss() -> float:
        rng = np.random.default_rng(123)
        batch = trainer.sample_batch(rng)
        with torch.no_grad():
            return trainer.simulate(batch, rng, train=False).loss

    before = fixed_loss()
    meta = trainer.run()
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)
    assert meta["steps_done"] == 8
    sd = model.state_dict()
    moved = {k for k in start if not torch.equal(start[k], sd[k])}
    assert moved and all(k.startswith(HQ_PREFIXES) for k in moved)
    assert "mask_decoder.compress_vit_feat.0.weight" in moved  # the fusion learns
    rows = [json.loads(line) for line in output_paths(tmp_path / "m.pth")["jsonl"].open()]
    assert len(rows) == 8
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    assert set(saved) == set(sd)  # the official layout: a bare state dict


@pytest.mark.parametrize("mode", ["heads", "iou-head"])
def test_hq_refuses_modes_of_sams_heads(mode: str, tmp_path: Path) -> None:
    tr = D.split_by_image(D.open_source(NUCLEI).images, 0.0, 0)[0][:1]
    with pytest.raises(ValueError, match="HQ-SAM trains"):
        Trainer(tiny(), tr, [], _cfg(train=mode), tmp_path / "x.pth", progress=False)


def test_hq_full_mode_trains_the_encoder(tmp_path: Path) -> None:
    tr = D.split_by_image(D.open_source(NUCLEI).images, 0.0, 0)[0][:1]
    model = tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, tr, [], _cfg(steps=1, train="full"), tmp_path / "f.pth", progress=False).run()
    sd = model.state_dict()
    moved = {k for k in start if not torch.equal(start[k], sd[k])}
    assert "image_encoder.patch_embed.proj.weight" in moved
    assert "mask_decoder.compress_vit_feat.0.weight" in moved


def test_hq_replay_starts_at_zero(tmp_path: Path) -> None:
    """Replay distillation fuses the cached early map with the teacher's and the student's
    own HQ modules: the loss is 0 before any update and grows once they differ."""
    tr = D.split_by_image(D.open_source(NUCLEI).images, 0.0, 0)[0][:1]
    replay = D.image_source(NUCLEI / "images").images[1:2]
    trainer = Trainer(tiny(), tr, [], _cfg(steps=1, replay_points=2), tmp_path / "r.pth",
                      progress=False, replay_images=replay)  # fmt: skip
    trainer.embeddings.prepare(replay, progress=False)
    assert trainer.replay_loss(np.random.default_rng(0), train=False) == pytest.approx(0, abs=1e-6)
    trainer.run()
    assert trainer.replay_loss(np.random.default_rng(0), train=False) > 0


def test_cli_train_hq_checkpoint_loads_back(tmp_path: Path, tiny_hq_file: Path) -> None:
    """``segany train --model`` an HQ-SAM file: the fine-tune is a bare state dict that
    loads as HQ-SAM, with only HQ-SAM's own weights changed."""
    from segany.cli import main
    from segany.loader import load_model

    src = json.loads((NUCLEI / "annotations.json").read_text())  # one image keeps it short
    first = src["images"][0]
    src["images"] = [first]
    src["annotations"] = [a for a in src["annotations"] if a["image_id"] == first["id"]]
    (tmp_path / "one.json").write_text(json.dumps(src))
    out = tmp_path / "run" / "ft.pth"
    args = ["train", "--data", str(tmp_path / "one.json"), "--images", str(NUCLEI / "images"),
            "--model", str(tiny_hq_file), "--out", str(out), "--steps", "2", "--val-fraction",
            "0", "--masks-per-image", "2", "--images-per-step", "1", "--lr", "1e-3", "--quiet",
            "--embedding-cache", str(tmp_path / "emb"), "--rehearse", "none"]  # fmt: skip
    assert main(args) == 0
    loaded = load_model(out, progress=False)
    assert isinstance(loaded, SamHQ)
    a, b = loaded.state_dict(), torch.load(tiny_hq_file, weights_only=True)
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(HQ_PREFIXES) for k in changed)
    assert list((tmp_path / "emb").glob("enc*-early-*.pt"))
