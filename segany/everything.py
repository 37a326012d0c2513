"""Segment everything: automatic mask generation by prompting a grid of points.

Two algorithms share the helpers of :mod:`segany.masks`:

- ``"reference"``: the procedure of the SAM paper and Meta's released generator (grid of
  points, optional crop layers, filters on predicted IoU and stability score computed at
  image resolution, box NMS within and across crops, crop-edge removal, small-region
  cleanup). With the same settings it returns the reference's mask set.
- ``"fast"``: the same steps on the decoder's low-resolution logits (filters, stability,
  boxes and NMS at 256x256), coarse-to-fine prompting (a coarse grid first, then only the
  points of a finer grid that no accepted mask covers yet) and upsampling of the surviving
  masks only. See ``docs/everything.md`` for its measured speed and recall.

Presets are plain data (:data:`PRESETS`); any field can be overridden per generator.

(Past 500 lines: the two algorithms share the generator's per-crop state and helpers;
split apart they would need each other's private methods.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from . import masks as M
from . import transforms as T
from .models import Sam
from .predictor import Predictor

Algorithm = Literal["reference", "fast"]
OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]


@dataclass(frozen=True)
class GeneratorSettings:
    """Every knob of the generator. Field names follow Meta's ``SamAutomaticMaskGenerator``.

    algorithm: ``"reference"`` or ``"fast"`` (see module doc).
    points_per_side: grid size on the whole image (layer 0).
    refine_points_per_side: ``fast`` only: a finer grid (or several, finest last) whose
        points are prompted only where no accepted mask covers them yet (``None``: no
        second pass).
    refine_cover_max_fraction: ``fast`` only: accepted masks covering at least this
        fraction of the image do not count as covering a point (so small objects lying on
        a large accepted region still get prompted); 1.0: every mask counts.
    dense_below_cover: ``fast`` only: when the masks accepted on the coarse grid (leaving
        out masks of 95% of the crop or more) cover less than this fraction of the crop,
        the finest refine grid is prompted in full instead of pass by pass on uncovered
        points: scenes of many small separate objects on a background (cells, nuclei),
        where a covering mask often holds several objects. 0.0: never.
    max_masks: keep at most this many masks, by predicted IoU (``None``: all).
    multimask_output: ``reference`` only: three masks per point (``False``: one, which
        for SAM 2 is the best of the three when the single-mask output is unstable).
        HQ-SAM gives one mask per point either way (SAM's best multimask output or its
        single-mask output, plus the HQ mask), as its reference generator does.
    use_m2m: ``reference`` only: SAM 2's mask-to-mask step: every mask of the grid is
        decoded once more with its own point and its low-res logits as mask input (one
        output), and the filters then judge the refined mask and its IoU.
    max_mask_region_fraction: drop masks covering at least this fraction of the image
        (SA-1B drops masks covering 95% or more); 1.0 keeps everything.
    """

    algorithm: Algorithm = "reference"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    max_mask_region_fraction: float = 1.0
    refine_points_per_side: int | tuple[int, ...] | None = None
    refine_cover_max_fraction: float = 1.0
    dense_below_cover: float = 0.0
    max_masks: int | None = None
    multimask_output: bool = True
    use_m2m: bool = False

    def replace(self, **changes: Any) -> GeneratorSettings:
        return dataclasses.replace(self, **changes)


#: Named settings. ``reference``: Meta's generator defaults. ``sa1b``: the paper's SA-1B
#: fully-automatic stage (32x32 grid, 2 crop layers with 2x-downscaled grids, 100-px hole
#: and island cleanup, masks covering >= 95% of the image dropped). ``sam2``: the defaults of
#: the SAM 2 package's ``SAM2AutomaticMaskGenerator`` (``sam2==1.1.0``: predicted-IoU
#: threshold 0.8, everything else as ``reference``, mask-to-mask off). ``fast``: the default.
PRESETS: dict[str, GeneratorSettings] = {
    "reference": GeneratorSettings(),
    "sa1b": GeneratorSettings(
        crop_n_layers=2,
        crop_n_points_downscale_factor=2,
        min_mask_region_area=100,
        max_mask_region_fraction=0.95,
    ),
    "sam2": GeneratorSettings(pred_iou_thresh=0.8),
    "fast": GeneratorSettings(
        algorithm="fast",
        points_per_side=8,
        refine_points_per_side=(16, 32),
        points_per_batch=32,
        pred_iou_thresh=0.7,
        stability_score_thresh=0.8,
        box_nms_thresh=0.7,
        dense_below_cover=0.5,
    ),
}
DEFAULT_PRESET = "fast"


@dataclass
class _Found:
    """Masks accepted so far (one crop or the whole image), batched."""

    masks: torch.Tensor  # (N, H, W) bool in the frame of `frame_size`, or low-res logits
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor  # (N, 2) image-frame (x, y)
    boxes: torch.Tensor  # (N, 4) image-frame XYXY
    crop: torch.Tensor  # (N, 4) XYXY crop box of origin

    @staticmethod
    def cat(items: list[_Found]) -> _Found:
        return _Found(
            *(torch.cat([getattr(i, f.name) for i in items]) for f in dataclasses.fields(_Found))
        )

    def take(self, idx: torch.Tensor) -> _Found:
        return _Found(*(getattr(self, f.name)[idx] for f in dataclasses.fields(_Found)))

    def __len__(self) -> int:
        return int(self.iou.shape[0])


class MaskGenerator:
    """Generate masks for everything in an image.

    Args:
        model: a :class:`~segany.models.Sam` or a :class:`~segany.predictor.Predictor`
            (whose embedding cache is then reused).
        preset: a name in :data:`PRESETS` or a :class:`GeneratorSettings`.
        output_mode: ``"binary_mask"`` (``(H, W)`` bool arrays), ``"uncompressed_rle"`` or
            ``"coco_rle"`` (JSON-ready, ``counts`` as str).
        point_grids: one ``(n, 2)`` grid of points in ``[0, 1]`` per crop layer, in place of
            the grids made from ``points_per_side`` (as the reference's ``point_grids``).
        **overrides: any :class:`GeneratorSettings` field.

    ``generate(image)`` returns one dict per mask: ``segmentation``, ``area``, ``bbox``
    (XYWH in the reference's convention, ``w = x1 - x0`` with ``x1`` the last column; every
    writer of :mod:`segany.datasets` writes pycocotools' box instead), ``predicted_iou``,
    ``point_coords`` (``[[x, y]]``), ``stability_score``, ``crop_box`` (XYWH), sorted as the
    reference sorts them (by NMS rank).
    """

    def __init__(
        self,
        model: Sam | Predictor,
        *,
        preset: str | GeneratorSettings = DEFAULT_PRESET,
        output_mode: OutputMode = "binary_mask",
        algorithm: Algorithm | None = None,
        points_per_side: int | None = None,
        points_per_batch: int | None = None,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float | None = None,
        stability_score_offset: float | None = None,
        box_nms_thresh: float | None = None,
        crop_n_layers: int | None = None,
        crop_nms_thresh: float | None = None,
        crop_overlap_ratio: float | None = None,
        crop_n_points_downscale_factor: int | None = None,
        min_mask_region_area: int | None = None,
        max_mask_region_fraction: float | None = None,
        refine_points_per_side: int | tuple[int, ...] | None = None,
        refine_cover_max_fraction: float | None = None,
        dense_below_cover: float | None = None,
        max_masks: int | None = None,
        multimask_output: bool | None = None,
        use_m2m: bool | None = None,
        point_grids: Sequence[np.ndarray] | None = None,
    ) -> None:
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
            settings = PRESETS[preset]
        else:
            settings = preset
        given = {
            k: v
            for k, v in dict(
                algorithm=algorithm,
                points_per_side=points_per_side,
                points_per_batch=points_per_batch,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                stability_score_offset=stability_score_offset,
                box_nms_thresh=box_nms_thresh,
                crop_n_layers=crop_n_layers,
                crop_nms_thresh=crop_nms_thresh,
                crop_overlap_ratio=crop_overlap_ratio,
                crop_n_points_downscale_factor=crop_n_points_downscale_factor,
                min_mask_region_area=min_mask_region_area,
                max_mask_region_fraction=max_mask_region_fraction,
                refine_points_per_side=refine_points_per_side,
                refine_cover_max_fraction=refine_cover_max_fraction,
                dense_below_cover=dense_below_cover,
                max_masks=max_masks,
                multimask_output=multimask_output,
                use_m2m=use_m2m,
            ).items()
            if v is not None
        }
        self.settings = settings.replace(**given)
        _check_settings(self.settings)
        if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
            raise ValueError(f"unknown output_mode {output_mode!r}")
        self.output_mode = output_mode
        #: points prompted by the last :meth:`generate` call (all crops)
        self.last_prompts = 0
        #: whether the last crop of the last call went dense (see ``dense_below_cover``)
        self.last_dense = False
        self.predictor = model if isinstance(model, Predictor) else Predictor(model)
        s = self.settings
        if point_grids is None:
            self.point_grids = M.layer_point_grids(
                s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor
            )
        elif len(point_grids) != s.crop_n_layers + 1:
            raise ValueError("point_grids needs one grid per crop layer")
        else:
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self._progress: Callable[[int, int], None] | None = None
        self._done = 0
        self._planned = 0

    @property
    def model(self) -> Sam:
        return self.predictor.model

    # -- public --------------------------------------------------------------------------
    def generate(
        self, image: T.ImageLike, *, progress: Callable[[int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Masks of everything in ``image`` (path, PIL, bytes or ``(H, W, 3)`` uint8 RGB).

        ``progress(done, planned)`` is called after each batch of point prompts: ``done``
        points decoded so far of ``planned`` (an upper bound that drops when the ``fast``
        algorithm skips covered points; equal to ``done`` at the end). An exception it
        raises stops the generation and propagates (a caller's cancel)."""
        rgb = T.load_image(image)
        found, size = self.generate_masks(rgb, progress=progress)
        return self._records(found, size)

    def generate_masks(
        self, rgb: np.ndarray, *, progress: Callable[[int, int], None] | None = None
    ) -> tuple[_Found, tuple[int, int]]:
        """The batched result before records: image-size bool masks and their scores
        (``progress``: see :meth:`generate`)."""
        s = self.settings
        self.last_prompts = 0
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        boxes, layers = M.crop_boxes(size, s.crop_n_layers, s.crop_overlap_ratio)
        self._progress, self._done = progress, 0
        self._planned = sum(len(self.point_grids[layer]) for layer in layers)
        if s.algorithm == "fast":
            self._planned += len(boxes) * sum(n * n for n in self._refine_passes())
        try:
            return self._generate_masks(rgb, boxes, layers, size)
        finally:
            self._progress = None

    def _refine_passes(self) -> list[int]:
        refine = self.settings.refine_points_per_side
        return [refine] if isinstance(refine, int) else list(refine or ())

    def _step(self, points: int) -> None:
        """``points`` more prompts decoded: tell the caller's ``progress``."""
        self._done += points
        if self._progress is not None:
            self._progress(self._done, max(self._planned, self._done))

    def _generate_masks(
        self, rgb: np.ndarray, boxes: list[list[int]], layers: list[int], size: tuple[int, int]
    ) -> tuple[_Found, tuple[int, int]]:
        s = self.settings
        parts = []
        with torch.inference_mode():
            for box, layer in zip(boxes, layers, strict=True):
                parts.append(self._crop(rgb, box, layer, size))
            found = _Found.cat(parts)
            if len(boxes) > 1 and len(found):
                keep = M.nms(found.boxes, 1.0 / M.box_area(found.crop.float()), s.crop_nms_thresh)
                found = found.take(keep)
            if s.min_mask_region_area > 0 and len(found):
                found = self._cleanup(found)
            if s.max_mask_region_fraction < 1.0 and len(found):
                area = found.masks.sum((-1, -2))
                found = found.take(area < s.max_mask_region_fraction * size[0] * size[1])
            if s.max_masks is not None and len(found) > s.max_masks:
                order = torch.sort(found.iou, descending=True, stable=True).indices
                found = found.take(order[: s.max_masks].sort().values)
        return found, size

    # -- one crop ------------------------------------------------------------------------
    def _crop(self, rgb: np.ndarray, box: list[int], layer: int, size: tuple[int, int]) -> _Found:
        x0, y0, x1, y1 = box
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        if layer == 0 and box == [0, 0, size[1], size[0]]:
            self.predictor.set_image(crop)
        else:
            self.predictor.set_embedding(self.predictor.embed(crop))
        ch, cw = crop.shape[:2]
        grid = self.point_grids[layer] * np.array([cw, ch], dtype=np.float64)
        if self.settings.algorithm == "fast":
            found = self._crop_fast(grid, box, size)
        else:
            found = self._crop_reference(grid, box, size)
        return found

    def _decode(
        self,
        points: np.ndarray,
        *,
        multimask_output: bool = True,
        mask_input: torch.Tensor | None = None,
        image_only: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop-frame points ``(B, 2)`` -> low-res logits ``(B*K, S/4, S/4)`` and IoUs
        (``K`` = 3; 1 without ``multimask_output``, or for HQ-SAM); ``mask_input``
        ``(B, S/4, S/4)``: one low-res mask per point. ``image_only``: see
        ``Predictor.decode_low_res``."""
        st = self.predictor.state
        if mask_input is None:
            self.last_prompts += len(points)
        coords = self.predictor.geometry.coords_to_model(points, st.original_size)
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int64)
        low, iou = self.predictor.decode_low_res(
            coords[:, None, :],
            labels,
            mask_input=None if mask_input is None else mask_input[:, None],
            multimask_output=multimask_output,
            image_only=image_only,
        )
        if mask_input is None:
            self._step(len(points))
        return low.flatten(0, 1).cpu(), iou.flatten(0, 1).cpu()

    def _mask_to_mask(
        self, points: np.ndarray, low: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's refinement: each mask's point again, its low-res logits (as the
        predictor hands them back, clamped for SAM 2) as mask input, one output."""
        limit = self.model.low_res_limit
        prior = low if limit is None else low.clamp(-limit, limit)
        return self._decode(points, multimask_output=False, mask_input=prior)

    def _to_image(self, low: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``(N, S/4, S/4)`` -> crop-size logits ``(N, h, w)``."""
        st = self.predictor.state
        if low.shape[0] == 0:
            return low.new_zeros(0, *st.original_size)
        out = self.predictor.geometry.masks_to_image(
            low[:, None], input_size=st.input_size, original_size=st.original_size
        )
        return out[:, 0]

    def _crop_reference(self, grid: np.ndarray, box: list[int], size: tuple[int, int]) -> _Found:
        s = self.settings
        thr = self.model.mask_threshold
        parts: list[_Found] = []
        for start in range(0, len(grid), s.points_per_batch):
            pts = grid[start : start + s.points_per_batch]
            low, iou = self._decode(
                pts, multimask_output=s.multimask_output, image_only=not s.use_m2m
            )
            k = len(iou) // len(pts)
            points = torch.as_tensor(pts, dtype=torch.float64).repeat_interleave(k, 0)
            if s.use_m2m:
                low, iou = self._mask_to_mask(np.repeat(pts, k, axis=0), low)
            keep = (
                iou > s.pred_iou_thresh
                if s.pred_iou_thresh > 0
                else torch.ones_like(iou, dtype=torch.bool)
            )
            logits = self._to_image(low[keep])
            iou, points = iou[keep], points[keep]
            stab = M.stability_score(logits, thr, s.stability_score_offset)
            if s.stability_score_thresh > 0:
                keep = stab >= s.stability_score_thresh
                logits, iou, points, stab = logits[keep], iou[keep], points[keep], stab[keep]
            masks = logits > thr
            del logits
            parts.append(self._finish_batch(masks, iou, stab, points, box, size))
        return self._crop_nms(parts, box, size)

    def _finish_batch(
        self,
        masks: torch.Tensor,
        iou: torch.Tensor,
        stab: torch.Tensor,
        points: torch.Tensor,
        box: list[int],
        size: tuple[int, int],
    ) -> _Found:
        """Crop-frame bool masks -> image frame, dropping masks cut by the crop's edges."""
        x0, y0 = box[0], box[1]
        offset = torch.tensor([x0, y0, x0, y0])
        boxes = M.masks_to_boxes(masks) + offset
        edge = M.box_near_crop_edge(boxes, box, [0, 0, size[1], size[0]])
        if edge.any():
            keep = ~edge
            masks, iou, stab, points, boxes = (
                masks[keep],
                iou[keep],
                stab[keep],
                points[keep],
                boxes[keep],
            )
        return _Found(
            masks=masks,
            iou=iou,
            stability=stab,
            points=points + torch.tensor([x0, y0], dtype=points.dtype),
            boxes=boxes,
            crop=torch.tensor([box] * len(iou), dtype=torch.int64).reshape(-1, 4),
        )

    def _crop_nms(self, parts: list[_Found], box: list[int], size: tuple[int, int]) -> _Found:
        found = _Found.cat(parts)
        keep = M.nms(found.boxes, found.iou, self.settings.box_nms_thresh)
        found = found.take(keep)
        return _Found(
            masks=_uncrop(found.masks, box, size),
            iou=found.iou,
            stability=found.stability,
            points=found.points,
            boxes=found.boxes,
            crop=found.crop,
        )

    # -- fast path -----------------------------------------------------------------------
    def _crop_fast(self, grid: np.ndarray, box: list[int], size: tuple[int, int]) -> _Found:
        """Filters, stability and NMS on the low-res logits; coarse grid, then the uncovered
        points of a finer grid; only survivors are upsampled."""
        s = self.settings
        st = self.predictor.state
        ch, cw = st.original_size
        side = self.model.prompt_encoder.mask_input_size[0]
        lh = max(1, math.ceil(st.input_size[0] * side / self.model.img_size))
        lw = max(1, math.ceil(st.input_size[1] * side / self.model.img_size))
        # low-res pixel (i, j) covers crop pixels ~ ((j + 0.5) * sx, (i + 0.5) * sy)
        sx = cw / (st.input_size[1] * side / self.model.img_size)
        sy = ch / (st.input_size[0] * side / self.model.img_size)
        scale = torch.tensor([sx, sy, sx, sy])

        def run(points: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
            out = []
            for start in range(0, len(points), s.points_per_batch):
                pts = points[start : start + s.points_per_batch]
                low, iou = self._decode(pts)
                low = low[:, :lh, :lw]
                k = len(iou) // len(pts)  # 3 masks per point (HQ-SAM: 1)
                pts_t = torch.as_tensor(pts, dtype=torch.float64).repeat_interleave(k, 0)
                keep = iou > s.pred_iou_thresh
                low, iou, pts_t = low[keep], iou[keep], pts_t[keep]
                stab = M.stability_score(low, self.model.mask_threshold, s.stability_score_offset)
                keep = stab >= s.stability_score_thresh
                low, iou, pts_t, stab = low[keep], iou[keep], pts_t[keep], stab[keep]
                binary = low > self.model.mask_threshold
                nonempty = binary.flatten(1).any(1)
                low, iou, pts_t, stab, binary = (
                    low[nonempty],
                    iou[nonempty],
                    pts_t[nonempty],
                    stab[nonempty],
                    binary[nonempty],
                )
                # box in crop pixels from the low-res box (edges of the covered cells)
                b = M.masks_to_boxes(binary).float()
                b = (b + torch.tensor([0.0, 0.0, 1.0, 1.0])) * scale
                b = b - torch.tensor([0.0, 0.0, 1.0, 1.0])
                b[:, 0::2] = b[:, 0::2].clamp(0, cw - 1)
                b[:, 1::2] = b[:, 1::2].clamp(0, ch - 1)
                out.append((low, iou, stab, pts_t, b, binary))
            return out

        batches = run(grid)
        passes = self._refine_passes()
        self.last_dense = False
        if passes and s.dense_below_cover > 0:
            kept = self._accepted(batches)
            if M.cover_fraction(kept, 0.95) < s.dense_below_cover:
                self.last_dense = True
                self._planned -= sum(n * n for n in passes[:-1])  # not run
                passes = passes[-1:]  # the finest grid, every point
        for n in passes:
            fine = M.point_grid(n) * np.array([cw, ch], dtype=np.float64)
            covered = (
                np.zeros(len(fine), dtype=bool)
                if self.last_dense
                else self._covered(batches, fine, sx, sy, lh, lw)
            )
            self._planned -= int(covered.sum())  # covered points are not prompted
            batches += run(fine[~covered])
        if not batches:
            return _empty_found(size)
        low = torch.cat([b[0] for b in batches])
        iou = torch.cat([b[1] for b in batches])
        stab = torch.cat([b[2] for b in batches])
        pts = torch.cat([b[3] for b in batches])
        boxes = torch.cat([b[4] for b in batches])
        x0, y0 = box[0], box[1]
        offset = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        edge = M.box_near_crop_edge(boxes + offset, box, [0, 0, size[1], size[0]])
        keep = ~edge
        low, iou, stab, pts, boxes = low[keep], iou[keep], stab[keep], pts[keep], boxes[keep]
        keep = M.nms(boxes, iou, s.box_nms_thresh)
        low, iou, stab, pts = low[keep], iou[keep], stab[keep], pts[keep]
        # upsample the survivors only, in chunks
        full = torch.zeros(len(iou), side, side)
        full[:, :lh, :lw] = low
        masks = (
            torch.cat(
                [
                    self._to_image(full[i : i + 64]) > self.model.mask_threshold
                    for i in range(0, len(full), 64)
                ]
            )
            if len(full)
            else torch.zeros(0, ch, cw, dtype=torch.bool)
        )
        boxes = M.masks_to_boxes(masks) + torch.tensor([x0, y0, x0, y0])
        return _Found(
            masks=_uncrop(masks, box, size),
            iou=iou,
            stability=stab,
            points=pts + torch.tensor([x0, y0], dtype=pts.dtype),
            boxes=boxes,
            crop=torch.tensor([box] * len(iou), dtype=torch.int64).reshape(-1, 4),
        )

    def _accepted(self, batches) -> torch.Tensor:
        """Low-res bool masks ``(N, lh, lw)`` of the batches' masks that survive box NMS."""
        if not batches:
            return torch.zeros(0, 1, 1, dtype=torch.bool)
        binary = torch.cat([b[5] for b in batches])
        iou = torch.cat([b[1] for b in batches])
        boxes = torch.cat([b[4] for b in batches])
        if len(iou) == 0:
            return binary
        return binary[M.nms(boxes, iou, self.settings.box_nms_thresh)]

    def _covered(self, batches, fine: np.ndarray, sx: float, sy: float, lh: int, lw: int):
        """Which fine-grid points fall inside an accepted mask (one that survives NMS)."""
        if not batches or len(fine) == 0:
            return np.zeros(len(fine), dtype=bool)
        kept = self._accepted(batches)
        if len(kept) == 0:
            return np.zeros(len(fine), dtype=bool)
        if self.settings.refine_cover_max_fraction < 1.0:
            small = kept.flatten(1).sum(1) < self.settings.refine_cover_max_fraction * lh * lw
            kept = kept[small]
        cover = kept.any(0)
        cols = np.clip((fine[:, 0] / sx).astype(int), 0, lw - 1)
        rows = np.clip((fine[:, 1] / sy).astype(int), 0, lh - 1)
        return cover.numpy()[rows, cols]

    # -- post-processing -----------------------------------------------------------------
    def _cleanup(self, found: _Found) -> _Found:
        s = self.settings
        masks = found.masks.numpy()
        cleaned = []
        unchanged = []
        for m in masks:
            c, changed = M.clean_mask(m, s.min_mask_region_area)
            cleaned.append(c)
            unchanged.append(0.0 if changed else 1.0)
        new = torch.from_numpy(np.stack(cleaned))
        boxes = M.masks_to_boxes(new)
        scores = torch.tensor(unchanged)
        keep = M.nms(boxes, scores, max(s.box_nms_thresh, s.crop_nms_thresh))
        changed = scores[keep] == 0
        out = found.take(keep)
        out.masks = torch.where(changed[:, None, None], new[keep], out.masks)
        out.boxes = torch.where(changed[:, None], boxes[keep], out.boxes)
        return out

    def _records(self, found: _Found, size: tuple[int, int]) -> list[dict[str, Any]]:
        n = len(found)
        if n == 0:
            return []
        masks = found.masks
        if self.output_mode == "coco_rle":
            segs: list[Any] = M.masks_to_coco_rle(masks)
        elif self.output_mode == "uncompressed_rle":
            segs = M.masks_to_rle(masks)
        else:
            segs = list(masks.numpy())
        areas = masks.sum((-1, -2)).tolist()
        bboxes = M.xyxy_to_xywh(found.boxes).tolist()
        crops = M.xyxy_to_xywh(found.crop).tolist()
        ious = found.iou.tolist()
        stabs = found.stability.tolist()
        points = found.points.tolist()
        return [
            {
                "segmentation": segs[i],
                "area": int(areas[i]),
                "bbox": bboxes[i],
                "predicted_iou": float(ious[i]),
                "point_coords": [points[i]],
                "stability_score": float(stabs[i]),
                "crop_box": crops[i],
            }
            for i in range(n)
        ]


def _uncrop(masks: torch.Tensor, box: list[int], size: tuple[int, int]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    h, w = size
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return masks
    return torch.nn.functional.pad(masks, (x0, w - x1, y0, h - y1), value=False)


def _empty_found(size: tuple[int, int]) -> _Found:
    return _Found(
        masks=torch.zeros(0, *size, dtype=torch.bool),
        iou=torch.zeros(0),
        stability=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        boxes=torch.zeros(0, 4, dtype=torch.int64),
        crop=torch.zeros(0, 4, dtype=torch.int64),
    )


def _check_settings(s: GeneratorSettings) -> None:
    if s.algorithm not in ("reference", "fast"):
        raise ValueError(f"algorithm must be 'reference' or 'fast', got {s.algorithm!r}")
    if s.points_per_side < 1 or s.points_per_batch < 1:
        raise ValueError("points_per_side and points_per_batch must be >= 1")
    if s.crop_n_layers < 0:
        raise ValueError("crop_n_layers must be >= 0")
    if s.algorithm == "fast" and (s.use_m2m or not s.multimask_output):
        raise ValueError("use_m2m and multimask_output=False need algorithm 'reference'")
    if not 0.0 <= s.dense_below_cover <= 1.0:
        raise ValueError(f"dense_below_cover must lie in [0, 1], got {s.dense_below_cover}")
    if s.crop_n_points_downscale_factor < 1:
        raise ValueError("crop_n_points_downscale_factor must be >= 1")
    if int(s.points_per_side / s.crop_n_points_downscale_factor**s.crop_n_layers) < 1:
        raise ValueError("the grid of the last crop layer would have no points")
