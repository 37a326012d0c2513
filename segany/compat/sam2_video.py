"""``sam2``'s video predictor names and signatures (``build_sam2_video_predictor``,
``SAM2VideoPredictor``) over :mod:`segany.video.sam2_tracker`.

Differences from the reference: the default device is the CPU; the inference state is an
:class:`InferenceState` (it answers ``state["num_frames"]``, ``["video_height"]``,
``["video_width"]``, ``["obj_ids"]`` like the reference's dict); frames are read lazily
from any video segany opens (a folder of frames, a video file) instead of being loaded at
model resolution up front; ``offload_*`` and ``async_loading_frames`` are accepted and have
nothing to do (everything is on the CPU already, frames are read when needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..models.sam2_video import Sam2Video
from ..video.sam2_tracker import Sam2Session, Sam2Tracker
from ..videos import VideoSource, open_video
from .sam2_image import build_sam2

#: ``++model.<name>=<value>`` hydra overrides understood by build_sam2_video_predictor
_OPTIONS = {
    "fill_hole_area": int,
    "non_overlap_masks": lambda v: v.lower() == "true",
    "add_all_frames_to_correct_as_cond": lambda v: v.lower() == "true",
    "binarize_mask_from_pts_for_mem_enc": lambda v: v.lower() == "true",
}


class InferenceState:
    """One video's session (``init_state``'s return value)."""

    def __init__(self, session: Sam2Session) -> None:
        self.session = session

    def __getitem__(self, key: str) -> Any:
        s = self.session
        values = {
            "num_frames": s.num_frames,
            "video_height": s.height,
            "video_width": s.width,
            "obj_ids": s.object_ids,
            "device": s.device,
        }
        if key not in values:
            raise KeyError(f"{key!r} is not kept by segany's inference state")
        return values[key]


class SAM2VideoPredictor:
    """``sam2.sam2_video_predictor.SAM2VideoPredictor``'s methods and return values
    (logits at video size, ``(objects, 1, H, W)`` float tensors) over a
    :class:`~segany.models.sam2_video.Sam2Video`.

    Args:
        model: the video model.
        fill_hole_area, non_overlap_masks, add_all_frames_to_correct_as_cond: as the
            reference (see :class:`~segany.video.sam2_tracker.Sam2Tracker`).
        clear_non_cond_mem_around_input: only ``False`` is supported.
        **tracker_options: other :class:`Sam2Tracker` keywords (``memory_window``,
            ``binarize_mask_from_pts``).
    """

    def __init__(
        self,
        model: Sam2Video,
        fill_hole_area: int = 0,
        non_overlap_masks: bool = False,
        clear_non_cond_mem_around_input: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
        **tracker_options: Any,
    ) -> None:
        if clear_non_cond_mem_around_input:
            raise ValueError("clear_non_cond_mem_around_input=True is not supported")
        self.model = model
        self.tracker = Sam2Tracker(
            model,
            fill_hole_area=fill_hole_area,
            non_overlap_masks=non_overlap_masks,
            add_all_frames_to_correct_as_cond=add_all_frames_to_correct_as_cond,
            **tracker_options,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_size(self) -> int:
        return self.model.img_size

    def init_state(
        self,
        video_path: str | os.PathLike[str] | VideoSource,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        async_loading_frames: bool = False,
    ) -> InferenceState:
        """A session on a folder of frames, a video file or a :class:`VideoSource`."""
        video = video_path if isinstance(video_path, VideoSource) else open_video(video_path)
        return InferenceState(self.tracker.start(video))

    @torch.inference_mode()
    def add_new_points_or_box(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: int,
        points: Any = None,
        labels: Any = None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box: Any = None,
    ) -> tuple[int, list[int], torch.Tensor]:
        """Clicks and/or a box on one frame for one object (video pixels; with
        ``normalize_coords=False`` in 0-1 units) -> ``(frame_idx, obj_ids, logits)``."""
        s = inference_state.session
        logits = s.add_prompt(
            frame_idx,
            obj_id,
            points=_array(points),
            labels=_array(labels),
            box=_array(box),
            clear_old_points=clear_old_points,
            relative=not normalize_coords,
        )
        return frame_idx, list(s.object_ids), logits

    add_new_points = add_new_points_or_box

    @torch.inference_mode()
    def add_new_mask(
        self, inference_state: InferenceState, frame_idx: int, obj_id: int, mask: Any
    ) -> tuple[int, list[int], torch.Tensor]:
        """A mask ``(H, W)`` on one frame for one object -> ``(frame_idx, obj_ids, logits)``."""
        s = inference_state.session
        logits = s.add_mask(frame_idx, obj_id, _array(mask))
        return frame_idx, list(s.object_ids), logits

    def propagate_in_video(
        self,
        inference_state: InferenceState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list[int], torch.Tensor]]:
        """Yields ``(frame_idx, obj_ids, logits)`` frame by frame."""
        with torch.inference_mode():
            yield from inference_state.session.propagate(
                start_frame_idx, max_frame_num_to_track, reverse
            )

    def reset_state(self, inference_state: InferenceState) -> None:
        """Remove every object, prompt and memory."""
        inference_state.session.reset()


def _array(x: Any) -> Any:
    if x is None or isinstance(x, torch.Tensor):
        return None if x is None else x.detach().cpu().numpy()
    return np.asarray(x)


def build_sam2_video_predictor(
    config_file: str,
    ckpt_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    mode: str = "eval",
    hydra_overrides_extra: Sequence[str] = (),
    apply_postprocessing: bool = True,
    vos_optimized: bool = False,
    **kwargs: Any,
) -> SAM2VideoPredictor:
    """``sam2.build_sam.build_sam2_video_predictor``: the video model of an official config
    with the weights of ``ckpt_path`` (strict keys). ``apply_postprocessing`` sets what the
    reference sets (unstable single masks fall back to the best of three, clicked frames
    enter the memory thresholded, holes up to 8 low-res pixels filled). Of the hydra
    overrides only ``++model.<name>=<value>`` for ``fill_hole_area``, ``non_overlap_masks``,
    ``add_all_frames_to_correct_as_cond`` and ``binarize_mask_from_pts_for_mem_enc`` are
    understood (others raise); ``kwargs`` are passed to :class:`SAM2VideoPredictor`."""
    model = build_sam2(config_file, ckpt_path, device=device, mode=mode)
    if not isinstance(model, Sam2Video):
        raise TypeError(f"{config_file} has no video memory")
    model.mask_decoder.dynamic_multimask_via_stability = apply_postprocessing
    options: dict[str, Any] = {
        "fill_hole_area": 8 if apply_postprocessing else 0,
        "binarize_mask_from_pts": apply_postprocessing,
    }
    for item in hydra_overrides_extra:
        name, _, value = item.lstrip("+").removeprefix("model.").partition("=")
        if name not in _OPTIONS or not value:
            raise ValueError(f"hydra override {item!r} is not supported")
        key = "binarize_mask_from_pts" if name.startswith("binarize") else name
        options[key] = _OPTIONS[name](value)
    return SAM2VideoPredictor(model, **{**options, **kwargs})


__all__ = ["InferenceState", "SAM2VideoPredictor", "build_sam2_video_predictor"]
