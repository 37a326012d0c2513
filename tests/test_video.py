"""Video: frame sources, DAVIS measures against hand-computed cases, outputs, the
propagation tracker and ``segany track`` on a small synthetic clip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segany.video import metrics as VM
from segany.video.outputs import (
    davis_palette,
    read_davis_png,
    to_video_json,
    write_davis_png,
    write_overlay_video,
)
from segany.video.tracker import ObjectPrompt, PropagationTracker, TrackResult
from segany.videos import FrameFolder, VideoError, VideoFile, open_video

H, W, N = 96, 128, 8


def _clip(n: int = N) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Frames with a red square moving right and a blue disc moving left; their masks."""
    rng = np.random.default_rng(0)
    frames, squares, discs = [], [], []
    yy, xx = np.mgrid[:H, :W]
    for t in range(n):
        img = rng.integers(0, 40, (H, W, 3)).astype(np.uint8)
        sq = np.zeros((H, W), bool)
        sq[20:50, 10 + 4 * t : 40 + 4 * t] = True
        disc = (yy - 70) ** 2 + (xx - (100 - 4 * t)) ** 2 <= 12**2
        img[sq] = (220, 30, 30)
        img[disc] = (30, 40, 230)
        frames.append(img)
        squares.append(sq)
        discs.append(disc)
    return frames, squares, discs


def _write_frames(folder, frames, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i}{suffix}")


# -- frames ----------------------------------------------------------------------------------


def test_frame_folder_order_hidden_and_sizes(tmp_path):
    frames, _, _ = _clip(12)
    _write_frames(tmp_path / "f", frames)
    (tmp_path / "f" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "f" / "notes.txt").write_text("x")
    v = open_video(tmp_path / "f")
    assert isinstance(v, FrameFolder)
    assert v.names == [str(i) for i in range(12)]  # natural order: 2 before 10
    assert v.size == (H, W) and len(v) == 12
    assert np.array_equal(v.frame(10), frames[10]) and np.array_equal(v.frame(2), frames[2])
    # an odd frame size is fine; frames of different sizes are not
    odd = tmp_path / "odd"
    _write_frames(odd, [f[:33, :47] for f in frames[:3]])
    assert open_video(odd).frame(2).shape == (33, 47, 3)
    Image.fromarray(frames[0][:40]).save(odd / "3.png")
    with pytest.raises(VideoError, match="frame 3 is 128x40, the first frame 47x33"):
        list(open_video(odd))
    with pytest.raises(VideoError, match="no such video or folder"):
        open_video(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no frames"):
        open_video(tmp_path / "empty")


def test_video_file_frames_in_any_order(tmp_path):
    import av

    frames, _, _ = _clip(6)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"qp": "0"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    v = open_video(path)
    assert isinstance(v, VideoFile)
    assert len(v) == 6 and v.names[:2] == ["00000", "00001"] and v.fps == pytest.approx(10)
    last, first = v.frame(5), v.frame(0)  # backwards: re-opened
    assert last.shape == (H, W, 3)

    def err(a, b):
        return np.abs(a.astype(int) - b).mean()

    # YUV 4:2:0 loses colour detail; each frame is still closest to its own original
    for k, got in ((0, first), (3, v.frame(3)), (5, last)):
        errs = [err(got, f) for f in frames]
        assert int(np.argmin(errs)) == k and errs[k] < 10, errs
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match="not a readable video"):
        open_video(tmp_path / "bad.mp4")


# -- measures --------------------------------------------------------------------------------


