"""Tracked videos through the one dataset reader: ``track.json`` / ``DS/videos/*.json`` /
the annotator's video export (YouTube-VIS layout) and DAVIS palette PNGs (``masks/``, the
annotator's DAVIS export, DAVIS itself) read as frames with their objects' masks, a
``segany label`` output with images and videos as one dataset, and trained and evaluated
on like any dataset."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany import masks as M
from segany.cli import main
from segany.datasets import DatasetError, open_dataset, read_sa1b_dataset, sniff
from segany.masks import rle_to_mask
from segany.video.outputs import to_video_json, write_davis_png
from segany.video.tracker import TrackResult
from segany.videos import read_davis_png

from .conftest import tiny_sam
from .test_video import _clip as video_clip
from .test_video import _write_frames, _write_mp4

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


# -- segany track's output, DAVIS PNGs, the annotator's layouts, segany label's output --------
def _tiny_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    if not path.is_file():
        torch.save(tiny_sam().state_dict(), path)
    return path


def _labels_of(im) -> dict[int, np.ndarray]:
    """``{mask id: (H, W) bool}`` of a record."""
    return {m.id: mask for m, mask in zip(im.annotations, im.masks(), strict=True)}


def test_segany_track_output_reads_back_as_written(tmp_path: Path) -> None:
    """`segany track` (tiny model, two objects given as masks on frame 0): track.json and
    masks/ read back give the frames' pixels, the frame names, the object ids and exactly
    the masks written."""
    frames, squares, discs = video_clip(4)
    _write_frames(tmp_path / "f", frames)  # PNG: lossless
    for name, m in (("sq.png", squares[0]), ("disc.png", discs[0])):
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / name)
    out = tmp_path / "out"
    argv = ["track", str(tmp_path / "f"), "--mask", str(tmp_path / "sq.png"), "--object", "2",
            "--mask", str(tmp_path / "disc.png"), "--model", str(_tiny_checkpoint(tmp_path)),
            "--out", str(out), "--no-video"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "track.json").read_text())
    ds = open_dataset(out)
    assert ds.kind == "video" and ds.name == "out"
    assert [im.key for im in ds.images] == [f"f/{t}.png" for t in range(4)]
    assert [im.file_name for im in ds.images] == [f"{t}.png" for t in range(4)]
    for t, im in enumerate(ds.images):
        assert np.array_equal(im.load(), frames[t])
        written = {a["track_id"]: a["segmentations"][t] for a in doc["annotations"]}
        present = sorted(k for k, seg in written.items() if seg is not None)  # nulls skipped
        got = _labels_of(im)
        assert sorted(got) == present and [m.id for m in im.annotations] == present
        for k in present:
            assert np.array_equal(got[k], rle_to_mask(written[k]))
        # the DAVIS PNG of the same frame: pixel = object id
        lab = read_davis_png(out / "masks" / f"{t}.png")
        assert sorted(set(np.unique(lab)) - {0}) == present
        for k in present:
            assert np.array_equal(got[k], lab == k)
    assert all(im.num_masks for im in ds.images)  # the checks above compared masks
    first = _labels_of(ds.images[0])
    assert np.array_equal(first[1], squares[0]) and np.array_equal(first[2], discs[0])

    # masks/ alone is a DAVIS folder of one video; its frames given as the images
    assert sniff(out / "masks") == ("davis", out / "masks")
    with pytest.raises(DatasetError, match="--images"):
        open_dataset(out / "masks").images  # noqa: B018
    davis = open_dataset(out / "masks", images=tmp_path / "f")
    assert davis.kind == "davis" and [im.key for im in davis.images] == [
        f"masks/{t}" for t in range(4)
    ]
    for a, b in zip(ds.images, davis.images, strict=True):
        assert a.ann_ids == b.ann_ids and np.array_equal(a.masks(), b.masks())
        assert np.array_equal(b.load(), a.load())


def _davis_root(root: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Two sequences in DAVIS layout: ``a`` (4 frames, annotated on frames 0 and 2 with
    objects 1 and 3), ``b`` (2 frames, a DAVIS-2016 style 0/255 grayscale mask)."""
    frames, squares, discs = video_clip(4)
    for seq, n in (("a", 4), ("b", 2)):
        folder = root / "JPEGImages" / "480p" / seq
        folder.mkdir(parents=True)
        for t in range(n):
            Image.fromarray(frames[t]).save(folder / f"{t:05d}.png")
        (root / "Annotations" / "480p" / seq).mkdir(parents=True)
    for t in (0, 2):
        lab = np.zeros(squares[0].shape, np.uint8)
        lab[squares[t]], lab[discs[t]] = 1, 3
        write_davis_png(root / "Annotations" / "480p" / "a" / f"{t:05d}.png", lab)
    for t in range(2):
        gray = discs[t].astype(np.uint8) * 255
        Image.fromarray(gray).save(root / "Annotations" / "480p" / "b" / f"{t:05d}.png")
    return frames, squares, discs


