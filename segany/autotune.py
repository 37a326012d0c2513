"""``backend="auto"``: the fastest exact backend for this machine, measured once and cached.

The exact backends are ``"torch"`` (fused fp32) and ``"onnx"`` (fp32 through onnxruntime);
both match the reference goldens. Which one is faster depends on the CPU: on an Intel Xeon
with AVX-512 torch won the encoder and the click, on an AMD EPYC with AVX2 onnxruntime's
encoder was a few percent faster and its click much slower (docs/performance.md). The
first ``auto`` load on a machine times both on one synthetic image (a few encodes and
clicks, the two backends taking turns so that load from other programs hits both alike;
the ONNX export it needs is cached for later use) and keeps the answer in
``<cache>/auto-backend.json``, keyed by the CPU, the library versions, the thread count and
the weights. The cost compared is ``encode + CLICKS_PER_IMAGE x click``.

Overrides: an explicit backend, or ``SEGANY_BACKEND=torch|onnx|onnx-int8`` in the
environment (the default backend of every command and of :func:`segany.load_predictor`).
int8 and bf16 change the masks and are never chosen automatically.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import runtime as R
from .files import atomic_write

log = logging.getLogger(__name__)

#: backends ``auto`` may pick: those that keep parity with the reference
EXACT_BACKENDS = ("torch", "onnx")
#: clicks weighed against one image encoding when comparing backends
CLICKS_PER_IMAGE = 10
BACKEND_ENV = "SEGANY_BACKEND"

Measure = Callable[[torch.nn.Module, str | None, str], dict[str, float]]


def choices_file() -> Path:
    from .weights import cache_dir

    return cache_dir() / "auto-backend.json"


def machine_key(model_id: str | None) -> str:
    """What the choice depends on: CPU model and flags, versions, the matrix products
    torch's side uses (:func:`segany.runtime.matrix_products`), threads, weights."""
    cpu = R.cpu_info()
    ort = importlib.util.find_spec("onnxruntime")
    parts = {
        "products": R.matrix_products(),
        "cpu": cpu["model"],
        "arch": cpu["arch"],
        "flags": sorted(cpu["flags"]),  # type: ignore[arg-type]
        "torch": torch.__version__,
        "onnxruntime": _ort_version() if ort else None,
        "threads": R.get_threads(),
        "model": model_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def candidates(model: torch.nn.Module) -> list[str]:
    """The exact backends timed for ``model`` here (onnx: SAM 1 and MobileSAM with
    onnxruntime installed; SAM 2's and HQ-SAM's graphs have no per-image decoder context,
    so their clicks would redo that work: those run on torch unless asked otherwise)."""
    from .models import SamHQ

    out = ["torch"]
    sam1 = getattr(model, "input_geometry", "longest_side") == "longest_side"
    if sam1 and not isinstance(model, SamHQ) and importlib.util.find_spec("onnxruntime"):
        out.append("onnx")
    return out


def read_choices() -> dict[str, Any]:
    try:
        data = json.loads(choices_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_choice(model_id: str | None) -> dict[str, Any] | None:
    """The recorded choice for these weights on this machine, or None."""
    entry = read_choices().get(machine_key(model_id))
    return entry if isinstance(entry, dict) and entry.get("backend") in EXACT_BACKENDS else None


def resolve_backend(
    backend: str,
    model: torch.nn.Module,
    model_id: str | None,
    *,
    measure: Measure | None = None,
) -> str:
    """``backend`` unless it is ``"auto"``; for ``"auto"``: ``$SEGANY_BACKEND`` if set,
    else the recorded choice, else measure now (and record)."""
    if backend != "auto":
        return backend
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env and env != "auto":
        return env
    options = candidates(model)
    if len(options) == 1:
        return options[0]
    entry = cached_choice(model_id)
    if entry is not None and not (entry.get("busy") and not machine_busy()):
        return entry["backend"]  # (a choice timed on a busy machine is timed again when idle)
    return choose(model, model_id, options, measure=measure)["backend"]


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_busy() -> bool:
    """Whether other work keeps at least half the cores busy (1-minute load average): then
    timings say more about that load than about the backends (torch's OpenMP threads
    suffer more from sharing cores than onnxruntime's), so a choice made now is recorded as
    provisional."""
    load = load_average()
    return load is not None and load >= 0.5 * R.available_cpus()


def choose(
    model: torch.nn.Module,
    model_id: str | None,
    options: list[str],
    *,
    measure: Measure | None = None,
) -> dict[str, Any]:
    """Time every option (``measure`` one backend at a time; default
    :func:`measure_backends`, all of them interleaved), record and return ``{"backend",
    "figures", "cpu", "threads", "load", "when"}``."""
    log.warning(
        "backend auto: timing %s once on this machine (recorded in %s)",
        " and ".join(options),
        choices_file(),
    )
    load, busy = load_average(), machine_busy()
    if measure is None:
        figures = measure_backends(model, model_id, options)
    else:
        figures = {b: measure(model, model_id, b) for b in options}
    cost = {b: f["encode_s"] + CLICKS_PER_IMAGE * f["click_s"] for b, f in figures.items()}
    entry = {
        "backend": min(cost, key=cost.__getitem__),
        "figures": figures,
        "cpu": R.cpu_info()["model"],
        "threads": R.get_threads(),
        "load": load,  # the 1-minute load average when timing started
        "busy": busy,  # then provisional: timed again once the machine is idle
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    data = read_choices()
    data[machine_key(model_id)] = entry
    try:
        atomic_write(choices_file(), json.dumps(data, indent=1, sort_keys=True), durable=False)
    except OSError as exc:  # a read-only cache: the choice holds for this process only
        log.warning("backend auto: could not record the choice: %s", exc)
    log.warning("backend auto: %s (%s)", entry["backend"], describe(entry))
    return entry


def describe(entry: dict[str, Any]) -> str:
    """The timings of a recorded choice, and the load they were taken under."""
    text = "; ".join(
        f"{b}: encode {f['encode_s'] * 1e3:.0f} ms, click {f['click_s'] * 1e3:.1f} ms"
        for b, f in entry["figures"].items()
    )
    if entry.get("load") is not None:
        text += f"; timed at load average {entry['load']:.1f}"
        if entry.get("busy"):
            text += " (a busy machine: provisional, timed again when it is idle)"
    return text


def measure_backend(model: torch.nn.Module, model_id: str | None, backend: str) -> dict[str, float]:
    """Best-of encode time and median click time of ``backend`` on a 1024 x 768 image."""
    return measure_backends(model, model_id, [backend])[backend]


def measure_backends(
    model: torch.nn.Module, model_id: str | None, backends: list[str], rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Best-of encode time and median click time of each backend on a 1024 x 768 image,
    the backends taking turns round by round (so that other load on the machine while
    timing hits all of them alike, as in the benchmarks); the first round is a warm-up."""
    from .predictor import EmbeddingCache, Predictor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(768, 1024, 3), dtype=np.uint8)
    preds = {
        b: Predictor(
            model if b == "torch" else copy.deepcopy(model),
            backend=b,
            model_id=model_id,
            cache=EmbeddingCache(max_items=0),
        )
        for b in backends
    }
    encodes: dict[str, list[float]] = {b: [] for b in backends}
    clicks: dict[str, list[float]] = {b: [] for b in backends}
    for r in range(rounds):
        for b, p in preds.items():
            t = time.perf_counter()
            p.set_image(image)
            if r:
                encodes[b].append(time.perf_counter() - t)
        for k in range(3):
            pt = np.array([[100.0 + 250 * k + 20 * r, 380.0]])
            for b, p in preds.items():
                t = time.perf_counter()
                p.predict(point_coords=pt, point_labels=np.array([1]))
                if r:
                    clicks[b].append(time.perf_counter() - t)
    return {
        b: {"encode_s": min(encodes[b]), "click_s": float(np.median(clicks[b]))} for b in backends
    }
