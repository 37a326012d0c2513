"""``segany export``: write a model's ONNX graphs (:mod:`segany.export.onnx`) to a folder.

    segany export --model sam2.1_hiera_tiny --out DIR [--int8]

SAM 1 / MobileSAM give ``encoder``, ``decoder``, ``context`` and ``prompt``; SAM 2 gives
``encoder`` (image -> embedding and the two high-res maps) and ``decoder`` (with the object
score). ``DIR/export.json`` lists every graph's inputs and outputs with their shapes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``segany`` parser."""
    from ..weights import DEFAULT_WEIGHTS

    p = sub.add_parser(
        "export",
        help="export a model to ONNX (image encoder and prompt decoder graphs)",
        description="Trace the model's own code into ONNX graphs (opset 18) for onnxruntime; "
        "`--backend onnx` elsewhere exports and caches them by itself.",
    )
    p.add_argument("--model", default=DEFAULT_WEIGHTS,
                   help=f"catalogue name or checkpoint (default: {DEFAULT_WEIGHTS})")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the .onnx files")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write dynamic int8 variants (NAME.int8.onnx; less accurate)",
    )
    p.set_defaults(func=run_export)


def _describe(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(v) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "file": path.name,
        "inputs": {v.name: dims(v) for v in graph.input},
        "outputs": {v.name: dims(v) for v in graph.output},
    }


def run_export(args: argparse.Namespace) -> int:
    from ..files import atomic_write
    from ..loader import load_model
    from .onnx import export_onnx, quantize_dynamic_int8

    sam = load_model(args.model, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = export_onnx(sam, out)
    if args.int8:
        paths.update({f"{k}.int8": quantize_dynamic_int8(p) for k, p in list(paths.items())})
    summary = {
        "model": str(args.model),
        "family": type(sam).__name__,
        "img_size": sam.img_size,
        "graphs": {name: _describe(p) for name, p in paths.items()},
    }
    atomic_write(out / "export.json", json.dumps(summary, indent=2) + "\n")
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0
