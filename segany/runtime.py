"""Process settings for the math: threads shared by every compute backend (torch and
onnxruntime), the allocator, and what this CPU can do.

One setting, :func:`set_threads`, decides how many threads the math kernels use. The
default is the number of CPUs this process may run on (``SEGANY_THREADS`` overrides it),
so the cores are never oversubscribed: torch's intra-op pool gets ``n`` threads, its
inter-op pool 1, and onnxruntime sessions created afterwards get the same ``n`` intra-op
threads and 1 inter-op thread.

:func:`keep_freed_memory` stops glibc from giving large freed blocks back to the kernel:
the image encoder allocates and frees tensors of up to 67 MB on every image, and each
fresh mapping of that size costs tens of thousands of page faults (measured: a third of
the encoder's time on this machine).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_threads: int | None = None
_allocator_tuned: bool | None = None

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


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


def keep_freed_memory(limit_mb: int = 1024) -> bool:
    """Keep freed blocks of up to ``limit_mb`` in the process (glibc ``mallopt``) instead
    of unmapping them, so that the next image's tensors reuse pages already mapped.

    By default glibc serves blocks above 32 MB with a fresh ``mmap`` and unmaps them when
    freed; the encoder's largest activations (67 MB at 1024 px) then page-fault on every
    image. With this setting the process keeps up to about ``limit_mb`` of freed memory
    (peak memory is unchanged; resident memory stays near the peak instead of falling
    back between images). Called by :class:`~segany.predictor.Predictor` for models on
    the CPU; ``SEGANY_KEEP_FREED_MEMORY=0`` turns it off. Returns whether it is in force
    (False off glibc). Process-wide and idempotent.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("SEGANY_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux"):  # pragma: no cover - glibc only
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - musl and others
        return False
    limit = int(limit_mb) << 20
    _allocator_tuned = bool(
        mallopt(_M_MMAP_THRESHOLD, limit) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 * limit) == 1
    )
    return _allocator_tuned


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads in this thread (torch's OpenMP thread count
    is per thread), then restore the previous count."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class DecodeSlots:
    """At most ``concurrency`` model calls of a server at once (default: one per core), and
    the torch threads of each prompt decode: ``threads`` (default 1), or with ``None`` the
    cores the other decodes leave free when it starts (``cores // running``, at least 1).

    One thread per decode and one decode per core is the default because it measured
    best with 8 annotators (docs/performance.md: the adaptive count, every core for a click
    alone, gave a p95 of 110-128 ms against 98-106 ms and more CPU per click, the threads
    of concurrent decodes waiting for each other). ``with slots:`` holds a slot without touching the
    threads (for work that sets its own, such as pre-fill); ``with slots.decode():``
    holds one and runs the block with the decode's thread count (torch's OpenMP thread
    count is per thread, so concurrent request threads do not interfere)."""

    def __init__(
        self, concurrency: int | None = None, threads: int | None = 1, cores: int | None = None
    ) -> None:
        self.cores = max(1, cores or available_cpus())
        self.concurrency = max(1, concurrency or self.cores)
        self.threads = None if threads is None else max(1, threads)
        self._sem = threading.Semaphore(self.concurrency)
        self._lock = threading.Lock()
        self.running = 0  #: slots held now

    def __enter__(self) -> int:
        self._sem.acquire()
        with self._lock:
            self.running += 1
            return self.running

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.running -= 1
        self._sem.release()

    @contextmanager
    def decode(self) -> Iterator[int]:
        """Hold a slot; the block runs with (and receives) its torch thread count."""
        with self as running:
            n = self.threads or max(1, self.cores // running)
            with torch_threads(n):
                yield n


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


# -- the CPU ---------------------------------------------------------------------------------

#: CPU flags (as /proc/cpuinfo names them) of native bfloat16 arithmetic: Intel AMX-BF16
#: and AVX512-BF16 on x86, the BF16 extension (``bf16``) on ARM.
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


class PrecisionError(ValueError):
    """A numeric precision this CPU has no instructions for (it would be slower than fp32)."""


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, object]:
    """``{"model": str, "vendor": str, "arch": str, "flags": frozenset[str]}`` of this
    machine's CPU (from ``/proc/cpuinfo`` on Linux: ``vendor`` as its ``vendor_id``, e.g.
    ``GenuineIntel``, ``AuthenticAMD``; the model, vendor and flags may be empty elsewhere)."""
    model, vendor, flags = platform.processor() or "", "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model.strip():
                    model = value.strip()
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:  # pragma: no cover - not Linux
        pass
    if sys.platform == "darwin" and platform.machine() == "arm64":  # pragma: no cover
        flags.add("bf16")  # every Apple silicon since M2 has FEAT_BF16; M1 emulates
    return {
        "model": model or platform.machine(),
        "vendor": vendor,
        "arch": platform.machine(),
        "flags": frozenset(flags),
    }


