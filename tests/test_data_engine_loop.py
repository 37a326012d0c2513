"""The data engine's loop through the command line, with a tiny model: label a folder
(stage 3) -> fine-tune on the labels (``segany train --data DS``) -> evaluate the new model
on the labels (``segany eval points DS``) and on the held-out split (its images in the
tars) -> serve it in the annotator and annotate -> retrain from the annotator's store
(``segany retrain``) and switch the annotator to it -> label again with the newest model.
Each model version is recorded with the data it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segany.cli import main
from segany.datasets import open_dataset
from segany.engine.service import AcceptRequest, AnnotationService, PredictRequest
from segany.engine.store import Store
from segany.loader import load_predictor
from segany.train.loop import model_history, switch_service_model

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
    # the best of three outputs against the labels scores at least the model's own choice
    assert all(r["oracle_miou_1"] >= r["miou"]["1"] for r in res["runs"])

    # the held-out split, its images found in the labeled tars
    val = tmp_path / "run" / "ft.val.json"
    held_out = open_dataset(val, images=ds)
    assert [im.key for im in held_out.images] == meta["split"]["val_images"]
    ev = ["eval", "boxes", str(val), "--images", str(ds), "--model", str(model)]
    assert main([*ev, "--out", str(tmp_path / "eval_val"), "--quiet"]) == 0
    res = json.loads((tmp_path / "eval_val" / "results.json").read_text())
    assert res["masks"] == held_out.num_masks > 0

    # serve the fine-tuned model in the annotator; annotate every image with one click
    svc = AnnotationService(
        Store(images / ".segany" / "annotations.db"),
        images,
        load_predictor(model, progress=False),
        model_name=model.name,
        prefetch=False,
    )
    try:
        svc.rescan()
        stored = svc.store.images()
        assert len(stored) == 4
        for im in stored:
            out = svc.predict(im.id, PredictRequest(points=[(40.0, 25.0)], labels=[1]),
                              svc.local_user)  # fmt: skip
            mask_id = out.masks[out.best].mask_input_id
            ann = svc.accept(im.id, AcceptRequest(mask_id=mask_id), svc.local_user)
            assert ann.model_id == svc.model_id  # the object carries the model that made it
        served_id = svc.model_id

        # retrain from the store, starting from the served model, and switch the annotator
        retrain = ["retrain", str(images), "--model", str(model), "--steps", "1", "--quiet"]
        retrain += ["--masks-per-image", "1", "--images-per-step", "1", "--point-rounds", "0"]
        capsys.readouterr()  # the earlier commands' output
        assert main(retrain) == 0
        trained = json.loads(capsys.readouterr().out)
        assert trained["base_model"] == str(model) and trained["masks"] == 4
        newest = Path(trained["checkpoint"])
        switched = switch_service_model(svc, newest)
        assert switched["model_id"] != served_id
        hist = model_history(svc.store)
        assert [h["kind"] for h in hist] == ["model_trained", "model_switch"]
        assert hist[0]["checkpoint"] == str(newest) and hist[0]["masks"] == 4
        assert hist[1]["checkpoint"] == str(newest)
        retrain_meta = json.loads(newest.with_suffix(".json").read_text())
        assert retrain_meta["base_model"] == str(model)
        assert retrain_meta["data"]["kind"] == "store" and retrain_meta["data"]["masks"] == 4
    finally:
        svc.close()
        svc.store.close()

    # label again with the newest model: its manifest names it
    again = tmp_path / "ds2"
    assert main([*label, "--out", str(again), "--model", str(newest), "--no-progress"]) == 0
    relabeled = open_dataset(again)
    assert len(relabeled.images) == 4
    assert json.loads((again / "manifest.json").read_text())["model"]["name"] == str(newest)
    # the lineage: base -> ft (on the labeled set ds) -> retrain (on the annotator's store)
    assert meta["base_model"] == str(base) and meta["data"]["source"] == str(ds)
    capsys.readouterr()
