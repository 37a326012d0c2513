"""Loading checkpoints safely: ``torch.load(..., weights_only=True)``, the optional hash
check, unwrapping, and refusing non-tensor or non-finite content. See :mod:`segany.weights`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalogue import WeightsError
from .fetching import hash_with_marker

if TYPE_CHECKING:
    import torch


def _load_failure(exc: BaseException) -> str:
    """The reason in ``torch.load``'s error, on one line. For a refused pickle torch's
    message is several paragraphs that also advise ``weights_only=False`` (running the
    file's code), which segany never does: only the first sentence of the unpickler's own
    reason is kept."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation of torch.load", 1)[0]
    else:
        text = text.strip().splitlines()[0] if text.strip() else ""
    text = " ".join(text.split()).split(". ", 1)[0].rstrip(".")  # the first sentence
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def load_checkpoint(
    path: str | os.PathLike[str], *, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of :func:`read_checkpoint` (the model config, if any, dropped)."""
    return read_checkpoint(path, sha256=sha256)[0]


def read_checkpoint(
    path: str | os.PathLike[str], *, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load a state dict with ``torch.load(..., weights_only=True)`` on the CPU, and the
    model config stored beside it (``registry.MODEL_CONFIG_KEY``; ``None`` in official
    files, whose variant the keys tell).

    If ``sha256`` is given the file's hash is checked first (a valid marker written by
    :func:`fetch` is trusted instead of rehashing). A checkpoint that wraps its weights in
    a dict under ``"model"`` or ``"state_dict"`` is unwrapped. Raises :class:`WeightsError`
    on a hash mismatch, if the file is missing or is not a torch state dict, or if a weight
    is NaN or infinite.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist or is not a file")
    if sha256 is not None:
        expected = sha256.strip().lower()
        actual = hash_with_marker(path, write=False)
        if actual != expected:
            raise WeightsError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise WeightsError(
            f"{path} is not a loadable PyTorch checkpoint (truncated, corrupt, not a "
            f"checkpoint, or holds objects other than tensors, which segany never unpickles):"
            f" {_load_failure(exc)}"
        ) from exc
    config = None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                config = obj.get("segany_model")
                obj = obj[key]
                break
    if config is not None and not isinstance(config, dict):
        raise WeightsError(f"{path}: 'segany_model' must be a dict, got {type(config).__name__}")
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5])
        raise WeightsError(f"{path} is not a state dict of tensors (bad entries: {shown})")
    broken = [k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise WeightsError(
            f"{path} holds NaN or infinite weights (in {shown}): a broken checkpoint"
        )
    return dict(obj), config
