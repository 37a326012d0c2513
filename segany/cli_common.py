"""What every ``segany`` sub-command's CLI shares: the one-line user error and the
detector and model options. Kept apart from :mod:`segany.cli` so the sub-command modules
(``eval/cli.py``, ``engine/label_cli.py``, ``train/cli.py``, ``video/cli.py``,
``geo_cli.py``...) never import the entry point that imports them (no import cycle)."""

from __future__ import annotations

import argparse


class CliError(Exception):
    """A user error reported as one line, exit code 2."""


def add_detector_args(g: argparse._ArgumentGroup, *, note: str = "") -> None:
    """``--detector``, ``--box-threshold``, ``--text-threshold`` (no argparse defaults: the
    detector's own apply, see :mod:`segany.text.detectors`); ``note`` is added to each help."""
    from .text import detectors as D

    g.add_argument(
        "--detector",
        metavar="NAME|PATH",
        help=f"{', '.join(D.DETECTORS)}, a hub id or a local folder "
        f"(default: {D.DEFAULT_DETECTOR}{note})",
    )
    g.add_argument(
        "--box-threshold",
        type=float,
        help=f"keep boxes scoring above this (default: {D.BOX_THRESHOLD} for Grounding DINO, "
        f"{D.OWL_BOX_THRESHOLD} for OWLv2{note})",
    )
    g.add_argument(
        "--text-threshold",
        type=float,
        help=f"Grounding DINO: words scoring above this form a box's phrase "
        f"(default: {D.TEXT_THRESHOLD}{note})",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--backend`` and ``--precision`` of the commands that run a model."""
    from .weights import DEFAULT_WEIGHTS

    p.add_argument(
        "--model",
        default=DEFAULT_WEIGHTS,
        help=f"catalogue name or checkpoint path (default: {DEFAULT_WEIGHTS})",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx", "onnx-int8"),
        default="auto",
        help="inference engine (auto: the faster exact one on this machine, timed once and "
        "recorded, or $SEGANY_BACKEND; onnx: exported once and cached; onnx-int8: "
        "quantised, see docs/performance.md for its accuracy cost)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="image encoder precision of the torch backend (bf16: faster on CPUs with "
        "AMX / AVX-512 BF16, less accurate; see docs/performance.md)",
    )
