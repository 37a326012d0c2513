"""Embed an image once, then answer any number of prompts.

Inputs and outputs at this edge are numpy arrays in the *image frame* (pixels of the
original image, ``(x, y)``, boxes XYXY); the work inside is torch in the model frame.

(Past 500 lines: one predictor serves every family (SAM 1, MobileSAM, HQ-SAM, SAM 2) and
both backends, and its prompt checks, batching and the embedding cache it keys share one
frame convention; the model-specific work stays in the models.)
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import transforms as T
from .files import atomic_file
from .fingerprint import model_fingerprint
from .models import Sam, SamHQ
from .models.fuse import fuse_for_inference
from .models.transformer import DecoderContext
from .runtime import check_precision, keep_freed_memory

# Prompts decoded together on the CPU. Each prompt carries its own (4096, 256) image-token
# state and (64, 128, 128) + (32, 256, 256) upscaling maps (4 + 4 + 8 MB), and the decoder's
# element-wise passes (adds, layer norms, GELU) are bound by memory traffic, so large
# batches are slower per prompt, not faster. On this 2-core machine (2 MB L2 per core),
# `benchmarks/bench_decode_chunk.py` (ms per prompt, median of 5, 2 threads, two runs):
# chunk 1: 19.0 / 20.3, 2: 27.1 / 27.8, 4: 27.3, 8: 35.8, 64: 41.3 / 35.2.
# Results do not depend on it (same logits to float rounding).
CPU_DECODE_CHUNK = 1


class PromptError(ValueError):
    """A prompt that cannot be used: wrong shape, NaN, outside the image."""


#: Numeric precisions of the torch backend's image encoder (see :class:`Predictor`).
PRECISIONS = ("fp32", "bf16")


class Prediction:
    """Masks for one prompt (or ``N`` prompts when batched, leading axis ``N``).

    masks: ``(K, H, W)`` bool at image size (float logits with ``return_logits``).
    scores: ``(K,)`` predicted IoUs.
    low_res_logits: ``(K, S/4, S/4)`` logits, usable as the next ``mask_input``. A single
        click on the torch backend computes the part of them under the padding (which no
        pixel of the image reads) only when this attribute is first read.
    """

    __slots__ = ("masks", "scores", "_low_res", "_fill")

    def __init__(
        self,
        masks: np.ndarray,
        scores: np.ndarray,
        low_res_logits: np.ndarray | None = None,
        *,
        fill: Callable[[], np.ndarray] | None = None,
    ) -> None:
        if (low_res_logits is None) == (fill is None):
            raise ValueError("give either low_res_logits or fill")
        self.masks, self.scores = masks, scores
        self._low_res, self._fill = low_res_logits, fill

    @property
    def low_res_logits(self) -> np.ndarray:
        if self._low_res is None:
            self._low_res = self._fill()
            self._fill = None
        return self._low_res

    def __repr__(self) -> str:
        return f"Prediction(masks={self.masks.shape}, scores={self.scores.tolist()})"


@dataclass(frozen=True)
class ImageEmbedding:
    """An image's embedding ``(1, C, h, w)`` with the sizes needed to map prompts, and the
    model's other per-image features (SAM 2: the projected stride-4 and stride-8 maps)."""

    embedding: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    high_res: tuple[torch.Tensor, ...] = ()
    # The decoder's prompt-independent part for this embedding, per model, with the
    # model's weight versions: every predictor that uses the embedding (e.g. one per server
    # thread) shares it; weights changed in place (training) make it stale.
    contexts: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, compare=False, repr=False
    )


