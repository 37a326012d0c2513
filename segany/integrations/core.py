"""What every tool contract of ``segany serve`` shares: one :class:`ModelSession` (one model,
one thread-safe embedding cache in memory and on disk, the decode concurrency and thread
settings), the image decoding of request bodies (base64 / data URIs, with the pixel limit)
and the mask -> polygon step.

The contracts (:mod:`.cvat`, :mod:`.xanylabeling`, ``labelstudio``) only translate their
tool's request and answer shapes; every number comes from here. Errors are the annotator's
:class:`~segany.engine.schemas.ServiceError` classes (each with its HTTP status), which each
contract turns into its tool's error shape.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import masks as M

# The annotator's errors (each with its HTTP status) and limits: one set for every server.
from ..engine.schemas import (
    DEFAULT_MAX_PIXELS,
    MAX_POINTS,
    BadRequest,
    Conflict,
    NotFound,
    ServiceError,
    Unprocessable,
)
from ..predictor import (
    ImageEmbedding,
    LockedEmbeddingCache,
    Prediction,
    Predictor,
    PromptError,
    image_key,
)
from ..runtime import DecodeSlots, available_cpus, default_threads, torch_threads
from ..transforms import ImageError, load_image

log = logging.getLogger("segany.serve")

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_POINTS",
    "BadRequest",
    "Conflict",
    "ModelSession",
    "NotFound",
    "ServiceError",
    "Unprocessable",
    "decode_base64",
    "mask_polygons",
]


def decode_base64(data: Any, what: str = "image") -> bytes:
    """The bytes of a base64 string or a ``data:<type>;base64,<...>`` URI (the shapes CVAT
    and X-AnyLabeling send); :class:`BadRequest` naming ``what`` otherwise."""
    if isinstance(data, (bytes, bytearray)):
        text = bytes(data).decode("latin-1")
    elif isinstance(data, str):
        text = data
    else:
        raise BadRequest(f"{what}: expected a base64 string, got {type(data).__name__}")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{what}: a data URI must be 'data:<type>;base64,<data>'")
    text = "".join(text.split())  # line breaks of MIME-style base64
    if not text:
        raise BadRequest(f"{what}: empty")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what}: not valid base64") from None


def mask_polygons(mask: np.ndarray, *, min_points: int = 3) -> list[list[list[float]]]:
    """The outer contours of a mask as ``[[x, y], ...]`` lists in image pixels, largest
    first (:func:`segany.masks.mask_to_polygons`)."""
    return [p.tolist() for p in M.mask_to_polygons(mask, min_points=min_points)]


class ModelSession:
    """One model shared by every contract of a ``segany serve`` process.

    Args:
        predictor: a :class:`~segany.Predictor` whose model, model id and backend are used
            (its own cache is not: the session keeps one thread-safe cache).
        name: shown to the tools (model lists, ``/health``).
        cache_dir: embeddings on disk (``None``: memory only); the key is the one of
            :meth:`Predictor.set_image` and the annotator (model id, backend, image content),
            so ``segany annotate``, ``segany serve`` and scripts share the files.
        memory_items: embeddings kept in memory.
        max_pixels: larger images are refused (413-like 422 with the limit).
        model_concurrency: prompts decoded at the same time (default: one per CPU).
        decode_threads: torch threads of one decode (default 1, as the annotator; ``None``:
            the cores the other decodes leave free, :class:`~segany.runtime.DecodeSlots`).
        embed_threads: torch threads of the image encoder (default: every core).
        detector: the text detector for text prompts: a name, hub id or folder (loaded on
            first use), or a ready object with :class:`segany.text.Detector`'s interface.
            ``None``: text prompts are refused with a 4xx naming ``--detector``.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        name: str = "model",
        cache_dir: str | Path | None = None,
        memory_items: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        model_concurrency: int | None = None,
        decode_threads: int | None = 1,
        embed_threads: int | None = None,
        detector: str | os.PathLike[str] | Any | None = None,
    ) -> None:
        self.name = name
        self.model = predictor.model
        self.model_id = predictor.model_id
        self._backend = getattr(predictor, "backend", None)
        self.backend_name = (
            "torch"
            if self._backend is None
            else str(getattr(predictor, "backend_name", None) or "onnx")
        )
        tag = "" if self._backend is None else f"-{self.backend_name}"
        self._key_prefix = f"{self.model_id}{tag}"
        self.cache = LockedEmbeddingCache(cache_dir, max_items=memory_items)
        self.max_pixels = int(max_pixels)
        self.embed_threads = max(1, embed_threads or default_threads())
        self._decode = DecodeSlots(
            model_concurrency or available_cpus(), decode_threads, self.embed_threads
        )
        self.model_concurrency = self._decode.concurrency
        self.decode_threads = self._decode.threads  #: None: adaptive (see DecodeSlots)
        self._tls = threading.local()
        self._key_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._detector_lock = threading.Lock()
        self._detector: Any = None
        self._detector_source: str | None = None
        self.detector_name: str | None = None
        if isinstance(detector, (str, os.PathLike)):
            self._detector_source = os.fspath(detector)
            path = Path(self._detector_source).expanduser()
            self.detector_name = path.name if path.is_dir() else self._detector_source
        elif detector is not None:
            self._detector = detector
            self.detector_name = str(getattr(detector, "name", type(detector).__name__))
        self.started = time.time()
        #: what the model was loaded from (catalogue name or path; set by build_session):
        #: the base a fine-tune starts from
        self.model_source: str | None = None

    # -- images ------------------------------------------------------------------------------
    def read_image(self, data: bytes) -> np.ndarray:
        """Decoded RGB pixels of an encoded image (PNG, JPEG, ...; EXIF orientation applied)
        under the pixel limit; :class:`Unprocessable` with the reason otherwise."""
        if not data:
            raise BadRequest("image: empty")
        try:
            return load_image(bytes(data), max_pixels=self.max_pixels)
        except ImageError as exc:
            raise Unprocessable(f"image: {exc}") from None

    def image_from_base64(self, data: Any, what: str = "image") -> np.ndarray:
        """:func:`decode_base64` then :meth:`read_image`."""
        return self.read_image(decode_base64(data, what))

    # -- embeddings --------------------------------------------------------------------------
    def cache_key(self, rgb: np.ndarray) -> str:
        return f"{self._key_prefix}-{image_key(rgb)}"

    def _key_lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            lock = self._key_locks.get(key)
            if lock is None:
                if len(self._key_locks) > 1024:  # locks of long-gone images
                    self._key_locks = {k: v for k, v in self._key_locks.items() if v.locked()}
                lock = self._key_locks[key] = threading.Lock()
            return lock

    def embedding(self, rgb: np.ndarray) -> ImageEmbedding:
        """The image's embedding from memory, disk, or computed now (once: concurrent
        requests for the same image wait for the first)."""
        key = self.cache_key(rgb)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        with self._key_lock(key):
            hit = self.cache.get(key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            with torch_threads(self.embed_threads):
                item = self.predictor().embed(rgb)
            self.cache.put(key, item)
            dt = time.perf_counter() - t0
            log.info("embedded a %dx%d image in %.2fs", rgb.shape[1], rgb.shape[0], dt)
            return item

    def predictor(self) -> Predictor:
        """This thread's predictor over the shared model and cache (a predictor holds the
        current image, so request threads never share one)."""
        p = getattr(self._tls, "predictor", None)
        if p is None or p.model is not self.model:  # none yet, or switch_model() since
            kwargs: dict[str, Any] = {"cache": self.cache, "model_id": self.model_id}
            if self._backend is not None:
                kwargs["backend"] = self._backend
            p = Predictor(self.model, **kwargs)
            self._tls.predictor = p
        return p

    # -- prompts -----------------------------------------------------------------------------
    def predict(
        self,
        rgb: np.ndarray,
        *,
        points: Sequence[Sequence[float]] = (),
        labels: Sequence[int] = (),
        box: Sequence[float] | None = None,
        multimask: bool = False,
    ) -> Prediction:
        """Masks for one prompt in image pixels: ``points`` ``[[x, y], ...]`` with
        ``labels`` (1 object, 0 background) and/or ``box`` XYXY. :class:`Unprocessable` for
        a prompt the model cannot use (the reason is the predictor's)."""
        if len(points) != len(labels):
            raise Unprocessable(f"{len(points)} points but {len(labels)} labels")
        if len(points) > MAX_POINTS:
            raise Unprocessable(f"at most {MAX_POINTS} points per prompt, got {len(points)}")
        if not len(points) and box is None:
            raise Unprocessable("give at least one point or a box")
        emb = self.embedding(rgb)
        p = self.predictor()
        if not (p.is_image_set and p.state is emb):
            p.set_embedding(emb)
        try:
            coords = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else None
            labs = np.asarray(labels, dtype=np.int64).reshape(-1) if len(points) else None
            bx = np.asarray(box, dtype=np.float64).reshape(4) if box is not None else None
        except (TypeError, ValueError):
            raise Unprocessable("points must be [x, y] pairs and a box 4 numbers") from None
        if labs is not None and not np.isin(labs, (0, 1)).all():
            raise Unprocessable("point labels must be 1 (object) or 0 (background)")
        try:
            with self._decode.decode():
                return p.predict(
                    point_coords=coords, point_labels=labs, box=bx, multimask_output=multimask
                )
        except PromptError as exc:
            raise Unprocessable(str(exc)) from None

    def best_mask(
        self,
        rgb: np.ndarray,
        *,
        points: Sequence[Sequence[float]] = (),
        labels: Sequence[int] = (),
        box: Sequence[float] | None = None,
        multimask: bool | None = None,
    ) -> tuple[np.ndarray, float]:
        """The highest-scoring mask of a prompt and its predicted IoU. ``multimask`` defaults
        to SAM's rule: three candidates for a single point without a box, else one."""
        if multimask is None:
            multimask = len(points) == 1 and box is None
        pred = self.predict(rgb, points=points, labels=labels, box=box, multimask=multimask)
        k = int(np.argmax(pred.scores))
        return np.asarray(pred.masks[k], dtype=bool), float(pred.scores[k])

    # -- text prompts ------------------------------------------------------------------------
    def text_detector(self) -> Any:
        """The text detector (loaded once, on first use); :class:`Conflict` (409) when none
        is configured or it cannot be loaded."""
        with self._detector_lock:
            if self._detector is None:
                if self._detector_source is None:
                    raise Conflict(
                        "text prompts need a text detector: start the server with "
                        "--detector NAME|FOLDER (grounding-dino-tiny, owlv2, ...; "
                        "pip install 'segany[text]')"
                    )
                from ..text import DetectorError, load_detector

                try:
                    self._detector = load_detector(self._detector_source)
                except DetectorError as exc:
                    raise Conflict(f"the text detector cannot be loaded: {exc}") from None
                self.detector_name = str(getattr(self._detector, "name", self.detector_name))
                log.info("text detector %s loaded", self.detector_name)
            return self._detector

    def segment_text(
        self,
        rgb: np.ndarray,
        text: str,
        *,
        box_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> Any:
        """Text -> detector boxes -> SAM masks (:class:`segany.text.TextSegmenter`), with
        this session's predictor and cache: a :class:`~segany.text.TextSegmentation`."""
        from ..text import MAX_DETECTIONS, TextSegmenter, parse_queries

        detector = self.text_detector()
        try:
            queries = parse_queries(text)
        except ValueError as exc:
            raise Unprocessable(f"text prompt: {exc}") from None
        if not queries:
            raise Unprocessable("text prompt: no class names in it")
        seg = TextSegmenter(
            self.predictor(),
            detector,
            box_threshold=box_threshold,
            max_detections=max_detections if max_detections is not None else MAX_DETECTIONS,
        )
        self.embedding(rgb)  # computed once, under the session's lock and thread settings
        with self._decode:
            return seg.segment(rgb, queries)

    def switch_model(self, predictor: Predictor, *, name: str) -> dict[str, Any]:
        """Serve ``predictor``'s model from now on (e.g. after a fine-tune): requests already
        decoding finish with the old one; each thread's predictor is remade on its next
        request. The embeddings stay cached under the old model id (a decoder fine-tune
        keeps the image encoder, but ids are per weights)."""
        previous = {"model": self.name, "model_id": self.model_id}
        backend = getattr(predictor, "backend", None)
        tag = "" if backend is None else f"-{getattr(predictor, 'backend_name', 'onnx')}"
        self.model_id = predictor.model_id
        self._backend = backend
        self.backend_name = tag[1:] or "torch"
        self._key_prefix = f"{self.model_id}{tag}"
        self.name = name
        self.model = predictor.model  # last: predictor() compares it
        log.info("switched model: %s -> %s", previous["model"], name)
        return {"model": name, "model_id": self.model_id, "previous": previous}

    # -- description -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_id": self.model_id,
            "backend": self.backend_name,
            "detector": self.detector_name,
            "embeddings_in_memory": self.cache.items_in_memory(),
            "max_pixels": self.max_pixels,
            "uptime_s": round(time.time() - self.started, 1),
        }


def build_session(
    model: str | os.PathLike[str] = "mobile_sam",
    *,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    memory_items: int = 16,
    max_pixels: int | None = None,
    detector: str | None = None,
) -> ModelSession:
    """Load the model (catalogue name or checkpoint path) into a :class:`ModelSession`; the
    embeddings go to ``~/.cache/segany/embeddings`` unless ``cache_dir`` says otherwise (the
    annotator's folder: both servers reuse each other's embeddings)."""
    from ..loader import load_predictor
    from ..weights import cache_dir as segany_cache

    predictor = load_predictor(model, backend=backend)
    text = os.fspath(model)
    session = ModelSession(
        predictor,
        name=Path(text).name if Path(text).suffix else text,
        cache_dir=cache_dir if cache_dir is not None else segany_cache() / "embeddings",
        memory_items=memory_items,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        detector=detector,
    )
    session.model_source = text
    return session