def prefer_onednn_products(info: dict | None = None) -> bool:
    """Whether oneDNN's matrix products beat torch's BLAS on this CPU. The x86 builds of
    torch use Intel's MKL, whose fastest code runs on Intel CPUs only. On an AMD CPU
    with AVX-512 (Zen 4, Zen 5) MKL's products run its AVX2 code, half of what oneDNN
    reaches there (measured on this project's AMD EPYC, Zen 5: about 90 against 150-220
    fp32 GFLOP/s per core, ``benchmarks/bench_products.py``). On AMD CPUs with AVX2
    only, oneDNN's AVX2 products measured 7-14% faster than MKL's (that Zen 5 capped to
    AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``; a click 3.02x the
    reference against 2.85x). Intel CPUs keep MKL, and so do CPUs of unknown vendor.
    ``SEGANY_PRODUCTS=onednn`` or ``blas`` overrides the answer (``True`` / ``False``)."""
    forced = os.environ.get("SEGANY_PRODUCTS", "").strip().lower()
    if forced in ("onednn", "blas"):
        return forced == "onednn"
    info = cpu_info() if info is None else info
    flags = info["flags"]
    return (
        info.get("arch") in ("x86_64", "AMD64")
        and (info.get("vendor") or "") not in ("GenuineIntel", "")
        and ("avx512f" in flags or "avx2" in flags)  # type: ignore[operator]
    )


def batched_windows(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether, where the fused models take oneDNN's products (:func:`matrix_products`),
    their small attention windows (TinyViT's 7x7) run as batched matrix products instead
    of the fused attention kernel: with AVX-512 (the encoder 3-7% faster so on the Zen 5
    EPYC of docs/performance.md; no faster capped to AVX2). See
    :func:`segany.models.common.window_attention`."""
    flags = cpu_info()["flags"] if flags is None else flags
    return "avx512f" in flags  # type: ignore[operator]


def matrix_products() -> str:
    """Which products the fused models' attention and decoder use here: ``"onednn"`` where
    they beat torch's BLAS (:func:`prefer_onednn_products`) and torch has oneDNN,
    ``"blas"`` otherwise (see :func:`segany.models.fuse.fuse_for_inference`)."""
    use = prefer_onednn_products() and bool(torch.backends.mkldnn.is_available())
    return "onednn" if use else "blas"


def has_native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the CPU (or the given ``flags``) computes bfloat16 natively."""
    flags = cpu_info()["flags"] if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)  # type: ignore[operator]


def check_precision(precision: str) -> None:
    """Refuse ``"bf16"`` on a CPU without bfloat16 instructions (:class:`PrecisionError`):
    there it is emulated and about 4x slower than fp32 (measured on an AVX2 AMD EPYC, see
    docs/performance.md). ``SEGANY_FORCE_BF16=1`` allows it anyway, for measuring."""
    if precision != "bf16" or has_native_bf16():
        return
    if os.environ.get("SEGANY_FORCE_BF16", "").strip() == "1":
        return
    raise PrecisionError(
        f"bf16 needs a CPU with native bfloat16 (AMX-BF16, AVX512-BF16 or ARM BF16); this "
        f"{cpu_info()['model']} has none, so bf16 would be several times slower than fp32. "
        "Use fp32 (the default)."
    )
