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
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import validate as V
from ..datasets.sa1b import read_tar
from ..everything import DEFAULT_PRESET, PRESETS, GeneratorSettings
from ..files import TMP_PREFIX, atomic_file, atomic_write, find_images, is_image_name
from ..weights import DEFAULT_WEIGHTS

#: SA-1B tars hold ~11k images; a smaller default keeps the work lost to a crash small.
DEFAULT_SHARD_SIZE = 1000
#: Threads per worker when ``workers`` is not given: one worker per this many CPUs.
DEFAULT_THREADS_PER_WORKER = 1
#: A worker process dying this many times on the same image makes it an error.
MAX_ATTEMPTS = 3
PLAN = "plan.json"
MANIFEST = "manifest.json"
INSTANCES = "instances.json"
REPORT = "report.json"
ERRORS = "errors.jsonl"
SHARDS = "shards"
STAGING = "staging"
_TMP = TMP_PREFIX
_FORMAT_VERSION = 1


class LabelError(RuntimeError):
    """A labeling job that cannot start (bad source, settings differ from the job on disk)."""


@dataclass(frozen=True)
class Item:
    """One input image: its dataset id (``sa_<image_id>``), path and shard number."""

    image_id: int
    source: str
    shard: int


@dataclass(frozen=True)
class TextConfig:
    """Labeling with class names: the classes, the detector (catalogue name, hub id or
    absolute folder) and its thresholds (``None``: the detector's default)."""

    classes: tuple[str, ...]
    detector: str
    box_threshold: float | None = None
    text_threshold: float | None = None


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to build its generator (picklable, sent once per worker).
    ``text``: label with class names (text prompts) instead of segment-everything."""

    model: str
    settings: GeneratorSettings
    out: str
    threads: int
    text: TextConfig | None = None


class ClassLabeler:
    """The per-image step of a job with class names, in the shape :func:`process_item`
    expects of a mask generator: ``generate(rgb)`` -> records (COCO RLE) with
    ``category_id``, ``label``, ``phrase``, ``score`` and ``box`` besides the generator's
    keys; :attr:`extra_keys` are kept in the per-image SA-1B JSON."""

    extra_keys = ("category_id", "label", "phrase", "score", "box")

    def __init__(self, segmenter: Any, classes: list[str]) -> None:
        self.segmenter = segmenter
        self.classes = list(classes)

    def generate(self, rgb: Any) -> list[dict[str, Any]]:
        return self.segmenter.segment(rgb, self.classes).records("coco_rle")


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
def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    atomic_write(path, V.dumps(obj, indent=indent))


# -- source ----------------------------------------------------------------------------------
def list_source(source: str | os.PathLike[str], *, exclude: Path | None = None) -> list[str]:
    """The images of ``source``: a folder or an image file (:func:`segany.files.find_images`)
    or a text file with one path per line (relative to the file's folder; blank lines and
    ``#`` comments skipped; kept in order). Duplicates are dropped. Paths under ``exclude``
    (the output folder) are skipped."""
    src = Path(source).expanduser()
    if src.is_dir() or (src.is_file() and is_image_name(src.name)):
        found = [str(p) for p in find_images(src)]
    elif src.is_file():
        found = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            found.append(os.path.abspath(p if p.is_absolute() else src.parent / p))
    else:
        raise LabelError(f"source not found: {source}")
    if exclude is not None:
        ex = os.path.abspath(exclude) + os.sep
        found = [f for f in found if not f.startswith(ex)]
    return list(dict.fromkeys(found))


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
    _write_json(sdir / f"{image_stem(item.image_id)}.error.json", err)
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
    _write_json(sdir / f"{stem}.json", ann)  # the commit mark of this image
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


class WorkerInitError(RuntimeError):
    """A worker could not build its model: the job stops (no image is to blame)."""


class _Worker:
    """The model and generator of one worker (process or Ray actor), built once.

    A failure to build them is kept and raised by :meth:`process` as
    :class:`WorkerInitError`, so the coordinator stops instead of retrying images."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.pid = os.getpid()
        self.name = f"{_host()}:{self.pid}"
        self.first = True
        self.init_error: str | None = None
        t0 = time.perf_counter()
        try:
            from ..everything import MaskGenerator
            from ..loader import load_predictor
            from ..predictor import EmbeddingCache
            from ..runtime import set_threads

            self.threads = set_threads(min(cfg.threads, _cpus()))
            predictor = load_predictor(
                cfg.model, progress=False, cache=EmbeddingCache(max_items=1), fuse=True
            )
            if cfg.text is None:
                self.generator: Any = MaskGenerator(
                    predictor, preset=cfg.settings, output_mode="coco_rle"
                )
            else:
                from ..text import TextSegmenter, load_detector

                segmenter = TextSegmenter(
                    predictor,
                    load_detector(cfg.text.detector),
                    box_threshold=cfg.text.box_threshold,
                    text_threshold=cfg.text.text_threshold,
                )
                self.generator = ClassLabeler(segmenter, list(cfg.text.classes))
        except Exception as exc:  # noqa: BLE001 - reported by process()
            self.init_error = f"worker on {_host()} pid {self.pid}: {type(exc).__name__}: {exc}"
        self.out = Path(cfg.out)
        self.load_seconds = time.perf_counter() - t0

    def process(self, item: Item) -> dict[str, Any]:
        if self.init_error is not None:
            raise WorkerInitError(self.init_error)
        res = process_item(self.generator, self.out, item)
        res["worker"] = self.name
        if self.first:  # model load time, reported once per worker
            res["model_load_seconds"] = self.load_seconds
            self.first = False
        return res


def _host() -> str:
    import socket

    return socket.gethostname()


def _cpus() -> int:
    from ..runtime import available_cpus

    return available_cpus()


# -- local process pool ----------------------------------------------------------------------
_LOCAL: _Worker | None = None


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the coordinator dies (even by SIGKILL),
    so no orphan keeps writing into the output."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _local_init(cfg: WorkerConfig, parent: int) -> None:
    global _LOCAL
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    _LOCAL = _Worker(cfg)


def _local_process(item: Item) -> dict[str, Any]:
    assert _LOCAL is not None
    return _LOCAL.process(item)


Results = Iterator[dict[str, Any]]
OnDeath = Callable[[Item, str], dict[str, Any]]


def _retrying(
    items: list[Item],
    slots: int,
    submit: Callable[[Item], Any],
    wait: Callable[[list[Any]], list[Any]],
    outcome: Callable[[Any], dict[str, Any]],
    is_death: Callable[[BaseException], bool],
    on_death: Callable[[list[Item]], None],
    give_up: OnDeath,
    *,
    death_fails_all: bool,
) -> Results:
    """Keep ``slots`` items in flight; when a worker dies, ``on_death`` replaces it and its
    items are retried; an image on which workers died :data:`MAX_ATTEMPTS` times goes to
    ``give_up``.

    ``death_fails_all``: a death fails every item in flight (a broken process pool), so the
    culprit is unknown: those items are then retried one at a time, and only an image that
    kills a worker while alone is blamed (its neighbours are not turned into errors)."""
    queue = deque(items)
    suspects: deque[Item] = deque()
    attempts: dict[int, int] = {}
    inflight: dict[Any, Item] = {}
    isolated = False
    while queue or inflight or suspects:
        if suspects:
            if not inflight:
                item = suspects.popleft()
                inflight[submit(item)] = item
                isolated = True
        else:
            while queue and len(inflight) < slots:
                item = queue.popleft()
                inflight[submit(item)] = item
                isolated = False
        dead: list[Item] = []
        results = []
        for fut in wait(list(inflight)):
            item = inflight.pop(fut)
            try:
                results.append(outcome(fut))
            except Exception as exc:
                if not is_death(exc):
                    raise
                dead.append(item)
        yield from results
        if not dead:
            continue
        if death_fails_all:
            dead += list(inflight.values())
            inflight.clear()
        on_death(dead)
        if death_fails_all and not isolated:
            suspects.extend(dead)  # nobody is blamed yet
            continue
        for item in reversed(dead):
            attempts[item.image_id] = attempts.get(item.image_id, 0) + 1
            if attempts[item.image_id] >= MAX_ATTEMPTS:
                yield give_up(item, f"a worker died {MAX_ATTEMPTS} times on this image")
            elif death_fails_all:
                suspects.appendleft(item)
            else:
                queue.appendleft(item)


def run_local(cfg: WorkerConfig, items: list[Item], workers: int, give_up: OnDeath) -> Results:
    """Process ``items`` on ``workers`` spawned processes (``workers=0``: in this process)."""
    if workers == 0:
        w = _Worker(cfg)
        for item in items:
            yield w.process(item)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
    from concurrent.futures import wait as fwait
    from concurrent.futures.process import BrokenProcessPool

    def make() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=_local_init,
            initargs=(cfg, os.getpid()),
        )

    pool = [make()]

    def on_death(_: list[Item]) -> None:
        pool[0].shutdown(wait=True, cancel_futures=True)
        pool[0] = make()

    try:
        yield from _retrying(
            items,
            2 * workers,  # one running and one queued per worker: no idle gap between images
            lambda item: pool[0].submit(_local_process, item),
            lambda futs: list(fwait(futs, return_when=FIRST_COMPLETED).done),
            lambda fut: fut.result(),
            lambda exc: isinstance(exc, BrokenProcessPool),
            on_death,
            give_up,
            death_fails_all=True,
        )
    finally:
        pool[0].shutdown(wait=True, cancel_futures=True)


