"""The SA-1B layout a labeling job writes (see :mod:`.label` for the job and its
durability rules): names, the per-image work of a worker (image copy + per-image JSON in the
shard's staging folder), packing a finished shard into its tar, the errors file, the
manifest, COCO ``instances.json`` of a job with classes, and :func:`check_dataset`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import validate as V
from ..datasets.sa1b import read_tar
from ..files import TMP_PREFIX, atomic_file, atomic_write

PLAN = "plan.json"
MANIFEST = "manifest.json"
INSTANCES = "instances.json"
REPORT = "report.json"
ERRORS = "errors.jsonl"
SHARDS = "shards"
STAGING = "staging"
_TMP = TMP_PREFIX
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One input image: its dataset id (``sa_<image_id>``), path and shard number."""

    image_id: int
    source: str
    shard: int


# -- names -----------------------------------------------------------------------------------
def shard_name(shard: int) -> str:
    return f"sa_{shard:06d}"


def image_stem(image_id: int) -> str:
    return f"sa_{image_id}"


def staging_dir(out: Path, shard: int) -> Path:
    return out / STAGING / shard_name(shard)


def shard_tar(out: Path, shard: int) -> Path:
    return out / SHARDS / f"{shard_name(shard)}.tar"


def shard_index(out: Path, shard: int) -> Path:
    return out / SHARDS / f"{shard_name(shard)}.index.json"


# -- files ---------------------------------------------------------------------------------
def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    atomic_write(path, V.dumps(obj, indent=indent))


# -- per-image work (runs in the workers) ----------------------------------------------------
def _image_payload(data: bytes, rgb: Any) -> tuple[str, bytes]:
    """The bytes stored in the shard: the original file when it is a JPEG or PNG that
    decodes to the labeled pixels as is (no EXIF rotation), else a JPEG of the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            orientation = im.getexif().get(0x0112, 1)
            size = im.size
    except Exception:  # noqa: BLE001 - decoded by load_image already; re-encode below
        fmt, orientation, size = None, 1, None
    same = orientation in (None, 1) and size == (rgb.shape[1], rgb.shape[0])
    if same and fmt == "JPEG":
        return ".jpg", data
    if same and fmt == "PNG":
        return ".png", data
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return ".jpg", buf.getvalue()


def write_error(out: Path, item: Item, reason: str) -> dict[str, Any]:
    """Mark ``item`` as not labelable (the mark is final: ``--resume`` does not retry it)."""
    err = {"image_id": item.image_id, "source": item.source, "reason": reason}
    sdir = staging_dir(out, item.shard)
    sdir.mkdir(parents=True, exist_ok=True)
    write_json(sdir / f"{image_stem(item.image_id)}.error.json", err)
    return {"image_id": item.image_id, "shard": item.shard, "ok": False, "reason": reason}


def process_item(generator: Any, out: Path, item: Item) -> dict[str, Any]:
    """Label one image: load it, generate masks, write its image copy and SA-1B JSON into
    the shard's staging folder. Unreadable images become error marks, never exceptions."""
    from ..datasets.sa1b import to_sa1b
    from ..transforms import ImageError, load_image

    t0 = time.perf_counter()
    try:
        rgb = load_image(item.source)
        ext, payload = _image_payload(Path(item.source).read_bytes(), rgb)
    except (OSError, ImageError) as exc:
        return write_error(out, item, f"{type(exc).__name__}: {exc}")
    t1, c1 = time.perf_counter(), time.process_time()
    try:
        records = generator.generate(rgb)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the job
        return write_error(out, item, f"generate failed: {type(exc).__name__}: {exc}")
    t2, c2 = time.perf_counter(), time.process_time()
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    stem = image_stem(item.image_id)
    extra = tuple(getattr(generator, "extra_keys", ()))
    ann = to_sa1b(
        records, image_id=item.image_id, file_name=stem + ext, width=w, height=h, extra_keys=extra
    )
    sdir = staging_dir(out, item.shard)
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write(sdir / (stem + ext), payload)
    write_json(sdir / f"{stem}.json", ann)  # the commit mark of this image
    (sdir / f"{stem}.error.json").unlink(missing_ok=True)
    t3 = time.perf_counter()
    return {
        "image_id": item.image_id,
        "shard": item.shard,
        "ok": True,
        "masks": len(records),
        "seconds": {"load": t1 - t0, "generate": t2 - t1, "write": t3 - t2},
        "cpu_seconds": c2 - c1,  # CPU time of generate, all threads of the worker
    }


