"""The workers of a labeling job (see :mod:`.label`): what each needs to build its model
(:class:`WorkerConfig`), the per-image step with class names, and the two ways to run them
(a local pool of spawned processes, Ray actors), both retrying the images of a worker that
died and blaming an image only after :data:`MAX_ATTEMPTS` deaths.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..everything import GeneratorSettings
from .label_shards import Item, process_item

#: A worker process dying this many times on the same image makes it an error.
MAX_ATTEMPTS = 3


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


def retrying(
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
        yield from retrying(
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


def ray_cpus() -> tuple[int, int]:
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
        yield from retrying(
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