class EmbeddingCache:
    """Embeddings kept in memory (LRU, ``max_items``) and optionally on disk, keyed by
    model and image content, so that no image is encoded twice."""

    def __init__(self, directory: str | Path | None = None, *, max_items: int = 8) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_items = max_items
        self._memory: OrderedDict[str, ImageEmbedding] = OrderedDict()

    def get(self, key: str) -> ImageEmbedding | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.directory is None:
            return None
        path = self.directory / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            item = ImageEmbedding(
                embedding=data["embedding"],
                original_size=tuple(data["original_size"]),
                input_size=tuple(data["input_size"]),
                high_res=tuple(data.get("high_res", ())),
            )
        except Exception:  # a damaged cache file is recomputed, never fatal
            return None
        self._remember(key, item)
        return item

    def put(self, key: str, item: ImageEmbedding) -> None:
        self._remember(key, item)
        if self.directory is None:
            return
        # a cache: atomic (readers never see a part) but not fsynced
        with atomic_file(self.directory / f"{key}.pt", durable=False) as f:
            torch.save(
                {
                    "embedding": item.embedding.contiguous(),
                    "original_size": list(item.original_size),
                    "input_size": list(item.input_size),
                    "high_res": [t.contiguous() for t in item.high_res],
                },
                f,
            )

    def _remember(self, key: str, item: ImageEmbedding) -> None:
        self._memory[key] = item
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def items_in_memory(self) -> int:
        """Embeddings held in memory."""
        return len(self._memory)


class LockedEmbeddingCache(EmbeddingCache):
    """:class:`EmbeddingCache` safe to share between request threads (the annotator's and
    ``segany serve``'s one cache per process)."""

    def __init__(self, directory: str | Path | None = None, *, max_items: int = 8) -> None:
        super().__init__(directory, max_items=max_items)
        self._lock = threading.RLock()

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            return super().get(key)

    def put(self, key: str, item: ImageEmbedding) -> None:
        with self._lock:
            super().put(key, item)

    def in_memory(self, key: str) -> bool:
        with self._lock:
            return key in self._memory

    def items_in_memory(self) -> int:
        with self._lock:
            return super().items_in_memory()


