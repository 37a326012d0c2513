"""Thread settings shared by every compute backend (torch and onnxruntime).

One setting, :func:`set_threads`, decides how many threads the math kernels use. The
default is the number of CPUs this process may run on (``SEGANY_THREADS`` overrides it),
so the cores are never oversubscribed: torch's intra-op pool gets ``n`` threads, its
inter-op pool 1, and onnxruntime sessions created afterwards get the same ``n`` intra-op
threads and 1 inter-op thread.
"""

from __future__ import annotations

import os

import torch

_threads: int | None = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``SEGANY_THREADS`` if set to a positive integer, else :func:`available_cpus`."""
    env = os.environ.get("SEGANY_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"SEGANY_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"SEGANY_THREADS must be a positive integer, got {env!r}")
        return n
    return available_cpus()


def set_threads(n: int | None = None) -> int:
    """Use ``n`` compute threads (``None``: :func:`default_threads`) in torch and in every
    onnxruntime session created afterwards. Returns the number set.

    More threads than available CPUs is refused: it only slows every kernel down.
    """
    global _threads
    if n is None:
        n = default_threads()
    n = int(n)
    cpus = available_cpus()
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if n > cpus:
        raise ValueError(f"{n} threads would oversubscribe the {cpus} available CPUs")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; keep what is there
        pass
    _threads = n
    return n


def get_threads() -> int:
    """The thread count in force (set by :func:`set_threads`, else torch's own)."""
    return _threads if _threads is not None else torch.get_num_threads()


def ort_session_options():  # -> onnxruntime.SessionOptions
    """onnxruntime session options that follow :func:`get_threads`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = get_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts
