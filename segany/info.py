"""``segany info``: what this installation runs on and what it will use.

Versions, the CPU (model, the instruction-set flags that decide speed, the kernels torch
dispatches to), threads, available backends and precisions, and the cache folders. Speed
figures in the docs name the CPU they come from; this is the command that tells which
family a machine belongs to.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from typing import Any

#: The CPU flags that decide which kernels run (x86 and ARM names as /proc/cpuinfo has them).
SPEED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
    "asimd",
    "sve",
    "bf16",
    "i8mm",
)
_PACKAGES = ("torch", "numpy", "onnxruntime", "opencv-python-headless", "pycocotools", "fastapi")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    import torch

    from . import __version__
    from . import runtime as R
    from . import weights as W

    cpu = R.cpu_info()
    flags = cpu["flags"]
    versions = {"segany": __version__, "python": platform.python_version()}
    versions.update({p: _version(p) for p in _PACKAGES})
    backends = ["torch"]
    if versions["onnxruntime"]:
        backends += ["onnx", "onnx-int8"]
    return {
        "versions": versions,
        "cpu": {
            "model": cpu["model"],
            "vendor": cpu.get("vendor", ""),
            "arch": cpu["arch"],
            "cpus_available": R.available_cpus(),
            "flags": [f for f in SPEED_FLAGS if f in flags],  # type: ignore[operator]
            "torch_kernels": torch.backends.cpu.get_cpu_capability(),
            "onednn": bool(torch.backends.mkldnn.is_available()),
            # the attention and decoder products of fused models (segany.models.fuse)
            "products": R.matrix_products(),
            # how TinyViT's 7x7 windows attend (segany.models.common.window_attention)
            "window_attention": "products"
            if R.matrix_products() == "onednn" and R.batched_windows()
            else "kernel",
        },
        "threads": R.get_threads(),
        "backends": backends,
        "precisions": ["fp32", "bf16"] if R.has_native_bf16() else ["fp32"],
        "default": {"model": W.DEFAULT_WEIGHTS, "backend": "auto", "precision": "fp32"},
        "auto_backend": _auto_backend(W.DEFAULT_WEIGHTS),
        "folders": {"cache": str(W.cache_dir()), "weights": str(W.weights_dir())},
    }


def _auto_backend(model: str) -> dict[str, Any]:
    """What ``backend="auto"`` picks for ``model`` here: ``$SEGANY_BACKEND``, the recorded
    choice with its timings, or not measured yet."""
    import os

    from . import autotune as A
    from . import weights as W

    env = os.environ.get(A.BACKEND_ENV, "").strip()
    if env and env != "auto":
        return {"backend": env, "source": f"${A.BACKEND_ENV}"}
    spec = W.get_spec(model)
    entry = A.cached_choice(spec.sha256[:32] if spec.sha256 else None)
    if entry is None:
        return {"backend": None, "source": "not timed yet", "file": str(A.choices_file())}
    return {"backend": entry["backend"], "source": A.describe(entry), "when": entry["when"]}


def _text(report: dict[str, Any]) -> str:
    cpu = report["cpu"]
    auto = report["auto_backend"]
    lines = [
        "segany " + report["versions"]["segany"],
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "segany" and v),
        f"cpu: {cpu['model']} ({cpu['arch']}), {cpu['cpus_available']} available",
        f"  flags: {' '.join(cpu['flags']) or '(none of interest)'}",
        f"  torch kernels: {cpu['torch_kernels']}, oneDNN: {'yes' if cpu['onednn'] else 'no'}",
        "  matrix products: "
        + (
            "oneDNN (faster than torch's BLAS, MKL, on this CPU's vendor; "
            "SEGANY_PRODUCTS=blas to change)"
            if cpu["products"] == "onednn"
            else "torch's BLAS"
        ),
        "  small attention windows: "
        + (
            "batched matrix products"
            if cpu["window_attention"] == "products"
            else "the fused attention kernel"
        ),
        f"threads: {report['threads']}",
        f"backends: {', '.join(report['backends'])}",
        f"precisions: {', '.join(report['precisions'])}"
        + ("" if "bf16" in report["precisions"] else " (no native bfloat16: bf16 refused)"),
        "default: " + ", ".join(f"{k} {v}" for k, v in report["default"].items()),
        "auto backend: "
        + (
            f"{auto['backend']} ({auto['source']})"
            if auto["backend"]
            else "not timed yet on this machine (`segany info --measure` or the first load)"
        ),
        f"cache: {report['folders']['cache']}",
        f"weights: {report['folders']['weights']}",
    ]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="versions, CPU, threads, backends and cache folders",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--measure",
        action="store_true",
        help="time the exact backends for the default model now and record the auto choice",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .validate import dumps

    if args.measure:
        from . import weights as W
        from .autotune import candidates, choose
        from .loader import load_model
        from .models.fuse import fuse_for_inference

        sam = fuse_for_inference(load_model(W.DEFAULT_WEIGHTS))
        sha = W.get_spec(W.DEFAULT_WEIGHTS).sha256
        choose(sam, sha[:32] if sha else None, candidates(sam))
    report = collect()
    print(dumps(report, indent=2) if args.json else _text(report), file=sys.stdout)
    return 0
