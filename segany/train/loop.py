"""The model in the loop (the paper's data engine): fine-tune on the annotator's accepted
masks, switch the running annotator to the new checkpoint, and keep a model history.

- :func:`retrain_from_store`: the accepted objects of an annotated folder -> a decoder
  fine-tune (starting from the model the annotator last switched to) -> a checkpoint under
  ``IMAGES_DIR/.segany/models/``; a ``model_trained`` event records it in the store.
- :func:`switch_service_model`: load a checkpoint and make an
  :class:`~segany.engine.service.AnnotationService` use it from now on (its public
  ``switch_model()``); a ``model_switch`` event records the new model id with its
  checkpoint. Every annotation (manual accepts and stage-2 pre-labels) already stores the
  ``model_id`` that produced it, so :func:`model_history` tells which checkpoint made which
  pre-labels.
- :class:`RetrainJob`: retrain in a background thread, then switch; the annotator's
  ``GET/POST /api/model`` and ``GET/POST /api/model/retrain`` are in :mod:`.routes`.
- :func:`switch_server`: the client side of ``POST /api/model`` (``segany retrain --server``).
"""

from __future__ import annotations

import json
import math
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .trainer import TrainConfig

MODEL_EVENTS = ("model_trained", "model_switch")

#: The retrain recipe (fields of :class:`TrainConfig`); ``steps`` follows the data size.
RETRAIN_DEFAULTS: dict[str, Any] = {
    "train": "decoder",
    "val_fraction": 0.0,
    "lr": 1e-4,
    "warmup_steps": 10,
    "images_per_step": 2,
    "masks_per_image": 8,
    "point_rounds": 2,
    "empty_rounds": 1,
    "log_every": 5,
}
#: Passes over the accepted masks, and the bounds of the step count.
RETRAIN_EPOCHS = 2.0
RETRAIN_MIN_STEPS, RETRAIN_MAX_STEPS = 20, 400


class LoopError(RuntimeError):
    """Retraining or switching cannot be done (no accepted masks, bad checkpoint...)."""


def models_dir(images_dir: str | Path) -> Path:
    """Where retrained checkpoints go: ``IMAGES_DIR/.segany/models``."""
    return Path(images_dir).expanduser().resolve() / ".segany" / "models"


