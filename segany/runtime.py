"""Thread settings shared by every compute backend (torch and onnxruntime).

One setting, :func:`set_threads`, decides how many threads the math kernels use. The
default is the number of CPUs this process may run on (``SEGANY_THREADS`` overrides it),
so the cores are never oversubscribed: torch's intra-op pool gets ``n`` threads, its
inter-op pool 1, and onnxruntime sessions created afterwards get the same ``n`` intra-op
threads and 1 inter-op thread.

:func:`keep_freed_memory` stops glibc from giving large freed blocks back to the kernel:
the image encoder allocates and frees tensors of up to 67 MB on every image, and each
fresh mapping of that size costs tens of thousands of page faults (measured: a third of
the encoder's time on this machine). It also asks the kernel to back the memory the
encoder's activations will live in with transparent huge pages (fewer TLB misses).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_threads: int | None = None
_allocator_tuned: bool | None = None

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MADV_HUGEPAGE = 14  # Linux madvise advice
_HUGE_PAGE = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


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

    Where the kernel's transparent huge pages are on request (``madvise``, the usual
    default), the heap is also grown by about ``limit_mb`` of address space advised for
    huge pages (see :func:`_reserve_huge_pages`; ``SEGANY_HUGE_PAGES=0`` turns that off).
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
    if _allocator_tuned and os.environ.get("SEGANY_HUGE_PAGES", "1").strip() != "0":
        _reserve_huge_pages(libc, limit - 2 * _HUGE_PAGE)
    return _allocator_tuned


def huge_pages_on_request() -> bool:
    """Whether the kernel gives transparent huge pages to memory advised for them (its
    setting is ``madvise``; with ``always`` it needs no advice, with ``never`` none)."""
    try:
        with open(_THP_SETTING) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def _reserve_huge_pages(libc: ctypes.CDLL, size: int) -> bool:
    """Grow the heap by ``size`` bytes of address space advised for transparent huge
    pages, and leave it free for the allocations to come.

    Called once, after :func:`keep_freed_memory`'s ``mallopt`` (blocks below ``limit_mb``
    then come from the heap, and freed space stays in it): one block of ``size`` is
    allocated (glibc extends the heap; nothing is touched, so nothing becomes resident),
    its whole 2 MB pages are advised ``MADV_HUGEPAGE`` and the block is freed. The
    encoder's tensors are later carved from that space and fault in as 2 MB pages
    (measured: 2-4% less time per image, see docs/performance.md). Returns whether the
    advice was taken."""
    if not huge_pages_on_request():
        return False
    try:
        malloc, free, madvise = libc.malloc, libc.free, libc.madvise
    except AttributeError:  # pragma: no cover - not glibc
        return False
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    madvise.restype = ctypes.c_int
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    block = malloc(size)
    if not block:
        return False
    start = -(-block // _HUGE_PAGE) * _HUGE_PAGE
    end = (block + size) // _HUGE_PAGE * _HUGE_PAGE
    ok = end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0
    free(block)
    return ok


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