def test_j_and_f_by_hand():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True  # 16 pixels
    b = np.zeros((10, 10), bool)
    b[4:8, 2:6] = True  # overlaps a in 8
    assert VM.j_measure(a, b) == pytest.approx(8 / 24)
    assert VM.j_measure(a, a) == 1.0
    assert VM.j_measure(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert VM.j_measure(a, np.zeros_like(a)) == 0.0
    # boundary: the pixels that differ from the right, lower or lower-right neighbour
    bd = VM.boundary(a)
    expect = np.zeros_like(a)
    expect[1, 1:6] = True  # the lower-right neighbour of (1, 1) is inside
    expect[1:6, 1] = True
    expect[2:6, 5] = True
    expect[5, 2:6] = True
    assert np.array_equal(bd, expect), bd.astype(int)
    # DAVIS's rule at the edges: the last row compares with the right neighbour only, the
    # last column with the lower one only, so a mask filling the frame has no boundary
    assert not VM.boundary(np.ones((4, 4), bool)).any()
    corner = np.zeros((4, 4), bool)
    corner[1:, 2:] = True  # touches the right and bottom edges
    assert VM.boundary(corner).astype(int).tolist() == [  # worked out by hand
        [0, 1, 1, 1],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
    ]
    # F with a tolerance of 1 px: a one-column shift matches every boundary pixel
    assert VM.f_measure(a, a) == 1.0
    assert VM.f_measure(a, np.roll(a, 1, axis=1), bound=1) == 1.0
    # a 3-row shift: each boundary is a 5x5 ring of 16 pixels (rows 1-5, then 4-8); within
    # 1 px (a disk of radius 1 is a cross) of the other ring lie the side pixels of rows 3
    # and 4 (2 + 2) and all of row 5 (5): 9 of 16, for precision and recall alike
    b = np.zeros((14, 14), bool)
    b[2:6, 2:6] = True
    far = np.roll(b, 3, axis=0)
    assert VM.boundary(b).sum() == 16 and VM.boundary(far).sum() == 16
    assert VM.f_measure(b, far, bound=1) == pytest.approx(9 / 16)
    assert VM.f_measure(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert VM.f_measure(a, np.zeros_like(a)) == 0.0
    # the default tolerance: ceil(0.008 * diagonal) = 1 pixel on 480x854 frames... 8 on 1000
    assert int(np.ceil(0.008 * np.hypot(480, 854))) == 8


def test_statistics_by_hand():
    s = VM.statistics([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert s["mean"] == pytest.approx(0.65)
    assert s["recall"] == pytest.approx(5 / 8)
    # bins of frames 0-2, 2-4, 4-6, 5-7 (DAVIS's rounding): decay = 0.9 - 0.4
    assert s["decay"] == pytest.approx(0.9 - 0.4)
    seq = VM.score_sequence([np.ones((4, 4), bool)] * 4, [np.ones((4, 4), bool)] * 4)
    assert seq["JF"] == 1.0 and len(seq["per_frame"]["J"]) == 2  # first and last skipped


# -- outputs ---------------------------------------------------------------------------------


def test_davis_png_and_video_json_round_trip(tmp_path):
    labels = np.zeros((H, W), np.uint8)
    labels[5:20, 5:30] = 1
    labels[40:60, 60:90] = 7
    write_davis_png(tmp_path / "00000.png", labels)
    img = Image.open(tmp_path / "00000.png")
    assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # DAVIS's red for 1
    assert np.array_equal(read_davis_png(tmp_path / "00000.png"), labels)
    assert davis_palette()[6:9] == [0, 128, 0]
    Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8)).save(tmp_path / "gray.png")
    assert np.array_equal(read_davis_png(tmp_path / "gray.png"), (labels > 0).astype(np.uint8))
    from segany import masks as M

    res = TrackResult(["a", "b"], (H, W), [1, 7])
    res.masks = {0: {1: M.masks_to_coco_rle((labels == 1)[None])[0]}, 1: {}}
    res.masks[1][7] = M.masks_to_coco_rle((labels == 7)[None])[0]
    res.scores = {0: {1: 0.9}, 1: {7: 0.8}}
    doc = json.loads(json.dumps(to_video_json(res, name="v", file_names=["a.jpg", "b.jpg"])))
    one, seven = doc["annotations"]
    assert one["track_id"] == 1 and one["segmentations"][1] is None
    assert one["areas"][0] == 15 * 25 and one["bboxes"][0] == [5.0, 5.0, 25.0, 15.0]
    assert np.array_equal(M.rle_to_mask(seven["segmentations"][1]), labels == 7)
    assert doc["videos"][0]["length"] == 2 and doc["videos"][0]["file_names"][1] == "b.jpg"


# -- tracking --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(mobile_sam):
    from segany import load_predictor

    return load_predictor()


def test_tracker_follows_two_objects_forward_and_backward(tmp_path, predictor):
    frames, squares, discs = _clip()
    _write_frames(tmp_path / "f", frames)
    video = open_video(tmp_path / "f")
    # the square clicked on frame 0; the disc given as a box on frame 3 (followed back)
    prompts = {
        0: {1: ObjectPrompt(points=np.array([[25.0, 35.0]]), labels=np.array([1]))},
        3: {2: ObjectPrompt(box=np.array([76.0, 58.0, 101.0, 83.0]))},
    }
    seen = []
    res = PropagationTracker(predictor).track(video, prompts, progress=seen.append)
    assert sum(seen) == N + 3  # every frame forward, frames 2..0 backward
    for t in range(N):
        assert VM.j_measure(res.mask(t, 1), squares[t]) > 0.9, t
        assert VM.j_measure(res.mask(t, 2), discs[t]) > 0.85, t
        assert not (res.mask(t, 1) & res.mask(t, 2)).any()
        lab = res.label_map(t)
        assert set(np.unique(lab)) == {0, 1, 2}


def test_track_command(tmp_path, mobile_sam, capsys):
    from segany.cli import main

    frames, squares, discs = _clip(5)
    _write_frames(tmp_path / "f", frames, ".jpg")
    mask = tmp_path / "disc.png"
    Image.fromarray((discs[2] * 255).astype(np.uint8)).save(mask)
    out = tmp_path / "out"
    argv = ["track", str(tmp_path / "f"), "--point", "25,35", "--object", "2", "--frame", "2",
            "--mask", str(mask), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 5 and summary["objects"] == [1, 2] and summary["fps"] > 0
    pngs = sorted(p.name for p in (out / "masks").iterdir())
    assert pngs == ["0.png", "1.png", "2.png", "3.png", "4.png"]  # named after the frames
    lab = read_davis_png(out / "masks" / "4.png")
    assert VM.j_measure(lab == 1, squares[4]) > 0.9 and VM.j_measure(lab == 2, discs[4]) > 0.85
    assert np.array_equal(read_davis_png(out / "masks" / "2.png") == 2, discs[2])  # as given
    doc = json.loads((out / "track.json").read_text())
    assert [a["track_id"] for a in doc["annotations"]] == [1, 2]
    assert doc["videos"][0]["file_names"][0] == "0.jpg"
    # the one dataset reader reads the track: frames with their objects' masks
    from segany.datasets import open_dataset
    from segany.transforms import load_image

    ds = open_dataset(out)
    assert ds.kind == "video" and len(ds.images) == 5 and ds.images[4].key == "f/4.jpg"
    assert [m.id for m in ds.images[2].annotations] == [1, 2]
    assert np.array_equal(ds.images[2].masks()[1], read_davis_png(out / "masks" / "2.png") == 2)
    assert np.array_equal(ds.images[3].load(), load_image(tmp_path / "f" / "3.jpg"))
    import av

    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
    # bad prompts: one line, exit 2
    assert main(["track", str(tmp_path / "f"), "--out", str(out)]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["track", str(tmp_path / "f"), "--frame", "9", "--point", "1,1",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "frames 0 to 4" in capsys.readouterr().err


def test_overlay_video_of_odd_size(tmp_path):
    import av

    frames = [np.full((33, 47, 3), 60 * i, np.uint8) for i in range(3)]
    _write_frames(tmp_path / "f", frames)
    video = open_video(tmp_path / "f")
    res = TrackResult(video.names, (33, 47), [])
    write_overlay_video(video, res, tmp_path / "o.mp4", fps=5)
    with av.open(str(tmp_path / "o.mp4")) as c:
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 3 and got[0].shape == (34, 48, 3)


def test_eval_video_on_a_davis_root(tmp_path, mobile_sam, capsys):
    """Two 4-frame sequences in DAVIS layout; the summary is the mean over their objects."""
    from segany.cli import main

    frames, squares, discs = _clip(4)
    root = tmp_path / "davis"
    for seq, objs in (("two", (squares, discs)), ("one", (discs,))):
        (root / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        (root / "Annotations" / "480p" / seq).mkdir(parents=True)
        for t in range(4):
            Image.fromarray(frames[t]).save(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg")
            lab = np.zeros((H, W), np.uint8)
            for k, m in enumerate(objs, start=1):
                lab[m[t]] = k
            write_davis_png(root / "Annotations" / "480p" / seq / f"{t:05d}.png", lab)
    for start in ("mask", "click"):
        out = tmp_path / start
        assert main(["eval", "video", str(root), "--out", str(out), "--start", start]) == 0
        capsys.readouterr()
        doc = json.loads((out / "results.json").read_text())
        seqs = {s["sequence"]: s for s in doc["sequences"]}
        assert sorted(seqs) == ["one", "two"] and sorted(seqs["two"]["objects"]) == ["1", "2"]
        objs = [o for s in doc["sequences"] for o in s["objects"].values()]
        assert len(objs) == 3
        assert doc["summary"]["J_mean"] == pytest.approx(np.mean([o["J"]["mean"] for o in objs]))
        assert doc["summary"]["J_mean"] > 0.85 and doc["summary"]["F_mean"] > 0.85
        assert (out / "jf.png").is_file() and "| **all** |" in (out / "report.md").read_text()
    assert main(["eval", "video", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a DAVIS root" in capsys.readouterr().err


# -- stage-3 labeling of videos --------------------------------------------------------------
def _write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"qp": "0"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_label_tracks_the_objects_of_a_videos_first_frame(tmp_path, mobile_sam, capsys):
    """`segany label` on a folder with videos: segment-everything on frame 0, every object
    tracked, one JSON per video; resumable; an unreadable video is reported, not fatal."""
    from pycocotools import mask as mask_utils

    from segany.cli import main

    frames, squares, discs = _clip(5)
    src = tmp_path / "src"
    src.mkdir()
    _write_mp4(src / "clip.mp4", frames)
    (src / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "ds"
    args = ["label", str(src), "--out", str(out), "--video-objects", "4", "--no-progress"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)["videos"]
    assert report["videos"] == 1 and report["skipped"] == 0 and report["frames"] == 5
    assert [e["video"].endswith("broken.mp4") for e in report["errors"]] == [True]
    data = json.loads((out / "videos" / "clip.mp4.json").read_text())
    assert data["videos"][0]["length"] == 5 and data["videos"][0]["width"] == W
    from segany.datasets import open_dataset

    ds = open_dataset(out)  # the labeled videos, read back as frames
    assert ds.kind == "video"
    assert [im.key for im in ds.images] == [f"clip/{i:05d}" for i in range(5)]
    present = [s for a in data["annotations"] for s in a["segmentations"] if s is not None]
    assert ds.num_masks == len(present)
    assert ds.images[0].load().shape == (H, W, 3)
    tracks = data["annotations"]
    assert 1 <= len(tracks) <= 4 and report["objects"] == len(tracks)

    def best_iou(truth):
        ious = []
        for t in tracks:
            per_frame = []
            for f in range(5):
                seg = t["segmentations"][f]
                if seg is None:
                    per_frame.append(0.0)
                    continue
                m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
                per_frame.append(
                    (m.astype(bool) & truth[f]).sum() / (m.astype(bool) | truth[f]).sum()
                )
            ious.append(min(per_frame))
        return max(ious)

    # the square and the disc are found on frame 0 and followed on every frame
    assert best_iou(squares) > 0.8 and best_iou(discs) > 0.8
    # again: the labeled video is skipped with --resume, refused without it
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)["videos"]
    assert again["skipped"] == 1 and again["videos"] == 0
