"""The annotator's data through the dataset layer: its store, its COCO export and its
SA-1B zip export read back by :func:`segany.datasets.open_dataset` with the accepted masks
and pycocotools' boxes; and ``segany train --data`` on the export."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from segany import masks as M
from segany.cli import main
from segany.datasets import open_dataset, rle_bbox, to_rle
from segany.predictor import Predictor
from segany.validate import dumps

from ..conftest import tiny_sam
from .conftest import make_service


@pytest.fixture()
def client(images_dir, tmp_path):
    from fastapi.testclient import TestClient

    from segany.engine.server import create_app

    svc = make_service(f"sqlite:///{tmp_path / 'a.db'}", images_dir,
                       Predictor(tiny_sam(), model_id="tiny"), tmp_path / "cache")  # fmt: skip
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        yield c
    svc.close()
    svc.store.close()


def _masks() -> np.ndarray:
    m = np.zeros((2, 96, 144), bool)
    m[0, 20:60, 30:90] = True
    m[1, 70:96, 100:144] = True  # touches the right and bottom edges
    return m


def test_store_and_exports_read_back(client, images_dir, tmp_path) -> None:
    iid = next(im["id"] for im in client.get("/api/images").json()["images"]
               if im["path"] == "a.png")  # fmt: skip
    masks = _masks()
    for m, cat in zip(masks, ("cup", "plate"), strict=True):
        seg = M.masks_to_coco_rle(m[None])[0]
        r = client.post(f"/api/images/{iid}/annotations",
                        json={"segmentation": seg, "category": cat})  # fmt: skip
        assert r.status_code == 201, r.text
    boxes = [[30.0, 20.0, 60.0, 40.0], [100.0, 70.0, 44.0, 26.0]]
    assert [list(rle_bbox(to_rle(m))) for m in masks] == boxes

    coco = tmp_path / "export.json"
    coco.write_text(dumps(client.get("/api/export/coco").json()))
    sa1b = tmp_path / "export.zip"
    sa1b.write_bytes(client.get("/api/export/sa1b").content)
    assert zipfile.ZipFile(io.BytesIO(sa1b.read_bytes())).namelist()
    sources = {
        "store": (tmp_path / "a.db", {"images": images_dir}),
        "coco export": (coco, {"images": images_dir}),
        "sa1b export": (sa1b, {"images": images_dir}),
    }
    for name, (source, kwargs) in sources.items():
        ds = open_dataset(source, **kwargs)
        with_masks = [im for im in ds.images if im.annotations]
        assert [im.key for im in with_masks] == ["a.png"], name
        im = with_masks[0]
        np.testing.assert_array_equal(im.masks(), masks, err_msg=name)
        assert [list(a.bbox) for a in im.annotations] == boxes, name
        assert im.load().shape == (96, 144, 3), name
    store = open_dataset(tmp_path / "a.db", images=images_dir)
    assert store.kind == "store"
    assert [a.label for a in store.images[0].annotations] == ["cup", "plate"]
    assert [c["name"] for c in store.categories] == ["cup", "plate"]

    # segany train --data on the exports (COCO: split only; SA-1B zip: one step)
    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    out = tmp_path / "run" / "ft.pt"
    split = ["train", "--data", str(coco), "--images", str(images_dir), "--out", str(out)]
    assert main([*split, "--val-fraction", "0", "--split-only"]) == 0
    assert json.loads((tmp_path / "run" / "ft.train.json").read_text())["images"][0]["id"] == iid
    recipe = ["--masks-per-image", "1", "--images-per-step", "1", "--point-rounds", "0",
              "--empty-rounds", "0", "--decay-at", "", "--val-fraction", "0"]  # fmt: skip
    argv = ["train", "--data", str(sa1b), "--images", str(images_dir), "--out", str(out)]
    argv += ["--rehearse", "none"]
    assert main([*argv, "--model", str(base), "--steps", "1", "--quiet", *recipe]) == 0
    meta = json.loads((tmp_path / "run" / "ft.json").read_text())
    assert meta["data"]["kind"] == "sa1b" and meta["data"]["masks"] == 2