# -- Ray -------------------------------------------------------------------------------------
class _RayWorker(_Worker):
    """A Ray actor holding one model (see :func:`run_ray`)."""


def _ray_cpus() -> tuple[int, int]:
    """(total CPUs, CPUs of the largest node) of the connected Ray cluster."""
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    per_node = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(1, total), max([1, *per_node])


def run_ray(cfg: WorkerConfig, items: list[Item], workers: int, give_up: OnDeath) -> Results:
    """Process ``items`` on ``workers`` Ray actors (Ray must be initialised), each reserving
    ``cfg.threads`` CPUs and holding the model once. A dead actor is replaced."""
    import ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    actor_cls = ray.remote(num_cpus=cfg.threads, max_restarts=0)(_RayWorker)
    actors: list[Any] = [actor_cls.remote(cfg) for _ in range(workers)]
    generation = [0] * workers
    load = [0] * workers
    owner: dict[Any, tuple[int, int]] = {}  # ref -> (actor slot, its generation)
    lost: dict[int, tuple[int, int]] = {}  # image id -> slot of a dead actor

    def submit(item: Item) -> Any:
        k = min(range(workers), key=lambda i: load[i])
        load[k] += 1
        ref = actors[k].process.remote(item)
        owner[ref] = (k, generation[k])
        lost[item.image_id] = owner[ref]
        return ref

    def wait(refs: list[Any]) -> list[Any]:
        return ray.wait(refs, num_returns=1)[0]

    def outcome(ref: Any) -> dict[str, Any]:
        k, _ = owner.pop(ref)
        load[k] -= 1
        res = ray.get(ref)
        return res

    def on_death(dead: list[Item]) -> None:
        for item in dead:
            k, gen = lost.pop(item.image_id)
            if generation[k] == gen:  # replace each dead actor once
                with contextlib.suppress(Exception):
                    ray.kill(actors[k])
                actors[k] = actor_cls.remote(cfg)
                generation[k] += 1

    try:
        yield from _retrying(
            items,
            2 * workers,
            submit,
            wait,
            outcome,
            lambda exc: isinstance(exc, RayActorError | WorkerCrashedError),
            on_death,
            give_up,
            death_fails_all=False,
        )
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)


