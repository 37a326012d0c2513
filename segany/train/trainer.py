"""The trainer: SAM's simulated interactive training (see :mod:`.prompts` and :mod:`.losses`)
with AdamW, linear warmup and step decay, gradient accumulation, periodic checkpoints,
exact resume, a CSV/JSON-lines log, a loss-curve PNG and a progress bar.

Modes (``TrainConfig.train``):

- ``decoder``: only the mask decoder learns; image embeddings are computed once with the
  frozen encoder and kept on disk (:class:`EmbeddingSource`), so a step costs decoder
  passes only. This is what a CPU can afford.
- ``decoder+prompt``: the prompt encoder learns too (still on cached embeddings).
- ``full``: every part learns; images go through the encoder at each step (meant for a
  GPU; it runs on the CPU with a tiny model).
- ``iou-head``: only the decoder's IoU prediction head learns (the MLP that scores the
  outputs): the masks stay bit-identical to the starting model's everywhere, only which of
  the three outputs ranks first ("auto") changes.
- ``heads``: the decoder's two-way transformer and upscaling stay frozen; the output
  hypernetwork MLPs, the IoU head and the IoU and mask tokens learn.

HQ-SAM: ``decoder`` trains only what HQ-SAM adds to SAM's decoder, as its official recipe
(:mod:`.family`); ``iou-head`` and ``heads`` (SAM's own heads) are refused.

Every mode writes a full checkpoint (all weights, frozen ones unchanged).

Files written for ``out = DIR/NAME.pt``:

- ``NAME.pt``: the weights, a plain state dict with the official key names (loads with
  :func:`segany.load_model` and ``--model DIR/NAME.pt`` everywhere);
- ``NAME.json``: metadata (base model, data, split, configuration, steps, wall time);
- ``NAME.train-state.pt``: optimizer, scheduler, step and random states for ``resume``;
- ``NAME.log.csv`` and ``NAME.log.jsonl``: one row per ``log_every`` steps;
- ``NAME.loss.png``: the loss curve;
- ``NAME.val.json``: the validation images as COCO instances (for ``segany eval``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import transforms as T
from .. import validate as V
from ..files import atomic_write
from ..models import Sam
from . import family as FAM
from .config import DEFAULT_RECIPE, MODES, RECIPES, TrainConfig, lr_factor
from .data import TrainData, TrainImage, to_coco
from .embeddings import EmbeddingSource, default_embedding_cache
from .runfiles import (
    META_FORMAT,
    STATE_FORMAT,
    StepStats,
    add_stats,
    append_log,
    atomic_save,
    log_row,
    output_paths,
    plot_log,
    read_log,
    truncate_logs,
)
from .simulation import Batch, SimulationMixin, rank_loss

__all__ = [
    "DEFAULT_RECIPE",
    "MODES",
    "RECIPES",
    "Batch",
    "EmbeddingSource",
    "TrainConfig",
    "Trainer",
    "default_embedding_cache",
    "lr_factor",
    "output_paths",
    "plot_log",
    "rank_loss",
    "read_log",
    "train",
]


class Trainer(SimulationMixin):
    """Trains ``model`` on ``train_images`` (see the module doc).

    Args:
        model: a :class:`~segany.models.Sam` (not fused for inference).
        train_images, val_images: the split (:func:`.data.split_by_image`).
        config: the run's :class:`TrainConfig`.
        out: the weights file; the other files go beside it (:func:`output_paths`).
        embedding_cache: folder of cached embeddings (decoder modes); ``None``: memory only.
        replay_images: unlabeled images on which the fine-tuned decoder is kept close to the
            starting one (:meth:`replay_loss`), against forgetting their domain.
        rehearse_images: labelled images of other domains (supervised rehearsal): each step
            adds one batch of them, trained with the same recipe, its loss scaled by
            ``config.rehearse_weight``.
        meta: extra fields for the metadata file (base model, data description...).
        progress: show progress bars.
        device: where the model runs.
    """

    def __init__(
        self,
        model: Sam,
        train_images: Sequence[TrainImage],
        val_images: Sequence[TrainImage],
        config: TrainConfig,
        out: str | Path,
        *,
        embedding_cache: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        progress: bool = True,
        device: str | torch.device = "cpu",
        replay_images: Sequence[TrainImage] = (),
        rehearse_images: Sequence[TrainImage] = (),
    ) -> None:
        self.cfg = config
        self.device = torch.device(device)
        self.model = FAM.for_training(model.to(self.device))
        self.geometry = T.geometry_of(self.model)
        self.train_images = [im for im in train_images if im.num_masks]
        self.val_images = [im for im in val_images if im.num_masks]
        if not self.train_images:
            raise ValueError("no training image has masks")
        self.paths = output_paths(out)
        self.meta = dict(meta or {})
        self.progress = progress
        self.grid = int(model.prompt_encoder.mask_input_size[0])
        self.stride = model.img_size // self.grid
        self.params = self._set_trainable()
        self.optimizer = _adamw(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.cfg)
        )
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self.elapsed = 0.0
        self.embed_seconds = 0.0
        self.embedding_cache = embedding_cache
        self.embeddings: EmbeddingSource | None = None
        if config.train != "full":
            self.embeddings = EmbeddingSource(self.model, embedding_cache)
        self.on_step: Callable[[int, dict[str, Any]], None] | None = None
        self.replay_images = list(replay_images)
        self.rehearse_images = [im for im in rehearse_images if im.num_masks]
        if rehearse_images and not self.rehearse_images:
            raise ValueError("no rehearsal image has masks")
        self.teacher: tuple[torch.nn.Module, torch.nn.Module] | None = None
        if self.replay_images and config.replay_weight > 0:
            if config.train == "full":
                raise ValueError("replay works on cached embeddings: not with train='full'")
            self.teacher = self._freeze_teacher()

    # -- set-up ------------------------------------------------------------------------------
    def _set_trainable(self) -> list[torch.nn.Parameter]:
        md = self.model.mask_decoder
        parts = {
            "decoder": [md],
            "decoder+prompt": [md, self.model.prompt_encoder],
            "full": [self.model],
            "iou-head": [md.iou_prediction_head],
            "heads": [
                md.output_hypernetworks_mlps,
                md.iou_prediction_head,
                md.iou_token,
                md.mask_tokens,
            ],  # fmt: skip
        }[self.cfg.train]
        return FAM.trainable(self.model, parts, self.cfg.train)

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Loss and first-round IoU on a fixed, seeded sample of validation masks (the same
        prompts every time, so the numbers are comparable across steps)."""
        if not self.val_images:
            return {}
        rng = np.random.default_rng(self.cfg.seed + 1_000_003)
        per_batch = self.cfg.images_per_step * self.cfg.masks_per_image
        n_batches = max(1, math.ceil(self.cfg.val_masks / per_batch))
        tot: dict[str, float] = {"val_loss": 0.0, "val_iou_first": 0.0}
        masks = 0
        with torch.no_grad():
            for _ in range(n_batches):
                batch = self.sample_batch(rng, self.val_images)
                if batch is None:
                    continue
                st = self.simulate(batch, rng, train=False)
                tot["val_loss"] += st.loss * len(batch)
                tot["val_iou_first"] += st.iou_first * len(batch)
                masks += len(batch)
        return {k: v / max(1, masks) for k, v in tot.items()}

    # -- state -------------------------------------------------------------------------------
    def save(self, rng_state: dict[str, Any] | None = None) -> None:
        """Write the weights, the training state and the metadata (atomically)."""
        atomic_save(FAM.checkpoint(self.model), self.paths["weights"])
        atomic_save(
            {
                "format": STATE_FORMAT,
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "numpy_rng": V.dumps(rng_state or self.rng.bit_generator.state),
                "torch_rng": torch.get_rng_state(),
                "config": V.dumps(self.cfg.to_dict()),
                "elapsed": self.elapsed,
            },
            self.paths["state"],
        )
        self.write_meta()

    def load_state(self) -> None:
        """Continue from the files of an earlier run with the same ``out``."""
        from ..weights import load_checkpoint

        path = self.paths["state"]
        if not path.is_file():
            raise FileNotFoundError(f"no training state to resume from at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a segany training state")
        saved = TrainConfig.from_dict(json.loads(state["config"]))
        saved.steps = self.cfg.steps  # the one setting that may change on resume
        self.cfg = saved
        self.model.load_state_dict(load_checkpoint(self.paths["weights"]), strict=True)
        self.params = self._set_trainable()
        self.optimizer = _adamw(self.params, saved)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.cfg)
        )
        # after the scheduler's constructor (which resets the learning rate to step 0's)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        if self.cfg.train != "full":  # the loaded encoder names the cached embeddings
            self.embeddings = EmbeddingSource(self.model, self.embedding_cache)
        else:
            self.embeddings = None
        truncate_logs(self.paths, self.step)

    def write_meta(self, extra: dict[str, Any] | None = None) -> None:
        meta = {
            "format": META_FORMAT,
            "weights": self.paths["weights"].name,
            **self.meta,
            "train": self.cfg.train,
            "steps_done": self.step,
            "config": self.cfg.to_dict(),
            "split": {
                "val_fraction": self.cfg.val_fraction,
                "split_seed": self.cfg.split_seed,
                "train_images": [im.key for im in self.train_images],
                "val_images": [im.key for im in self.val_images],
                "train_masks": sum(im.num_masks for im in self.train_images),
                "val_masks": sum(im.num_masks for im in self.val_images),
            },
            "wall_seconds": round(self.elapsed, 1),
            "embedding_seconds": round(self.embed_seconds, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        atomic_write(self.paths["meta"], V.dumps(meta, indent=2) + "\n")

    # -- the loop ----------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train to ``config.steps`` optimizer steps (from the saved state with ``resume``)
        and return the metadata. On ``KeyboardInterrupt`` (or SIGTERM, in the main thread)
        the last completed step is saved (resume continues from it) and the interrupt is
        re-raised."""
        from tqdm import tqdm

        cfg = self.cfg
        self.paths["weights"].parent.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_state()
            cfg = self.cfg
        else:
            for key in ("csv", "jsonl"):
                self.paths[key].unlink(missing_ok=True)
        if not resume:
            torch.manual_seed(cfg.seed)
        if self.val_images:
            atomic_write(self.paths["val"], V.dumps(to_coco(self.val_images)) + "\n")
        if self.embeddings is not None:
            need = self.train_images + (self.val_images if cfg.val_every else [])
            need += self.replay_images if self.teacher is not None else []
            need += self.rehearse_images
            self.embed_seconds += self.embeddings.prepare(need, progress=self.progress)
        t_start = time.perf_counter() - self.elapsed
        acc = StepStats()
        acc_steps = 0
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress)  # fmt: skip
        # the random state after the last completed step: an interrupted step is discarded
        # and its draws replayed on resume
        rng_at_step = self.rng.bit_generator.state
        restore = _interrupt_on_sigterm()
        first_step, t_loop = self.step, time.perf_counter()
        try:
            while self.step < cfg.steps:
                self.optimizer.zero_grad(set_to_none=True)
                for _ in range(cfg.accumulate):
                    batch = None
                    while batch is None:
                        batch = self.sample_batch(self.rng)
                    st = self.simulate(batch, self.rng, train=True, scale=1 / cfg.accumulate)
                    if self.rehearse_images and cfg.rehearse_weight > 0:
                        st.rehearse = self.rehearse_step(self.rng, scale=1 / cfg.accumulate)
                    if self.teacher is not None:
                        st.replay = self.replay_loss(self.rng, train=True, scale=1 / cfg.accumulate)
                    add_stats(acc, st, 1 / cfg.accumulate)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                rng_at_step = self.rng.bit_generator.state
                acc_steps += 1
                self.elapsed = time.perf_counter() - t_start
                bar.update(1)
                bar.set_postfix(loss=f"{st.loss:.4f}", iou=f"{st.iou_first:.3f}")
                if self.step == first_step + 1 and self.progress and self.step < cfg.steps:
                    bar.write(
                        _estimate(time.perf_counter() - t_loop, cfg.steps - self.step),
                        file=sys.stderr,
                    )
                row: dict[str, Any] | None = None
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    row = log_row(self.step, lr, acc, acc_steps, self.elapsed)
                    if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                        row.update({k: round(v, 6) for k, v in self.validate().items()})
                    append_log(self.paths, row)
                    acc, acc_steps = StepStats(), 0
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self.step, row or {})
        except KeyboardInterrupt:
            bar.close()
            if self.step > 0:
                self.save(rng_state=rng_at_step)
            raise
        finally:
            restore()
        bar.close()
        self.elapsed = time.perf_counter() - t_start
        self.save()
        plot_log(self.paths["csv"], self.paths["plot"])
        return json.loads(self.paths["meta"].read_text())


def _interrupt_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` (so ``kill`` saves like Ctrl-C does; background
    jobs of a shell ignore SIGINT) while training; returns the function that restores it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the fused kernel where torch has one for the parameters' device."""
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def train(
    data: str | Path | TrainData,
    out: str | Path,
    *,
    model: str | Path | Sam = "mobile_sam",
    config: TrainConfig | None = None,
    images: str | Path | None = None,
    data_kind: str = "auto",
    embedding_cache: str | Path | None = "default",
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    meta: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    replay: str | Path | TrainData | None = None,
    rehearse: str | Path | TrainData | None = None,
    rehearse_images_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (catalogue name, checkpoint path or a model) on ``data`` (a
    source for :func:`.data.open_source`, or opened data) and write the run's files beside
    ``out``; returns the metadata. ``embedding_cache="default"`` keeps embeddings under
    :func:`default_embedding_cache`, ``None`` in memory only; ``on_step(step, log_row)`` is
    called after every optimizer step; ``replay`` (images: a folder or a COCO source) keeps
    the decoder close to the starting one on those images (:meth:`Trainer.replay_loss`);
    ``rehearse`` (a labelled source like ``data``, images in ``rehearse_images_dir`` if
    given; ``"coco10"``: the general set of :mod:`.rehearsal`, fetched once; ``"none"``
    or ``None``: no rehearsal) is trained on alongside, every image of it, one batch per
    step (:meth:`Trainer.rehearse_step`)."""
    from ..loader import load_model
    from .data import image_source, open_source, split_by_image

    cfg = config or TrainConfig()
    if resume:
        cfg = _resumed_config(out, cfg)
    dataset = data if isinstance(data, TrainData) else open_source(
        data, images=images, kind=data_kind
    )  # fmt: skip
    train_images, val_images = split_by_image(dataset.images, cfg.val_fraction, cfg.split_seed)
    if isinstance(model, Sam):
        sam, base = model, {"base_model": "<in-memory model>"}
    else:
        sam = load_model(model, device=device, progress=progress)
        base = {"base_model": str(model)}
    cache = default_embedding_cache() if embedding_cache == "default" else embedding_cache
    extra: dict[str, Any] = {}
    replay_images: list[TrainImage] = []
    meta_path = output_paths(out)["meta"]
    if resume and meta_path.is_file():  # the interrupted run's replay and rehearsal sources
        saved = json.loads(meta_path.read_text())
        if replay is None:
            replay = saved.get("replay", {}).get("source")
        if rehearse is None:
            rehearse = saved.get("rehearse", {}).get("source")
            rehearse_images_dir = saved.get("rehearse", {}).get("images_dir")
    if replay is not None:
        rdata = replay if isinstance(replay, TrainData) else image_source(replay)
        replay_images = rdata.images
        extra["replay"] = {"source": rdata.source, "images": len(replay_images)}
    rehearse_images: list[TrainImage] = []
    if rehearse is not None and not isinstance(rehearse, TrainData):  # a name or a source
        from .rehearsal import resolve

        rehearse, rehearse_images_dir = resolve(rehearse, rehearse_images_dir, progress=progress)
    if rehearse is not None:
        hdata = rehearse if isinstance(rehearse, TrainData) else open_source(
            rehearse, images=rehearse_images_dir
        )  # fmt: skip
        rehearse_images = hdata.images  # the trainer keeps those with masks
        extra["rehearse"] = {
            "source": hdata.source,
            "images_dir": None if rehearse_images_dir is None else str(rehearse_images_dir),
            "images": sum(1 for im in rehearse_images if im.num_masks),
            "masks": sum(im.num_masks for im in rehearse_images),
        }
    trainer = Trainer(
        sam,
        train_images,
        val_images,
        cfg,
        out,
        embedding_cache=cache,
        meta={**base, "data": dataset.describe(), **extra, **(meta or {})},
        progress=progress,
        device=device,
        replay_images=replay_images,
        rehearse_images=rehearse_images,
    )
    trainer.on_step = on_step
    return trainer.run(resume=resume)


def _estimate(first: float, remaining: int) -> str:
    """The time estimate printed after the first step of a run (its time x the rest)."""
    left = first * remaining
    done = time.strftime("%H:%M", time.localtime(time.time() + left))
    span = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return (
        f"segany train: first step {first:.1f} s; about {span} for the {remaining} steps "
        f"left (done near {done})"
    )


def _resumed_config(out: str | Path, cfg: TrainConfig) -> TrainConfig:
    """The configuration saved with ``out``'s training state (``steps`` from ``cfg``), so the
    split and the recipe stay those of the interrupted run."""
    path = output_paths(out)["state"]
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TrainConfig.from_dict(json.loads(state["config"]))
    saved.steps = cfg.steps
    return saved