def scan(out: Path, shards: dict[int, list[Item]]) -> tuple[set[int], dict[int, set[int]]]:
    """(finished shards, ids marked done per unfinished shard); removes temp files and the
    staging of finished shards (left by a kill between the tar's rename and the cleanup)."""
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    (out / STAGING).mkdir(parents=True, exist_ok=True)
    for tmp in (out / SHARDS).glob(f"{_TMP}*"):
        tmp.unlink(missing_ok=True)
    for tmp in out.glob(f"{_TMP}*"):
        tmp.unlink(missing_ok=True)
    finished = {s for s in shards if shard_tar(out, s).is_file() and shard_index(out, s).is_file()}
    marked: dict[int, set[int]] = {}
    for s in shards:
        sdir = staging_dir(out, s)
        if s in finished:
            shutil.rmtree(sdir, ignore_errors=True)
            continue
        ids: set[int] = set()
        if sdir.is_dir():
            for f in sdir.iterdir():
                if f.name.startswith(_TMP):
                    f.unlink(missing_ok=True)
                elif f.name.endswith(".json") and f.name.startswith("sa_"):
                    stem = f.name.split(".", 1)[0]
                    with contextlib.suppress(ValueError):
                        ids.add(int(stem[3:]))
        marked[s] = ids & {it.image_id for it in shards[s]}
    return finished, marked


def finalize_shard(out: Path, shard: int, items: list[Item]) -> dict[str, Any]:
    """Pack a shard whose images are all marked into its tar (atomically) and drop its
    staging folder. Returns the shard index (also written next to the tar)."""
    sdir = staging_dir(out, shard)
    name = shard_name(shard)
    tar_path = shard_tar(out, shard)
    images: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    masks = 0
    # the tar is renamed into place (the shard's commit mark) after its index is written
    with atomic_file(tar_path) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for it in sorted(items, key=lambda i: i.image_id):
                stem = image_stem(it.image_id)
                jpath = sdir / f"{stem}.json"
                if not jpath.is_file():
                    epath = sdir / f"{stem}.error.json"
                    errors.append(json.loads(epath.read_text()))
                    continue
                jbytes = jpath.read_bytes()
                ann = json.loads(jbytes)
                im = ann["image"]
                ibytes = (sdir / im["file_name"]).read_bytes()
                _tar_add(tar, im["file_name"], ibytes)
                _tar_add(tar, jpath.name, jbytes)
                n = len(ann["annotations"])
                masks += n
                images.append(
                    {
                        "image_id": it.image_id,
                        "file_name": im["file_name"],
                        "json": jpath.name,
                        "width": im["width"],
                        "height": im["height"],
                        "masks": n,
                        "source": it.source,
                    }
                )
        raw.flush()
        index = {
            "shard": f"{name}.tar",
            "images": images,
            "errors": errors,
            "counts": {"images": len(images), "errors": len(errors), "masks": masks},
            "bytes": raw.tell(),
        }
        write_json(shard_index(out, shard), index)
    shutil.rmtree(sdir, ignore_errors=True)
    return index


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # identical inputs give identical tars
    tar.addfile(info, io.BytesIO(data))


def _planned_shards(plan: dict[str, Any]) -> list[int]:
    return sorted({s for _, _, s in plan["items"]})


