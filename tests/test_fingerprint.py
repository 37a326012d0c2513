"""The one model fingerprint (:mod:`segany.fingerprint`) and the places that key by it."""

from __future__ import annotations

import copy
import hashlib
import io

import numpy as np
import torch

from segany.fingerprint import model_fingerprint
from segany.predictor import Predictor
from segany.train.trainer import EmbeddingSource

from .conftest import tiny_sam


def test_the_hash_is_the_state_dicts_names_and_bytes():
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.copy_(torch.tensor([3.0]))
    h = hashlib.sha256()
    for name, values in (("weight", [1.0, 2.0]), ("bias", [3.0])):
        h.update(name.encode())
        h.update(np.asarray(values, np.float32).tobytes())
    assert model_fingerprint(lin) == h.hexdigest()[:32]


def test_same_weights_same_id_one_changed_parameter_another():
    a = tiny_sam(0)
    fp = model_fingerprint(a)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert model_fingerprint(tiny_sam(0)) == fp  # built again with the same seed
    assert model_fingerprint(copy.deepcopy(a)) == fp
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = tiny_sam(1)
    assert model_fingerprint(b) != fp
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert model_fingerprint(b) == fp  # saved and loaded into another model
    with torch.no_grad():
        next(b.mask_decoder.parameters()).view(-1)[0] += 1e-3  # one value of one parameter
    assert model_fingerprint(b) != fp
    # the image encoder's own id is unchanged by a decoder change (embeddings stay valid)
    assert model_fingerprint(b.image_encoder) == model_fingerprint(a.image_encoder)
    with torch.no_grad():
        next(b.image_encoder.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(b.image_encoder) != model_fingerprint(a.image_encoder)


def test_its_users_key_by_it():
    model = tiny_sam(0)
    assert Predictor(model).model_id == model_fingerprint(model)
    assert Predictor(model, model_id="given").model_id == "given"  # e.g. a catalogue hash
    src = EmbeddingSource(model, None)
    assert src.prefix == "enc" + model_fingerprint(model.image_encoder)[:24]
