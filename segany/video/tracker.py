"""Follow objects through a video with any image model (SAM 1, MobileSAM): each frame is
prompted from the object's mask on the frame before.

SAM 1 checkpoints have no memory of earlier frames, so the previous frame's result becomes
the next frame's prompt: its box (grown by a margin, for motion), the interior point
farthest from its boundary (a positive click), and its low-resolution logits as the mask
input. :class:`Propagation` says which of these are used; the default is what measured best
on DAVIS-2016 (docs/video.md). An object whose mask vanishes is *lost*: the next frames are
prompted with its last box, grown once more per frame, until it is found again.

Frames are embedded once each (the predictor's embedding cache); all objects of a frame
are decoded in one batch. Where objects overlap, a pixel goes to the object with the
highest logit. Masks are kept as compressed RLE, so memory grows with the masks, not with
frames times pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import masks as M
from ..eval.clicks import farthest_point
from ..predictor import Predictor
from ..videos import VideoSource


@dataclass(frozen=True)
class ObjectPrompt:
    """A prompt for one object on one frame, image pixels: clicks ``points`` ``(N, 2)``
    ``(x, y)`` with ``labels`` ``(N,)`` (1 object, 0 background), a ``box`` XYXY, and/or a
    ``mask`` ``(H, W)`` bool (taken as the object's mask on that frame as it is)."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.points is None and self.box is None and self.mask is None:
            raise ValueError("an object prompt needs points, a box or a mask")
        if (self.points is None) != (self.labels is None):
            raise ValueError("points and labels go together")


@dataclass(frozen=True)
class Propagation:
    """How the previous frame's mask prompts the next frame.

    box: its bounding box, grown by ``margin`` of its size on each side (at least 2 px);
    point: a positive click at its interior point farthest from the boundary;
    mask_input: its low-res logits as the decoder's mask input;
    candidates: ask for the decoder's three masks and keep the one that overlaps the
    previous mask most (IoU), instead of its single-mask answer.

    The defaults (box and candidates, no point) measured best on DAVIS-2016 val with
    MobileSAM: J&F 0.828 against 0.746 for box + point and 0.775 for the box alone
    (docs/video.md).
    """

    box: bool = True
    point: bool = False
    mask_input: bool = False
    candidates: bool = True
    margin: float = 0.1
    #: a lost object's last box grows by this fraction per frame while it is searched for
    search_growth: float = 0.1


@dataclass
class TrackResult:
    """Masks per frame and object: ``masks[frame][object]`` compressed COCO RLE,
    ``scores[frame][object]`` predicted IoU (1.0 for a given mask), for frames ``names``
    of size ``(H, W)``."""

    names: list[str]
    size: tuple[int, int]
    object_ids: list[int]
    masks: dict[int, dict[int, dict]] = field(default_factory=dict)
    scores: dict[int, dict[int, float]] = field(default_factory=dict)

    def mask(self, frame: int, obj: int) -> np.ndarray:
        """``(H, W)`` bool (empty where the object was not tracked)."""
        rle = self.masks.get(frame, {}).get(obj)
        return M.rle_to_mask(rle) if rle is not None else np.zeros(self.size, bool)

    def label_map(self, frame: int) -> np.ndarray:
        """``(H, W)`` uint16: each pixel the id of its object, 0 for background."""
        out = np.zeros(self.size, np.uint16)
        for obj in self.object_ids:
            if obj in self.masks.get(frame, {}):
                out[self.mask(frame, obj)] = obj
        return out


class PropagationTracker:
    """Tracks objects through a :class:`~segany.videos.VideoSource` with a
    :class:`~segany.predictor.Predictor` (SAM 1 family)."""

    def __init__(self, predictor: Predictor, *, propagation: Propagation | None = None) -> None:
        self.predictor = predictor
        self.propagation = propagation or Propagation()

    def track(
        self,
        video: VideoSource,
        prompts: Mapping[int, Mapping[int, ObjectPrompt]],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> TrackResult:
        """Prompts by frame index and object id -> masks on every frame.

        Each object starts at the first frame that prompts it and is followed forward to
        the end; a later prompt of the same object (a correction) replaces its mask on
        that frame and the frames after follow from it. Frames before an object's first
        prompt are followed backward from it. ``progress(n)`` is called after each frame.
        """
        if not prompts:
            raise ValueError("no prompts: give at least one object on one frame")
        n = len(video)
        for f in prompts:
            if not 0 <= f < n:
                raise ValueError(f"frame {f} is outside the video's {n} frames")
        objects = sorted({o for per in prompts.values() for o in per})
        result = TrackResult(list(video.names), video.size, objects)
        first = {o: min(f for f, per in prompts.items() if o in per) for o in objects}
        start = min(first.values())
        # forward: from the first prompted frame to the end
        state: dict[int, _State] = {}
        for f in range(start, n):
            here = {o: p for o, p in prompts.get(f, {}).items()}
            active = [o for o in objects if o in state or o in here]
            self._step(video, f, here, [o for o in active if o not in here], state, result)
            if progress:
                progress(1)
        # backward: each object from its first prompt to the video's start
        state = {}
        for f in range(max(first.values()) - 1, -1, -1):
            for o in objects:
                if first[o] == f + 1:
                    state[o] = _State.from_result(result, f + 1, o, self.propagation)
            follow = [o for o in objects if o in state and f < first[o]]
            if follow:
                self._step(video, f, {}, follow, state, result)
                if progress:
                    progress(1)
        return result

    # -- one frame -----------------------------------------------------------------------
    def _step(
        self,
        video: VideoSource,
        f: int,
        prompted: Mapping[int, ObjectPrompt],
        follow: list[int],
        state: dict[int, _State],
        result: TrackResult,
    ) -> None:
        if not prompted and not follow:
            return
        h, w = video.size
        logits: dict[int, np.ndarray] = {}
        low: dict[int, np.ndarray | None] = {}
        scores: dict[int, float] = {}
        decode = [o for o, p in prompted.items() if p.mask is None] + follow
        if decode:
            self.predictor.set_image(video.frame(f))
        for o, p in prompted.items():
            if p.mask is not None:
                if p.mask.shape != (h, w):
                    raise ValueError(f"object {o}: mask {p.mask.shape} on {h}x{w} frames")
                logits[o] = np.where(p.mask, 1.0, -1.0).astype(np.float32)
                low[o], scores[o] = None, 1.0
            else:
                pred = self.predictor.predict(
                    point_coords=p.points,
                    point_labels=p.labels,
                    box=p.box,
                    multimask_output=p.box is None and p.points is not None and len(p.points) == 1,
                    return_logits=True,
                )
                k = int(np.argmax(pred.scores))
                logits[o], low[o], scores[o] = (
                    pred.masks[k],
                    pred.low_res_logits[k],
                    float(pred.scores[k]),
                )
        if follow:
            batch = self._propagate(follow, state, (h, w))
            for o, (lg, lr, sc) in zip(follow, batch, strict=True):
                logits[o], low[o], scores[o] = lg, lr, sc
        # a contested pixel goes to the object with the highest logit
        ids = list(logits)
        stack = np.stack([logits[o] for o in ids])
        win = stack.argmax(0)
        masks = [(stack[i] > 0) & (win == i) for i in range(len(ids))]
        enc = M.masks_to_coco_rle(np.stack(masks))
        frame_masks = result.masks.setdefault(f, {})
        frame_scores = result.scores.setdefault(f, {})
        for i, o in enumerate(ids):
            frame_masks[o] = enc[i]
            frame_scores[o] = scores[o]
            state[o] = _State.update(state.get(o), masks[i], low[o], self.propagation)

    def _propagate(
        self, objects: list[int], state: dict[int, _State], size: tuple[int, int]
    ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Decode the followed objects, batched by the kind of prompt each can take (a lost
        object has no point and no mask input)."""
        cfg = self.propagation
        out: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        groups: dict[tuple[bool, bool], list[int]] = {}
        for o in objects:
            s = state[o]
            key = (cfg.point and s.point is not None, cfg.mask_input and s.low_res is not None)
            groups.setdefault(key, []).append(o)
        for (use_point, use_mask), group in groups.items():
            st = [state[o] for o in group]
            pred = self.predictor.predict_batch(
                boxes=np.stack([s.box for s in st]) if cfg.box or not use_point else None,
                point_coords=np.stack([s.point for s in st])[:, None] if use_point else None,
                point_labels=np.ones((len(group), 1)) if use_point else None,
                mask_input=np.stack([s.low_res for s in st])[:, None] if use_mask else None,
                multimask_output=cfg.candidates,
                return_logits=True,
            )
            low = pred.low_res_logits
            for i, o in enumerate(group):
                k = 0
                if cfg.candidates and state[o].mask is not None:
                    prev = state[o].mask
                    k = int(np.argmax([_iou(pred.masks[i, j] > 0, prev) for j in range(3)]))
                out[o] = (pred.masks[i, k], low[i, k], float(pred.scores[i, k]))
        return [out[o] for o in objects]


@dataclass
class _State:
    """What the next frame is prompted with for one object."""

    box: np.ndarray  # XYXY, float, clipped to the frame
    point: np.ndarray | None  # (2,) x, y; None while lost
    low_res: np.ndarray | None
    lost: int = 0
    mask: np.ndarray | None = None  # (H, W) bool, the last mask (kept only when needed)

    @classmethod
    def update(
        cls, old: _State | None, mask: np.ndarray, low: np.ndarray | None, cfg: Propagation
    ) -> _State:
        h, w = mask.shape
        found = farthest_point(mask)
        if found is None:  # lost: search around the last box, a little wider each frame
            if old is None:
                return cls(np.array([0.0, 0.0, w, h]), None, None, lost=1)
            return cls(_grow(old.box, cfg.search_growth, h, w), None, None, old.lost + 1)
        ys, xs = np.nonzero(mask)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        keep = mask if cfg.candidates else None
        return cls(_grow(box, cfg.margin, h, w), np.array(found[:2], float), low, mask=keep)

    @classmethod
    def from_result(cls, result: TrackResult, f: int, obj: int, cfg: Propagation) -> _State:
        return cls.update(None, result.mask(f, obj), None, cfg)


def _grow(box: np.ndarray, margin: float, h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    dx = max(2.0, margin * (x1 - x0))
    dy = max(2.0, margin * (y1 - y0))
    return np.array([max(0.0, x0 - dx), max(0.0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