def _weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter of the mask decoder or prompt encoder is modified in
    place (optimizer steps, ``load_state_dict``): the in-place version counters."""
    return tuple(p._version for p in model.mask_decoder.parameters()) + tuple(
        p._version for p in model.prompt_encoder.parameters()
    )


def image_key(image: np.ndarray) -> str:
    """Content hash of an RGB image array (shape included)."""
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()[:32]


class Predictor:
    """Promptable segmentation of one image at a time.

    Args:
        model: a :class:`~segany.models.Sam` (in eval mode).
        cache: where embeddings are kept; by default in memory for the last 8 images.
        model_id: identifies the weights in cache keys (e.g. the checkpoint's SHA-256);
            computed from the parameters when needed and not given.
        backend: ``"torch"`` (the model itself), ``"onnx"`` (the model exported once and
            run with onnxruntime, see :mod:`segany.export.runtime`), ``"onnx-int8"`` (its
            dynamic-quantised variant; less accurate, see ``docs/performance.md``) or an
            object with the ``embed`` / ``decode`` methods of
            :class:`~segany.export.runtime.OnnxBackend`.
        fuse: apply :func:`~segany.models.fuse.fuse_for_inference` to ``model`` (in place:
            faster on the CPU, but the model can no longer be trained).
        decode_chunk: the torch backend decodes batched prompts this many at a time
            (default: :data:`CPU_DECODE_CHUNK` on the CPU, all at once elsewhere).
        precision: ``"fp32"`` (default; matches the reference) or ``"bf16"``: the torch
            backend embeds images with a bfloat16 copy of the image encoder (made here;
            the decoder stays float32). About 1.8x faster on CPUs with AMX / AVX-512 BF16
            and less accurate (measured in ``docs/performance.md``); refused on CPUs
            without bfloat16 instructions (:func:`~segany.runtime.check_precision`), where
            it is several times slower. Never a default.
        hq_token_only: HQ-SAM models (:class:`~segany.models.SamHQ`) only: return the HQ
            output's mask alone instead of its sum with SAM's (the reference predictor's
            ``predict(..., hq_token_only=...)``; public, may be changed between calls).
            Ignored for other models.
    """

    def __init__(
        self,
        model: Sam,
        *,
        cache: EmbeddingCache | None = None,
        model_id: str | None = None,
        backend: str | object = "torch",
        fuse: bool = False,
        decode_chunk: int | None = None,
        precision: str = "fp32",
        hq_token_only: bool = False,
    ) -> None:
        self.model = model.eval()
        self.hq_token_only = hq_token_only
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        if precision != "fp32" and backend != "torch":
            raise ValueError(f"precision {precision!r} is for the torch backend")
        check_precision(precision)
        self.precision = precision
        if decode_chunk is not None and decode_chunk < 1:
            raise ValueError("decode_chunk must be at least 1")
        self.decode_chunk = decode_chunk
        sam2 = getattr(self.model, "input_geometry", "") == "square"
        # SAM 2 and HQ-SAM backends must give the extra per-image features
        # (OnnxBackend.embed_features: the high-res maps, the HQ features)
        extra_backend = backend in ("torch", "onnx") or hasattr(backend, "embed_features")
        if sam2 and not extra_backend:
            raise ValueError("SAM 2 models run on the torch or onnx backend")
        if isinstance(self.model, SamHQ) and not extra_backend:
            raise ValueError("HQ-SAM models run on the torch or onnx backend")
        if fuse:
            fuse_for_inference(self.model)
        self.geometry = T.geometry_of(self.model)
        if next(self.model.parameters()).device.type == "cpu":
            keep_freed_memory()
        self._encoder_bf16 = None
        if precision == "bf16":
            self._encoder_bf16 = copy.deepcopy(self.model.image_encoder).to(torch.bfloat16)
        self.cache = cache if cache is not None else EmbeddingCache()
        self._model_id = model_id
        self._state: ImageEmbedding | None = None
        self._context: DecoderContext | None = None
        self.backend_name = backend if isinstance(backend, str) else type(backend).__name__
        self.backend = None  # None: the torch model itself
        if backend in ("onnx", "onnx-int8"):
            from .export.runtime import OnnxBackend

            self.backend = OnnxBackend.from_model(
                self.model, model_id=model_id, quantized=backend == "onnx-int8"
            )
        elif isinstance(backend, str):
            if backend != "torch":
                raise ValueError(f"unknown backend {backend!r}; use 'torch', 'onnx' or 'onnx-int8'")
        elif hasattr(backend, "embed") and hasattr(backend, "decode"):
            self.backend = backend
        else:
            raise TypeError("backend must be a name or an object with embed() and decode()")

    # -- image ---------------------------------------------------------------------------
    @property
    def encoder_copy(self) -> torch.nn.Module | None:
        """The reduced-precision copy of the image encoder that embeds images
        (``precision="bf16"``), or ``None`` at fp32; for callers that encode frames
        themselves (:class:`~segany.video.sam2_tracker.Sam2Tracker`)."""
        return self._encoder_bf16

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = model_fingerprint(self.model)
        return self._model_id

    @property
    def is_image_set(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> ImageEmbedding:
        if self._state is None:
            raise RuntimeError("no image set: call set_image() first")
        return self._state

    @property
    def original_size(self) -> tuple[int, int]:
        return self.state.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self.state.input_size

    @property
    def embedding(self) -> torch.Tensor:
        """The current image's embedding ``(1, C, h, w)``."""
        return self.state.embedding

    def set_image(self, image: T.ImageLike) -> ImageEmbedding:
        """Load ``image`` (path, bytes, PIL or array; see :func:`transforms.load_image`)
        and embed it, or reuse a cached embedding of the same pixels."""
        rgb = T.load_image(image)
        tag = "" if self.backend is None else f"-{self.backend_name}"
        tag += "" if self.precision == "fp32" else f"-{self.precision}"
        key = f"{self.model_id}{tag}-{image_key(rgb)}"
        cached = self.cache.get(key)
        if cached is None:
            cached = self.embed(rgb)
            self.cache.put(key, cached)
        self.set_embedding(cached)
        return cached

    def embed(self, rgb: np.ndarray) -> ImageEmbedding:
        """Embed an ``(H, W, 3)`` uint8 RGB image (no cache)."""
        m = self.model
        x, input_size = self.geometry.to_model_input(
            rgb, pixel_mean=m.pixel_mean, pixel_std=m.pixel_std
        )
        high_res: tuple[torch.Tensor, ...] = ()
        with torch.inference_mode():
            if self.backend is None:  # with precision="bf16", its bfloat16 encoder copy
                emb, high_res = m.embed_features(x, valid=input_size, encoder=self._encoder_bf16)
            elif hasattr(self.backend, "embed_features"):  # the encoder's other outputs too
                emb, high_res = self.backend.embed_features(x)
            else:
                emb = self.backend.embed(x)
        return ImageEmbedding(
            embedding=emb,
            original_size=(rgb.shape[0], rgb.shape[1]),
            input_size=input_size,
            high_res=tuple(high_res),
        )

    def set_embedding(self, item: ImageEmbedding) -> None:
        """Use an embedding computed elsewhere (e.g. loaded from disk)."""
        self._state = item
        self._context = None
        if self.backend is None:
            self._decoder_context()

    def reset_image(self) -> None:
        self._state = None
        self._context = None

    def _decoder_context(self) -> DecoderContext:
        """The prompt-independent part of the decoder for the current image, computed once
        per image (a few milliseconds) and reused by every prompt without a mask input."""
        if self._context is None:
            state = self.state
            version = _weights_version(self.model)
            hit = state.contexts.get(self.model)
            if hit is not None and hit[0] == version:
                ctx = hit[1]
            else:
                with torch.inference_mode():
                    ctx = self.model.prepare_decoder(state.embedding.to(self.model.device))
                state.contexts[self.model] = (version, ctx)
            self._context = ctx
        return self._context

    # -- prompts -------------------------------------------------------------------------
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """One prompt in the image frame.

        Args:
            point_coords: ``(N, 2)`` pixel ``(x, y)``; point_labels: ``(N,)`` 1 = object,
                0 = background.
            box: ``(4,)`` XYXY pixels.
            mask_input: ``(1, S/4, S/4)`` low-res logits of an earlier prediction.
            multimask_output: three candidate masks (best for ambiguous single clicks) or one.
        """
        coords = labels = boxes = masks_in = None
        if point_coords is not None or point_labels is not None:
            coords, labels = self._check_points(point_coords, point_labels)
            coords, labels = coords[None], labels[None]
        if box is not None:
            boxes = self._check_boxes(np.asarray(box, dtype=np.float64).reshape(-1, 4))
        if mask_input is not None:
            masks_in = self._check_mask_input(mask_input, 1)
        out = self.predict_batch(
            point_coords=coords,
            point_labels=labels,
            boxes=boxes,
            mask_input=masks_in,
            multimask_output=multimask_output,
            return_logits=return_logits,
            _checked=True,
        )
        return Prediction(out.masks[0], out.scores[0], fill=lambda: out.low_res_logits[0])

    def predict_batch(
        self,
        *,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        _checked: bool = False,
    ) -> Prediction:
        """``B`` prompts at once, image frame: point_coords ``(B, N, 2)``, point_labels
        ``(B, N)``, boxes ``(B, 4)``, mask_input ``(B, 1, S/4, S/4)``. Returns arrays with a
        leading ``B`` axis."""
        if not _checked:
            if point_coords is not None or point_labels is not None:
                point_coords, point_labels = self._check_points(
                    point_coords, point_labels, batched=True
                )
            if boxes is not None:
                boxes = self._check_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
            if mask_input is not None:
                mask_input = self._check_mask_input(mask_input, None)
        sizes = {len(a) for a in (point_coords, boxes, mask_input) if a is not None}
        if len(sizes) > 1:
            raise PromptError(f"batched prompts disagree on the batch size: {sorted(sizes)}")
        st = self.state
        geom = self.geometry
        coords_t = labels_t = boxes_t = mask_t = None
        if point_coords is not None:
            coords_t = geom.coords_to_model(point_coords, st.original_size)
            labels_t = torch.as_tensor(point_labels, dtype=torch.int64)
        if boxes is not None:
            boxes_t = geom.boxes_to_model(boxes, st.original_size)
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float32)
        if self.backend is None and sizes == {1}:
            return self._predict_one(
                coords_t, labels_t, boxes_t, mask_t, multimask_output, return_logits
            )
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, boxes_t, mask_t, multimask_output, return_logits
        )
        return Prediction(masks.numpy(), iou.numpy(), low_res.numpy())

    def _predict_one(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        return_logits: bool,
    ) -> Prediction:
        """One prompt on the torch backend: only the image tokens are upscaled for the
        masks; the low-res logits under the padding are computed from the kept decoder
        state when :attr:`Prediction.low_res_logits` is first read."""
        crop = self._image_tokens()
        keep: dict = {}
        with torch.inference_mode():
            low, iou = self._decode_torch(
                point_coords, point_labels, boxes, mask_input, multimask_output, crop, keep=keep
            )
            low = self._full_low_res(low)
            masks = self._to_image(low, return_logits)
        decoder = self.model.mask_decoder

        def fill() -> np.ndarray:
            with torch.inference_mode():  # a no-op when the crop is the whole grid
                decoder.fill_outside_crop(low, keep, crop)
            keep.clear()
            return self._clamp_low_res(low).cpu().numpy()

        return Prediction(masks.cpu().numpy(), iou.cpu().numpy(), fill=fill)

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model-frame prompts (already transformed) -> masks ``(B, K, H, W)``, IoUs
        ``(B, K)``, low-res logits ``(B, K, S/4, S/4)``."""
        with torch.inference_mode():
            low_res, iou = self.decode_low_res(
                point_coords, point_labels, boxes, mask_input, multimask_output
            )
            masks = self._to_image(low_res, return_logits)
        return masks.cpu(), iou.cpu(), self._clamp_low_res(low_res).cpu()

    def _clamp_low_res(self, low_res: torch.Tensor) -> torch.Tensor:
        """The low-res logits as handed back for refinement (SAM 2 clamps them)."""
        limit = self.model.low_res_limit
        return low_res if limit is None else low_res.clamp(-limit, limit)

    def _to_image(self, low_res: torch.Tensor, return_logits: bool) -> torch.Tensor:
        """Low-res logits ``(B, K, S/4, S/4)`` -> masks (or logits) at image size."""
        st = self.state
        masks = self.geometry.masks_to_image(
            low_res, input_size=st.input_size, original_size=st.original_size
        )
        return masks if return_logits else masks > self.model.mask_threshold

    def _full_low_res(self, low: torch.Tensor) -> torch.Tensor:
        """Logits of a ``crop_tokens`` decode zero-padded back to ``(B, K, S/4, S/4)``."""
        side = self.model.prompt_encoder.mask_input_size
        if tuple(low.shape[-2:]) == tuple(side):
            return low
        return torch.nn.functional.pad(
            low, (0, side[1] - low.shape[-1], 0, side[0] - low.shape[-2])
        )

    def _image_tokens(self) -> tuple[int, int]:
        """The token rows and columns under the current image (see
        :func:`~segany.transforms.image_tokens`)."""
        grid = tuple(self.model.prompt_encoder.image_embedding_size)
        return self.geometry.image_tokens(self.state.input_size, grid)

    def decode_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        image_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-frame prompts -> low-res logits ``(B, K, S/4, S/4)`` and IoUs ``(B, K)`` on
        the model's device, without upsampling (for callers that filter first, e.g.
        :class:`~segany.everything.MaskGenerator`). The torch backend reuses the image's
        prepared decoder context. ``image_only``: the torch backend upscales only the
        tokens under the image (:func:`~segany.transforms.image_tokens`: every low-res cell
        that the upsampling to the image reads) and fills the other cells with zeros: same
        masks at image size, less work; not for feeding back as ``mask_input``."""
        with torch.inference_mode():
            if self.backend is not None:
                extra: dict = (
                    {"high_res_features": self.state.high_res} if self.state.high_res else {}
                )
                if isinstance(self.model, SamHQ):
                    extra["hq_token_only"] = self.hq_token_only
                return self.backend.decode(
                    self.state.embedding,
                    point_coords=point_coords,
                    point_labels=point_labels,
                    boxes=boxes,
                    mask_input=mask_input,
                    multimask_output=multimask_output,
                    **extra,
                )
            crop = self._image_tokens() if image_only else None
            low, iou = self._decode_torch(
                point_coords, point_labels, boxes, mask_input, multimask_output, crop
            )
            return self._full_low_res(low), iou

    def _decode_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        crop_tokens: tuple[int, int] | None = None,
        keep: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep`` (one chunk only): see :meth:`~segany.models.Sam.decode`."""
        dev = self.model.device
        prompts = [point_coords, point_labels, boxes, mask_input]
        n = next(len(t) for t in prompts if t is not None)
        chunk = self.decode_chunk or (CPU_DECODE_CHUNK if dev.type == "cpu" else n)
        embedding = self.state.embedding.to(dev)
        high_res = tuple(t.to(dev) for t in self.state.high_res)
        context = self._decoder_context()  # with a mask input only its PE is used
        hq = isinstance(self.model, SamHQ)
        outs = []
        for start in range(0, n, chunk):
            part = [
                None if t is None else (t[start : start + chunk] if len(t) == n else t).to(dev)
                for t in prompts
            ]
            outs.append(
                self.model.decode(
                    embedding,
                    point_coords=part[0],
                    point_labels=part[1],
                    boxes=part[2],
                    mask_input=part[3],
                    multimask_output=multimask_output,
                    context=context,
                    crop_tokens=crop_tokens,
                    keep=keep,
                    high_res_features=high_res,
                    hq_token_only=self.hq_token_only if hq else None,
                )
            )
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    # -- validation ----------------------------------------------------------------------
    def _check_points(
        self, coords: np.ndarray | None, labels: np.ndarray | None, batched: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        if coords is None or labels is None:
            raise PromptError("point_coords and point_labels must be given together")
        c = np.asarray(coords, dtype=np.float64)
        lab = np.asarray(labels)
        want = 3 if batched else 2
        if c.ndim != want or c.shape[-1] != 2:
            shape = "(B, N, 2)" if batched else "(N, 2)"
            raise PromptError(f"point_coords must have shape {shape}, got {c.shape}")
        if lab.shape != c.shape[:-1]:
            raise PromptError(
                f"point_labels shape {lab.shape} does not match point_coords {c.shape}"
            )
        if c.shape[-2] == 0:
            raise PromptError("no points given")
        if not np.isfinite(c).all():
            raise PromptError("point_coords contain NaN or infinity")
        if not np.isin(lab, (0, 1, -1)).all():
            raise PromptError(f"point_labels must be 1 (object), 0 (background) or -1; got {lab}")
        h, w = self.original_size
        outside = (c[..., 0] < 0) | (c[..., 0] > w) | (c[..., 1] < 0) | (c[..., 1] > h)
        if outside.any():
            bad = c[outside][0]
            raise PromptError(f"point ({bad[0]:g}, {bad[1]:g}) lies outside the {w}x{h} image")
        return c, lab.astype(np.int64)

    def _check_boxes(self, boxes: np.ndarray) -> np.ndarray:
        if not np.isfinite(boxes).all():
            raise PromptError("box contains NaN or infinity")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise PromptError(f"boxes must be XYXY with x0 <= x1 and y0 <= y1; got {boxes}")
        h, w = self.original_size
        clipped = boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, w)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, h)
        empty = (clipped[:, 2] <= clipped[:, 0]) & (clipped[:, 3] <= clipped[:, 1])
        if ((boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > w) | (boxes[:, 1] > h)).any():
            raise PromptError(f"box lies outside the {w}x{h} image: {boxes[0].tolist()}")
        if empty.any():
            raise PromptError("box is empty after clipping to the image")
        return clipped

    def _check_mask_input(self, mask_input: np.ndarray, batch: int | None) -> np.ndarray:
        m = np.asarray(mask_input, dtype=np.float32)
        side = self.model.prompt_encoder.mask_input_size[0]
        if batch == 1 and m.shape in ((side, side), (1, side, side)):
            return m.reshape(1, 1, side, side)
        if batch is None and m.ndim == 4 and m.shape[1:] == (1, side, side):
            return m
        raise PromptError(
            f"mask_input must be low-res logits of shape (1, {side}, {side}) "
            f"(batched: (B, 1, {side}, {side})); got {m.shape}"
        )