# -- plan and state --------------------------------------------------------------------------
def _settings(preset: str, overrides: dict[str, Any] | None) -> GeneratorSettings:
    if preset not in PRESETS:
        raise LabelError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GeneratorSettings)}
    bad = sorted(set(overrides or {}) - fields)
    if bad:
        raise LabelError(f"unknown generator setting(s) {bad}; known: {sorted(fields)}")
    return PRESETS[preset].replace(**(overrides or {}))


def _model_id(model: str) -> dict[str, Any]:
    from ..weights import resolve, sha256_file

    path, spec = resolve(model, progress=True)  # fetch once here, not in every worker
    sha = spec.sha256 if spec is not None and spec.sha256 else sha256_file(path)
    return {"name": str(model), "file": path.name, "sha256": sha}


def _make_plan(
    source: str, out: Path, model: str, preset: str, settings: GeneratorSettings, size: int
) -> dict[str, Any]:
    paths = list_source(source, exclude=out)
    if not paths:
        raise LabelError(f"no images found in {source}")
    return {
        "version": _FORMAT_VERSION,
        "source": os.path.abspath(source),
        "model": _model_id(model),
        "preset": preset,
        "settings": dataclasses.asdict(settings),
        "shard_size": size,
        "items": [[i + 1, p, i // size] for i, p in enumerate(paths)],
        "text": None,
    }


def _detector_ref(detector: str | os.PathLike[str]) -> str:
    """How a detector is recorded in the plan: an existing folder as its absolute path (the
    workers may run elsewhere), a catalogue name or hub id as given."""
    path = Path(os.fspath(detector)).expanduser()
    return os.fspath(path.resolve()) if path.is_dir() else os.fspath(detector)


def _check_detector(detector: str) -> dict[str, Any]:
    """Load the detector once in the coordinator, so that missing weights stop the job at
    its start (with :class:`~segany.text.DetectorWeightsError`'s message) instead of in
    every worker; returns its name, kind and default thresholds."""
    from ..text import load_detector

    det = load_detector(detector)
    info = {
        "name": str(getattr(det, "name", detector)),
        "kind": type(det).__name__,
        "default_box_threshold": det.default_box_threshold,
        "default_text_threshold": det.default_text_threshold,
    }
    return info


def _text_plan(
    classes: list[str],
    detector: str,
    box_threshold: float | None,
    text_threshold: float | None,
) -> dict[str, Any]:
    """The plan's ``text`` entry of a new job with classes; the thresholds are recorded as
    they apply (the detector's defaults when not given)."""
    info = _check_detector(detector)
    box = info["default_box_threshold"] if box_threshold is None else box_threshold
    text = info["default_text_threshold"] if text_threshold is None else text_threshold
    return {
        "classes": list(classes),
        "detector": detector,
        "detector_name": info["name"],
        "detector_kind": info["kind"],
        "box_threshold": None if box is None else float(box),
        "text_threshold": None if text is None else float(text),
    }


def _text_config(plan: dict[str, Any]) -> TextConfig | None:
    text = plan.get("text")
    if not text:
        return None
    return TextConfig(
        classes=tuple(text["classes"]),
        detector=text["detector"],
        box_threshold=text["box_threshold"],
        text_threshold=text["text_threshold"],
    )


def _extend_plan(plan: dict[str, Any], source: str, out: Path) -> int:
    """Append the source's images that the plan does not list yet, in new shards (a shard
    of the plan never changes once planned). Returns how many were added."""
    known = {p for _, p, _ in plan["items"]}
    new = [p for p in list_source(source, exclude=out) if p not in known]
    if not new:
        return 0
    size = plan["shard_size"]
    next_id = max(i for i, _, _ in plan["items"]) + 1
    next_shard = max(s for _, _, s in plan["items"]) + 1
    for k, p in enumerate(new):
        plan["items"].append([next_id + k, p, next_shard + k // size])
    return len(new)


def _check_same(key: str, given: Any, stored: Any) -> None:
    if given is not None and given != stored:
        raise LabelError(
            f"--resume: {key} differs from the job in this folder ({stored!r} there, "
            f"{given!r} now); rerun with the same settings or use a new --out"
        )


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


def _scan(out: Path, shards: dict[int, list[Item]]) -> tuple[set[int], dict[int, set[int]]]:
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
        _write_json(shard_index(out, shard), index)
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
    _write_json(out / INSTANCES, data)
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
        "version": _FORMAT_VERSION,
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
    _write_json(out / MANIFEST, manifest, indent=1)
    return manifest


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
    text = _text_request(classes, detector, box_threshold, text_threshold)
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


def _text_request(
    classes: str | Sequence[str] | None,
    detector: str | os.PathLike[str] | None,
    box_threshold: float | None,
    text_threshold: float | None,
) -> dict[str, Any]:
    """The text options as given: classes parsed, detector as recorded in a plan."""
    parsed = None
    if classes is not None:
        from ..text import parse_queries

        try:
            parsed = parse_queries(classes)
        except ValueError as exc:
            raise LabelError(f"--classes: {exc}") from None
    for name, v in (("box threshold", box_threshold), ("text threshold", text_threshold)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise LabelError(f"{name} must lie in [0, 1], got {v}")
    return {
        "classes": parsed,
        "detector": None if detector is None else _detector_ref(detector),
        "box_threshold": None if box_threshold is None else float(box_threshold),
        "text_threshold": None if text_threshold is None else float(text_threshold),
    }


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
            _check_same("model", model, plan["model"]["name"])
            _check_same("preset", preset, plan["preset"])
            _check_same("shard size", shard_size, plan["shard_size"])
            if overrides:
                stored = plan["settings"]
                settings = _settings(plan["preset"], overrides)
                _check_same("settings", dataclasses.asdict(settings), stored)
            stored_text = plan.get("text") or {}
            _check_same("classes", text["classes"], stored_text.get("classes"))
            _check_same("detector", text["detector"], stored_text.get("detector"))
            _check_same("box threshold", text["box_threshold"], stored_text.get("box_threshold"))
            _check_same("text threshold", text["text_threshold"], stored_text.get("text_threshold"))
            added = _extend_plan(plan, os.fspath(source), out)
            if added:
                say(f"{added} new image(s) in the source, added in new shards")
                _write_json(plan_path, plan)
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
            settings = _settings(preset or DEFAULT_PRESET, overrides)
            plan = _make_plan(
                os.fspath(source),
                out,
                model or DEFAULT_WEIGHTS,
                preset or DEFAULT_PRESET,
                settings,
                shard_size or DEFAULT_SHARD_SIZE,
            )
            if classes is not None:
                from ..text import DEFAULT_DETECTOR

                plan["text"] = _text_plan(
                    classes,
                    text["detector"] or DEFAULT_DETECTOR,
                    text["box_threshold"],
                    text["text_threshold"],
                )
            _write_json(plan_path, plan)
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
    finished, marked = _scan(out, shards)
    pending = [it for s in sorted(shards) if s not in finished for it in shards[s]]
    pending = [it for it in pending if it.image_id not in marked[it.shard]]
    total = len(plan["items"])
    done_before = total - len(pending)
    text_cfg = _text_config(plan)
    if pending and text_cfg is not None and check_detector:
        _check_detector(text_cfg.detector)  # a resume: the weights may have gone since
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
    _write_json(out / REPORT, report, indent=1)
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
        total, node = _ray_cpus()
        if workers is None:
            t = threads or DEFAULT_THREADS_PER_WORKER
            return "ray", max(1, total // t), min(t, node)
        t = threads or max(1, min(node, total // workers))
        return "ray", workers, min(t, node)
    cpus = _cpus()
    if workers is None:
        t = min(threads or DEFAULT_THREADS_PER_WORKER, cpus)
        return "local", max(1, cpus // t), t
    t = threads or max(1, cpus // max(workers, 1))
    if max(workers, 1) * t > cpus:
        say(f"{max(workers, 1)} worker(s) x {t} thread(s) oversubscribe the {cpus} CPUs")
    return "local", workers, min(t, cpus)


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
