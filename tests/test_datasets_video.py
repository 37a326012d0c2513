"""Tracked videos through the one dataset reader: ``track.json`` / ``DS/videos/*.json``
(YouTube-VIS layout) read as frames with their objects' masks, and trained and evaluated on
like any dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany import masks as M
from segany.cli import main
from segany.datasets import DatasetError, open_dataset, sniff
from segany.video.outputs import to_video_json
from segany.video.tracker import TrackResult

from .conftest import tiny_sam

H, W, T = 40, 56, 3


def _clip(folder: Path) -> tuple[list[np.ndarray], TrackResult]:
    """Three PNG frames and a track: object 1 on every frame, object 2 on frame 1 only."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames, res = [], TrackResult(names=["0", "1", "2"], size=(H, W), object_ids=[1, 2])
    for t in range(T):
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"{t}.png")
        frames.append(rgb)
        a = np.zeros((H, W), bool)
        a[5 + t : 20 + t, 4:30] = True
        res.masks.setdefault(t, {})[1] = M.masks_to_coco_rle(a[None])[0]
        res.scores.setdefault(t, {})[1] = 0.9
    b = np.zeros((H, W), bool)
    b[25:35, 30:50] = True
    res.masks[1][2] = M.masks_to_coco_rle(b[None])[0]
    return frames, res


def _write(path: Path, res: TrackResult, source: Path | None, name: str = "clip") -> None:
    names = [f"{t}.png" for t in range(T)]
    src = None if source is None else str(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_video_json(res, name=name, file_names=names, source=src)))


def test_a_track_reads_as_frames_with_masks(tmp_path: Path) -> None:
    frames, res = _clip(tmp_path / "frames")
    _write(tmp_path / "out" / "track.json", res, tmp_path / "frames")
    assert sniff(tmp_path / "out") == ("video", tmp_path / "out")
    assert sniff(tmp_path / "out" / "track.json")[0] == "video"
    ds = open_dataset(tmp_path / "out")
    assert ds.kind == "video" and ds.name == "out"
    assert [im.key for im in ds.images] == ["clip/0.png", "clip/1.png", "clip/2.png"]
    assert [im.image_id for im in ds.images] == [1, 2, 3]
    assert [[m.id for m in im.annotations] for im in ds.images] == [[1], [1, 2], [1]]
    for t, im in enumerate(ds.images):
        assert (im.height, im.width) == (H, W)
        assert np.array_equal(im.load(), frames[t])  # PNG frames: lossless
        for k, obj in enumerate(m.id for m in im.annotations):
            assert np.array_equal(im.masks()[k], res.mask(t, obj))
    assert ds.images[1].annotations[0].score == pytest.approx(0.9)


def test_a_label_output_with_several_videos(tmp_path: Path) -> None:
    _, res = _clip(tmp_path / "a")
    _, res_b = _clip(tmp_path / "b")
    _write(tmp_path / "ds" / "videos" / "a.json", res, tmp_path / "a", name="a")
    _write(tmp_path / "ds" / "videos" / "b.json", res_b, tmp_path / "b", name="b")
    ds = open_dataset(tmp_path / "ds")
    assert ds.kind == "video" and len(ds.images) == 2 * T and ds.num_masks == 2 * 4
    assert [im.image_id for im in ds.images] == list(range(1, 2 * T + 1))  # unique over videos
    assert ds.images[T].key == "b/0.png"


def test_a_track_without_its_video(tmp_path: Path) -> None:
    frames, res = _clip(tmp_path / "frames")
    _write(tmp_path / "t.json", res, None)
    with pytest.raises(DatasetError, match="--images"):
        open_dataset(tmp_path / "t.json").images  # noqa: B018
    ds = open_dataset(tmp_path / "t.json", images=tmp_path / "frames")
    assert np.array_equal(ds.images[2].load(), frames[2])
    _write(tmp_path / "gone.json", res, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="cannot open the video"):
        open_dataset(tmp_path / "gone.json").images[0].load()
    bad = json.loads((tmp_path / "t.json").read_text())
    bad["annotations"][0]["segmentations"] = bad["annotations"][0]["segmentations"][:2]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="one segmentation per frame"):
        open_dataset(tmp_path / "bad.json", images=tmp_path / "frames").images  # noqa: B018


def test_train_and_eval_on_a_tracked_video(tmp_path: Path) -> None:
    _, res = _clip(tmp_path / "frames")
    _write(tmp_path / "out" / "track.json", res, tmp_path / "frames")
    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    out = tmp_path / "ft.pt"
    args = ["train", "--data", str(tmp_path / "out"), "--model", str(base), "--out", str(out)]
    args += ["--steps", "1", "--val-fraction", "0", "--images-per-step", "1",
             "--masks-per-image", "1", "--rehearse", "none", "--quiet"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((tmp_path / "ft.json").read_text())
    assert meta["data"]["kind"] == "video" and meta["data"]["masks"] == 4
    ev = ["eval", "boxes", str(tmp_path / "out" / "track.json"), "--model", str(out)]
    assert main([*ev, "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["masks"] == 4
