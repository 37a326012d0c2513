"""The model in the loop: retrain from the annotator's accepted masks, switch the service to
the new checkpoint, and the history that ties pre-labels to the model that made them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from segany.engine.service import AcceptRequest, AnnotationService, PredictRequest
from segany.engine.store import Store
from segany.train import loop as L

from .conftest import tiny_sam
from .test_train import make_squares

RECIPE = {"steps": 2, "images_per_step": 1, "masks_per_image": 2, "point_rounds": 1,
          "empty_rounds": 0, "warmup_steps": 1}  # fmt: skip


@pytest.fixture()
def annotated(tmp_path: Path):
    """A folder of four images whose squares were accepted in the annotator (tiny model)."""
    root = make_squares(tmp_path / "data")
    images = root / "images"
    base = tmp_path / "base.pt"
    torch.save(tiny_sam().state_dict(), base)
    from segany.loader import load_predictor

    svc = AnnotationService(
        Store(images / ".segany" / "annotations.db"),
        images,
        load_predictor(base, progress=False),
        model_name="base.pt",
        prefetch=False,
    )
    svc.rescan()
    coco = json.loads((root / "annotations.json").read_text())
    ids = {im.path: im.id for im in svc.store.images()}
    for a in coco["annotations"]:
        name = coco["images"][a["image_id"] - 1]["file_name"]
        svc.accept(ids[name], AcceptRequest(segmentation=a["segmentation"]), svc.local_user)
    yield svc, images, base
    svc.close()
    svc.store.close()


def test_retrain_switch_and_history(annotated, tmp_path: Path) -> None:
    svc, images, base = annotated
    old_id = svc.model_id
    trained = L.retrain_from_store(
        images, model=base, config=RECIPE, embedding_cache=None, progress=False
    )
    ckpt = Path(trained["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == L.models_dir(images)
    assert trained["masks"] == 12 and trained["steps"] == 2
    switched = L.switch_service_model(svc, ckpt)
    assert svc.model_id == switched["model_id"] != old_id
    assert switched["embeddings_kept"]  # decoder fine-tune: same encoder, no re-embedding
    im = svc.store.images()[0]
    out = svc.predict(im.id, PredictRequest(points=[(20.0, 20.0)], labels=[1]), svc.local_user)
    ann = svc.accept(im.id, AcceptRequest(mask_id=out.masks[0].mask_input_id), svc.local_user)
    assert ann.model_id == svc.model_id  # the new model's objects carry its id
    hist = L.model_history(svc.store)
    assert [h["kind"] for h in hist] == ["model_trained", "model_switch"]
    by_id = {h["model_id"]: h["checkpoint"] for h in hist if h["kind"] == "model_switch"}
    assert by_id[ann.model_id] == str(ckpt)
    assert L.current_checkpoint(svc.store) == str(ckpt)
    # the next retrain starts from the switched-to checkpoint by default
    again = L.retrain_from_store(images, config=RECIPE, embedding_cache=None, progress=False)
    assert again["base_model"] == str(ckpt) and again["checkpoint"].endswith("retrain-002.pt")


def test_model_routes_retrain_in_background(annotated) -> None:
    from fastapi.testclient import TestClient

    from segany.engine.server import create_app

    svc, images, base = annotated
    with TestClient(
        create_app(svc), base_url="http://localhost"
    ) as c:  # the annotator's app has the model routes
        got = c.get("/api/model").json()
        assert got["model_id"] == svc.model_id and got["retrain"]["state"] == "idle"
        assert c.post("/api/model/retrain", json={"bogus": 1}).status_code == 422
        r = c.post("/api/model/retrain", json=RECIPE)
        assert r.status_code == 202, r.text
        end = time.time() + 300
        while c.get("/api/model/retrain").json()["state"] == "running" and time.time() < end:
            time.sleep(0.2)
        st = c.get("/api/model/retrain").json()
        assert st["state"] == "done", st
        assert svc.model_id == st["result"]["switched"]["model_id"]
        assert c.post("/api/model", json={"checkpoint": "/nope.pt"}).status_code == 422
        r = c.post("/api/model", json={"checkpoint": str(base), "name": "base again"})
        assert r.status_code == 200 and svc.model_name == "base again"
        assert [h["kind"] for h in c.get("/api/model").json()["history"]] == [
            "model_trained",
            "model_switch",
            "model_switch",
        ]


def test_retrain_needs_accepted_masks(tmp_path: Path) -> None:
    from segany.train.data import DataError

    images = make_squares(tmp_path / "d") / "images"
    Store(images / ".segany" / "annotations.db").close()
    with pytest.raises(DataError):
        L.retrain_from_store(images, config=RECIPE, embedding_cache=None, progress=False)


def test_switch_refuses_a_bad_checkpoint(annotated, tmp_path: Path) -> None:
    svc, *_ = annotated
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    before = svc.model_id
    with pytest.raises(L.LoopError):
        L.switch_service_model(svc, bad)
    assert svc.model_id == before


def test_cli_retrain(annotated, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from segany.cli import main

    svc, images, base = annotated
    args = ["retrain", str(images), "--model", str(base), "--steps", "1", "--quiet",
            "--masks-per-image", "1", "--images-per-step", "1", "--point-rounds", "0",
            "--empty-rounds", "0", "--embedding-cache", str(tmp_path / "emb")]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["checkpoint"]).is_file() and out["masks"] == 12
    assert L.model_history(svc.store)[-1]["kind"] == "model_trained"


def test_switch_to_another_encoder_drops_the_embeddings(annotated, tmp_path: Path) -> None:
    svc, images, base = annotated
    im = svc.store.images()[0]
    click = PredictRequest(points=[(20.0, 20.0)], labels=[1])
    svc.predict(im.id, click, svc.local_user)
    assert svc.embedding_ready(im)
    same = tmp_path / "same.pt"
    torch.save(tiny_sam().state_dict(), same)  # the same encoder
    assert L.switch_service_model(svc, same)["embeddings_kept"] is True
    assert svc.embedding_ready(im)  # nothing to re-embed
    other = tmp_path / "other.pt"
    torch.save(tiny_sam(1).state_dict(), other)  # another image encoder
    switched = L.switch_service_model(svc, other, name="other")
    assert switched["embeddings_kept"] is False and svc.model_name == "other"
    assert svc.model_id == switched["model_id"] != switched["previous_model_id"]
    assert not svc.embedding_ready(im)  # the old encoder's embedding is not used
    assert svc.predict(im.id, click, svc.local_user).masks
    assert svc.embedding_ready(im)