def test_a_davis_root(tmp_path: Path) -> None:
    root = tmp_path / "davis"
    frames, squares, discs = _davis_root(root)
    assert sniff(root) == ("davis", root)
    ds = open_dataset(root)
    assert ds.kind == "davis" and ds.name == "davis"
    assert [im.key for im in ds.images] == ["480p/a/00000", "480p/a/00002", "480p/b/00000",
                                            "480p/b/00001"]  # fmt: skip
    assert [im.image_id for im in ds.images] == [1, 2, 3, 4]
    assert [im.ann_ids for im in ds.images] == [(1, 3), (1, 3), (1,), (1,)]
    for im, t in zip(ds.images[:2], (0, 2), strict=True):
        got = _labels_of(im)
        assert np.array_equal(got[1], squares[t]) and np.array_equal(got[3], discs[t])
        assert np.array_equal(im.load(), frames[t])  # the frame the PNG is named after
    assert np.array_equal(_labels_of(ds.images[3])[1], discs[1])
    assert ds.images[1].file_name == "00002.png"
    # an annotation of a frame the video does not have
    write_davis_png(root / "Annotations" / "480p" / "b" / "00007.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"has no frame '00007'"):
        open_dataset(root).images  # noqa: B018


def test_the_annotators_davis_export_with_a_video_file(tmp_path: Path) -> None:
    """The zip of `GET /api/export/davis` (Annotations/<video>/<frame>.png, a video file
    named without its suffix), read as it is downloaded; frames decoded from the video."""
    from segany.videos import open_video

    frames, squares, discs = video_clip(3)
    folder = tmp_path / "annotated"
    folder.mkdir()
    _write_mp4(folder / "movie.mp4", frames)
    export = tmp_path / "export.zip"
    with zipfile.ZipFile(export, "w") as z:
        for t in range(3):
            buf = io.BytesIO()
            write_davis_png(buf, squares[t].astype(np.uint8) * 2)
            z.writestr(f"Annotations/movie/{t:05d}.png", buf.getvalue())
    assert sniff(export) == ("davis", export)
    with pytest.raises(DatasetError, match="no frames of the video 'movie' beside"):
        open_dataset(export).images  # noqa: B018
    ds = open_dataset(export, images=folder)
    assert [im.key for im in ds.images] == ["movie/00000", "movie/00001", "movie/00002"]
    assert [im.ann_ids for im in ds.images] == [(2,)] * 3
    video = open_video(folder / "movie.mp4")
    for t in (2, 0, 1):  # any order: the video is decoded again from its start
        im = ds.images[t]
        assert np.array_equal(im.masks()[0], squares[t])
        assert np.array_equal(im.load(), video.frame(t))


def test_a_label_output_with_images_and_a_video_is_one_dataset(tmp_path: Path) -> None:
    """`segany label` on a folder of two images and a video: the shards' images, then the
    video's frames with the tracked masks, unique image ids."""
    from segany.videos import open_video

    frames, _, _ = video_clip(3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(frames[i]).save(src / f"im{i}.png")
    _write_mp4(src / "clip.mp4", frames)
    ds_dir = tmp_path / "ds"
    settings = ["--set=points_per_side=3", "--set=pred_iou_thresh=0.0",
                "--set=stability_score_thresh=0.0"]  # fmt: skip
    argv = ["label", str(src), "--out", str(ds_dir), "--preset", "reference", *settings,
            "--workers", "0", "--video-objects", "2", "--no-progress",
            "--model", str(_tiny_checkpoint(tmp_path))]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((ds_dir / "videos" / "clip.mp4.json").read_text())
    assert sniff(ds_dir) == ("sa1b", ds_dir)
    ds = open_dataset(ds_dir)
    assert ds.kind == "sa1b"
    keys = [im.key for im in ds.images]
    assert keys == ["sa_1.png", "sa_2.png", "clip/00000", "clip/00001", "clip/00002"]
    ids = [im.image_id for im in ds.images]
    assert len(set(ids)) == 5 and ids[2:] == [max(ids[:2]) + 1 + t for t in range(3)]
    assert np.array_equal(ds.images[1].load(), frames[1])  # from the shard tar
    video = open_video(src / "clip.mp4")
    for t, im in enumerate(ds.images[2:]):
        written = {a["track_id"]: a["segmentations"][t] for a in doc["annotations"]}
        present = sorted(k for k, seg in written.items() if seg is not None)
        got = _labels_of(im)
        assert sorted(got) == present
        for k in present:
            assert np.array_equal(got[k], rle_to_mask(written[k]))
        assert np.array_equal(im.load(), video.frame(t))
    assert sum(im.num_masks for im in ds.images[2:]) > 0  # frame 0's objects at least
    # the videos alone, and the images alone
    assert open_dataset(ds_dir, kind="video").num_masks == sum(im.num_masks for im in ds.images[2:])
    assert len(read_sa1b_dataset(ds_dir).images) == 2


def test_several_videos_in_one_json_and_bad_files(tmp_path: Path) -> None:
    """The annotator's export layout (all videos in one file, annotations by video_id, the
    label set's categories), found by name under --images; truncated or malformed files
    give one clear error."""
    _, res = _clip(tmp_path / "root" / "a")
    _, res_b = _clip(tmp_path / "root" / "b")
    data: dict = {"videos": [], "annotations": [], "categories": [{"id": 4, "name": "cup"}]}
    for vid, (name, r) in enumerate((("a", res), ("b", res_b)), start=7):
        one = to_video_json(r, name=name, file_names=[f"{t}.png" for t in range(T)])
        data["videos"].append({**one["videos"][0], "id": vid})
        for ann in one["annotations"]:
            ann.update(id=100 * vid + ann["track_id"], video_id=vid, category_id=4)
            data["annotations"].append(ann)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(data))
    ds = open_dataset(path, images=tmp_path / "root")
    assert ds.kind == "video" and ds.categories == [{"id": 4, "name": "cup"}]
    assert [im.key for im in ds.images] == [f"{v}/{t}.png" for v in "ab" for t in range(T)]
    assert [im.ann_ids for im in ds.images] == [(1,), (1, 2), (1,)] * 2
    assert {m.category_id for im in ds.images for m in im.annotations} == {4}
    assert np.array_equal(ds.images[4].masks()[1], res_b.mask(1, 2))
    shutil.rmtree(tmp_path / "root" / "b")
    with pytest.raises(DatasetError, match="no video 'b' under"):
        open_dataset(path, images=tmp_path / "root").images  # noqa: B018

    bad = dict(data, annotations=[dict(data["annotations"][0], video_id=99)])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="video_id 99, which is not among the 'videos'"):
        open_dataset(tmp_path / "bad.json", images=tmp_path / "root").images  # noqa: B018
    rle = dict(data["annotations"][0])
    rle["segmentations"] = [{"size": [H, W], "counts": "0ZZ<"}, None, None]
    (tmp_path / "rle.json").write_text(json.dumps(dict(data, annotations=[rle])))
    with pytest.raises(DatasetError, match=r"video 'a', frame '0.png', object #0"):
        open_dataset(tmp_path / "rle.json", images=tmp_path / "root").images  # noqa: B018
    text = path.read_text()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "track.json").write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(DatasetError, match=r"track\.json: not valid JSON, cut short"):
        open_dataset(tmp_path / "out")
    (tmp_path / "out" / "track.json").write_text(json.dumps({**data, "videos": []}))
    with pytest.raises(DatasetError, match="'videos' is empty but there are 4 annotations"):
        open_dataset(tmp_path / "out").images  # noqa: B018
    (tmp_path / "out" / "track.json").write_text(json.dumps({"videos": [], "annotations": []}))
    assert open_dataset(tmp_path / "out").images == []  # an export with no track yet