def write_instances(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """``OUT/instances.json`` of a job with classes (every shard must be finished): COCO
    instances over the whole dataset, categories = the classes (ids 1..K in their order),
    images = the dataset's images (``sa_<id>.jpg``, ids as in the dataset), one
    annotation per mask with its category, ``score`` (detector), ``predicted_iou``,
    ``stability_score`` and ``phrase``. Rebuilt from the tars each time, so it holds every
    labeled image once however often the job was resumed. Returns its counts."""
    from ..text import coco_writer

    text = plan["text"]
    writer = coco_writer(text["classes"])
    for s in _planned_shards(plan):
        for im in sorted(read_tar(shard_tar(out, s)), key=lambda im: im.image_id):
            writer.add(
                im.annotations,
                file_name=im.file_name,
                width=im.width,
                height=im.height,
                image_id=im.image_id,
            )
    data = writer.to_dict()
    data["info"] = {
        "description": "segany label --classes",
        "source": plan["source"],
        "model": plan["model"]["name"],
        "classes": text["classes"],
        "detector": text["detector"],
        "box_threshold": text["box_threshold"],
        "text_threshold": text["text_threshold"],
    }
    write_json(out / INSTANCES, data)
    return {"images": len(data["images"]), "annotations": len(data["annotations"])}


def write_manifest(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Manifest and errors file from the shard indexes (every shard must be finished)."""
    shards: dict[int, int] = {}
    for _, _, s in plan["items"]:
        shards[s] = shards.get(s, 0) + 1
    entries, images, errors = [], [], []
    for s in sorted(shards):
        index = json.loads(shard_index(out, s).read_text())
        entries.append(
            {
                "name": index["shard"],
                "path": f"{SHARDS}/{index['shard']}",
                "bytes": index["bytes"],
                **index["counts"],
            }
        )
        images += [{**im, "shard": index["shard"]} for im in index["images"]]
        errors += index["errors"]
    lines = "".join(V.dumps(e) + "\n" for e in sorted(errors, key=lambda e: e["image_id"]))
    atomic_write(out / ERRORS, lines.encode())
    manifest = {
        "format": "sa1b",
        "version": FORMAT_VERSION,
        "source": plan["source"],
        "model": plan["model"],
        "preset": plan["preset"],
        "settings": plan["settings"],
        "shard_size": plan["shard_size"],
        **({"text": plan["text"], "instances": INSTANCES} if plan.get("text") else {}),
        "counts": {
            "inputs": len(plan["items"]),
            "images": len(images),
            "errors": len(errors),
            "masks": sum(im["masks"] for im in images),
            "shards": len(entries),
        },
        "errors_file": ERRORS,
        "shards": entries,
        "images": images,
    }
    write_json(out / MANIFEST, manifest, indent=1)
    return manifest


def check_dataset(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a finished job: each planned input is in exactly one tar (with its image and
    valid JSON, read by :mod:`segany.datasets`) or in the errors file, and the manifest
    agrees. Raises ``AssertionError``."""
    out = Path(out)
    plan = json.loads((out / PLAN).read_text())
    manifest = json.loads((out / MANIFEST).read_text())
    seen: dict[int, str] = {}
    for shard in manifest["shards"]:
        for im in read_tar(out / shard["path"]):  # checks every mask
            i = im.image_id
            assert i not in seen, f"image {i} in {seen.get(i)} and {shard['name']}"
            assert im.read_bytes(), f"image {i}: no image file in {shard['name']}"
            seen[i] = shard["name"]
    errs = [json.loads(line) for line in (out / ERRORS).read_text().splitlines() if line]
    err_ids = {e["image_id"] for e in errs}
    assert len(err_ids) == len(errs), "an image is listed twice in the errors file"
    assert not (err_ids & set(seen)), "an image is both labeled and in the errors file"
    planned = {i for i, _, _ in plan["items"]}
    assert set(seen) | err_ids == planned, "labeled + errors != inputs"
    assert manifest["counts"]["images"] == len(seen)
    assert manifest["counts"]["errors"] == len(errs)
    if plan.get("text"):
        coco = json.loads((out / INSTANCES).read_text())
        ids = [im["id"] for im in coco["images"]]
        assert sorted(ids) == sorted(seen), "instances.json images != labeled images"
        names = [c["name"] for c in coco["categories"]]
        assert names == plan["text"]["classes"], "instances.json categories != classes"
        assert len(coco["annotations"]) == manifest["counts"]["masks"]
    leftovers = [p for p in out.rglob(f"{_TMP}*")]
    assert not leftovers, f"temporary files left: {leftovers}"
    return {"images": len(seen), "errors": len(errs)}
