"""Stage 3 labeling (segany label) and dataset statistics (segany stats), on a tiny random
model with a 3x3 grid: local pool vs Ray give the same dataset, a job killed by SIGKILL
and resumed ends with every image exactly once, unreadable images go to the errors file."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany.engine import label as L
from segany.engine import label_shards as LS
from segany.engine import label_workers as LW
from segany.engine.dataset_stats import compute, mask_shape
from segany.engine.dataset_stats import run as run_stats
from segany.text import DetectorWeightsError

from ..conftest import REPO, tiny_sam

N_IMAGES = 20
# loose thresholds so the random model keeps masks; a 3x3 grid keeps it fast
OVERRIDES = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
SETTINGS = [f"--set={k}={v}" for k, v in OVERRIDES.items()]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny_sam.pt"
    torch.save(tiny_sam().state_dict(), path)
    return path


def _make_images(root: Path, n: int, size: tuple[int, int] = (64, 80), start: int = 0) -> Path:
    rng = np.random.default_rng(start)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(start, start + n):
        a = rng.integers(0, 255, size=(h + 4 * (i % 3), w, 3), dtype=np.uint8)
        a[h // 6 : h // 2, w // 4 : 3 * w // 4] = (200, 40 + 10 * (i % 5), 40)
        folder = root / "sub" if i % 4 == 0 else root
        Image.fromarray(a).save(folder / f"img_{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = _make_images(tmp_path_factory.mktemp("src"), N_IMAGES)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def _read_shard(path: Path):
    """The (SA-1B JSON, image bytes) pairs of one shard tar, as stored."""
    with tarfile.open(path, "r") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    for name, data in files.items():
        if name.endswith(".json"):
            ann = json.loads(data)
            yield ann, files.get(ann["image"]["file_name"], b"")


def _contents(out: Path) -> dict[str, tuple[dict, bytes]]:
    """Per-image JSON and image bytes of a finished dataset, keyed by source path."""
    manifest = json.loads((out / "manifest.json").read_text())
    source = {im["image_id"]: im["source"] for im in manifest["images"]}
    found = {}
    for shard in manifest["shards"]:
        for ann, img in _read_shard(out / shard["path"]):
            key = source[ann["image"]["image_id"]]
            assert key not in found
            found[key] = (ann, img)
    return found


def _errors(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]


def _same_json(x: dict, y: dict) -> None:
    """Same image record and masks; scores equal up to float noise (CPU kernels are not
    bitwise reproducible across processes in general, though they mostly are here)."""
    assert x["image"] == y["image"]
    assert len(x["annotations"]) == len(y["annotations"])
    for p, q in zip(x["annotations"], y["annotations"]):
        for k in ("segmentation", "bbox", "area", "point_coords", "crop_box", "id"):
            assert p[k] == q[k], (x["image"], k)
        for k in ("predicted_iou", "stability_score"):
            assert p[k] == pytest.approx(q[k], abs=1e-4)


def test_local_and_ray_give_the_same_dataset(images, tiny_ckpt, tmp_path):
    ray = pytest.importorskip("ray")
    common = dict(
        model=str(tiny_ckpt),
        preset="reference",
        overrides=OVERRIDES,
        workers=2,
        threads=1,
        shard_size=6,
        progress=False,
    )
    local = L.label(images, tmp_path / "local", **common)
    assert local["backend"] == "local" and local["workers"] == 2
    assert local["images"] == N_IMAGES and local["errors"] == 1
    assert local["masks"] > 0 and local["images_per_second"] > 0
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        remote = L.label(images, tmp_path / "ray", ray=True, **common)
    finally:
        ray.shutdown()
    assert remote["backend"] == "ray" and remote["workers"] == 2
    assert remote["images"] == N_IMAGES and remote["errors"] == 1

    a, b = _contents(tmp_path / "local"), _contents(tmp_path / "ray")
    assert len(a) == N_IMAGES and a.keys() == b.keys()
    for key in a:
        _same_json(a[key][0], b[key][0])
        assert a[key][1] == b[key][1], key  # identical image bytes
    for out in (tmp_path / "local", tmp_path / "ray"):
        assert L.check_dataset(out) == {"images": N_IMAGES, "errors": 1}
        assert not (out / "staging").exists() or not any((out / "staging").iterdir())
    # the corrupt image is reported with its reason; the text file is not an input
    (err,) = _errors(tmp_path / "local")
    assert err["source"].endswith("corrupt.jpg") and "ImageError" in err["reason"]
    manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert manifest["counts"] == {
        "inputs": N_IMAGES + 1,
        "images": N_IMAGES,
        "errors": 1,
        "masks": local["masks"],
        "shards": 4,
    }
    assert manifest["model"]["sha256"] and manifest["settings"]["points_per_side"] == 3
    # SA-1B fields, and the JSON names the image stored next to it
    ann, img = next(iter(a.values()))
    assert set(ann) == {"image", "annotations"}
    assert img and ann["image"]["file_name"].startswith(f"sa_{ann['image']['image_id']}.")
    rec = ann["annotations"][0]
    assert set(rec) >= {"segmentation", "bbox", "area", "predicted_iou", "point_coords"}


def _done(out: Path) -> int:
    """Inputs committed so far: those of packed shards (tar present) + marks in the staging
    folders of the others."""
    n = 0
    for sdir in (out / "staging").glob("sa_*") if (out / "staging").exists() else []:
        if not (out / "shards" / f"{sdir.name}.tar").exists():
            n += sum(1 for _ in sdir.glob("sa_*.json"))
    for tar in (out / "shards").glob("sa_*.tar") if (out / "shards").exists() else []:
        try:
            index = json.loads(tar.with_name(tar.stem + ".index.json").read_text())
        except (OSError, ValueError):
            continue
        n += index["counts"]["images"] + index["counts"]["errors"]
    return n


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_killed_job_resumes_exactly_once(tiny_ckpt, tmp_path):
    src = _make_images(tmp_path / "src", N_IMAGES, size=(192, 240))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "segany", "label", str(src), "--out", str(out)]
    cmd += ["--model", str(tiny_ckpt), "--preset", "reference", *SETTINGS]
    cmd += ["--set=points_per_side=6", "--workers", "1", "--threads-per-worker", "1"]
    cmd += ["--shard-size", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while _done(out) < 6:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the job made no progress"
            workers.update(_children(proc.pid))
            time.sleep(0.02)
        workers.update(_children(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert not (out / "manifest.json").exists(), "killed too late: the job had finished"
    # the kernel takes the workers down with the coordinator: nothing keeps writing
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)

    done = _done(out)
    assert 6 <= done < N_IMAGES + 1
    report = L.label(src, out, resume=True, workers=1, threads=1, progress=False)
    assert report["done_before"] == done
    assert report["processed"] == N_IMAGES + 1 - done  # only the missing ones
    assert L.check_dataset(out) == {"images": N_IMAGES, "errors": 1}
    contents = _contents(out)
    assert sorted(Path(k).name for k in contents) == sorted(p.name for p in src.rglob("img_*"))
    for ann, img in contents.values():
        assert Image.open(io.BytesIO(img)).size == (
            ann["image"]["width"],
            ann["image"]["height"],
        )
    (err,) = _errors(out)
    assert err["source"].endswith("broken.png")


def test_resume_states_and_guards(images, tiny_ckpt, tmp_path):
    """In-process (workers=0): resume after a kill while packing a shard and with stale temp
    files; new source images go to new shards; mismatched settings are refused."""
    src = _make_images(tmp_path / "src", 5)
    (src / "bad.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    kw = dict(workers=0, threads=1, progress=False)
    first = L.label(
        src, out, model=str(tiny_ckpt), preset="reference", overrides=OVERRIDES, shard_size=2, **kw
    )
    assert first["processed"] == 6 and first["errors"] == 1
    with pytest.raises(L.LabelError, match="--resume"):
        L.label(src, out, **kw)
    with pytest.raises(L.LabelError, match="preset"):
        L.label(src, out, resume=True, preset="fast", **kw)
    with pytest.raises(L.LabelError, match="settings"):
        L.label(src, out, resume=True, overrides={"points_per_side": 5}, **kw)
    with pytest.raises(L.LabelError, match="classes"):  # a job without classes
        L.label(src, out, resume=True, classes="dog . cat", **kw)
    other = _make_images(tmp_path / "other", 2, start=50)  # another collection: not merged
    with pytest.raises(L.LabelError, match=f"labels {src}, not {other}"):
        L.label(other, out, resume=True, **kw)
    assert len(json.loads((out / "plan.json").read_text())["items"]) == 6

    # a kill after all of shard 1's images were marked but before its tar was renamed,
    # with a half-written temp tar and a half-written image mark of shard 2 lying around
    plan = json.loads((out / "plan.json").read_text())
    items = [LS.Item(i, p, s) for i, p, s in plan["items"]]
    shard1 = [it for it in items if it.shard == 1]
    staged = LS.staging_dir(out, 1)
    staged.mkdir(parents=True)
    for ann, img in _read_shard(LS.shard_tar(out, 1)):
        (staged / ann["image"]["file_name"]).write_bytes(img)
        (staged / f"sa_{ann['image']['image_id']}.json").write_text(json.dumps(ann))
    for e in json.loads(LS.shard_index(out, 1).read_text())["errors"]:
        (staged / f"sa_{e['image_id']}.error.json").write_text(json.dumps(e))
    LS.shard_tar(out, 1).unlink()
    (out / "shards" / ".tmp-sa_000001.tar.123").write_bytes(b"partial")
    LS.shard_tar(out, 2).unlink()
    LS.shard_index(out, 2).unlink()
    (out / "manifest.json").unlink()
    LS.staging_dir(out, 2).mkdir(parents=True)
    (LS.staging_dir(out, 2) / ".tmp-sa_5.json.99").write_text('{"image": ')
    _make_images(src, 3, start=100)  # new images arrive before the resume

    again = L.label(src, out, resume=True, **kw)
    assert again["done_before"] == 2 + len(shard1)  # shards 0 and 1
    assert again["processed"] == 2 + 3  # shard 2 and the new images
    assert L.check_dataset(out) == {"images": 8, "errors": 1}
    plan = json.loads((out / "plan.json").read_text())
    assert [s for i, _, s in plan["items"] if i > 6] == [3, 3, 4]  # new shards only
    assert len(_contents(out)) == 8

    # nothing left to do: a resume only rewrites the manifest
    assert L.label(src, out, resume=True, **kw)["processed"] == 0


def test_source_list_file(tiny_ckpt, tmp_path):
    src = _make_images(tmp_path / "imgs", 3)
    listing = tmp_path / "list.txt"
    names = sorted(p.name for p in src.glob("img_*"))
    listing.write_text(
        "# images to label\n" + "\n".join(f"imgs/{n}" for n in names) + f"\nimgs/{names[0]}\n"
    )
    assert L.list_source(listing) == [str(src / n) for n in names]  # order kept, deduplicated
    assert L.list_source(src, exclude=src / "sub") == [str(src / n) for n in names]
    with pytest.raises(L.LabelError, match="not found"):
        L.list_source(tmp_path / "missing")


def test_mask_shape_concavity_and_centre():
    m = np.zeros((100, 200), bool)
    m[10:30, 40:80] = True
    area, concavity, cx, cy = mask_shape(m)
    assert area == 800 and concavity == pytest.approx(0.0, abs=1e-9)
    assert (cx, cy) == pytest.approx((59.5, 19.5))
    ell = np.zeros((100, 100), bool)
    ell[0:100, 0:10] = True
    ell[90:100, 0:100] = True  # an L: hull is about half the square
    _, c, _, _ = mask_shape(ell)
    assert 0.55 < c < 0.7
    assert mask_shape(np.zeros((5, 5), bool)) is None


def test_stats_on_coco_and_sa1b(tmp_path, tiny_ckpt):
    from segany.datasets.coco import CocoWriter
    from segany.datasets.sa1b import write_sa1b

    def rec(mask: np.ndarray) -> dict:
        ys, xs = np.nonzero(mask)
        box = [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        return {
            "segmentation": mask,
            "area": int(mask.sum()),
            "bbox": box,
            "predicted_iou": 0.9,
            "stability_score": 0.9,
            "point_coords": [[0.0, 0.0]],
            "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
        }

    m1 = np.zeros((40, 60), bool)
    m1[0:20, 0:30] = True
    m2 = np.zeros((40, 60), bool)
    m2[20:40, 30:60] = True
    coco = CocoWriter()
    coco.add([rec(m1), rec(m2)], file_name="a.jpg", width=60, height=40)
    coco.add([], file_name="b.jpg", width=30, height=30)
    coco.write(tmp_path / "coco" / "annotations.json")
    write_sa1b(tmp_path / "sa" / "x.json", [rec(m1)], image_id=1, file_name="x.jpg", width=60,
               height=40)  # fmt: skip
    result = run_stats(tmp_path / "coco" / "annotations.json", tmp_path / "plots",
                       compare=tmp_path / "sa")  # fmt: skip
    coco_s, sa_s = result["datasets"]
    assert coco_s["kind"] == "coco" and sa_s["kind"] == "sa1b"
    assert coco_s["images"] == 2 and coco_s["masks"] == 2
    assert coco_s["masks_per_image"]["groups_percent"]["0"] == 50.0
    assert coco_s["relative_mask_size"]["median"] == pytest.approx(0.5)
    assert coco_s["centers"]["mean_x"] == pytest.approx(0.5)
    for name in ("masks_per_image", "mask_size", "concavity", "centers", "resolution"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert json.loads((tmp_path / "plots" / "stats.json").read_text())["datasets"][1]["masks"] == 1
    st = compute(tmp_path / "sa")
    assert st.images == 1 and st.concavity == [0.0]


class _Death(Exception):
    pass


@pytest.mark.parametrize("fails_all", [True, False])
def test_worker_deaths_blame_only_the_culprit(fails_all):
    """A worker dying on image 3 every time: image 3 ends as an error after MAX_ATTEMPTS,
    every other image is labeled, even those in flight when the pool broke."""
    items = [LS.Item(i, f"/x/{i}.jpg", 0) for i in range(1, 9)]
    deaths = []

    def outcome(item):
        if item.image_id == 3:
            raise _Death()
        return {"image_id": item.image_id, "ok": True}

    results = list(
        LW.retrying(
            items,
            3,
            submit=lambda item: item,  # the "future" is the item itself
            wait=lambda futs: futs[:1],  # one completion per wait, oldest first
            outcome=outcome,
            is_death=lambda exc: isinstance(exc, _Death),
            on_death=deaths.append,
            give_up=lambda item, reason: {"image_id": item.image_id, "ok": False, "why": reason},
            death_fails_all=fails_all,
        )
    )
    assert sorted(r["image_id"] for r in results) == list(range(1, 9))
    bad = [r for r in results if not r["ok"]]
    assert [r["image_id"] for r in bad] == [3] and "died" in bad[0]["why"]
    assert len(deaths) == LW.MAX_ATTEMPTS + (1 if fails_all else 0)


# -- labeling with class names (segany label --classes) --------------------------------------
CLASSES = ["dog", "cat", "person"]


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory) -> Path:
    """The tiny random Grounding DINO of tests/test_text.py, saved to a folder."""
    pytest.importorskip("transformers")
    from ..test_text import _save_gdino

    folder = tmp_path_factory.mktemp("detectors") / "tiny-gdino"
    _save_gdino(folder)
    return folder


def _check_class_dataset(out: Path, classes: list[str], n_images: int) -> dict:
    """Per-image JSONs carry categories within the classes; instances.json (read by
    pycocotools) has exactly the classes and one entry per labeled image, and agrees with
    the per-image JSONs mask for mask. Returns the COCO dict."""
    from pycocotools.coco import COCO

    assert L.check_dataset(out)["images"] == n_images
    contents = _contents(out)
    per_image = {}
    for ann, _ in contents.values():
        per_image[ann["image"]["image_id"]] = ann
        for a in ann["annotations"]:
            assert 1 <= a["category_id"] <= len(classes)
            assert a["label"] == classes[a["category_id"] - 1]
            assert isinstance(a["phrase"], str) and a["phrase"]
            assert 0.0 <= a["score"] <= 1.0 and len(a["box"]) == 4
            assert a["point_coords"] == [] and "predicted_iou" in a
    api = COCO(str(out / "instances.json"))
    cats = api.loadCats(api.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == list(enumerate(classes, 1))
    images = api.loadImgs(api.getImgIds())
    assert len(images) == n_images == len({im["id"] for im in images})
    assert {im["id"]: im["file_name"] for im in images} == {
        i: a["image"]["file_name"] for i, a in per_image.items()
    }
    n_anns = 0
    for i, ann in per_image.items():
        coco_anns = api.loadAnns(api.getAnnIds(imgIds=[i]))
        assert len(coco_anns) == len(ann["annotations"])
        for c, a in zip(coco_anns, ann["annotations"]):
            assert c["category_id"] == a["category_id"] and c["score"] == a["score"]
            assert c["segmentation"]["counts"] == a["segmentation"]["counts"]
            assert int(api.annToMask(c).sum()) == c["area"] == a["area"]
        n_anns += len(coco_anns)
    assert len(api.getAnnIds()) == n_anns
    return json.loads((out / "instances.json").read_text())


def test_label_with_classes_resume_and_guards(tiny_ckpt, gdino_dir, tmp_path):
    """In-process: a job with classes, then a resume after a partial run (a shard lost, new
    images, a stale instances.json) rebuilds instances.json without duplicates; other
    classes, detector or thresholds on resume are refused; a detector gone on resume stops
    the job at its start."""
    import shutil

    det = tmp_path / "det"
    shutil.copytree(gdino_dir, det)
    src = _make_images(tmp_path / "src", 5)
    out = tmp_path / "out"
    kw = dict(workers=0, threads=1, progress=False)
    first = L.label(
        src, out, model=str(tiny_ckpt), classes="dog . cat . person .", detector=det,
        box_threshold=0.2, shard_size=2, **kw,
    )  # fmt: skip
    assert first["images"] == 5 and first["classes"] == CLASSES and first["masks"] > 0
    assert first["instances"]["images"] == 5
    assert first["instances"]["annotations"] == first["masks"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["text"]["classes"] == CLASSES and plan["text"]["detector"] == str(det.resolve())
    assert plan["text"]["box_threshold"] == 0.2 and plan["text"]["text_threshold"] == 0.25
    assert json.loads((out / "manifest.json").read_text())["text"] == plan["text"]
    coco = _check_class_dataset(out, CLASSES, 5)
    assert coco["info"]["classes"] == CLASSES
    labels = {a["label"] for ann, _ in _contents(out).values() for a in ann["annotations"]}
    assert labels and labels <= set(CLASSES)

    # settings that differ from the job are refused before anything runs
    for bad, what in (
        (dict(classes="dog . cat"), "classes"),
        (dict(detector=gdino_dir), "detector"),
        (dict(box_threshold=0.5), "box threshold"),
        (dict(text_threshold=0.9), "text threshold"),
    ):
        with pytest.raises(L.LabelError, match=what):
            L.label(src, out, resume=True, **bad, **kw)

    # a partial run: the last shard's tar and the manifest gone (killed before packing),
    # the old instances.json still there, and two new images in the source
    LS.shard_tar(out, 2).unlink()
    LS.shard_index(out, 2).unlink()
    (out / "manifest.json").unlink()
    _make_images(src, 2, start=100)
    again = L.label(src, out, resume=True, classes=["dog", "cat", "person"], **kw)
    assert again["done_before"] == 4 and again["processed"] == 3
    coco = _check_class_dataset(out, CLASSES, 7)
    assert (
        len(coco["annotations"])
        == json.loads((out / "manifest.json").read_text())["counts"]["masks"]
    )
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])

    # the detector's folder has gone: a resume with work to do stops at its start
    LS.shard_tar(out, 3).unlink()
    LS.shard_index(out, 3).unlink()
    shutil.rmtree(det)
    with pytest.raises(DetectorWeightsError, match="no such folder"):
        L.label(src, out, resume=True, **kw)
    assert not (LS.staging_dir(out, 3)).exists() or not any(LS.staging_dir(out, 3).iterdir())


def test_label_with_classes_on_a_worker_process(tiny_ckpt, gdino_dir, tmp_path):
    """One spawned worker process gives the same dataset as the in-process run."""
    src = _make_images(tmp_path / "src", 3)
    kw = dict(model=str(tiny_ckpt), classes="cat . person", detector=str(gdino_dir),
              box_threshold=0.25, threads=1, progress=False)  # fmt: skip
    local = L.label(src, tmp_path / "proc", workers=1, **kw)
    assert local["backend"] == "local" and local["workers"] == 1 and local["images"] == 3
    here = L.label(src, tmp_path / "here", workers=0, **kw)
    assert local["masks"] == here["masks"] > 0
    _check_class_dataset(tmp_path / "proc", ["cat", "person"], 3)
    a, b = _contents(tmp_path / "proc"), _contents(tmp_path / "here")
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key][0]["annotations"], b[key][0]["annotations"]
        assert [r["category_id"] for r in x] == [r["category_id"] for r in y]
        assert [r["segmentation"] for r in x] == [r["segmentation"] for r in y]
        assert [r["score"] for r in x] == pytest.approx([r["score"] for r in y], abs=1e-4)


def test_label_with_classes_masks_follow_the_boxes(mobile_sam, tmp_path, monkeypatch):
    """Real MobileSAM and a stub detector with known boxes: the stored masks and those of
    instances.json cover the named objects, each under its class."""
    pytest.importorskip("transformers")
    from pycocotools.coco import COCO

    import segany.text
    from segany.masks import rle_to_mask

    from ..test_text import RECTS, _stub, _synthetic

    stub = _stub()
    monkeypatch.setattr(segany.text, "load_detector", lambda name, **kw: stub)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(_synthetic()).save(src / f"s{i}.png")
    out = tmp_path / "out"
    report = L.label(src, out, classes="red box . bright car", detector="stub", workers=0,
                     threads=2, progress=False)  # fmt: skip
    assert report["images"] == 2 and report["masks"] == 4  # duplicate and weak box dropped
    assert {c[2] for c in stub.calls} == {0.3}  # the stub's default, recorded in the plan

    def truth(name: str) -> np.ndarray:
        x0, y0, x1, y1 = RECTS[name]
        m = np.zeros((400, 600), bool)
        m[y0:y1, x0:x1] = True
        return m

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / (a | b).sum()

    for ann, _ in _contents(out).values():
        assert [a["label"] for a in ann["annotations"]] == ["red box", "bright car"]
        assert [a["category_id"] for a in ann["annotations"]] == [1, 2]
        for a in ann["annotations"]:
            assert iou(rle_to_mask(a["segmentation"]), truth(a["label"])) > 0.9
    api = COCO(str(out / "instances.json"))
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == ["red box", "bright car"]
    assert len(api.getImgIds()) == 2 and len(api.getAnnIds()) == 4
    for c in api.loadAnns(api.getAnnIds()):
        name = api.loadCats(c["category_id"])[0]["name"]
        assert iou(api.annToMask(c).astype(bool), truth(name)) > 0.9


def test_label_with_classes_errors(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """A missing detector stops the job at its start with the message of what to download
    (no plan, no worker); bad class lists and options without --classes are refused."""
    pytest.importorskip("transformers")
    from segany.cli import main

    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _make_images(tmp_path / "src", 2)
    with pytest.raises(DetectorWeightsError, match="no such folder"):
        L.label(src, tmp_path / "a", model=str(tiny_ckpt), classes="dog",
                detector=tmp_path / "nowhere", workers=1, progress=False)  # fmt: skip
    assert not (tmp_path / "a" / "plan.json").exists()
    base = ["label", str(src), "--model", str(tiny_ckpt), "--workers", "1", "--no-progress"]
    out = tmp_path / "b"
    code = main([*base, "--out", str(out), "--classes", "dog . cat", "--detector",
                 "grounding-dino-base"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "IDEA-Research/grounding-dino-base" in err and "hf download" in err
    assert not (out / "plan.json").exists()
    assert main([*base, "--out", str(out), "--classes", " . "]) == 2
    assert "no class names" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--detector", "owlv2"]) == 2
    assert "need --classes" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--classes", "dog", "--preset", "fast"]) == 2
    assert "do not apply to --classes" in capsys.readouterr().err
    assert not (out / "plan.json").exists()
