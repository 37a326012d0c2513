"""The one model fingerprint: which weights a model (or one of its parts) holds.

:func:`model_fingerprint` hashes a module's ``state_dict``: every entry's name and the raw
bytes of its values, in order. Equal weights give equal ids whatever built or loaded them;
any changed value gives another id. Its users: :attr:`segany.predictor.Predictor.model_id`
(when the catalogue gives no file hash), the embedding cache keys of training and the
annotator's model switch (:func:`state_fingerprint` of the weights behind the cached
features, ``Sam.feature_state()``: embeddings kept when they are unchanged), and the folder
of a model's exported ONNX graphs.

A checkpoint *file* is identified by its SHA-256 instead (:func:`segany.weights.sha256_file`,
the catalogue's hashes); that is the model id of catalogue models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

#: Hex digits of a fingerprint.
FINGERPRINT_LENGTH = 32


def model_fingerprint(module: torch.nn.Module) -> str:
    """The first :data:`FINGERPRINT_LENGTH` hex digits of the SHA-256 of ``module``'s
    parameters and buffers (``state_dict`` names and value bytes)."""
    return state_fingerprint(module.state_dict())


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """:func:`model_fingerprint` of a ``name -> tensor`` mapping (e.g. the weights of
    several parts of a model that together make a cached feature)."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:FINGERPRINT_LENGTH]


__all__ = ["FINGERPRINT_LENGTH", "model_fingerprint", "state_fingerprint"]
