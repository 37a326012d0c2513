"""The dataset layer: every writer of segany read back by the one reader with identical
masks and one box convention (pycocotools' ``toBbox``), and the sniffing rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany import masks as M
from segany.datasets import (
    CocoWriter,
    DatasetError,
    open_dataset,
    rle_bbox,
    sniff,
    to_coco,
    to_rle,
    write_sa1b,
)
from segany.datasets.png import write_png
from segany.engine import label_shards as L
from segany.text.pipeline import TextSegmentation

H, W = 40, 60


def _masks() -> np.ndarray:
    m = np.zeros((4, H, W), bool)
    m[0, 5:20, 5:30] = True  # x 5..29, y 5..19
    m[1, 25:40, 40:60] = True  # touches the right and bottom edges
    m[2, 0, 0] = True  # one pixel
    m[3, 10:12, 50:53] = True
    m[3, 30:31, 2:4] = True  # two parts
    return m


#: pycocotools' toBbox of each mask: x + w and y + h one past the last column / row.
EXPECTED_BOXES = [[5, 5, 25, 15], [40, 25, 20, 15], [0, 0, 1, 1], [2, 10, 51, 21]]


def _records(masks: np.ndarray) -> list[dict]:
    """Records as the mask generator returns them: its XYWH boxes have ``w = x1 - x0``
    (Meta's convention, one pixel narrower than COCO's) and every segmentation kind."""
    boxes = M.xyxy_to_xywh(M.masks_to_boxes(torch.from_numpy(masks))).tolist()
    segs = [masks[0], M.masks_to_rle(masks[1:2])[0], M.masks_to_coco_rle(masks[2:3])[0]]
    segs.append(M.masks_to_coco_rle(masks[3:4])[0])
    return [
        {
            "segmentation": segs[i],
            "area": int(masks[i].sum()),
            "bbox": boxes[i],
            "predicted_iou": 0.9 - i * 0.1,
            "point_coords": [[10.0 + i, 12.0]],
            "stability_score": 0.95,
            "crop_box": [0, 0, W, H],
        }
        for i in range(len(masks))
    ]


def test_the_generators_boxes_are_narrower_and_rle_bbox_is_cocos() -> None:
    masks = _masks()
    assert [r["bbox"] for r in _records(masks)][:3] == [[5, 5, 24, 14], [40, 25, 19, 14],
                                                        [0, 0, 0, 0]]  # fmt: skip
    assert [list(rle_bbox(to_rle(m))) for m in masks] == EXPECTED_BOXES
    assert rle_bbox(to_rle(np.zeros((H, W), bool))) == (0.0, 0.0, 0.0, 0.0)


def _label_output(out: Path, image: Path, records: list[dict]) -> Path:
    """What ``segany label`` writes for one image, through its own functions, with a
    generator that returns ``records``."""

    class Fixed:
        def generate(self, rgb: np.ndarray) -> list[dict]:
            assert rgb.shape[:2] == (H, W)
            return records

    item = L.Item(image_id=3, source=str(image), shard=0)
    assert L.process_item(Fixed(), out, item)["ok"]
    L.finalize_shard(out, 0, [item])
    plan = {"items": [[3, str(image), 0]], "source": str(image.parent), "model": {},
            "preset": "fast", "settings": {}, "shard_size": 1}  # fmt: skip
    L.write_manifest(out, plan)
    return out


def test_every_writer_reads_back_the_same_masks_and_boxes(tmp_path, monkeypatch) -> None:
    from segany import everything
    from segany.cli import main

    from .conftest import tiny_sam

    masks = _masks()
    records = _records(masks)
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "a.png")
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), ckpt)
    monkeypatch.setattr(everything.MaskGenerator, "generate", lambda self, image: records)

    written: dict[str, tuple[Path, dict]] = {}  # writer -> (source, open_dataset kwargs)
    w = CocoWriter()
    w.add(records, file_name="a.png", width=W, height=H)
    written["CocoWriter"] = (w.write(tmp_path / "coco" / "annotations.json"), {"images": images})
    path = write_sa1b(tmp_path / "sa1b" / "a.json", records, image_id=1, file_name="a.png",
                      width=W, height=H)  # fmt: skip
    written["write_sa1b"] = (path, {"images": images})
    for fmt in ("coco", "sa1b"):
        out = tmp_path / f"everything_{fmt}"
        argv = ["everything", str(images), "--out", str(out), "--format", fmt, "--no-overlay"]
        assert main([*argv, "--model", str(ckpt), "--preset", "reference"]) == 0
        written[f"everything --format {fmt}"] = (out, {"images": images})
    written["label"] = (_label_output(tmp_path / "label", images / "a.png", records), {})
    first = open_dataset(written["CocoWriter"][0], images=images)
    (tmp_path / "val.json").write_text(json.dumps(to_coco(first.images)))
    written["trainer's to_coco"] = (tmp_path / "val.json", {"images": images})

    for writer, (source, kwargs) in written.items():
        ds = open_dataset(source, **kwargs)
        assert len(ds.images) == 1, writer
        im = ds.images[0]
        assert (im.height, im.width) == (H, W), writer
        np.testing.assert_array_equal(im.masks(), masks, err_msg=writer)
        assert [list(a.bbox) for a in im.annotations] == EXPECTED_BOXES, writer
        assert [a.area for a in im.annotations] == masks.sum((1, 2)).tolist(), writer
        np.testing.assert_array_equal(im.load(), rgb, err_msg=writer)  # file or tar member
        # the boxes as written in the files, not only as re-measured by the reader
        assert [list(a.file_bbox) for a in im.annotations] == EXPECTED_BOXES, writer
        if writer != "trainer's to_coco":  # COCO files keep it as the score
            got = [a.score if a.predicted_iou is None else a.predicted_iou for a in im.annotations]
            assert got == pytest.approx(
                [0.9, 0.8, 0.7, 0.6]), writer  # fmt: skip
    assert open_dataset(written["label"][0]).images[0].key == "sa_3.png"
    # text prompts' records (segment --text, label --classes) carry the same boxes
    n = len(masks)
    text = TextSegmentation(masks=masks, boxes=np.zeros((n, 4)), scores=np.ones(n),
                            ious=np.ones(n), stability=np.ones(n), labels=np.zeros(n, int),
                            phrases=["x"] * n, queries=["x"], image_size=(H, W))  # fmt: skip
    assert [r["bbox"] for r in text.records()] == EXPECTED_BOXES
    text_coco = CocoWriter()
    text.add_to(text_coco, file_name="a.png")
    assert [a["bbox"] for a in text_coco.to_dict()["annotations"]] == EXPECTED_BOXES
    # the PNG writer's metadata.csv has the same boxes
    folder = write_png(tmp_path / "png", records)
    with open(folder / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    boxes = [[float(r[k]) for k in ("bbox_x0", "bbox_y0", "bbox_w", "bbox_h")] for r in rows]
    assert boxes == EXPECTED_BOXES


def test_sniffing_rule(tmp_path) -> None:
    masks = _masks()
    records = _records(masks)
    coco = CocoWriter()
    coco.add(records, file_name="a.png", width=W, height=H)
    coco.write(tmp_path / "c" / "annotations.json")
    coco.write(tmp_path / "alone" / "mine.json")
    write_sa1b(tmp_path / "s" / "a.json", records, image_id=1, file_name="a.png", width=W,
               height=H)  # fmt: skip
    (tmp_path / "db" / ".segany").mkdir(parents=True)
    (tmp_path / "db" / ".segany" / "annotations.db").touch()
    assert sniff(tmp_path / "c") == ("coco", tmp_path / "c")
    assert sniff(tmp_path / "c" / "annotations.json")[0] == "coco"
    assert sniff(tmp_path / "alone") == ("coco", tmp_path / "alone" / "mine.json")
    assert sniff(tmp_path / "s") == ("sa1b", tmp_path / "s")
    assert sniff(tmp_path / "s" / "a.json") == ("sa1b", tmp_path / "s" / "a.json")
    assert sniff(tmp_path / "db")[0] == "store"
    assert sniff("sqlite:///x.db")[0] == "store"
    assert sniff(tmp_path / "x.sqlite")[0] == "store"
    (tmp_path / "t.tar").touch()
    assert sniff(tmp_path / "t.tar")[0] == "sa1b"
    (tmp_path / "export.zip").touch()
    assert sniff(tmp_path / "export.zip")[0] == "sa1b"
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(DatasetError, match="neither a COCO"):
        sniff(tmp_path / "other.json")
    with pytest.raises(DatasetError, match="not found"):
        sniff(tmp_path / "missing")
    with pytest.raises(DatasetError, match="needs the annotated images folder"):
        open_dataset(tmp_path / "x.db")
    with pytest.raises(DatasetError, match="unknown data kind"):
        open_dataset(tmp_path / "c", kind="csv")


def test_a_bad_annotation_is_named(tmp_path) -> None:
    bad = {"image": {"image_id": 1, "width": W, "height": H, "file_name": "a.png"},
           "annotations": [{"id": 7, "segmentation": {"size": [H, W], "counts": "0"}}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"a\.json: image 'a\.png', annotation 7 \(#0\)"):
        _ = open_dataset(tmp_path).images
    missing = tmp_path / "m"
    missing.mkdir()
    write_sa1b(missing / "b.json", [], image_id=1, file_name="b.png", width=W, height=H)
    im = open_dataset(missing).images[0]
    with pytest.raises(DatasetError, match="cannot read the image"):
        im.load()
