"""Training: losses on hand-computed cases, the prompt samplers, data sources and the split,
a few steps that lower the loss, and resume == uninterrupted (tiny random model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segany.train import data as D
from segany.train import prompts as P
from segany.train.losses import dice_loss, focal_loss, iou_mse, mask_iou, sam_loss
from segany.train.trainer import TrainConfig, Trainer, lr_factor, output_paths

from .conftest import tiny_sam


def small_sam(seed: int = 0):
    """A SAM whose every part is small (32-channel decoder, 128 px input): the training
    tests' model. Checkpoints of the standard dimensions are tested with ``tiny_sam``."""
    from segany.models import Sam
    from segany.models.image_encoder import ImageEncoderViT
    from segany.models.mask_decoder import MaskDecoder
    from segany.models.prompt_encoder import PromptEncoder
    from segany.models.transformer import TwoWayTransformer

    torch.manual_seed(seed)
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(img_size=128, embed_dim=16, depth=1, num_heads=1,
                                      out_chans=dim, window_size=0, use_rel_pos=False),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(8, 8),
                                     input_image_size=(128, 128), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=2, mlp_dim=64),
            iou_head_hidden_dim=dim,
        ),
    ).eval()  # fmt: skip


LN2 = math.log(2.0)


# -- losses ----------------------------------------------------------------------------------
def test_focal_loss_hand_computed() -> None:
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    pos = 0.25 * 0.5**2 * LN2  # alpha (1 - p)^2 (-log p)
    neg = 0.75 * 0.5**2 * LN2  # (1 - alpha) p^2 (-log(1 - p))
    assert focal_loss(logits, target).item() == pytest.approx((pos + 3 * neg) / 4, rel=1e-6)
    valid = torch.tensor([[[True, True], [True, False]]])
    assert focal_loss(logits, target, valid).item() == pytest.approx((pos + 2 * neg) / 3, rel=1e-6)
    # a confident, correct prediction costs almost nothing; a confident wrong one a lot
    good = torch.tensor([[[10.0, -10.0], [-10.0, -10.0]]])
    assert focal_loss(good, target).item() < 1e-6
    assert focal_loss(-good, target).item() > 1.0


def test_dice_loss_hand_computed() -> None:
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # sum p = 2, sum t = 1, sum p t = 0.5: 1 - (2 * 0.5 + 1) / (2 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    valid = torch.tensor([[[True, True], [True, False]]])
    assert dice_loss(logits, target, valid).item() == pytest.approx(1 - 2 / 3.5)
    assert dice_loss(torch.full((1, 2, 2), 50.0), torch.ones(1, 2, 2)).item() == pytest.approx(0.0)