def test_train_on_davis_pngs(tmp_path: Path) -> None:
    root = tmp_path / "davis"
    _davis_root(root)
    out = tmp_path / "ft.pt"
    args = ["train", "--data", str(root), "--model", str(_tiny_checkpoint(tmp_path)),
            "--out", str(out), "--steps", "1", "--val-fraction", "0", "--images-per-step", "1",
            "--masks-per-image", "1", "--rehearse", "none", "--quiet"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((tmp_path / "ft.json").read_text())
    assert meta["data"]["kind"] == "davis" and meta["data"]["masks"] == 6
    assert meta["steps_done"] == 1


def test_evaluation_indexes_every_frames_own_masks(tmp_path: Path) -> None:
    """Track ids repeat on every frame; the evaluator's COCO index (what COCOeval reads)
    still gives each frame its own masks."""
    from segany.eval.common import CocoDataset

    _, res = _clip(tmp_path / "frames")
    _write(tmp_path / "out" / "track.json", res, tmp_path / "frames")
    ev = CocoDataset(tmp_path / "out")
    coco = ev.coco
    assert len(coco.anns) == 4  # 1 on frame 0, 1 and 2 on frame 1, 1 on frame 2
    for im in ev.images:
        got = coco.loadAnns(coco.getAnnIds(imgIds=[im.image_id]))
        assert [a["image_id"] for a in got] == [im.image_id] * im.num_masks
        assert [rle_to_mask(a["segmentation"]).tolist() for a in got] == im.masks().tolist()
