"""The data engine's loop through the command line, with a tiny model: label a folder
(stage 3) -> fine-tune on the labels (``segany train --data DS``) -> evaluate the new model
on the labels (``segany eval points DS``) and on the held-out split (its images in the
tars) -> label again with the new model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segany.cli import main
from segany.datasets import open_dataset

from .conftest import tiny_sam

# loose thresholds so the random model keeps masks; a 3x3 grid keeps it fast
SETTINGS = ["--set=points_per_side=3", "--set=pred_iou_thresh=0.0",
            "--set=stability_score_thresh=0.0"]  # fmt: skip


def _images(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        a = rng.integers(0, 60, size=(64, 80, 3), dtype=np.uint8)
        a[10 + i : 40, 20 : 60 - i] = (200, 40 + 30 * i, 40)
        Image.fromarray(a).save(root / f"im{i}.png")
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    return root


def test_label_train_eval_label_again(tmp_path: Path, capsys) -> None:
    images = _images(tmp_path / "images")
    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    ds = tmp_path / "ds"
    label = ["label", str(images), "--preset", "reference", *SETTINGS, "--workers", "0"]
    assert main([*label, "--out", str(ds), "--model", str(base), "--no-progress"]) == 0
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 4 and manifest["counts"]["errors"] == 0
    data = open_dataset(ds)
    assert data.kind == "sa1b" and data.num_masks == manifest["counts"]["masks"] > 0
    assert [im.key for im in data.images] == [f"sa_{i}.png" for i in range(1, 5)]

    model = tmp_path / "run" / "ft.pt"
    recipe = ["--masks-per-image", "2", "--images-per-step", "1", "--point-rounds", "0",
              "--empty-rounds", "0", "--decay-at", ""]  # fmt: skip
    train = ["train", "--data", str(ds), "--model", str(base), "--train", "decoder"]
    train += ["--steps", "2", "--val-fraction", "0.25", "--out", str(model), "--quiet", *recipe]
    train += ["--rehearse", "none"]
    assert main(train) == 0
    meta = json.loads((tmp_path / "run" / "ft.json").read_text())
    assert meta["data"]["kind"] == "sa1b" and meta["data"]["images"] == 4
    assert len(meta["split"]["train_images"]) == 3 and len(meta["split"]["val_images"]) == 1
    assert meta["steps_done"] == 2
    before = torch.load(base, weights_only=True)
    after = torch.load(model, weights_only=True)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("mask_decoder.") for k in changed)

    out = tmp_path / "eval"
    ev = ["eval", "points", str(ds), "--model", str(base), "--model", str(model)]
    assert main([*ev, "--out", str(out), "--max-clicks", "2", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["masks"] for r in res["runs"]] == [data.num_masks] * 2
    assert res["models"] == ["tiny", "ft"]
    assert all(0 <= r["miou"]["1"] <= 100 for r in res["runs"])

    # the held-out split, its images found in the labeled tars
    val = tmp_path / "run" / "ft.val.json"
    held_out = open_dataset(val, images=ds)
    assert [im.key for im in held_out.images] == meta["split"]["val_images"]
    ev = ["eval", "boxes", str(val), "--images", str(ds), "--model", str(model)]
    assert main([*ev, "--out", str(tmp_path / "eval_val"), "--quiet"]) == 0
    res = json.loads((tmp_path / "eval_val" / "results.json").read_text())
    assert res["masks"] == held_out.num_masks > 0

    again = tmp_path / "ds2"
    assert main([*label, "--out", str(again), "--model", str(model), "--no-progress"]) == 0
    relabeled = open_dataset(again)
    assert len(relabeled.images) == 4
    assert json.loads((again / "manifest.json").read_text())["model"]["name"] == str(model)
    capsys.readouterr()
