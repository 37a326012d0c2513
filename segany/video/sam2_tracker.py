"""Follow objects through a video with SAM 2's memory (the behaviour of the reference
``SAM2VideoPredictor``, ``sam2==1.1.0``).

A :class:`Sam2Session` holds one video and its objects. Per object it keeps a memory bank:

- *conditioning* frames: frames the user prompted (the first prompt of an object, and with
  ``add_all_frames_to_correct_as_cond`` every correction); every later frame attends to
  all of them;
- *non-conditioning* frames: frames the tracker predicted; a frame attends to the
  ``num_maskmem - 1`` frames just before it (after it, tracking backward), and to the
  object pointers of up to 16 frames (only those in the past of the direction of travel).

Prompts (clicks, a box, a mask) may be given on any frame; they are decoded at once (the
masks come back) and written to the memory when propagation starts. Propagation runs
forward or backward from any frame; all objects are tracked on each frame (each with its
own memory), and the frame's image features are computed once for all of them.

Memory use is bounded on long videos: frames are read from the
:class:`~segany.videos.VideoSource` when needed (the reference loads the whole video
at model resolution), image features are kept for the current frame only, and the encoded
memory of a predicted frame is dropped once it is ``memory_window`` frames away from the
frame being tracked (it is recomputed, with the same result, if a later propagation needs it
again). What stays per frame and object is the low-res logits, the object pointer and the
object score.

:class:`Sam2Tracker` gives the :class:`~segany.video.tracker.TrackResult` of the
propagation tracker, so ``segany track`` and ``segany eval video`` can use either.

(Longer than 500 lines because the session's memory bank and the tracker that drives it
share their private state; split, each would reach into the other.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import masks as M
from ..models.sam2_video import NO_OBJ_SCORE, HeadsOutput, Sam2Video
from ..predictor import Predictor
from ..transforms import SquareGeometry, video_frame_to_model_input
from ..videos import VideoSource
from .tracker import ObjectPrompt, PropagationTracker, TrackResult


@dataclass
class FrameOutput:
    """One object on one frame: low-res logits ``pred_masks`` ``(1, 1, S/4, S/4)``, the
    object pointer ``obj_ptr`` ``(1, C)``, ``score`` ``(1, 1)`` (object-score logit), and
    the encoded memory ``maskmem`` ``(1, mem_dim, S/16, S/16)`` (bfloat16, as the reference
    stores it; ``None`` until encoded or after being dropped). ``binarize``: the memory is
    (to be) encoded from the thresholded mask (frames prompted with clicks)."""

    pred_masks: torch.Tensor
    obj_ptr: torch.Tensor
    score: torch.Tensor
    maskmem: torch.Tensor | None = None
    binarize: bool = False


@dataclass
class _Object:
    points: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    temp_cond: dict[int, FrameOutput] = field(default_factory=dict)
    temp_non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    tracked: dict[int, bool] = field(default_factory=dict)  # frame -> tracked in reverse

    def output(self, frame: int, temp_first: dict[int, FrameOutput] | None = None):
        for src in (temp_first or {}, self.cond, self.non_cond):
            if frame in src:
                return src[frame]
        return None


class Sam2Session:
    """One video being annotated: objects, their prompts and memory banks.

    Coordinates are video pixels ``(x, y)``; masks ``(H, W)`` at video size. Outputs are
    logits at video size ``(objects, 1, H, W)`` (positive inside), objects in the order
    they were first prompted (:attr:`object_ids`).
    """

    def __init__(self, tracker: Sam2Tracker, video: VideoSource) -> None:
        self.tracker = tracker
        self.model = tracker.model
        self.video = video
        self.num_frames = len(video)
        if self.num_frames == 0:
            raise ValueError("the video has no frames")
        self.height, self.width = video.size
        self.object_ids: list[int] = []
        self._objects: list[_Object] = []
        self._features: dict[int, tuple] = {}  # the current frame's (and one more)
        self._maskmem_pos: torch.Tensor | None = None
        self.geometry = SquareGeometry(img_size=self.model.img_size)

    # -- bookkeeping -----------------------------------------------------------------------
    def _index(self, obj_id: int) -> int:
        if obj_id not in self.object_ids:
            self.object_ids.append(obj_id)
            self._objects.append(_Object())
        return self.object_ids.index(obj_id)

    def _check_frame(self, frame: int) -> None:
        if not 0 <= frame < self.num_frames:
            raise ValueError(f"frame {frame} is outside the video's {self.num_frames} frames")

    def reset(self) -> None:
        """Forget every object, prompt and memory."""
        self.object_ids.clear()
        self._objects.clear()
        self._features.clear()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def features(self, frame: int, *, keep: bool = True) -> tuple:
        """The frame's raw stride-16 map, its position encoding and high-res maps,
        computed once per frame while it is one of the two last ``keep`` frames."""
        if frame in self._features:
            return self._features[frame]
        model = self.model
        x = video_frame_to_model_input(
            self.video.frame(frame),
            model.img_size,
            pixel_mean=model.pixel_mean,
            pixel_std=model.pixel_std,
        )
        feats = model.frame_features(x, encoder=self.tracker.encoder)
        if keep:
            while len(self._features) >= 2:
                del self._features[next(iter(self._features))]
            self._features[frame] = feats
        return feats

    # -- prompts ---------------------------------------------------------------------------
    def add_prompt(
        self,
        frame: int,
        obj_id: int,
        *,
        points: np.ndarray | torch.Tensor | None = None,
        labels: np.ndarray | torch.Tensor | None = None,
        box: np.ndarray | torch.Tensor | None = None,
        clear_old_points: bool = True,
        relative: bool = False,
    ) -> torch.Tensor:
        """Clicks ``points`` ``(N, 2)`` with ``labels`` ``(N,)`` (1 object, 0 background)
        and/or a ``box`` XYXY for one object on one frame, in video pixels (``relative``:
        in 0-1 units of the frame's width and height). ``clear_old_points=False`` adds the
        clicks to the frame's earlier ones. Returns the frame's logits at video size for all
        objects."""
        self._check_frame(frame)
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if points is None and box is None:
            raise ValueError("give points or a box")
        pts = torch.as_tensor(
            np.zeros((0, 2)) if points is None else points, dtype=torch.float32
        ).reshape(1, -1, 2)
        lab = torch.as_tensor(np.zeros(0) if labels is None else labels, dtype=torch.int32).reshape(
            1, -1
        )
        if pts.shape[1] != lab.shape[1]:
            raise ValueError(f"{pts.shape[1]} points but {lab.shape[1]} labels")
        if box is not None:
            if not clear_old_points:
                raise ValueError("a box replaces the frame's clicks: use clear_old_points=True")
            corners = torch.as_tensor(box, dtype=torch.float32).reshape(1, 2, 2)
            pts = torch.cat([corners, pts], dim=1)
            lab = torch.cat([torch.tensor([[2, 3]], dtype=torch.int32), lab], dim=1)
        if relative:
            pts = pts * self.model.img_size
        else:
            pts = self.geometry.coords_to_model(pts, (self.height, self.width))
        pts, lab = pts.to(self.device), lab.to(self.device)
        idx = self._index(obj_id)
        obj = self._objects[idx]
        old = None if clear_old_points else obj.points.get(frame)
        if old is not None:
            pts, lab = torch.cat([old[0], pts], dim=1), torch.cat([old[1], lab], dim=1)
        obj.points[frame] = (pts, lab)
        obj.mask_inputs.pop(frame, None)
        is_init = frame not in obj.tracked
        reverse = False if is_init else obj.tracked[frame]
        is_cond = is_init or self.tracker.add_all_frames_to_correct_as_cond
        temp = obj.temp_cond if is_cond else obj.temp_non_cond
        prev = obj.output(frame, temp)
        prev_logits = None
        if prev is not None:
            prev_logits = prev.pred_masks.to(self.device).clamp(-32.0, 32.0)
        out, _ = self._infer(
            idx, frame, is_init, points=(pts, lab), reverse=reverse, prev_logits=prev_logits
        )
        temp[frame] = out
        return self._consolidated(frame, is_cond)

    def add_mask(self, frame: int, obj_id: int, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A mask ``(H', W')`` (any size; resized to the model's square) for one object on
        one frame, taken as the object's mask there. Returns the frame's logits at video
        size for all objects."""
        self._check_frame(frame)
        m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        if m.dim() != 2:
            raise ValueError(f"a mask is (H, W), not {tuple(m.shape)}")
        x = m[None, None].float().to(self.device)
        s = self.model.img_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            x = (x >= 0.5).float()
        idx = self._index(obj_id)
        obj = self._objects[idx]
        obj.mask_inputs[frame] = x
        obj.points.pop(frame, None)
        is_init = frame not in obj.tracked
        reverse = False if is_init else obj.tracked[frame]
        is_cond = is_init or self.tracker.add_all_frames_to_correct_as_cond
        out, _ = self._infer(idx, frame, is_init, mask=x, reverse=reverse)
        (obj.temp_cond if is_cond else obj.temp_non_cond)[frame] = out
        return self._consolidated(frame, is_cond)

    def _consolidated(self, frame: int, is_cond: bool) -> torch.Tensor:
        """Every object's current logits on ``frame`` at video size (``NO_OBJ_SCORE`` for
        objects without an output there)."""
        size = (self.height, self.width)
        out = torch.full((len(self._objects), 1, *size), NO_OBJ_SCORE, device=self.device)
        for i, obj in enumerate(self._objects):
            o = obj.output(frame, obj.temp_cond if is_cond else obj.temp_non_cond)
            if o is not None:
                out[i : i + 1] = F.interpolate(
                    o.pred_masks.to(self.device), size=size, mode="bilinear", align_corners=False
                )
        return self.tracker.finish(out)

    # -- one frame, one object -------------------------------------------------------------
    def _infer(
        self,
        idx: int,
        frame: int,
        is_init: bool,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reverse: bool = False,
        prev_logits: torch.Tensor | None = None,
        encode: bool = False,
    ) -> tuple[FrameOutput, torch.Tensor]:
        model = self.model
        raw, pos, high_res = self.features(frame)
        if mask is not None:
            heads = model.mask_as_output(raw, high_res, mask)
        else:
            if is_init:
                cond = model.condition(raw, pos, None, None)
            else:
                cond = model.condition(
                    raw, pos, *self._memory(idx, frame, reverse), attention=self.tracker.attention
                )
            heads = self._heads(cond, high_res, points, prev_logits, is_init)
        maskmem = None
        if encode:
            maskmem = self._encode(
                raw, heads.high_res, heads.object_score_logits, points is not None
            )
        pred = heads.low_res
        if self.tracker.fill_hole_area > 0:
            pred = fill_holes(pred, self.tracker.fill_hole_area)
        out = FrameOutput(
            pred_masks=pred,
            obj_ptr=heads.obj_ptr,
            score=heads.object_score_logits,
            maskmem=maskmem,
            binarize=points is not None,
        )
        return out, pred

    def _heads(
        self,
        features: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        points: tuple[torch.Tensor, torch.Tensor] | None,
        prev_logits: torch.Tensor | None,
        is_init: bool,
    ) -> HeadsOutput:
        n = 0 if points is None else int(points[1].shape[1])
        multimask = self.tracker.multimask_min_pt_num <= n <= self.tracker.multimask_max_pt_num
        coords = labels = boxes = None
        if points is not None:
            coords, labels = points
            if n >= 2 and bool((labels[0, :2] == torch.tensor([2, 3], device=labels.device)).all()):
                boxes = coords[:, :2].reshape(-1, 4)
                coords, labels = coords[:, 2:], labels[:, 2:]
            if coords.shape[1] == 0:
                coords = labels = None
        return self.model.heads(
            features,
            high_res,
            point_coords=coords,
            point_labels=labels,
            boxes=boxes,
            mask_input=prev_logits,
            multimask_output=multimask,
        )

    def _encode(
        self, raw: torch.Tensor, high_res: torch.Tensor, score: torch.Tensor, binarize: bool
    ) -> torch.Tensor:
        binarize = binarize and self.tracker.binarize_mask_from_pts
        mem, pos = self.model.encode_memory(raw, high_res, score, binarize=binarize)
        if self._maskmem_pos is None:
            self._maskmem_pos = pos
        return mem.to(torch.bfloat16)

    def _ensure_memory(self, frame: int, out: FrameOutput) -> torch.Tensor:
        """The memory of a stored output, encoded again if it was dropped."""
        if out.maskmem is None:
            raw = self.features(frame, keep=False)[0]
            high = F.interpolate(
                out.pred_masks.to(self.device),
                size=self.model.image_size,
                mode="bilinear",
                align_corners=False,
            )
            out.maskmem = self._encode(raw, high, out.score, out.binarize)
        return out.maskmem

    def _memory(
        self, idx: int, frame: int, reverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The memory tokens the object attends to on ``frame``: conditioning frames,
        the ``num_maskmem - 1`` frames before it (in the direction of travel), then object
        pointers. Returns tokens, their encodings ``(1, M, mem_dim)`` and the pointer count."""
        model, obj = self.model, self._objects[idx]
        if not obj.cond:
            raise RuntimeError("an object without a prompted frame cannot be tracked")
        step = -1 if reverse else 1
        entries: list[tuple[int, int, FrameOutput]] = [(0, t, o) for t, o in obj.cond.items()]
        for t_pos in range(1, model.num_maskmem):
            t = frame - step * (model.num_maskmem - t_pos)
            o = obj.non_cond.get(t)
            if o is not None:
                entries.append((t_pos, t, o))
        tokens, encs = [], []
        for t_pos, t, o in entries:
            mem = self._ensure_memory(t, o)
            tok, enc = model.memory_tokens(mem.to(self.device), self._maskmem_pos, t_pos)
            tokens.append(tok)
            encs.append(enc)
        max_ptrs = min(self.num_frames, model.max_obj_ptrs)
        offsets, ptrs = [], []
        for t, o in obj.cond.items():
            if (t >= frame) if reverse else (t <= frame):
                offsets.append((frame - t) * step)
                ptrs.append(o.obj_ptr)
        for d in range(1, max_ptrs):
            t = frame - step * d
            if t < 0 or t >= self.num_frames:
                break
            o = obj.non_cond.get(t)
            if o is not None:
                offsets.append(d)
                ptrs.append(o.obj_ptr)
        n_ptr = 0
        if ptrs:
            tok, enc = model.pointer_tokens(torch.stack(ptrs).to(self.device), offsets, max_ptrs)
            tokens.append(tok)
            encs.append(enc)
            n_ptr = tok.shape[1]
        return torch.cat(tokens, dim=1), torch.cat(encs, dim=1), n_ptr

    # -- propagation -----------------------------------------------------------------------
    def _preflight(self) -> None:
        if not self._objects:
            raise RuntimeError("no object has a prompt yet: add points, a box or a mask first")
        for i, obj in enumerate(self._objects):
            for temp, store in ((obj.temp_non_cond, obj.non_cond), (obj.temp_cond, obj.cond)):
                for f, out in temp.items():
                    if out.maskmem is None:
                        out.binarize = True  # the reference encodes prompted frames so
                        self._ensure_memory(f, out)
                    store[f] = out
                temp.clear()
            if not obj.cond:
                raise RuntimeError(f"object {self.object_ids[i]} has no prompted frame")
            for f in obj.cond:
                obj.non_cond.pop(f, None)

    def propagate(
        self,
        start_frame: int | None = None,
        max_frames: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list[int], torch.Tensor]]:
        """Track every object from ``start_frame`` (default: the first prompted frame)
        forward to the end, or ``reverse`` back to frame 0, at most ``max_frames`` frames
        past the start. Yields ``(frame, object_ids, logits (objects, 1, H, W))``."""
        self._preflight()
        n = self.num_frames
        if start_frame is None:
            start_frame = min(t for obj in self._objects for t in obj.cond)
        self._check_frame(start_frame)
        if max_frames is None:
            max_frames = n
        if reverse:
            end = max(start_frame - max_frames, 0)
            order = range(start_frame, end - 1, -1) if start_frame > 0 else range(0)
        else:
            end = min(start_frame + max_frames, n - 1)
            order = range(start_frame, end + 1)
        size = (self.height, self.width)
        for f in order:
            preds = []
            for i, obj in enumerate(self._objects):
                if f in obj.cond:
                    pred = obj.cond[f].pred_masks.to(self.device)
                else:
                    out, pred = self._infer(i, f, False, reverse=reverse, encode=True)
                    obj.non_cond[f] = out
                obj.tracked[f] = reverse
                preds.append(pred)
                self._drop_far_memories(obj, f)
            logits = F.interpolate(
                torch.cat(preds), size=size, mode="bilinear", align_corners=False
            )
            yield f, list(self.object_ids), self.tracker.finish(logits)

    def _drop_far_memories(self, obj: _Object, frame: int) -> None:
        window = self.tracker.memory_window
        if window is None:
            return
        for t, o in obj.non_cond.items():
            if o.maskmem is not None and abs(t - frame) > window:
                o.maskmem = None


class Sam2Tracker:
    """SAM 2 video tracking with a :class:`~segany.models.sam2_video.Sam2Video`.

    Args:
        model: the video model (evaluation mode).
        fill_hole_area: background holes of at most this many low-res pixels inside a
            mask are filled (0: off; the reference's default 8 needs its CUDA extension
            and is skipped without it).
        non_overlap_masks: in the outputs, each pixel keeps only the object of highest
            logit (the others are capped at -10).
        add_all_frames_to_correct_as_cond: a correction on an already tracked frame makes
            it a conditioning frame (else it only replaces that frame's prediction until the
            next propagation).
        multimask_min_pt_num, multimask_max_pt_num: prompts with this many points (a box
            counts as two) and tracked frames (no points) take the best of three masks.
        binarize_mask_from_pts: frames prompted with clicks enter the memory as their
            thresholded mask (what the user saw) instead of its sigmoid.
        memory_window: encoded memories of predicted frames farther than this from the
            frame being tracked are dropped (``None``: kept; at least ``num_maskmem``
            avoids recomputation during one propagation).
        encoder: encodes the frames instead of the model's image encoder, e.g. the
            bfloat16 copy of a predictor made with ``precision="bf16"``
            (:attr:`~segany.predictor.Predictor.encoder_copy`; masks then differ from
            fp32's, see docs/sam2.md); ``None``: the model's own.
        attention: runs instead of the model's memory attention, e.g. a bfloat16 copy
            (:func:`tracker_for` makes one for a ``precision="bf16"`` predictor; masks
            differ from fp32's, docs/video.md); ``None``: the model's own.
    """

    def __init__(
        self,
        model: Sam2Video,
        *,
        fill_hole_area: int = 0,
        non_overlap_masks: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
        multimask_min_pt_num: int = 0,
        multimask_max_pt_num: int = 1,
        binarize_mask_from_pts: bool = True,
        memory_window: int | None = 16,
        encoder: torch.nn.Module | None = None,
        attention: torch.nn.Module | None = None,
    ) -> None:
        if not isinstance(model, Sam2Video):
            raise TypeError("SAM 2 tracking needs a SAM 2 model with its video memory")
        self.model = model
        self.encoder = encoder
        self.attention = attention
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.multimask_min_pt_num = multimask_min_pt_num
        self.multimask_max_pt_num = multimask_max_pt_num
        self.binarize_mask_from_pts = binarize_mask_from_pts
        self.memory_window = memory_window

    def start(self, video: VideoSource) -> Sam2Session:
        """A new session on ``video``."""
        return Sam2Session(self, video)

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """Output logits ``(objects, 1, H, W)`` after the optional non-overlap rule."""
        if self.non_overlap_masks and logits.shape[0] > 1:
            keep = logits.argmax(0, keepdim=True) == torch.arange(
                logits.shape[0], device=logits.device
            ).view(-1, 1, 1, 1)
            logits = torch.where(keep, logits, logits.clamp(max=-10.0))
        return logits

    @torch.inference_mode()
    def track(
        self,
        video: VideoSource,
        prompts: Mapping[int, Mapping[int, ObjectPrompt]],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> TrackResult:
        """Prompts by frame index and object id -> masks on every frame (as
        :meth:`~segany.video.tracker.PropagationTracker.track`): propagation forward from
        the first prompted frame, then backward from the last frame before which some
        object was first prompted. ``scores`` are the sigmoid of the object score."""
        if not prompts:
            raise ValueError("no prompts: give at least one object on one frame")
        session = self.start(video)
        for f in sorted(prompts):
            for o, p in sorted(prompts[f].items()):
                if p.mask is not None:
                    session.add_mask(f, o, p.mask)
                else:
                    session.add_prompt(f, o, points=p.points, labels=p.labels, box=p.box)
        objects = sorted(session.object_ids)
        result = TrackResult(list(video.names), video.size, objects)
        for f, ids, logits in session.propagate():
            self._store(result, session, f, ids, logits)
            if progress:
                progress(1)
        first = min(prompts)
        if first > 0:
            for f, ids, logits in session.propagate(start_frame=first, reverse=True):
                if f != first:
                    self._store(result, session, f, ids, logits)
                    if progress:
                        progress(1)
        return result

    @staticmethod
    def _store(
        result: TrackResult, session: Sam2Session, f: int, ids: list[int], logits: torch.Tensor
    ) -> None:
        masks = (logits[:, 0] > 0).cpu().numpy()
        enc = M.masks_to_coco_rle(masks)
        frame_masks = result.masks.setdefault(f, {})
        frame_scores = result.scores.setdefault(f, {})
        for i, o in enumerate(ids):
            out = session._objects[i].output(f)
            frame_masks[o] = enc[i]
            frame_scores[o] = float(torch.sigmoid(out.score).item()) if out is not None else 0.0


def fill_holes(logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Background components (``logits <= 0``, 8-connected) of at most ``max_area`` pixels
    in ``(B, 1, h, w)`` logits set to 0.1 (the reference's post-processing)."""
    import cv2

    out = logits.clone()
    for b in range(logits.shape[0]):
        bg = (logits[b, 0] <= 0).cpu().numpy().astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=8)
        small = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] <= max_area]
        if small:
            hole = torch.from_numpy(np.isin(labels, small)).to(logits.device)
            out[b, 0] = torch.where(hole, torch.tensor(0.1, device=logits.device), out[b, 0])
    return out


def tracker_for(predictor: Predictor) -> PropagationTracker | Sam2Tracker:
    """The tracker a predictor's model can run: SAM 2's memory tracker for a model with
    its video memory, the propagation tracker otherwise. With ``precision="bf16"`` the
    SAM 2 tracker encodes frames with the predictor's bfloat16 encoder and runs a bfloat16
    copy of the memory attention."""
    if isinstance(predictor.model, Sam2Video):
        encoder = predictor.encoder_copy
        attention = None
        if encoder is not None:
            dtype = next(encoder.parameters()).dtype
            attention = copy.deepcopy(predictor.model.memory_attention).to(dtype)
        return Sam2Tracker(predictor.model, encoder=encoder, attention=attention)
    return PropagationTracker(predictor)
