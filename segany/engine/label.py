"""Data engine, stage 3: fully automatic labeling of an image collection into SA-1B layout.

``label(SOURCE, OUT)`` runs :class:`segany.everything.MaskGenerator` over every image of a
folder (recursive) or of a text file of paths, on a local pool of worker processes (default)
or on Ray actors, and writes::

    OUT/plan.json                 inputs (id, path, shard), model and settings; written first
    OUT/shards/sa_000000.tar      sa_<id>.jpg + sa_<id>.json per image, as in SA-1B
    OUT/shards/sa_000000.index.json   the shard's images (size, masks) and errors
    OUT/errors.jsonl              one line per input that could not be labeled, with the reason
    OUT/instances.json            with ``classes``: COCO instances JSON of the whole dataset
    OUT/manifest.json             shards, images, counts, model, settings; written last
    OUT/report.json               the last run's throughput (images/s, masks/image, timings)
    OUT/staging/sa_000000/        work in progress, removed when the shard's tar is written

Durability (a kill at any point, of a worker or of the whole job, loses no finished work
and leaves no half-written file where a reader looks):

- every file is written to a ``.tmp-*`` name, flushed, fsynced and renamed (``os.replace``);
- a worker writes the image copy, then the per-image JSON: the JSON is the commit mark of
  that image (``sa_<id>.error.json`` marks an unreadable one);
- a shard's tar is built by the coordinator once all of its images are marked, then
  renamed into place; the staging folder goes only after that. The tar is the shard's
  commit mark: ``--resume`` skips shards whose tar exists and, inside the others, images
  whose mark exists, so only missing work is redone;
- every input has one id and one shard in the plan and a tar holds each id once, so the
  dataset has every readable input exactly once, however often an image was (re)computed.

With ``classes`` (``"dog . cat . person"``), each image is labeled with text prompts
instead of segment-everything: an open-vocabulary detector finds the named classes and SAM
segments each box (:class:`segany.text.TextSegmenter`); the per-image JSONs then keep each
mask's ``category_id`` (1..K in the order of the classes), ``label``, ``phrase``, detector
``score`` and ``box``, and ``OUT/instances.json`` (rebuilt from the tars at the end of every
run, so a resume never duplicates) has the classes as categories.

Workers load the model once each and split the CPUs (threads per worker = CPUs // workers).
A worker that dies (out of memory, killed) is replaced and its images retried; an image
that takes down :data:`MAX_ATTEMPTS` workers is recorded as an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..everything import DEFAULT_PRESET, GeneratorSettings
from ..runtime import available_cpus
from ..weights import DEFAULT_WEIGHTS
from .label_plan import (
    LabelError,
    check_same,
    extend_plan,
    generator_settings,
    list_source,
    make_plan,
    probe_detector,
    text_config,
    text_plan,
    text_request,
)
from .label_shards import (
    INSTANCES,
    MANIFEST,
    PLAN,
    REPORT,
    Item,
    check_dataset,
    finalize_shard,
    scan,
    write_error,
    write_instances,
    write_json,
    write_manifest,
)
from .label_workers import WorkerConfig, ray_cpus, run_local, run_ray

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_THREADS_PER_WORKER",
    "LabelError",
    "check_dataset",
    "label",
    "list_source",
]

#: SA-1B tars hold ~11k images; a smaller default keeps the work lost to a crash small.
DEFAULT_SHARD_SIZE = 1000
#: Threads per worker when ``workers`` is not given: one worker per this many CPUs.
DEFAULT_THREADS_PER_WORKER = 1


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One job per output folder at a time (advisory lock, released when the process dies)."""
    import fcntl

    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabelError(f"another labeling job is running on {out}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the job ---------------------------------------------------------------------------------
def label(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    shard_size: int | None = None,
    resume: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    classes: str | Sequence[str] | None = None,
    detector: str | os.PathLike[str] | None = None,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
) -> dict[str, Any]:
    """Label every image of ``source`` into ``out`` (SA-1B layout); returns the run report.

    Args:
        model: catalogue name or checkpoint path (default: MobileSAM).
        preset: generator preset (default: ``fast``); ``overrides``: GeneratorSettings fields.
        workers: worker processes (local) or actors (Ray); ``0`` runs in this process.
            Default: one per :data:`DEFAULT_THREADS_PER_WORKER` CPUs (of the cluster on Ray).
        threads: threads per worker (default: CPUs // workers, on Ray per-node CPUs).
        shard_size: images per tar (default :data:`DEFAULT_SHARD_SIZE`).
        resume: continue the job in ``out``; model, preset, overrides and shard size default
            to the job's and must match it when given. New images in ``source`` are added.
        ray: run on Ray: ``ray_address`` of a cluster (``"auto"``, ``"ray://host:10001"``),
            or ``None``: ``RAY_ADDRESS``, a ``ray start`` cluster on this machine, else a new
            local one. An already initialised Ray connection is used as is.
        classes: label with these class names (``"dog . cat"`` or a list) instead of
            segment-everything: ``detector`` (catalogue name, hub id or folder; default
            ``grounding-dino-tiny``) finds them, SAM segments each box, and
            ``OUT/instances.json`` (COCO, the classes as categories) is written too.
            ``box_threshold`` / ``text_threshold``: the detector's (default: its own).
            Missing detector weights raise :class:`~segany.text.DetectorWeightsError`
            before anything is written. On ``--resume`` they default to the job's and must
            match it when given.
    """
    t_start = time.perf_counter()
    say = log or (lambda msg: print(f"segany label: {msg}", file=sys.stderr))
    out = Path(out).expanduser().resolve()
    if shard_size is not None and shard_size < 1:
        raise LabelError("shard size must be >= 1")
    text = text_request(classes, detector, box_threshold, text_threshold)
    ray_started = False
    if ray and not _ray_ready():  # before anything is written: a bad address leaves no job
        _ray_connect(ray_address)
        ray_started = True
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _label(source, out, model, preset, overrides, workers, threads, shard_size,
                      resume, ray, progress, say, t_start, text)  # fmt: skip
    finally:
        if ray_started:
            import ray as ray_module

            ray_module.shutdown()


def _label(
    source: str | os.PathLike[str],
    out: Path,
    model: str | None,
    preset: str | None,
    overrides: dict[str, Any] | None,
    workers: int | None,
    threads: int | None,
    shard_size: int | None,
    resume: bool,
    ray: bool,
    progress: bool,
    say: Callable[[str], None],
    t_start: float,
    text: dict[str, Any],
) -> dict[str, Any]:
    with _lock(out):
        plan_path = out / PLAN
        if plan_path.is_file():
            if not resume:
                raise LabelError(
                    f"{out} already holds a labeling job; pass --resume to continue it "
                    "or choose a new --out"
                )
            plan = json.loads(plan_path.read_text())
            if os.path.realpath(source) != os.path.realpath(plan["source"]):
                raise LabelError(
                    f"--resume: the job in {out} labels {plan['source']}, not "
                    f"{os.path.abspath(source)}; resume with the same source or use a new --out"
                )
            check_same("model", model, plan["model"]["name"])
            check_same("preset", preset, plan["preset"])
            check_same("shard size", shard_size, plan["shard_size"])
            if overrides:
                stored = plan["settings"]
                settings = generator_settings(plan["preset"], overrides)
                check_same("settings", dataclasses.asdict(settings), stored)
            stored_text = plan.get("text") or {}
            check_same("classes", text["classes"], stored_text.get("classes"))
            check_same("detector", text["detector"], stored_text.get("detector"))
            check_same("box threshold", text["box_threshold"], stored_text.get("box_threshold"))
            check_same("text threshold", text["text_threshold"], stored_text.get("text_threshold"))
            added = extend_plan(plan, os.fspath(source), out)
            if added:
                say(f"{added} new image(s) in the source, added in new shards")
                write_json(plan_path, plan)
            check_detector = True
        else:
            classes = text["classes"]
            if classes is None and any(v is not None for v in text.values()):
                raise LabelError("--detector, --box-threshold and --text-threshold need --classes")
            if classes is not None and (preset is not None or overrides):
                raise LabelError(
                    "--preset, --points-per-side, --crop-layers and --set tune "
                    "segment-everything; they do not apply to --classes"
                )
            settings = generator_settings(preset or DEFAULT_PRESET, overrides)
            plan = make_plan(
                os.fspath(source),
                out,
                model or DEFAULT_WEIGHTS,
                preset or DEFAULT_PRESET,
                settings,
                shard_size or DEFAULT_SHARD_SIZE,
            )
            if classes is not None:
                from ..text import DEFAULT_DETECTOR

                plan["text"] = text_plan(
                    classes,
                    text["detector"] or DEFAULT_DETECTOR,
                    text["box_threshold"],
                    text["text_threshold"],
                )
            write_json(plan_path, plan)
            check_detector = False  # just loaded by _text_plan
        return _run(plan, out, workers, threads, ray, progress, say, t_start, check_detector)


def _run(
    plan: dict[str, Any],
    out: Path,
    workers: int | None,
    threads: int | None,
    use_ray: bool,
    progress: bool,
    say: Callable[[str], None],
    t_start: float,
    check_detector: bool = False,
) -> dict[str, Any]:
    from tqdm import tqdm

    shards: dict[int, list[Item]] = {}
    for i, p, s in plan["items"]:
        shards.setdefault(s, []).append(Item(i, p, s))
    finished, marked = scan(out, shards)
    pending = [it for s in sorted(shards) if s not in finished for it in shards[s]]
    pending = [it for it in pending if it.image_id not in marked[it.shard]]
    total = len(plan["items"])
    done_before = total - len(pending)
    text_cfg = text_config(plan)
    if pending and text_cfg is not None and check_detector:
        probe_detector(text_cfg.detector)  # a resume: the weights may have gone since
    if pending:
        (out / MANIFEST).unlink(missing_ok=True)  # stale until every shard is written again
        (out / INSTANCES).unlink(missing_ok=True)
    t_finalize = 0.0
    for s in sorted(marked):  # fully marked but not packed: killed while packing
        if len(marked[s]) == len(shards[s]):
            t0 = time.perf_counter()
            finalize_shard(out, s, shards[s])
            t_finalize += time.perf_counter() - t0
    remaining = {s: len(shards[s]) - len(marked[s]) for s in marked}
    remaining = {s: n for s, n in remaining.items() if n > 0}

    settings = GeneratorSettings(**plan["settings"])
    backend, workers, threads = _plan_workers(workers, threads, use_ray, say)
    cfg = WorkerConfig(plan["model"]["name"], settings, os.fspath(out), threads, text_cfg)
    if pending:
        what = (
            f"classes {', '.join(text_cfg.classes)} with detector {text_cfg.detector}; "
            if text_cfg is not None
            else ""
        )
        say(
            f"{len(pending)} image(s) to label ({done_before} already done), {what}"
            + (
                f"{backend}: {workers} worker(s) x {threads} thread(s)"
                if workers
                else f"in this process, {threads} thread(s)"
            )
        )

    def give_up(item: Item, reason: str) -> dict[str, Any]:
        return write_error(out, item, reason)

    n_ok = n_err = n_masks = 0
    stage = {"load": 0.0, "generate": 0.0, "write": 0.0}
    cpu = 0.0
    load_times: list[float] = []
    first_result: float | None = None
    per_worker: dict[str, tuple[float, float, int]] = {}
    errors: list[dict[str, Any]] = []
    bar = tqdm(
        total=total,
        initial=done_before,
        unit="img",
        desc="label",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        if pending:
            if backend == "ray":
                results = run_ray(cfg, pending, workers, give_up)
            else:
                results = run_local(cfg, pending, workers, give_up)
            for res in results:
                now = time.perf_counter()
                if first_result is None:
                    first_result = now
                if "worker" in res:  # (first, last, count) of each worker's results
                    f, _, c = per_worker.get(res["worker"], (now, now, 0))
                    per_worker[res["worker"]] = (f, now, c + 1)
                if "model_load_seconds" in res:
                    load_times.append(res["model_load_seconds"])
                if res["ok"]:
                    n_ok += 1
                    n_masks += res["masks"]
                    for k, v in res["seconds"].items():
                        stage[k] += v
                    cpu += res.get("cpu_seconds", 0.0)
                else:
                    n_err += 1
                    errors.append(res)
                    bar.write(f"segany label: skipped image {res['image_id']}: {res['reason']}")
                bar.set_postfix(
                    masks_per_img=f"{n_masks / max(n_ok, 1):.1f}", errors=n_err, refresh=False
                )
                bar.update(1)
                s = res["shard"]
                remaining[s] -= 1
                if remaining[s] == 0:
                    t0 = time.perf_counter()
                    finalize_shard(out, s, shards[s])
                    t_finalize += time.perf_counter() - t0
                    del remaining[s]
    finally:
        bar.close()
    t_end = time.perf_counter()
    instances = write_instances(out, plan) if text_cfg is not None else None
    manifest = write_manifest(out, plan)
    wall = t_end - t_start
    processed = n_ok + n_err
    # steady rate: sum over workers of (results - 1) / (last - first result), so that
    # start-up (process start, model load) is left out and parallel workers are not
    # favoured by their first results arriving together
    rates = [(c - 1) / (b - a) for a, b, c in per_worker.values() if c > 1 and b > a]
    steady = round(sum(rates), 4) if rates else None
    report = {
        "out": os.fspath(out),
        "backend": backend,
        "workers": workers,
        "threads_per_worker": threads,
        "model": plan["model"]["name"],
        "preset": plan["preset"],
        "inputs": total,
        "done_before": done_before,
        "processed": processed,
        "images": n_ok,
        "errors": n_err,
        "masks": n_masks,
        "masks_per_image": round(n_masks / n_ok, 2) if n_ok else 0.0,
        "seconds": round(wall, 2),
        "images_per_second": round(n_ok / wall, 4) if wall > 0 else 0.0,
        "steady_images_per_second": steady,
        # job start to the first finished image: start-up, model load and one image
        "first_image_seconds": round(first_result - t_start, 2) if first_result else None,
        "model_load_seconds": round(max(load_times), 2) if load_times else None,
        "seconds_per_image": {k: round(v / n_ok, 3) for k, v in stage.items()} if n_ok else {},
        # CPU time of generate per image: what the model costs, whatever else runs here
        "generate_cpu_seconds_per_image": round(cpu / n_ok, 3) if n_ok else None,
        "finalize_seconds": round(t_finalize, 2),
        "dataset": manifest["counts"],
    }
    if text_cfg is not None:
        report["classes"] = list(text_cfg.classes)
        report["detector"] = text_cfg.detector
        report["instances"] = {"file": os.fspath(out / INSTANCES), **(instances or {})}
    write_json(out / REPORT, report, indent=1)
    return report


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _ray_connect(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise LabelError("--ray needs Ray: pip install 'segany[ray]'") from None
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LabelError(
            f"cannot connect to Ray at {address or 'the default address'}: {exc} "
            "(for a `ray start` cluster on this machine use --ray auto)"
        ) from None


def _plan_workers(
    workers: int | None,
    threads: int | None,
    use_ray: bool,
    say: Callable[[str], None],
) -> tuple[str, int, int]:
    """(backend, workers, threads per worker), never more threads than CPUs on a node."""
    if workers is not None and workers < 0:
        raise LabelError("workers must be >= 0")
    if threads is not None and threads < 1:
        raise LabelError("threads must be >= 1")
    if use_ray:
        if workers == 0:
            raise LabelError("--ray needs at least one worker")
        total, node = ray_cpus()
        if workers is None:
            t = threads or DEFAULT_THREADS_PER_WORKER
            return "ray", max(1, total // t), min(t, node)
        t = threads or max(1, min(node, total // workers))
        return "ray", workers, min(t, node)
    cpus = available_cpus()
    if workers is None:
        t = min(threads or DEFAULT_THREADS_PER_WORKER, cpus)
        return "local", max(1, cpus // t), t
    t = threads or max(1, cpus // max(workers, 1))
    if max(workers, 1) * t > cpus:
        say(f"{max(workers, 1)} worker(s) x {t} thread(s) oversubscribe the {cpus} CPUs")
    return "local", workers, min(t, cpus)
