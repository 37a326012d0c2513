"""The annotator's browser decoder, server side: the exported graphs the page runs with
onnxruntime-web, and each image's embedding and per-image decoder context as one binary
payload (docs/annotate.md, "Decoder in the browser").

The graphs are :mod:`segany.export.onnx`'s, exported once per model into the ONNX cache
(:func:`segany.export.runtime.default_onnx_dir`): ``prompt.onnx`` (per-image context +
prompts, for clicks without a mask input) and ``decoder.onnx`` (embedding + prompts + mask
input, for refinements). The context is the model's own ``prepare_decoder`` (what
``context.onnx`` computes), memoised on the image's embedding as the server's click path
does.

Payload (``application/octet-stream``, little-endian): ``b"SEGE"``, a ``uint32`` header
length, the header (UTF-8 JSON padded with spaces to a multiple of 8 bytes), then the
tensors back to back, each at the offset the header gives (from the end of the header):

    {"version": 1, "dtype": "float16" | "float32", "original_size": [H, W],
     "input_size": [h, w], "img_size": 1024, "mask_input_size": [256, 256],
     "mask_threshold": 0.0, "tensors": {"image_embeddings": {"shape": [...],
     "offset": 0, "nbytes": ...}, "keys": ..., "k": ..., "v": ..., "q": ...}}
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import numpy as np
import torch

from ..models import Sam
from ..models.sam2 import Sam2
from ..models.sam_hq import SamHQ
from ..predictor import ImageEmbedding, _weights_version

MAGIC = b"SEGE"
PAYLOAD_VERSION = 1
DTYPES = ("float16", "float32")
#: The graphs the page loads, by name.
GRAPHS = ("prompt", "decoder")


def unsupported_reason(model: Sam) -> str | None:
    """Why the page cannot decode for ``model`` (``None``: it can). SAM 2 and HQ-SAM decode
    on the server."""
    if isinstance(model, Sam2):
        return "SAM 2 models decode on the server"
    if isinstance(model, SamHQ):
        return "HQ-SAM decodes on the server"
    return None


class WebDecoder:
    """The graphs of one model for the page, exported on first use (once; concurrent
    callers wait for it)."""

    def __init__(self, model: Sam, model_id: str, directory: Path | None = None) -> None:
        from ..export.runtime import default_onnx_dir

        self.model = model
        self.model_id = model_id
        self.directory = Path(directory) if directory is not None else default_onnx_dir(model_id)
        self._lock = threading.Lock()

    def graph(self, name: str) -> Path:
        """The path of ``prompt.onnx`` or ``decoder.onnx``, exported if missing."""
        if name not in GRAPHS:
            raise KeyError(name)
        path = self.directory / f"{name}.onnx"
        if path.is_file():
            return path
        from ..export.onnx import export_decoder, export_prompt

        with self._lock:
            if not path.is_file():
                (export_prompt if name == "prompt" else export_decoder)(self.model, path)
        return path


def context_tensors(model: Sam, item: ImageEmbedding) -> dict[str, torch.Tensor]:
    """The decoder's per-image context of ``item`` (``keys``, ``k``, ``v``, ``q``: the
    inputs of ``prompt.onnx`` besides the prompt), memoised on the embedding like the
    server's own click path (:attr:`ImageEmbedding.contexts`)."""
    version = _weights_version(model)
    hit = item.contexts.get(model)
    if hit is not None and hit[0] == version:
        ctx = hit[1]
    else:
        with torch.inference_mode():
            ctx = model.prepare_decoder(item.embedding.to(model.device))
        item.contexts[model] = (version, ctx)
    return {"keys": ctx.keys, "k": ctx.k, "v": ctx.v, "q": ctx.q}


def payload(model: Sam, item: ImageEmbedding, dtype: str = "float16") -> bytes:
    """The binary payload of an image for the page (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    np_dtype = np.float16 if dtype == "float16" else np.float32
    tensors = {"image_embeddings": item.embedding, **context_tensors(model, item)}
    blobs, meta, offset = [], {}, 0
    for name, t in tensors.items():
        arr = np.ascontiguousarray(t.detach().float().cpu().numpy().astype(np_dtype))
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        meta[name] = {"shape": list(arr.shape), "offset": offset, "nbytes": len(raw)}
        blobs.append(raw)
        offset += len(raw)
    header = {
        "version": PAYLOAD_VERSION,
        "dtype": dtype,
        "original_size": list(item.original_size),
        "input_size": list(item.input_size),
        "img_size": int(model.img_size),
        "mask_input_size": list(model.prompt_encoder.mask_input_size),
        "mask_threshold": float(model.mask_threshold),
        "tensors": meta,
    }
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-(len(MAGIC) + 4 + len(text)) % 8)
    return b"".join([MAGIC, struct.pack("<I", len(text)), text, *blobs])


def read_payload(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and float32 tensors of a payload (tests, other clients)."""
    if data[:4] != MAGIC:
        raise ValueError("not a segany embedding payload")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    dt = np.dtype("<f2" if header["dtype"] == "float16" else "<f4")
    out = {}
    for name, m in header["tensors"].items():
        raw = data[base + m["offset"] : base + m["offset"] + m["nbytes"]]
        out[name] = np.frombuffer(raw, dt).reshape(m["shape"]).astype(np.float32)
    return header, out


class WebDecoderMixin:
    """The browser decoder's part of :class:`~.service.AnnotationService` (its state is
    set up there: ``web_decoder`` on or off, the default payload ``web_dtype``)."""

    def _web_decoder(self) -> WebDecoder:
        with self._web_lock:
            wd = self._web_decoders.get(self.model_id)
            if wd is None:
                wd = self._web_decoders[self.model_id] = WebDecoder(self.model, self.model_id)
            return wd

    def web_decoder_info(self) -> dict:
        """What the page needs to decode by itself, or why it cannot (then it asks the
        server for every click)."""
        from . import ortweb

        reason = None
        if not self.web_decoder:
            reason = "turned off on the server (--no-web-decoder)"
        elif (why := unsupported_reason(self.model)) is not None:
            reason = why
        elif not ortweb.available():
            reason = (f"onnxruntime-web {ortweb.VERSION} is not in the cache: run "
                      "python -m segany.engine.ortweb (make install)")  # fmt: skip
        return {
            "available": reason is None,
            "reason": reason,
            "runtime": f"/vendor/onnxruntime-web-{ortweb.VERSION}/",
            "version": ortweb.VERSION,
            "graphs": {g: f"/api/graphs/{self.model_id}/{g}.onnx" for g in GRAPHS},
            "dtype": self.web_dtype,
        }

    def web_graph(self, model_id: str, name: str) -> Path:
        """The path of an exported graph of the current model."""
        from .schemas import NotFound

        if model_id != self.model_id or name not in GRAPHS:
            raise NotFound(f"no graph {name!r} for model {model_id!r}")
        if (why := unsupported_reason(self.model)) is not None:
            raise NotFound(why)
        return self._web_decoder().graph(name)

    def embedding_payload(self, image_id: int, dtype: str | None = None) -> bytes:
        """The image's embedding and decoder context for the page (computed if needed:
        the call waits for it, as a click would)."""
        from .schemas import Unprocessable

        dtype = dtype or self.web_dtype
        if dtype not in DTYPES:
            raise Unprocessable(f"dtype must be one of {', '.join(DTYPES)}")
        if (why := unsupported_reason(self.model)) is not None:
            raise Unprocessable(why)
        im = self._image(image_id, usable=True)
        item = self.embedding(im)
        with self._decode:  # the context is a few ms of model work: one per core at a time
            return payload(self.model, item, dtype)
