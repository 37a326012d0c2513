"""Open-vocabulary detectors: image + text queries -> boxes, scores, phrases.

Adapters over Hugging Face transformers' zero-shot object detection models:

- Grounding DINO (``GroundingDinoForObjectDetection``): the queries are joined into one
  caption ``"dog . person ."`` as Grounded-SAM does; a box is kept when its best token
  probability exceeds the *box threshold* (0.3), and its phrase is made of the prompt's
  words whose token probability exceeds the *text threshold* (0.25). Each box is also
  assigned the query whose tokens score highest (its class). Captions longer than the
  model's text length are split into several runs.
- OWLv2 / OWL-ViT (``Owlv2ForObjectDetection``, ``OwlViTForObjectDetection``): one score
  per (box, query); a box is kept when its best query's probability exceeds the box
  threshold (0.1 by default, as in the model's own post-processing); its phrase is that
  query. There is no text threshold.

Every detector is loaded by :func:`load_detector` from a folder or a hub id with the same
code; where the weights are missing, :class:`DetectorWeightsError` says what to download
and where to put it.

(Past 500 lines: the catalogue, the two adapters and the loader; the loader's messages and
the adapters' thresholds both read the catalogue's specs. A split into a catalogue module
and an adapters module is the next step when a third detector comes.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..weights import WeightsError, cache_dir

#: Grounded-SAM's defaults for Grounding DINO.
BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.25
#: OWLv2's own default score threshold (its scores are lower than Grounding DINO's).
OWL_BOX_THRESHOLD = 0.1


@dataclass(frozen=True)
class DetectorSpec:
    """A catalogue entry: short name -> hub repository and the files it needs."""

    name: str
    hub_id: str
    files: tuple[str, ...]
    about: str


_GDINO_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
_OWL_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)

DETECTORS: dict[str, DetectorSpec] = {
    s.name: s
    for s in (
        DetectorSpec(
            "grounding-dino-tiny",
            "IDEA-Research/grounding-dino-tiny",
            _GDINO_FILES,
            "Grounding DINO, Swin-T backbone (172M parameters, ~0.7 GB)",
        ),
        DetectorSpec(
            "grounding-dino-base",
            "IDEA-Research/grounding-dino-base",
            _GDINO_FILES,
            "Grounding DINO, Swin-B backbone (233M parameters, ~0.9 GB)",
        ),
        DetectorSpec(
            "owlv2",
            "google/owlv2-base-patch16-ensemble",
            _OWL_FILES,
            "OWLv2, ViT-B/16 (155M parameters, ~0.6 GB)",
        ),
    )
}
DEFAULT_DETECTOR = "grounding-dino-tiny"


class DetectorError(RuntimeError):
    """A detector that cannot be used (missing extra, unsupported model, bad queries)."""


class DetectorWeightsError(DetectorError, WeightsError):
    """A detector whose files are not on this machine."""


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image.

    boxes: ``(N, 4)`` float XYXY in image pixels (clipped to the image).
    scores: ``(N,)`` detector confidence in ``[0, 1]``.
    labels: ``(N,)`` int index into ``queries`` (the query the box belongs to).
    phrases: the text each box was found for (see the module doc for each detector).
    queries: the class names that were asked for.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    phrases: list[str]
    queries: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.labels.shape != (n,) or len(self.phrases) != n:
            raise ValueError(
                f"Detections disagree on their length: boxes {self.boxes.shape}, scores "
                f"{self.scores.shape}, labels {self.labels.shape}, phrases {len(self.phrases)}"
            )

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty(queries: Sequence[str] = ()) -> Detections:
        return Detections(
            boxes=np.zeros((0, 4), np.float64),
            scores=np.zeros(0, np.float64),
            labels=np.zeros(0, np.int64),
            phrases=[],
            queries=list(queries),
        )

    def take(self, idx: Sequence[int] | np.ndarray) -> Detections:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return Detections(
            boxes=self.boxes[idx],
            scores=self.scores[idx],
            labels=self.labels[idx],
            phrases=[self.phrases[i] for i in idx.tolist()],
            queries=list(self.queries),
        )

    @staticmethod
    def concat(parts: Sequence[Detections], queries: Sequence[str]) -> Detections:
        if not parts:
            return Detections.empty(queries)
        return Detections(
            boxes=np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
            scores=np.concatenate([p.scores for p in parts]),
            labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
            phrases=[s for p in parts for s in p.phrases],
            queries=list(queries),
        )


@runtime_checkable
class Detector(Protocol):
    """What the text pipeline needs from a detector."""

    name: str
    default_box_threshold: float
    default_text_threshold: float | None

    def detect(
        self,
        image: np.ndarray,
        queries: Sequence[str],
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> Detections:
        """``(H, W, 3)`` uint8 RGB image and class names -> detections (no NMS)."""
        ...


def clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Clip XYXY boxes to an ``(H, W)`` image."""
    h, w = size
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _check_thresholds(box: float, text: float | None) -> None:
    for name, v in (("box threshold", box), ("text threshold", text)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise DetectorError(f"{name} must lie in [0, 1], got {v}")


def _check_queries(queries: Sequence[str]) -> list[str]:
    qs = [q.strip() for q in queries]
    if not qs or any(not q for q in qs):
        raise DetectorError(f"give at least one non-empty text query, got {list(queries)!r}")
    return qs


class _HFDetector:
    """Shared parts: the model, its processor, the device."""

    name = "detector"
    default_box_threshold = BOX_THRESHOLD
    default_text_threshold: float | None = TEXT_THRESHOLD

    def __init__(self, model: Any, processor: Any, *, name: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        if name is not None:
            self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> _HFDetector:
        self.model.to(device)
        return self

    def _pil(self, image: np.ndarray) -> Any:
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))


