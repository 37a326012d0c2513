"""Build ready-to-use models and predictors from a catalogue name or a checkpoint path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .autotune import resolve_backend
from .models import Sam, model_from_state_dict
from .models.fuse import fuse_for_inference
from .predictor import EmbeddingCache, Predictor
from .runtime import set_threads
from .weights import DEFAULT_WEIGHTS, WeightsError, read_checkpoint, resolve


def load_model(
    model: str | os.PathLike[str] = DEFAULT_WEIGHTS,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Sam:
    """Load a SAM model in eval mode.

    ``model`` is a catalogue name (``mobile_sam``, ``sam_vit_b``..., or ``vit_t``/``vit_b``...)
    fetched and cached on first use, or a path to any checkpoint with the official key names
    (the variant, including custom ViT sizes, is read from the checkpoint; a file of a
    custom SAM 2 size names it under ``registry.MODEL_CONFIG_KEY``). Catalogue files
    are hash-checked; every file is loaded with ``weights_only=True``.
    """
    return _load(model, device=device, progress=progress)[0]


def _load(
    model: str | os.PathLike[str], *, device: str | torch.device, progress: bool
) -> tuple[Sam, str | None]:
    path, spec = resolve(model, progress=progress)
    sha = spec.sha256 if spec is not None and spec.sha256 else None
    state, config = read_checkpoint(path, sha256=sha)
    try:
        sam = model_from_state_dict(state, config)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise WeightsError(f"{path} is not a SAM checkpoint this package can build: {exc}") from exc
    return sam.to(device).eval(), sha


def load_predictor(
    model: str | os.PathLike[str] = DEFAULT_WEIGHTS,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    backend: str = "auto",
    fuse: bool = True,
    threads: int | None = None,
    precision: str = "fp32",
) -> Predictor:
    """A :class:`Predictor` over :func:`load_model`; ``cache_dir`` keeps embeddings on disk
    (or pass a ready ``cache``).

    ``backend`` is ``"auto"`` (default: the faster of the exact backends on this machine,
    measured once and recorded, or ``$SEGANY_BACKEND``; see :mod:`segany.autotune`),
    ``"torch"``, ``"onnx"`` (exported once, cached under ``~/.cache/segany/onnx``) or
    ``"onnx-int8"``; ``fuse`` applies
    :func:`segany.models.fuse.fuse_for_inference` (the predictor owns this model, so the
    inference-only rewrite is safe); ``threads`` calls :func:`segany.runtime.set_threads`;
    ``precision`` ``"bf16"`` embeds with a bfloat16 encoder (faster on AMX CPUs, less
    accurate; see :class:`Predictor`).
    """
    if threads is not None:
        set_threads(threads)
    sam, sha = _load(model, device=device, progress=progress)
    model_id = sha[:32] if sha else None
    if backend == "auto":
        if precision != "fp32" or torch.device(device).type != "cpu":
            backend = "torch"  # bf16 and GPUs are the torch backend's
        else:
            if fuse:  # measured as it will run
                fuse_for_inference(sam)
            backend = resolve_backend(backend, sam, model_id)
    return Predictor(
        sam,
        cache=cache if cache is not None else EmbeddingCache(cache_dir),
        model_id=model_id,
        backend=backend,
        fuse=fuse,
        precision=precision,
    )
