"""Label Studio's ``/webhook`` ``START_TRAINING`` (and the older ``/train``): fine-tune
segany's mask decoder on the project's annotations, then switch the served model.

The annotations come from Label Studio's export API (``GET /api/projects/{id}/export?
exportType=JSON``) or, for the older ``/train`` call, from its body; every brush
(``brushlabels``, decoded by :mod:`.brush`) and polygon (``polygonlabels``) region of an
annotation that was not cancelled is a training mask. The images are read as for
``/predict``, written with the masks as a COCO file in a work folder, and trained on with
:func:`segany.train.trainer.train` under the retrain recipe of the annotator's model loop
(:func:`segany.train.loop.retrain_config`). One job at a time runs in a background thread;
its state is in ``GET /labelstudio/train/status`` and ``/labelstudio/health``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import brush

log = logging.getLogger("segany.serve.labelstudio")

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


def region_mask(region: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """A Label Studio brush or polygon region -> a bool mask of ``height x width`` (the
    image's decoded size); ``None`` for other region types or an empty mask."""
    import cv2

    kind, value = region.get("type"), region.get("value") or {}
    if kind == "brushlabels" and value.get("format", "rle") == "rle" and value.get("rle"):
        ow = int(region.get("original_width") or width)
        oh = int(region.get("original_height") or height)
        mask = brush.rle_to_mask(value["rle"], oh, ow)
        if (oh, ow) != (height, width):
            mask = cv2.resize(mask.astype(np.uint8), (width, height), cv2.INTER_NEAREST) > 0
    elif kind == "polygonlabels" and len(value.get("points") or []) >= 3:
        pts = np.asarray(value["points"], dtype=np.float64) * [width / 100.0, height / 100.0]
        canvas = np.zeros((height, width), np.uint8)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
        mask = canvas > 0
    else:
        return None
    return mask if mask.any() else None


def _label(region: dict[str, Any]) -> str:
    value = region.get("value") or {}
    labels = value.get(region.get("type", "")) or value.get("labels") or []
    return str(labels[0]) if labels else "object"


def tasks_to_coco(
    tasks: list[dict[str, Any]],
    image_key: Callable[[dict[str, Any]], str | None],
    read_image: Callable[[str, int | None], np.ndarray],
    folder: Path,
) -> tuple[Path, int]:
    """Write the annotated masks of Label Studio's exported ``tasks`` as ``folder/coco.json``
    with the images in ``folder/images``; ``(coco path, number of masks)``."""
    from PIL import Image

    from ...datasets.coco import CocoWriter
    from ...masks import masks_to_coco_rle

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    names: dict[str, int] = {}
    per_image: list[tuple[str, int, int, list[dict[str, Any]]]] = []
    for task in tasks:
        anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        regions = [r for a in anns for r in a.get("result") or []]
        regions = [r for r in regions if r.get("type") in ("brushlabels", "polygonlabels")]
        ref = image_key(task)
        if not regions or not ref:
            continue
        rgb = read_image(ref, task.get("id"))
        h, w = rgb.shape[:2]
        records = []
        for r in regions:
            mask = region_mask(r, h, w)
            if mask is None:
                continue
            label = _label(r)
            cat = names.setdefault(label, len(names) + 1)
            records.append({"segmentation": masks_to_coco_rle(mask[None])[0], "category_id": cat})
        if records:
            name = f"task-{task.get('id', len(per_image))}.png"
            Image.fromarray(rgb).save(images / name)
            per_image.append((name, w, h, records))
    cats = [{"id": i, "name": n} for n, i in names.items()]
    writer = CocoWriter(categories=cats or None)
    n = 0
    for name, w, h, records in per_image:
        writer.add(records, file_name=name, width=w, height=h)
        n += len(records)
    return writer.write(folder / "coco.json"), n


class TrainingJob:
    """One background fine-tune-and-switch at a time, with its progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = "idle"
        self.project: str | None = None
        self.step = 0
        self.steps = 0
        self.masks = 0
        self.error: str | None = None
        self.result: dict[str, Any] | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.thread: threading.Thread | None = None
        self.checkpoints: list[str] = []  # every checkpoint switched to, oldest first

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "project": self.project,
            "step": self.step,
            "steps": self.steps,
            "masks": self.masks,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "result": self.result,
        }

    def start(self, project: str, work: Callable[[TrainingJob], dict[str, Any]]) -> bool:
        """Run ``work(self)`` in a thread unless a job runs; whether it started."""
        with self.lock:
            if self.state == "running":
                return False
            self.state, self.project, self.error, self.result = "running", project, None, None
            self.step = self.steps = self.masks = 0
            self.started, self.finished = time.time(), None
            self.thread = threading.Thread(
                target=self._run, args=(work,), daemon=True, name="segany-ls-train"
            )
            self.thread.start()
            return True

    def _run(self, work: Callable[[TrainingJob], dict[str, Any]]) -> None:
        try:
            self.result = work(self)
            self.state = "done"
            log.info("Label Studio training done: %s", self.result)
        except Exception as exc:  # reported through the status and the log
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.error("Label Studio training failed: %s\n%s", self.error, traceback.format_exc())
        finally:
            self.finished = time.time()

    def wait(self, timeout: float | None = None) -> bool:
        t = self.thread
        if t is not None:
            t.join(timeout)
        return self.state != "running"


def fine_tune(
    job: TrainingJob,
    tasks: list[dict[str, Any]],
    *,
    image_key: Callable[[dict[str, Any]], str | None],
    read_image: Callable[[str, int | None], np.ndarray],
    base_model: str,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training itself (in the job's thread): COCO from ``tasks``, decoder fine-tune of
    ``base_model`` (a catalogue name or checkpoint), the checkpoint under ``out_dir``."""
    from ...train.data import DataError
    from ...train.loop import retrain_config
    from ...train.trainer import train

    with tempfile.TemporaryDirectory(prefix="segany-ls-train-") as tmp:
        coco, n_masks = tasks_to_coco(tasks, image_key, read_image, Path(tmp))
        job.masks = n_masks
        if n_masks == 0:
            raise DataError(
                "no brush or polygon annotations to train on in this project (cancelled "
                "annotations and other region types are skipped)"
            )
        cfg = retrain_config(n_masks, overrides)
        job.steps = cfg.steps
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"labelstudio-{job.project}-{len(job.checkpoints) + 1:03d}.pt"

        def on_step(step: int, _row: dict[str, Any]) -> None:
            job.step = step

        meta = train(
            str(coco),
            out,
            model=base_model,
            config=cfg,
            images=Path(tmp) / "images",
            progress=False,
            on_step=on_step,
            meta={"trained_on": f"Label Studio project {job.project}"},
        )
    return {
        "checkpoint": str(out.resolve()),
        "base_model": base_model,
        "masks": n_masks,
        "steps": meta["steps_done"],
        "wall_seconds": meta["wall_seconds"],
    }