class GroundingDinoDetector(_HFDetector):
    """Grounding DINO with Grounded-SAM's thresholds (see the module doc)."""

    name = "grounding-dino"
    default_box_threshold = BOX_THRESHOLD
    default_text_threshold = TEXT_THRESHOLD

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def max_text_len(self) -> int:
        return int(getattr(self.model.config, "max_text_len", 256))

    def caption_chunks(self, queries: Sequence[str]) -> list[list[int]]:
        """Query indices grouped so that each caption ``"a . b ."`` fits the model's text
        length (``[CLS]`` and ``[SEP]`` included)."""
        budget = self.max_text_len - 2
        chunks: list[list[int]] = []
        used = 0
        for i, q in enumerate(queries):
            n = len(self.tokenizer(q.lower(), add_special_tokens=False)["input_ids"]) + 1
            if chunks and used + n <= budget:
                chunks[-1].append(i)
                used += n
            else:
                chunks.append([i])
                used = n
        return chunks

    def detect(
        self,
        image: np.ndarray,
        queries: Sequence[str],
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> Detections:
        queries = _check_queries(queries)
        bt = self.default_box_threshold if box_threshold is None else float(box_threshold)
        tt = self.default_text_threshold if text_threshold is None else float(text_threshold)
        _check_thresholds(bt, tt)
        pixels = self.processor.image_processor(images=self._pil(image), return_tensors="pt")
        parts = [
            self._detect_caption(pixels, image.shape[:2], queries, idx, bt, tt)
            for idx in self.caption_chunks(queries)
        ]
        return Detections.concat(parts, queries)

    def _detect_caption(
        self,
        pixels: Any,
        size: tuple[int, int],
        queries: list[str],
        idx: list[int],
        box_threshold: float,
        text_threshold: float,
    ) -> Detections:
        # The caption as Grounded-SAM writes it: lower case, " . " between names, final ".".
        spans: list[tuple[int, int]] = []
        caption = ""
        for i in idx:
            if caption:
                caption += " . "
            spans.append((len(caption), len(caption) + len(queries[i])))
            caption += queries[i].lower()
        caption += " ."
        enc = self.tokenizer(
            caption,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_token_type_ids=True,
            truncation=True,
            max_length=self.max_text_len,
        )
        offsets = enc.pop("offset_mapping")[0].tolist()
        ids = enc["input_ids"][0]
        # token -> position of its query in idx, -1 for specials and separators
        owner = np.full(len(offsets), -1, dtype=np.int64)
        for t, (s, e) in enumerate(offsets):
            if e <= s:
                continue
            for k, (a, b) in enumerate(spans):
                if s < b and e > a:
                    owner[t] = k
                    break
        dev = self.device
        inputs = {k: v.to(dev) for k, v in {**pixels, **enc}.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
        logits = out.logits[0].float().cpu()[:, : len(offsets)]  # (Q, T)
        probs = logits.sigmoid()
        boxes = out.pred_boxes[0].float().cpu()  # (Q, 4) cxcywh in [0, 1] of the image
        scores = probs.max(-1).values
        keep = torch.nonzero(scores > box_threshold).flatten()
        if len(keep) == 0:
            return Detections.empty(queries)
        logits, probs, boxes, scores = logits[keep], probs[keep], boxes[keep], scores[keep]
        h, w = size
        xyxy = _cxcywh_to_xyxy(boxes) * torch.tensor([w, h, w, h], dtype=torch.float32)
        # class of each box: the query whose tokens score highest (compared on logits)
        own = torch.as_tensor(owner)
        lowest = torch.full((len(logits),), float("-inf"))
        per_query = torch.stack(
            [
                logits[:, own == k].max(-1).values if (own == k).any() else lowest
                for k in range(len(idx))
            ],
            -1,
        )
        best = per_query.argmax(-1).tolist()
        labels = np.asarray([idx[k] for k in best], dtype=np.int64)
        # phrase: the prompt's words whose tokens exceed the text threshold
        in_prompt = own >= 0
        phrases = []
        for row, k in zip(probs, best, strict=True):
            sel = torch.nonzero((row > text_threshold) & in_prompt).flatten()
            text = self.tokenizer.decode(ids[sel].tolist(), skip_special_tokens=True).strip()
            phrases.append(text if text else queries[idx[k]])
        return Detections(
            boxes=clip_boxes(xyxy.numpy(), size),
            scores=scores.numpy().astype(np.float64),
            labels=labels,
            phrases=phrases,
            queries=queries,
        )


class OwlDetector(_HFDetector):
    """OWLv2 (boxes relative to the image padded to a square) or OWL-ViT (relative to the
    image)."""

    name = "owlv2"
    default_box_threshold = OWL_BOX_THRESHOLD
    default_text_threshold = None

    def __init__(
        self, model: Any, processor: Any, *, name: str | None = None, padded_square: bool = True
    ) -> None:
        super().__init__(model, processor, name=name)
        self.padded_square = padded_square

    def detect(
        self,
        image: np.ndarray,
        queries: Sequence[str],
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> Detections:
        queries = _check_queries(queries)
        bt = self.default_box_threshold if box_threshold is None else float(box_threshold)
        _check_thresholds(bt, text_threshold)
        inputs = self.processor(
            text=[[q.lower() for q in queries]],
            images=self._pil(image),
            return_tensors="pt",
            truncation=True,
        )
        dev = self.device
        with torch.inference_mode():
            out = self.model(**{k: v.to(dev) for k, v in inputs.items()})
        logits = out.logits[0].float().cpu()[:, : len(queries)]  # (P, Q)
        best, labels = logits.max(-1)  # on logits: sigmoid saturates and would tie
        scores = best.sigmoid()
        keep = torch.nonzero(scores > bt).flatten()
        if len(keep) == 0:
            return Detections.empty(queries)
        h, w = image.shape[:2]
        sx, sy = (max(h, w), max(h, w)) if self.padded_square else (w, h)
        xyxy = _cxcywh_to_xyxy(out.pred_boxes[0].float().cpu()[keep])
        xyxy = xyxy * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        lab = labels[keep].numpy().astype(np.int64)
        return Detections(
            boxes=clip_boxes(xyxy.numpy(), (h, w)),
            scores=scores[keep].numpy().astype(np.float64),
            labels=lab,
            phrases=[queries[i] for i in lab.tolist()],
            queries=queries,
        )


# --------------------------------------------------------------------------- loading


def detectors_dir() -> Path:
    """Where detector folders are looked for by name: ``<segany cache>/detectors``."""
    return cache_dir() / "detectors"


def setup_command(spec: DetectorSpec, dest: Path | None = None) -> str:
    """The one line that puts a catalogue detector in place on a connected machine (``hf``
    is the command line of ``huggingface_hub``, installed with the ``text`` extra)."""
    dest = dest if dest is not None else detectors_dir() / spec.name
    return f"hf download {spec.hub_id} --local-dir {dest}"


def _spec_for(text: str) -> DetectorSpec | None:
    """The catalogue entry for a short name or hub id; an ad-hoc entry for another hub id."""
    if text in DETECTORS:
        return DETECTORS[text]
    for s in DETECTORS.values():
        if s.hub_id == text:
            return s
    if _HUB_ID.fullmatch(text):
        return DetectorSpec(
            text.replace("/", "--"),
            text,
            ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer files"),
            "a Grounding DINO, OWLv2 or OWL-ViT model",
        )
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _missing_message(spec: DetectorSpec, cause: str) -> str:
    dest = detectors_dir() / spec.name
    return (
        f"the detector {spec.name!r} ({spec.about}) is not on this machine and the model hub "
        f"cannot be reached ({cause}). Download the files of the hub repository "
        f"{spec.hub_id} ({', '.join(spec.files)}) into the folder {dest} (or into any "
        f"folder, then pass --detector FOLDER). On a machine with network access this does "
        f"it:\n  {setup_command(spec)}\nthen copy {dest} to the same place here."
    )


def _folder_message(folder: Path, cause: str) -> str:
    return (
        f"cannot load a detector from {folder}: {cause}. Give a catalogue name "
        f"({', '.join(DETECTORS)}), a Hugging Face hub id, or a folder holding the model's "
        "config.json, weights (model.safetensors), preprocessor_config.json and tokenizer "
        "files, as written by save_pretrained or downloaded from the hub."
    )


def load_detector(
    detector: str | os.PathLike[str] = DEFAULT_DETECTOR,
    *,
    device: str | torch.device = "cpu",
) -> GroundingDinoDetector | OwlDetector:
    """Load a detector from a catalogue name (``grounding-dino-tiny``, ``grounding-dino-base``,
    ``owlv2``), a hub id (``IDEA-Research/grounding-dino-tiny``) or a local folder.

    A name or hub id is looked for first in ``detectors_dir()/NAME``, then in Hugging Face's
    cache, and only then on the hub (not at all with ``HF_HUB_OFFLINE=1``). Real weights
    and the tests' tiny models take the same path.
    """
    text = os.fspath(detector)
    path = Path(text).expanduser()
    spec = None if path.is_dir() else _spec_for(text)
    if spec is None:  # a folder
        if not path.is_dir():
            raise DetectorWeightsError(_folder_message(path, "no such folder"))
        if not (path / "config.json").is_file():
            raise DetectorWeightsError(_folder_message(path, "it has no config.json"))
        model, processor = _from_pretrained(str(path), local=True, spec=None)
        name = path.name
    else:
        cand = detectors_dir() / spec.name
        local = (cand / "config.json").is_file()
        source = str(cand) if local else spec.hub_id
        model, processor = _from_pretrained(source, local=local, spec=spec)
        name = spec.name
    return _wrap(model, processor, name=name).to(device)


def _from_pretrained(source: str, *, local: bool, spec: DetectorSpec | None) -> tuple[Any, Any]:
    try:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    except ImportError as exc:
        raise DetectorError(
            "text prompts need Hugging Face transformers: pip install 'segany[text]'"
        ) from exc

    def load(local_only: bool) -> tuple[Any, Any]:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(
            source, local_files_only=local_only
        )
        return model, processor

    try:
        return load(True)  # a folder, or the hub id already in Hugging Face's cache
    except (OSError, ValueError) as first:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if spec is None:
            raise DetectorWeightsError(_folder_message(Path(source), _short(first))) from first
        if local or offline:
            raise DetectorWeightsError(_missing_message(spec, _short(first))) from first
    try:
        return load(False)
    except (OSError, ValueError) as exc:
        raise DetectorWeightsError(_missing_message(spec, _short(exc))) from exc


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _wrap(model: Any, processor: Any, *, name: str) -> GroundingDinoDetector | OwlDetector:
    kind = getattr(model.config, "model_type", "")
    if kind in ("grounding-dino", "mm-grounding-dino"):
        return GroundingDinoDetector(model, processor, name=name)
    if kind == "owlv2":
        return OwlDetector(model, processor, name=name, padded_square=True)
    if kind == "owlvit":
        return OwlDetector(model, processor, name=name, padded_square=False)
    raise DetectorError(
        f"detector model type {kind!r} is not supported (Grounding DINO, OWLv2 and OWL-ViT are)"
    )
