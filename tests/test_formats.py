"""Output formats (SA-1B, COCO, PNG, YOLO), overlays and the ``everything`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segany import masks as M
from segany.datasets import to_coco_rle, to_mask
from segany.datasets.coco import CocoWriter
from segany.datasets.png import read_png, write_png
from segany.datasets.sa1b import read_sa1b, write_sa1b
from segany.datasets.yolo import read_yolo, write_yolo
from segany.viz import overlay_masks, overlay_records


def _records(h: int = 40, w: int = 60) -> list[dict]:
    masks = np.zeros((3, h, w), bool)
    masks[0, 5:20, 5:30] = True
    masks[1, 25:35, 40:55] = True
    masks[2, 0:10, 50:60] = True
    boxes = M.xyxy_to_xywh(M.masks_to_boxes(torch.from_numpy(masks))).tolist()
    segs = [masks[0], M.masks_to_rle(masks[1:2])[0], M.masks_to_coco_rle(masks[2:3])[0]]
    return [
        {
            "segmentation": segs[i],
            "area": int(masks[i].sum()),
            "bbox": boxes[i],
            "predicted_iou": 0.9 - i * 0.1,
            "point_coords": [[10.0 + i, 12.0]],
            "stability_score": 0.95,
            "crop_box": [0, 0, w, h],
        }
        for i in range(3)
    ], masks


def test_segmentation_conversions():
    recs, masks = _records()
    for r, m in zip(recs, masks, strict=True):
        np.testing.assert_array_equal(to_mask(r["segmentation"]), m)
        np.testing.assert_array_equal(M.rle_to_mask(to_coco_rle(r["segmentation"])), m)


def test_sa1b_round_trip(tmp_path):
    recs, masks = _records()
    path = write_sa1b(tmp_path / "a.json", recs, image_id=7, file_name="a.jpg", width=60, height=40)
    data = read_sa1b(path)
    assert data["image"] == {"image_id": 7, "width": 60, "height": 40, "file_name": "a.jpg"}
    assert [a["id"] for a in data["annotations"]] == [0, 1, 2]
    for a, m in zip(data["annotations"], masks, strict=True):
        np.testing.assert_array_equal(M.rle_to_mask(a["segmentation"]), m)
        assert set(a) >= {"bbox", "area", "predicted_iou", "stability_score", "crop_box"}
        assert a["point_coords"] and len(a["point_coords"][0]) == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError):
        read_sa1b(tmp_path / "bad.json")


def test_coco_loads_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    recs, masks = _records()
    w = CocoWriter()
    w.add(recs, file_name="a.jpg", width=60, height=40)
    w.add(recs[:1], file_name="b.jpg", width=60, height=40)
    path = w.write(tmp_path / "inst.json")
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 4
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[1]
    np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), masks[1])
    ev = COCOeval(coco, coco.loadRes(w.results()), "segm")  # the results list loads too
    ev.evaluate()
    ev.accumulate()
    assert ev.eval["recall"].max() == 1.0


def test_png_and_csv(tmp_path):
    recs, masks = _records()
    write_png(tmp_path / "img", recs)
    rows, read = read_png(tmp_path / "img")
    assert len(rows) == 3 and rows[1]["area"] == str(recs[1]["area"])
    for a, b in zip(read, masks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_yolo(tmp_path):
    recs, masks = _records()
    path = write_yolo(tmp_path / "a.txt", recs, class_id=0)
    lines = read_yolo(path)
    assert len(lines) == 3
    cls, poly = lines[0]
    assert cls == 0 and poly.min() >= 0 and poly.max() <= 1
    assert poly[:, 0].min() == pytest.approx(5 / 60, abs=1e-5)
    assert poly[:, 1].max() == pytest.approx(19 / 40, abs=1e-5)
    write_yolo(tmp_path / "empty.txt", [])
    assert read_yolo(tmp_path / "empty.txt") == []


def test_overlay():
    recs, masks = _records()
    img = np.full((40, 60, 3), 128, np.uint8)
    out = overlay_records(img, recs)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[10, 10] != 128).any() and (out[38, 2] == 128).all()
    np.testing.assert_array_equal(overlay_masks(img, []), img)


def test_cli_everything(tmp_path, tiny_model):
    from segany.cli import main

    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    for fmt in ("sa1b", "coco"):
        out = tmp_path / f"out_{fmt}"
        argv = ["everything", str(folder), "--out", str(out), "--format", fmt]
        argv += ["--model", str(ckpt), "--preset", "reference", "--points-per-side", "2"]
        assert main(argv) == 0
        assert (out / "overlays" / "a.png").is_file()
        if fmt == "sa1b":
            assert read_sa1b(out / "a.json")["image"]["width"] == 64
        else:
            data = json.loads((out / "annotations.json").read_text())
            assert [i["file_name"] for i in data["images"]] == ["a.png"]
