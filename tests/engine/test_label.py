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
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany.engine import label as L
from segany.engine.dataset_stats import compute, mask_shape
from segany.engine.dataset_stats import run as run_stats

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


def _contents(out: Path) -> dict[str, tuple[dict, bytes]]:
    """Per-image JSON and image bytes of a finished dataset, keyed by source path."""
    manifest = json.loads((out / "manifest.json").read_text())
    source = {im["image_id"]: im["source"] for im in manifest["images"]}
    found = {}
    for shard in manifest["shards"]:
        for ann, img in L.read_shard(out / shard["path"]):
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

    # a kill after all of shard 1's images were marked but before its tar was renamed,
    # with a half-written temp tar and a half-written image mark of shard 2 lying around
    plan = json.loads((out / "plan.json").read_text())
    items = [L.Item(i, p, s) for i, p, s in plan["items"]]
    shard1 = [it for it in items if it.shard == 1]
    staged = L.staging_dir(out, 1)
    staged.mkdir(parents=True)
    for ann, img in L.read_shard(L.shard_tar(out, 1)):
        (staged / ann["image"]["file_name"]).write_bytes(img)
        (staged / f"sa_{ann['image']['image_id']}.json").write_text(json.dumps(ann))
    for e in json.loads(L.shard_index(out, 1).read_text())["errors"]:
        (staged / f"sa_{e['image_id']}.error.json").write_text(json.dumps(e))
    L.shard_tar(out, 1).unlink()
    (out / "shards" / ".tmp-sa_000001.tar.123").write_bytes(b"partial")
    L.shard_tar(out, 2).unlink()
    L.shard_index(out, 2).unlink()
    (out / "manifest.json").unlink()
    L.staging_dir(out, 2).mkdir(parents=True)
    (L.staging_dir(out, 2) / ".tmp-sa_5.json.99").write_text('{"image": ')
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
    from segany.formats.coco import CocoWriter
    from segany.formats.sa1b import write_sa1b

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
    items = [L.Item(i, f"/x/{i}.jpg", 0) for i in range(1, 9)]
    deaths = []

    def outcome(item):
        if item.image_id == 3:
            raise _Death()
        return {"image_id": item.image_id, "ok": True}

    results = list(
        L._retrying(
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
    assert len(deaths) == L.MAX_ATTEMPTS + (1 if fails_all else 0)