def retrain_config(n_masks: int, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """:data:`RETRAIN_DEFAULTS` with ``overrides``; ``steps`` (unless given) makes about
    :data:`RETRAIN_EPOCHS` passes over ``n_masks`` masks, within the bounds above."""
    kw = {**RETRAIN_DEFAULTS, **(overrides or {})}
    if "steps" not in kw:
        per_step = kw["images_per_step"] * kw["masks_per_image"] * kw.get("accumulate", 1)
        steps = math.ceil(RETRAIN_EPOCHS * n_masks / per_step)
        kw["steps"] = max(RETRAIN_MIN_STEPS, min(RETRAIN_MAX_STEPS, steps))
    return TrainConfig(**kw)


# -- history ---------------------------------------------------------------------------------
def model_history(store: Any) -> list[dict[str, Any]]:
    """The ``model_trained`` and ``model_switch`` events of a store, oldest first, as dicts
    (``ts``, ``kind``, ``user_id`` and the event's data)."""
    return [
        {"ts": e.ts, "kind": e.kind, "user_id": e.user_id, **(e.data or {})}
        for e in store.events(kinds=MODEL_EVENTS)
    ]


def _record(store: Any, kind: str, data: dict[str, Any], user_id: int | None = None) -> None:
    store.add_events([{"ts": time.time(), "kind": kind, "user_id": user_id, "data": data}])


def current_checkpoint(store: Any, model_id: str | None = None) -> str | None:
    """The checkpoint of the last switch (to ``model_id`` if given) that still exists."""
    for ev in reversed(model_history(store)):
        if ev["kind"] != "model_switch" or (model_id and ev.get("model_id") != model_id):
            continue
        path = ev.get("checkpoint")
        if path and Path(path).is_file():
            return str(path)
        if ev.get("model") and not path:
            return str(ev["model"])
    return None


# -- retrain ---------------------------------------------------------------------------------
def retrain_from_store(
    images_dir: str | Path,
    *,
    db: str | Path | None = None,
    model: str | Path | None = None,
    out: str | Path | None = None,
    config: TrainConfig | dict[str, Any] | None = None,
    embedding_cache: str | Path | None = "default",
    progress: bool = True,
    on_step: Any = None,
) -> dict[str, Any]:
    """Fine-tune on the accepted objects of the store of ``images_dir``.

    ``model`` defaults to the checkpoint the annotator last switched to (else the default
    catalogue model); ``out`` to ``IMAGES_DIR/.segany/models/retrain-NNN.pt``; ``config``
    is a :class:`TrainConfig` or overrides of :func:`retrain_config`. Records a
    ``model_trained`` event and returns its data (with ``checkpoint``)."""
    from ..datasets import open_dataset
    from ..engine.store import Store, default_db, redact
    from ..weights import DEFAULT_WEIGHTS
    from .data import DataError, for_training
    from .trainer import train

    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise LoopError(f"images folder not found: {images_dir}")
    db = db or default_db(root)
    try:
        data = for_training(open_dataset(db, images=root, kind="store"))
    except Exception as exc:  # StoreError, SQLAlchemy errors
        raise LoopError(f"cannot read the annotations of {root}: {exc}") from exc
    if data.num_masks == 0:
        raise DataError(f"no accepted objects in {redact(str(db))} to train on")
    store = Store(db)
    try:
        base = str(model) if model else current_checkpoint(store) or DEFAULT_WEIGHTS
        done = [e for e in model_history(store) if e["kind"] == "model_trained"]
        if out is None:
            out = models_dir(root) / f"retrain-{len(done) + 1:03d}.pt"
        cfg = config if isinstance(config, TrainConfig) else retrain_config(data.num_masks, config)
        ann_ids = sorted(i for im in data.images for i in im.ann_ids)
        meta = train(
            data,
            out,
            model=base,
            config=cfg,
            embedding_cache=embedding_cache,
            progress=progress,
            on_step=on_step,
            meta={
                "store": redact(str(db)),
                "trained_on": "accepted annotations",
                "annotation_ids": _ranges(ann_ids),
            },
        )
        record = {
            "checkpoint": str(Path(out).resolve()),
            "base_model": base,
            "images": len(data.images),
            "masks": data.num_masks,
            "annotation_ids": _ranges(ann_ids),
            "steps": meta["steps_done"],
            "wall_seconds": meta["wall_seconds"],
        }
        _record(store, "model_trained", record)
    finally:
        store.close()
    return record


def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids as ``[first, last]`` runs (compact for long lists)."""
    out: list[list[int]] = []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


# -- switch ----------------------------------------------------------------------------------
def switch_service_model(
    service: Any,
    checkpoint: str | Path,
    *,
    name: str | None = None,
    user_id: int | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` on the backend ``service`` runs and hand it to
    :meth:`~segany.engine.service.AnnotationService.switch_model` (requests already running
    finish with the old model; embeddings are kept when the image encoder is unchanged).
    Records a ``model_switch`` event and returns its data."""
    from ..loader import load_predictor
    from ..weights import WeightsError

    path = Path(checkpoint).expanduser()
    try:
        pred = load_predictor(path, backend=service.backend_name, progress=False)
    except (WeightsError, ValueError, RuntimeError) as exc:
        raise LoopError(f"cannot load {checkpoint}: {exc}") from exc
    switched = service.switch_model(pred, name=name or path.name)
    record = {
        "model": switched["model"],
        "model_id": switched["model_id"],
        "checkpoint": str(path.resolve()),
        "backend": switched["backend"],
        "previous_model": switched["previous_model"],
        "previous_model_id": switched["previous_model_id"],
        "embeddings_kept": switched["embeddings_kept"],
    }
    _record(service.store, "model_switch", record, user_id)
    return record


def switch_server(url: str, checkpoint: str | Path, *, token: str | None = None) -> dict:
    """Ask a running annotator (``segany annotate``) to switch to ``checkpoint`` (a path on
    the server's machine) through ``POST /api/model``."""
    import urllib.error
    import urllib.request

    body = json.dumps({"checkpoint": str(Path(checkpoint).resolve())}).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/api/model", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise LoopError(f"the server refused the switch ({exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise LoopError(f"cannot reach the annotator at {url}: {exc.reason}") from None


# -- the annotator's routes ------------------------------------------------------------------
class RetrainJob:
    """One background retrain-and-switch at a time, with its progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = "idle"
        self.step = 0
        self.steps = 0
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.started: float | None = None
        self.thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "step": self.step,
            "steps": self.steps,
            "started": self.started,
            "result": self.result,
            "error": self.error,
        }

    def start(self, service: Any, overrides: dict[str, Any], user_id: int | None) -> bool:
        with self.lock:
            if self.state == "running":
                return False
            self.state, self.step, self.result, self.error = "running", 0, None, None
            self.steps = int(overrides.get("steps", 0))
            self.started = time.time()
            self.thread = threading.Thread(
                target=self._run, args=(service, overrides, user_id), daemon=True,
                name="segany-retrain",
            )  # fmt: skip
            self.thread.start()
            return True

    def _run(self, service: Any, overrides: dict[str, Any], user_id: int | None) -> None:
        def on_step(step: int, _row: dict[str, Any]) -> None:
            self.step = step

        try:
            base = current_checkpoint(service.store, service.model_id)
            if base is None and Path(str(service.model_name)).suffix == "":
                base = str(service.model_name)  # a catalogue name
            data_masks = len(service.store.annotations(statuses=["accepted"]))
            cfg = retrain_config(data_masks, overrides)
            self.steps = cfg.steps
            trained = retrain_from_store(
                service.root, db=service.store.url, model=base, config=cfg, progress=False,
                on_step=on_step,
            )  # fmt: skip
            switched = switch_service_model(service, trained["checkpoint"], user_id=user_id)
            self.result = {"trained": trained, "switched": switched}
            self.state = "done"
        except Exception as exc:  # reported through the status
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            traceback.print_exc()