def test_iou_and_mse_hand_computed() -> None:
    logits = torch.tensor([[[5.0, 5.0], [-5.0, -5.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert mask_iou(logits, target).item() == pytest.approx(0.5)
    assert mask_iou(-torch.ones(1, 2, 2), torch.zeros(1, 2, 2)).item() == 1.0  # both empty
    assert mask_iou(logits, target, torch.tensor([[[True, False], [True, True]]])).item() == 1.0
    assert iou_mse(torch.tensor([0.8]), torch.tensor([0.5])).item() == pytest.approx(0.09)


def test_sam_loss_weights_and_lowest_loss_gets_the_gradient() -> None:
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1
    good = torch.where(target[0] > 0, 8.0, -8.0)
    logits = torch.stack([torch.zeros(4, 4), good, -good])[None].requires_grad_(True)
    pred_iou = torch.tensor([[0.5, 0.9, 0.1]], requires_grad=True)
    out = sam_loss(logits, pred_iou, target)
    assert out.chosen.tolist() == [1]
    assert out.true_iou[0].tolist() == pytest.approx([0.0, 1.0, 0.0])  # logit 0 is not > 0
    # total = 20 focal + dice of the chosen mask + mean IoU MSE over the three outputs
    f = focal_loss(good[None], target).item()
    d = dice_loss(good[None], target).item()
    mse = ((0.5 - 0.0) ** 2 + (0.9 - 1.0) ** 2 + (0.1 - 0.0) ** 2) / 3
    assert out.loss.item() == pytest.approx(20 * f + d + mse, rel=1e-5)
    out.loss.backward()
    g = logits.grad[0].abs().sum(dim=(1, 2))
    assert g[0] == 0 and g[2] == 0 and g[1] > 0  # only the lowest-loss mask learns
    assert (pred_iou.grad != 0).all()  # the IoU head learns for every output


# -- prompts ---------------------------------------------------------------------------------
def test_error_region_sampler_stays_in_the_region() -> None:
    rng = np.random.default_rng(0)
    gt = rng.random((64, 24, 32)) < 0.3
    pred = rng.random((64, 24, 32)) < 0.3
    pred[0] = gt[0]  # no error at all
    pred[1] = gt[1] | (rng.random((24, 32)) < 0.05)  # only false positives
    valid = np.zeros((24, 32), dtype=bool)
    valid[:20, :28] = True
    fn, fp = P.error_regions(gt, pred)
    for _ in range(20):
        for v in (None, valid):
            coords, labels = P.sample_error_points(gt, pred, rng, v)
            assert labels[0] == -1
            for i in range(1, len(gt)):
                x, y = int(coords[i, 0]), int(coords[i, 1])
                assert labels[i] in (0, 1)
                region = fn[i] if labels[i] == 1 else fp[i]
                assert region[y, x], (i, x, y, labels[i])
                if v is not None:
                    assert v[y, x]
            assert (labels[1] == 0) or not fn[1].any()


def test_point_box_and_schedule_samplers() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10, 20] = True
    masks[2, 15:20, :] = True
    for _ in range(20):
        pts = P.sample_points(masks, rng)
        assert all(masks[i, int(y), int(x)] for i, (x, y) in enumerate(pts))
    with pytest.raises(ValueError):
        P.sample_points(np.zeros((1, 4, 4), dtype=bool), rng)
    boxes = np.array([[10.0, 10.0, 110.0, 60.0], [0.0, 0.0, 1000.0, 1000.0]])
    for _ in range(50):
        j = P.jitter_boxes(boxes, rng)
        assert (j[:, 2] >= j[:, 0]).all() and (j[:, 3] >= j[:, 1]).all()
        assert np.abs(j - boxes).max() <= 20.0 + 1e-9  # capped at 20 px
    assert np.array_equal(P.jitter_boxes(boxes, rng, noise=0.0), boxes)
    for _ in range(10):
        s = P.round_schedule(rng)
        assert len(s) == 10 and sum(s) == 8 and s[-1] is False
    assert P.num_rounds() == 11
    assert P.round_schedule(rng, 3, 0) == [True] * 3
    cells = np.array([[0, 0], [5, 7]])
    sizes = np.array([[10, 10], [1024, 1024]])
    for _ in range(10):
        pix = P.lowres_to_model_points(cells, rng, 4, sizes)
        assert (pix // 4 == cells).all()


# -- data ------------------------------------------------------------------------------------
def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def make_squares(root: Path, n: int = 4, seed: int = 0) -> Path:
    """A COCO dataset of ``n`` small images with three bright squares each."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        h, w = 48, 64
        img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
        for _ in range(3):
            y0, x0, s = int(rng.integers(2, h - 18)), int(rng.integers(2, w - 18)), 14
            m = np.zeros((h, w), dtype=bool)
            m[y0 : y0 + s, x0 : x0 + s] = True
            img[m] = 220
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "segmentation": _rle(m), "area": int(m.sum()),
                         "bbox": [x0, y0, s, s], "iscrowd": 0})  # fmt: skip
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "sq"}]}
    (root / "annotations.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_squares(tmp_path_factory.mktemp("squares"))


def test_sources_and_split(squares: Path, tmp_path: Path) -> None:
    coco = D.open_source(squares)
    assert coco.kind == "coco" and len(coco.images) == 4 and coco.num_masks == 12
    tr, va = D.split_by_image(coco.images, 0.5, seed=3)
    assert len(tr) == len(va) == 2 and not {i.key for i in tr} & {i.key for i in va}
    tr2, va2 = D.split_by_image(list(reversed(coco.images)), 0.5, seed=3)
    assert [i.key for i in va2] == [i.key for i in va]  # seeded, order-independent
    # SA-1B layout: one JSON per image beside it
    sa = tmp_path / "sa1b"
    sa.mkdir()
    src = json.loads((squares / "annotations.json").read_text())
    for im in src["images"][:2]:
        Image.open(squares / "images" / im["file_name"]).save(sa / im["file_name"])
        anns = [a for a in src["annotations"] if a["image_id"] == im["id"]]
        (sa / (Path(im["file_name"]).stem + ".json")).write_text(json.dumps(
            {"image": {**im, "image_id": im["id"]}, "annotations": anns}))  # fmt: skip
    sa1b = D.open_source(sa)
    assert sa1b.kind == "sa1b" and sa1b.num_masks == 6
    assert np.array_equal(sa1b.images[0].masks(), coco.images[0].masks())
    # the COCO written for the evaluation round-trips
    again = tmp_path / "val.json"
    again.write_text(json.dumps(D.to_coco(va)))
    back = D.open_source(again, images=squares / "images")
    assert [i.key for i in back.images] == [i.key for i in va]
    assert np.array_equal(back.images[0].masks(), va[0].masks())


def test_store_source(squares: Path, tmp_path: Path) -> None:
    from segany.engine.store import Store

    src = json.loads((squares / "annotations.json").read_text())
    db = tmp_path / "a.db"
    store = Store(db)
    store.sync_images({im["file_name"]: {"width": im["width"], "height": im["height"],
                       "size_bytes": 1, "mtime": 0.0} for im in src["images"]})  # fmt: skip
    ids = {im.path: im.id for im in store.images()}
    items = []
    for a in src["annotations"]:
        name = src["images"][a["image_id"] - 1]["file_name"]
        status = "rejected" if a["id"] % 3 == 0 else "accepted"
        items.append({"image_id": ids[name], "segmentation": a["segmentation"],
                      "bbox": a["bbox"], "area": a["area"], "status": status})  # fmt: skip
    store.add_annotations(items)
    store.close()
    data = D.open_source(db, images=squares / "images")
    assert data.kind == "store" and data.num_masks == 8  # rejected objects are left out


def test_lowres_targets_match_the_pixels_under_cell_centres() -> None:
    m = np.zeros((1, 256, 256), dtype=bool)
    m[0, 10:20, 30:35] = True
    t, valid = D.lowres_targets(m, (1024, 1024), 1024, 256)
    assert np.array_equal(t, m) and valid.all()  # 256 px image: one cell per pixel
    m2 = np.zeros((1, 100, 200), dtype=bool)
    m2[0, 50:, :100] = True
    t2, valid2 = D.lowres_targets(m2, (512, 1024), 1024, 256)
    assert valid2[:128].all() and not valid2[128:].any()
    assert t2[0, 64:128, :128].all() and not t2[0, :64].any() and not t2[0, :, 128:].any()


# -- training --------------------------------------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    # small: one image of two masks, a first prompt (box or point with equal odds) and one
    # error-region point per step
    base = dict(steps=4, lr=2e-3, warmup_steps=1, images_per_step=1, masks_per_image=2,
                point_rounds=1, empty_rounds=0, box_prob=0.5, val_fraction=0.25,
                log_every=1)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=90, warmup_steps=10, decay_at=(2 / 3, 26 / 27))
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(59, cfg) == 1.0 and lr_factor(60, cfg) == pytest.approx(0.1)
    assert lr_factor(87, cfg) == pytest.approx(0.01)


def test_a_few_steps_lower_the_loss(squares: Path, tmp_path: Path) -> None:
    data = D.open_source(squares)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    trainer = Trainer(small_sam(), tr, va, _cfg(steps=8), tmp_path / "m.pt", progress=False)
    trainer.embeddings.prepare(tr, progress=False)

    def fixed_loss() -> float:
        rng = np.random.default_rng(123)
        batch = trainer.sample_batch(rng)
        with torch.no_grad():
            return trainer.simulate(batch, rng, train=False).loss

    before = fixed_loss()
    meta = trainer.run()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    paths = output_paths(tmp_path / "m.pt")
    for key in ("weights", "meta", "state", "csv", "jsonl", "plot", "val"):
        assert paths[key].is_file(), key
    assert meta["steps_done"] == 8 and meta["split"]["val_images"]


def test_output_is_a_registry_checkpoint(squares: Path, tmp_path: Path) -> None:
    from segany.loader import load_model

    data = D.open_source(squares)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    trainer = Trainer(tiny_sam(), tr, va, _cfg(steps=1), tmp_path / "m.pt", progress=False)
    trainer.run()
    loaded = load_model(tmp_path / "m.pt")  # loads like any checkpoint of the registry
    sd = trainer.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


def test_resume_equals_uninterrupted(squares: Path, tmp_path: Path) -> None:
    data = D.open_source(squares)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    cfg = _cfg(steps=3, checkpoint_every=1, accumulate=2, box_prob=1.0)
    full = Trainer(small_sam(), tr, va, cfg, tmp_path / "a.pt", progress=False)
    full.run()

    part = Trainer(small_sam(), tr, va, cfg, tmp_path / "b.pt", progress=False)

    def stop(step: int, _row: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt  # the "crash" after step 2

    part.on_step = stop
    with pytest.raises(KeyboardInterrupt):
        part.run()
    state = torch.load(output_paths(tmp_path / "b.pt")["state"], weights_only=True)
    assert state["step"] == 2  # saved on the interrupt
    resumed = Trainer(small_sam(seed=7), tr, va, _cfg(steps=3), tmp_path / "b.pt", progress=False)
    meta = resumed.run(resume=True)
    assert meta["steps_done"] == 3 and meta["config"]["accumulate"] == 2  # saved recipe kept
    a = full.model.state_dict()
    b = resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in output_paths(tmp_path / "b.pt")["jsonl"].open()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_replay_distillation_runs_and_starts_at_zero(squares: Path, tmp_path: Path) -> None:
    data = D.open_source(squares)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    replay = D.image_source(squares / "images").images
    assert len(replay) == 4 and all(im.num_masks == 0 for im in replay)
    cfg = _cfg(steps=1, replay_points=2)
    trainer = Trainer(small_sam(), tr, va, cfg, tmp_path / "r.pt", progress=False,
                      replay_images=replay)  # fmt: skip
    trainer.embeddings.prepare(replay, progress=False)
    # before any update the student is the teacher: the distillation loss is zero
    assert trainer.replay_loss(np.random.default_rng(0), train=False) == pytest.approx(0, abs=1e-5)
    teacher = [p.clone() for p in trainer.teacher[1].parameters()]
    trainer.run()
    rows = [json.loads(line) for line in output_paths(tmp_path / "r.pt")["jsonl"].open()]
    assert rows[-1]["replay"] >= 0
    assert all(torch.equal(a, b) for a, b in zip(teacher, trainer.teacher[1].parameters()))
    assert trainer.replay_loss(np.random.default_rng(0), train=False) > 0  # the student moved


def test_cli_train_split_and_use_the_checkpoint(squares: Path, tmp_path: Path) -> None:
    from segany.cli import main

    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    out = tmp_path / "run" / "ft.pt"
    common = ["--data", str(squares), "--val-fraction", "0.5", "--out", str(out)]
    assert main(["train", *common, "--split-only"]) == 0
    split = json.loads((tmp_path / "run" / "ft.val.json").read_text())
    assert len(split["images"]) == 2
    recipe = ["--masks-per-image", "1", "--images-per-step", "1", "--point-rounds", "0",
              "--empty-rounds", "0", "--decay-at", ""]  # fmt: skip
    args = ["train", *common, "--model", str(base), "--train", "decoder", "--steps", "1"]
    args += ["--embedding-cache", str(tmp_path / "emb"), "--quiet", "--rehearse", "none", *recipe]
    assert main(args) == 0
    meta = json.loads((tmp_path / "run" / "ft.json").read_text())
    assert meta["base_model"] == str(base) and meta["config"]["decay_at"] == []
    assert meta["config"]["masks_per_image"] == 1 and meta["config"]["lr"] == TrainConfig().lr
    assert list((tmp_path / "emb").glob("enc*.pt"))  # embeddings cached on disk
    image = squares / "images" / "im0.png"
    mask = tmp_path / "mask.png"
    assert main(["segment", str(image), "--point", "10,10", "--model", str(out),
                 "--out", str(mask)]) == 0  # fmt: skip
    assert mask.is_file()


def test_rank_loss_keeps_the_teachers_first_choice() -> None:
    from segany.train.trainer import rank_loss

    teacher = torch.tensor([[0.90, 0.91, 0.89]])
    assert rank_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    flipped = torch.tensor([[0.92, 0.91, 0.89]])  # a small change of the first choice
    assert rank_loss(flipped, teacher).item() > 0.1


@pytest.mark.parametrize(
    "mode, learns",
    [
        ("iou-head", ("mask_decoder.iou_prediction_head.",)),
        (
            "heads",
            (
                "mask_decoder.iou_prediction_head.",
                "mask_decoder.output_hypernetworks_mlps.",
                "mask_decoder.iou_token.",
                "mask_decoder.mask_tokens.",
            ),
        ),
    ],
)
def test_partial_modes_change_only_their_parameters(
    mode: str, learns: tuple[str, ...], squares: Path, tmp_path: Path
) -> None:
    data = D.open_source(squares)
    tr, va = D.split_by_image(data.images, 0.25, 0)
    model = small_sam()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tr, va, _cfg(steps=2, train=mode, box_prob=0.0),
                      tmp_path / "m.pt", progress=False)  # fmt: skip
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(learns) for n in trained)
    masks_before = trainer.model.decode(
        trainer.embeddings.get(tr[0]).embedding, point_coords=torch.tensor([[[40.0, 40.0]]]),
        point_labels=torch.tensor([[1]]), multimask_output=True,
    )[0].detach()  # fmt: skip
    trainer.run()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(learns) for k in changed), changed
    for prefix in learns:  # every named part moved
        assert any(k.startswith(prefix) for k in changed), prefix
    # a full checkpoint of the registry: every key, frozen ones bit-identical
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(sd) == set(before)
    assert all(torch.equal(sd[k], before[k]) for k in before if k not in changed)
    masks_after = trainer.model.decode(
        trainer.embeddings.get(tr[0]).embedding, point_coords=torch.tensor([[[40.0, 40.0]]]),
        point_labels=torch.tensor([[1]]), multimask_output=True,
    )[0].detach()  # fmt: skip
    if mode == "iou-head":  # the masks are the starting model's, only their scores moved
        assert torch.equal(masks_before, masks_after)


def test_rehearsal_batches_train_and_resume_keeps_them(squares: Path, tmp_path: Path) -> None:
    from segany.train.trainer import train

    other = make_squares(tmp_path / "other")  # a second labelled source (another "domain")

    def run(out: Path, steps: int, on_step=None, **kw) -> dict:
        return train(squares, out, model=small_sam(), config=_cfg(steps=steps, **kw),
                     embedding_cache=None, progress=False, rehearse=other,
                     on_step=on_step)  # fmt: skip

    meta = run(tmp_path / "a.pt", 2)
    assert meta["rehearse"]["images"] == 4 and meta["rehearse"]["masks"] > 0
    rows = [json.loads(line) for line in output_paths(tmp_path / "a.pt")["jsonl"].open()]
    assert all(r["rehearse"] > 0 for r in rows)
    # the rehearsal batches move the weights: weight 0 gives other weights
    run(tmp_path / "z.pt", 2, rehearse_weight=0.0)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    z = torch.load(tmp_path / "z.pt", weights_only=True)
    assert any(not torch.equal(a[k], z[k]) for k in a)
    # interrupted after 1 step and resumed (without naming the source again) = 2 steps

    def stop(step: int, _row: dict) -> None:
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", 2, on_step=stop)
    train(squares, tmp_path / "b.pt", model=small_sam(), config=_cfg(steps=2),
          embedding_cache=None, progress=False, resume=True)  # fmt: skip
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="rehearsal image"):
        Trainer(small_sam(), D.open_source(squares).images, [], _cfg(), tmp_path / "c.pt",
                rehearse_images=D.image_source(other / "images").images)  # fmt: skip


# -- the default recipe (measured) and the general rehearsal set -----------------------------
def test_defaults_are_the_measured_recipe() -> None:
    """The defaults are the recipe of docs/training.md that met the nuclei target; the
    paper's rounds are a named recipe."""
    from segany.train.trainer import RECIPES

    cfg = TrainConfig()
    got = (cfg.train, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.point_rounds, cfg.empty_rounds)
    assert got == ("decoder", 120, 2e-4, 10, 1, 0)
    assert (cfg.box_prob, cfg.rehearse_weight, cfg.images_per_step, cfg.masks_per_image) == (
        0.2, 0.5, 2, 8)  # fmt: skip
    paper = TrainConfig(**RECIPES["paper"])
    assert (paper.rounds, paper.box_prob, paper.steps) == (11, 0.5, 1000)


def _fake_general_set(folder: Path) -> None:
    """Stand-ins for the 10 COCO images at their annotated sizes (the real ones are
    downloaded on a user's first run; this machine has no route to COCO's servers)."""
    from segany.train.rehearsal import ANNOTATIONS

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for im in json.loads(ANNOTATIONS.read_text())["images"]:
        px = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(px).save(folder / im["file_name"], quality=90)


def test_cli_train_rehearses_the_general_set_by_default(
    squares: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from segany.cli import main
    from segany.train import rehearsal

    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path / "cache"))
    _fake_general_set(rehearsal.images_dir())
    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    out = tmp_path / "ft.pt"
    args = ["train", "--data", str(squares), "--out", str(out), "--model", str(base)]
    assert main([*args, "--steps", "2", "--images-per-step", "1", "--masks-per-image", "1"]) == 0
    meta = json.loads((tmp_path / "ft.json").read_text())
    assert meta["rehearse"] == {
        "source": str(rehearsal.ANNOTATIONS),
        "images_dir": str(rehearsal.images_dir()),
        "images": 10,
        "masks": 69,
    }
    assert meta["config"]["rehearse_weight"] == 0.5 and meta["config"]["box_prob"] == 0.2
    err = capsys.readouterr().err
    assert "segany train: first step" in err and "for the 1 steps left" in err


def test_general_set_offline_says_where_to_put_it(
    squares: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import urllib.error

    from segany.cli import main
    from segany.train import rehearsal

    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path / "cache"))
    calls = []

    def offline(url: str, dest: Path) -> None:
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(rehearsal, "_download", offline)
    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    args = ["train", "--data", str(squares), "--out", str(tmp_path / "ft.pt")]
    assert main([*args, "--model", str(base), "--steps", "1", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert str(rehearsal.images_dir()) in err and "--rehearse none" in err
    assert len(calls) == 1  # stops at the first failure instead of waiting on each image
    assert not (tmp_path / "ft.pt").exists()
    # given the files (here, stand-ins), the same command runs
    _fake_general_set(rehearsal.images_dir())
    assert main([*args, "--model", str(base), "--steps", "1", "--quiet"]) == 0
