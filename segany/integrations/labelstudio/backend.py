"""The state behind Label Studio's ML backend routes: per-project credentials and settings
(from ``/setup``), the label configs read, recently fetched images, the training job, the
last error. Every handler takes the JSON body Label Studio sends and returns the JSON it
expects; the shapes are those of ``label_studio_ml/api.py`` (label-studio-ml-backend).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...engine.schemas import BadRequest, Conflict, ServiceError, Unprocessable
from . import predict as P
from .client import Credentials, LabelStudioClient, LabelStudioError, env_credentials
from .config import ConfigError, LabelConfig, parse_label_config
from .training import TRAIN_EVENTS, TrainingJob, fine_tune

log = logging.getLogger("segany.serve.labelstudio")

MODEL_CLASS = "segany"
_IMAGES_KEPT = 8
_IMAGE_TTL = 600.0


def project_id(value: Any) -> str | None:
    """``"12.1700000000"`` (Label Studio's project uid: id and creation time) -> ``"12"``."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        value = value.get("id")
    return str(value).split(".", 1)[0] or None


class LabelStudioBackend:
    """One ``segany serve`` process's Label Studio backend over a ``ModelSession``.

    Args:
        session: the shared model session (``segany.integrations.core.ModelSession``).
        preannotate: what a task without prompts gets: ``auto`` (text prompts with the
            labels' names when the session has a detector, else segment-everything),
            ``everything``, ``text`` or ``off``; default ``SEGANY_LS_PREANNOTATE`` or
            ``auto``. A project's ``extra_params`` (Label Studio's model settings, a JSON
            object) may set ``"preannotate"`` and ``"train"`` (TrainConfig fields, e.g.
            ``{"steps": 40}``).
        train_every: start a fine-tune after this many annotation events of a project
            (0: only on ``START_TRAINING``; default ``SEGANY_LS_TRAIN_EVERY`` or 0).
        models_dir: where fine-tuned checkpoints go (default ``SEGANY_LS_MODELS_DIR`` or
            ``<segany cache>/labelstudio-models``).
        credentials: Label Studio's URL and key (default: the environment, see
            :mod:`.client`).
        train_overrides: :class:`segany.train.trainer.TrainConfig` fields over the retrain
            recipe; everything: :class:`segany.everything.MaskGenerator` keywords for
            pre-annotation.
    """

    def __init__(
        self,
        session: Any,
        *,
        preannotate: str | None = None,
        train_every: int | None = None,
        models_dir: str | Path | None = None,
        credentials: Credentials | None = None,
        train_overrides: dict[str, Any] | None = None,
        everything: dict[str, Any] | None = None,
    ) -> None:
        self.session = session
        mode = preannotate or os.environ.get("SEGANY_LS_PREANNOTATE") or "auto"
        if mode not in P.PREANNOTATE_MODES:
            raise ValueError(f"preannotate must be one of {P.PREANNOTATE_MODES}, got {mode!r}")
        self.preannotate_mode = mode
        self.train_every = int(
            train_every if train_every is not None else os.environ.get("SEGANY_LS_TRAIN_EVERY", 0)
        )
        models_dir = models_dir or os.environ.get("SEGANY_LS_MODELS_DIR")
        self._models_dir = Path(models_dir) if models_dir else None
        self.env = credentials or env_credentials()
        self.train_overrides = dict(train_overrides or {})
        self.everything = dict(everything or {})
        self.lock = threading.Lock()
        self.projects: dict[str, dict[str, Any]] = {}  # id -> {"creds", "extra", "events"}
        self._configs: dict[str, LabelConfig] = {}
        self._clients: dict[tuple, LabelStudioClient] = {}
        self._images: collections.OrderedDict[tuple, tuple[float, np.ndarray]] = (
            collections.OrderedDict()
        )
        self.job = TrainingJob()
        self.last_error: dict[str, Any] | None = None

    # -- helpers -------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        s = self.session
        return f"segany-{s.name}-{str(s.model_id)[:8]}"

    def models_dir(self) -> Path:
        if self._models_dir is None:
            from ...weights import cache_dir

            self._models_dir = cache_dir() / "labelstudio-models"
        return self._models_dir

    def error(self, exc: BaseException, where: str) -> None:
        """Remember and log an error Label Studio's page may not show (it keeps only the
        HTTP status of a failed call)."""
        msg = str(exc)
        self.last_error = {"time": time.time(), "where": where, "message": msg}
        log.warning("Label Studio %s failed: %s", where, msg)

    def config(self, text: Any) -> LabelConfig:
        if not isinstance(text, str):
            raise BadRequest("label_config must be the project's labeling config (XML text)")
        with self.lock:
            hit = self._configs.get(text)
        if hit is None:
            try:
                hit = parse_label_config(text)
            except ConfigError as exc:
                raise Unprocessable(str(exc)) from None
            with self.lock:
                if len(self._configs) > 64:
                    self._configs.clear()
                self._configs[text] = hit
        return hit

    def credentials(self, project: str | None) -> Credentials:
        """The environment's URL and key where set, else what ``/setup`` gave."""
        with self.lock:
            setup = (self.projects.get(project or "") or {}).get("creds")
        env = self.env
        if setup is None:
            return env
        if env.url or env.key:
            return Credentials(env.url or setup.url, env.key or setup.key, "environment")
        return setup

    def client(self, project: str | None) -> LabelStudioClient:
        creds = self.credentials(project)
        key = (creds.url, creds.key, creds.source)
        with self.lock:
            c = self._clients.get(key)
            if c is None:
                c = self._clients[key] = LabelStudioClient(creds)
            return c

    def read_image(self, project: str | None, ref: str, task_id: int | None) -> np.ndarray:
        """The task's image, decoded (kept a few minutes: clicks on one task refetch none)."""
        client = self.client(project)
        key = (client.creds.url, client.creds.key, ref)
        now = time.monotonic()
        with self.lock:
            hit = self._images.get(key)
            if hit is not None and now - hit[0] < _IMAGE_TTL:
                self._images.move_to_end(key)
                return hit[1]
        rgb = self.session.read_image(client.image_bytes(ref, task_id))
        with self.lock:
            self._images[key] = (now, rgb)
            while len(self._images) > _IMAGES_KEPT:
                self._images.popitem(last=False)
        return rgb

    # -- /setup --------------------------------------------------------------------------------
    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = project_id(body.get("project"))
        if body.get("schema"):
            self.config(body["schema"])  # an unusable config is said now, not at the first click
        extra = body.get("extra_params")
        if isinstance(extra, str) and extra.strip():
            try:
                extra = json.loads(extra)
            except ValueError:
                raise Unprocessable("extra_params must be a JSON object") from None
        host, token = body.get("hostname"), body.get("access_token")
        with self.lock:
            p = self.projects.setdefault(pid or "", {"events": 0})
            if isinstance(extra, dict):
                p["extra"] = extra
            if isinstance(host, str) and host.startswith(("http://", "https://")):
                p["creds"] = Credentials(
                    host.rstrip("/"), token if isinstance(token, str) and token else None, "setup"
                )
        creds = self.credentials(pid)
        if not creds.key:
            log.warning(
                "Label Studio project %s: no API key (LABEL_STUDIO_API_KEY unset, none in "
                "/setup): images under /data/ will not be readable",
                pid,
            )
        return {"model_version": self.model_version}

    def _mode(self, project: str | None) -> str:
        with self.lock:
            extra = (self.projects.get(project or "") or {}).get("extra") or {}
        mode = extra.get("preannotate", self.preannotate_mode)
        return mode if mode in P.PREANNOTATE_MODES else self.preannotate_mode

    # -- /predict ------------------------------------------------------------------------------
    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("tasks must be a non-empty list of Label Studio tasks")
        config = self.config(body.get("label_config"))
        pid = project_id(body.get("project"))
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context")
        version = self.model_version
        regions_in = context.get("result") if isinstance(context, dict) else None
        if regions_in:
            image = next(
                (r.get("to_name") for r in regions_in if isinstance(r, dict) and r.get("to_name")),
                None,
            )
            out = self._output(config, image if image in config.images else None)
            rgb = self._task_image(pid, tasks[0], config, out.to_name)
            prompt = P.parse_context(context, rgb.shape[:2])
            if prompt.empty:
                return {"results": [P.prediction([], version)]}
            t0 = time.perf_counter()
            regions, info = P.interactive(self.session, rgb, prompt, out)
            ms = (time.perf_counter() - t0) * 1e3
            log.info("Label Studio click on task %s: %d region(s) in %.0f ms %s",
                     tasks[0].get("id"), len(regions), ms, info)  # fmt: skip
            return {"results": [P.prediction(regions, version)]}
        out = self._output(config, None)
        mode = self._mode(pid)
        results = []
        for task in tasks:
            if mode == "off":
                results.append(P.prediction([], version))
                continue
            rgb = self._task_image(pid, task, config, out.to_name)
            t0 = time.perf_counter()
            regions, what = P.preannotate(self.session, rgb, config, out, mode, self.everything)
            log.info("Label Studio pre-annotation of task %s (%s): %d region(s) in %.1f s",
                     task.get("id"), what, len(regions), time.perf_counter() - t0)  # fmt: skip
            results.append(P.prediction(regions, version))
        return {"results": results}

    def _output(self, config: LabelConfig, image: str | None):
        try:
            return config.output_for(image)
        except ConfigError as exc:
            raise Unprocessable(str(exc)) from None

    def _task_image(self, pid: str | None, task: dict, config: LabelConfig, image: str):
        key = config.data_key(image)
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        ref = data.get(key)
        if not isinstance(ref, str) or not ref:
            raise Unprocessable(
                f"task {task.get('id')} has no image under data.{key} (the label config's "
                f'<Image name="{image}" value="${key}"/>)'
            )
        return self.read_image(pid, ref, task.get("id"))

    # -- /webhook and /train -------------------------------------------------------------------
    def webhook(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        event = body.get("action")
        if event not in TRAIN_EVENTS:
            return 200, {"status": "Unknown event"}
        project = body.get("project")
        pid = project_id(project)
        if pid is None:
            raise BadRequest("a training event needs project.id")
        if isinstance(project, dict) and project.get("label_config"):
            self.config(project["label_config"])
        if event != "START_TRAINING":
            with self.lock:
                p = self.projects.setdefault(pid, {"events": 0})
                p["events"] = p.get("events", 0) + 1
                due = self.train_every > 0 and p["events"] % self.train_every == 0
            if not due:
                return 201, {"result": {"queued": False, "events": p["events"]}, "status": "ok"}
        started = self.start_training(pid, project if isinstance(project, dict) else {}, None)
        return 201, {"result": {"started": started, "job": self.job.status()}, "status": "ok"}

    def train(self, body: dict[str, Any]) -> dict[str, Any]:
        """Label Studio's older ``/train`` (its tasks with annotations in the body)."""
        pid = project_id(body.get("project"))
        tasks = body.get("annotations")
        if pid is None or not isinstance(tasks, list):
            raise BadRequest("/train needs project and annotations (a list of tasks)")
        self.start_training(pid, {"label_config": body.get("label_config")}, tasks)
        return {"job": f"{pid}-{int(self.job.started or 0)}", "status": self.job.status()}

    def start_training(self, pid: str, project: dict[str, Any], tasks: list | None) -> bool:
        if not hasattr(self.session, "switch_model"):
            raise Conflict("this segany serve cannot switch models: training is unavailable")
        config_text = project.get("label_config")
        config = self.config(config_text) if config_text else None

        def image_key(task: dict[str, Any]) -> str | None:
            data = task.get("data") or {}
            if config is not None:
                for key in config.images.values():
                    if isinstance(data.get(key), str):
                        return data[key]
            return next((v for v in data.values() if isinstance(v, str)), None)

        def work(job: TrainingJob) -> dict[str, Any]:
            todo = tasks
            if todo is None:
                todo = self.client(pid).api_json(
                    f"/api/projects/{int(pid)}/export?exportType=JSON&download_all_tasks=false",
                    what=f"the annotations of project {pid}",
                )
            base = job.checkpoints[-1] if job.checkpoints else self._base_model()
            result = fine_tune(
                job,
                todo,
                image_key=image_key,
                read_image=lambda ref, tid: self.read_image(pid, ref, tid),
                base_model=base,
                out_dir=self.models_dir(),
                overrides={**self.train_overrides, **self._project_train(pid)},
            )
            self.switch(result["checkpoint"])
            job.checkpoints.append(result["checkpoint"])
            result["model_version"] = self.model_version
            return result

        started = self.job.start(pid, work)
        if not started:
            log.info("Label Studio training for project %s: a job is already running", pid)
        return started

    def _project_train(self, project: str) -> dict[str, Any]:
        """A project's ``extra_params`` ``{"train": {...}}``: TrainConfig fields (steps, lr...)."""
        with self.lock:
            extra = (self.projects.get(project) or {}).get("extra") or {}
        train = extra.get("train")
        return dict(train) if isinstance(train, dict) else {}

    def _base_model(self) -> str:
        return str(getattr(self.session, "model_source", None) or self.session.name)

    def switch(self, checkpoint: str) -> None:
        from ...loader import load_predictor

        backend = getattr(self.session, "backend_name", "torch")
        pred = load_predictor(checkpoint, backend=backend, progress=False)
        self.session.switch_model(pred, name=Path(checkpoint).name)

    # -- /health -------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model_version": self.model_version,
            "label_studio": self.env.describe() if self.env.url else None,
            "api_key": bool(self.env.key),
            "preannotate": self.preannotate_mode,
            "training": self.job.status(),
            "last_error": self.last_error,
        }


def error_body(status: int, message: str) -> dict[str, Any]:
    """label-studio-ml's error answer (``label_studio_ml/exceptions.py`` ``answer``)."""
    return {"status": status, "detail": message, "request": {}, "result": {}}


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ServiceError):
        return exc.status
    if isinstance(exc, LabelStudioError):
        return exc.status
    return 500
