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

import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import transforms as T
from .. import validate as V
from ..files import atomic_file, atomic_write
from ..models import Sam
from ..predictor import EmbeddingCache, ImageEmbedding, image_key
from . import family as FAM
from . import prompts as P
from .data import TrainData, TrainImage, lowres_targets, to_coco

MODES = ("decoder", "decoder+prompt", "full", "iou-head", "heads")
LOG_FIELDS = (
    "step",
    "lr",
    "loss",
    "focal",
    "dice",
    "iou_mse",
    "object",
    "iou_first",
    "iou_last",
    "replay",
    "rehearse",
    "masks",
    "val_loss",
    "val_iou_first",
    "seconds",
)
STATE_FORMAT = "segany-train-state/1"
META_FORMAT = "segany-train/1"


@dataclass
class TrainConfig:
    """Everything that decides a run (saved in the metadata and the training state).

    The defaults are the recipe measured on this project's fine-tuning target (docs/
    training.md: +11 points 1-click mIoU on held-out nuclei with DAVIS 1-click improving
    too, in about ten minutes of a 2-core CPU with MobileSAM): decoder only, 120 steps,
    learning rate 2e-4 after 10 warmup steps, a first prompt (a box with odds 0.2, else a
    point) and one error-region point, and, given rehearsal images (``segany train``
    rehearses the shipped general set by default, see :mod:`.rehearsal`), their loss at
    weight 0.5. :data:`RECIPES` ``["paper"]`` holds the SAM paper's interactive rounds
    instead (8 points + 2 without, boxes with odds 0.5). The rest is the paper's (focal:dice
    20:1; IoU MSE x1; AdamW, weight decay 0.1, x0.1 at 2/3 and 26/27 of the steps); for SAM
    2 (``iou_loss="auto"``) the IoU error is absolute and the object score is trained
    (``object_weight``), as in SAM 2's training (see :mod:`.losses`). ``replay_*`` apply only
    when the trainer is given replay images (see :meth:`Trainer.replay_loss`),
    ``rehearse_weight`` only when it is given labelled rehearsal images.
    """

    steps: int = 120
    train: str = "decoder"
    lr: float = 2e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    decay_at: tuple[float, ...] = (2 / 3, 26 / 27)
    decay_factor: float = 0.1
    images_per_step: int = 2
    masks_per_image: int = 8
    accumulate: int = 1
    point_rounds: int = 1
    empty_rounds: int = 0
    box_prob: float = 0.2
    box_noise: float = P.BOX_NOISE
    box_max_shift: float = P.BOX_MAX_SHIFT
    box_multimask: bool = False
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_loss: str = "auto"
    object_weight: float = 1.0
    grad_clip: float = 0.0
    seed: int = 0
    val_fraction: float = 0.1
    split_seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    val_every: int = 0
    val_masks: int = 64
    replay_weight: float = 1.0
    replay_iou_weight: float = 50.0
    replay_rank_weight: float = 1.0
    replay_points: int = 4
    rehearse_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.train not in MODES:
            raise ValueError(f"train must be one of {MODES}, got {self.train!r}")
        for name in ("steps", "images_per_step", "masks_per_image", "accumulate", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.box_prob <= 1:
            raise ValueError("box_prob must be in [0, 1]")
        if self.iou_loss not in ("auto", "mse", "l1"):
            raise ValueError(f"iou_loss must be 'auto', 'mse' or 'l1', got {self.iou_loss!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.decay_at = tuple(self.decay_at)

    @property
    def rounds(self) -> int:
        return P.num_rounds(self.point_rounds, self.empty_rounds)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["decay_at"] = list(self.decay_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                      if k in names})  # fmt: skip


#: Named recipes: fields that differ from :class:`TrainConfig`'s defaults (``measured``).
RECIPES: dict[str, dict[str, Any]] = {
    "measured": {},
    "paper": {
        "steps": 1000,
        "lr": 1e-4,
        "warmup_steps": 50,
        "point_rounds": P.POINT_ROUNDS,
        "empty_rounds": P.EMPTY_ROUNDS,
        "box_prob": 0.5,
        "rehearse_weight": 1.0,
    },
}
DEFAULT_RECIPE = "measured"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warmup over
    ``warmup_steps``, then ``decay_factor`` per passed milestone (fractions of ``steps``)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    passed = sum(step >= int(round(f * cfg.steps)) for f in cfg.decay_at)
    return cfg.decay_factor**passed


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files of a run whose weights go to ``out`` (see the module doc)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return {
        "weights": out,
        "meta": stem.with_name(stem.name + ".json"),
        "state": stem.with_name(stem.name + ".train-state.pt"),
        "csv": stem.with_name(stem.name + ".log.csv"),
        "jsonl": stem.with_name(stem.name + ".log.jsonl"),
        "plot": stem.with_name(stem.name + ".loss.png"),
        "val": stem.with_name(stem.name + ".val.json"),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`segany.files.atomic_file` (durable)."""
    with atomic_file(path) as f:
        torch.save(obj, f)


class EmbeddingSource:
    """Image features of a frozen encoder (:func:`.family.embed`), computed once and kept in an
    :class:`~segany.predictor.EmbeddingCache` (on disk when ``cache_dir`` is given) under
    ``enc<encoder hash>-<image content hash>``."""

    def __init__(self, model: Sam, cache_dir: str | Path | None, *, max_items: int = 256) -> None:
        self.model = model
        self.cache = EmbeddingCache(cache_dir, max_items=max_items)
        # the weights behind the cached features (encoder; SAM 2's conv_s0/s1, no_mem_embed),
        # shared by every decoder fine-tune of one base model
        self.prefix = FAM.cache_prefix(model)
        self._keys: dict[str, str] = {}

    def _key(self, image: TrainImage, rgb: np.ndarray) -> str:
        return f"{self.prefix}-{image_key(rgb)}"

    def get(self, image: TrainImage) -> ImageEmbedding:
        key = self._keys.get(image.key)
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        rgb = image.load()
        key = self._key(image, rgb)
        self._keys[image.key] = key
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        item = FAM.embed(self.model, rgb)
        self.cache.put(key, item)
        return item

    def prepare(self, images: Sequence[TrainImage], progress: bool = True) -> float:
        """Embed every image not cached yet; returns the seconds spent."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        for im in tqdm(images, desc="embeddings", unit="img", disable=not progress):
            self.get(im)
        return time.perf_counter() - t0


@dataclass
class Batch:
    """``B`` masks from a few images, ready for the simulation (model frame, low-res)."""

    embeddings: torch.Tensor | None  # (n_images, C, h, w); None in full mode
    images: list[TrainImage]
    image_index: np.ndarray  # (B,) into images / embeddings
    input_size: np.ndarray  # (B, 2) (h, w)
    targets: torch.Tensor  # (B, G, G) bool
    valid: torch.Tensor  # (B, G, G) bool
    first_is_box: np.ndarray  # (B,) bool
    first_points: np.ndarray  # (B, 2) model frame
    boxes: np.ndarray  # (B, 4) model frame, jittered
    high_res: tuple[torch.Tensor, ...] = ()  # SAM 2: (n_images, ...) each; full mode: ()

    def __len__(self) -> int:
        return len(self.image_index)


@dataclass
class StepStats:
    loss: float = 0.0
    focal: float = 0.0
    dice: float = 0.0
    iou_mse: float = 0.0
    object: float = 0.0
    iou_first: float = 0.0
    iou_last: float = 0.0
    masks: int = 0
    replay: float = 0.0
    rehearse: float = 0.0


class Trainer:
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

    # -- batches -----------------------------------------------------------------------------
    def sample_batch(
        self, rng: np.random.Generator, images: Sequence[TrainImage] | None = None
    ) -> Batch | None:
        """Pick ``images_per_step`` images and up to ``masks_per_image`` masks of each, and
        draw their first prompts. ``None`` if every picked mask vanished at low res."""
        cfg = self.cfg
        pool = self.train_images if images is None else images
        n_img = min(cfg.images_per_step, len(pool))
        picked = [pool[i] for i in rng.choice(len(pool), size=n_img, replace=False)]
        img_list: list[TrainImage] = []
        index, sizes, targets, valids, is_box, points, boxes = [], [], [], [], [], [], []
        s = self.model.img_size
        for im in picked:
            k = min(cfg.masks_per_image, im.num_masks)
            sel = np.sort(rng.choice(im.num_masks, size=k, replace=False))
            masks = im.masks(sel)
            input_size = self.geometry.input_size(im.height, im.width)
            tgt, valid = lowres_targets(masks, input_size, s, self.grid)
            keep = tgt.reshape(len(tgt), -1).any(axis=1)
            if not keep.any():
                continue
            sel, masks, tgt = sel[keep], masks[keep], tgt[keep]
            j = len(img_list)
            img_list.append(im)
            n = len(sel)
            first_box = P.choose_first_prompts(n, rng, cfg.box_prob)
            pts = self.geometry.coords_to_model(P.sample_points(masks, rng), (im.height, im.width))
            bxs = self.geometry.boxes_to_model(im.boxes_xyxy(sel), (im.height, im.width)).numpy()
            bxs = P.jitter_boxes(bxs, rng, cfg.box_noise, cfg.box_max_shift)
            index += [j] * n
            sizes += [input_size] * n
            targets.append(tgt)
            valids.append(np.broadcast_to(valid, tgt.shape))
            is_box.append(first_box)
            points.append(pts.numpy())
            boxes.append(bxs)
        if not img_list:
            return None
        emb, high_res = None, ()
        if self.embeddings is not None:
            items = [self.embeddings.get(im) for im in img_list]
            emb = torch.cat([it.embedding for it in items]).to(self.device)
            maps = zip(*(it.high_res for it in items))
            high_res = tuple(torch.cat(t).to(self.device) for t in maps)
        return Batch(
            embeddings=emb,
            images=img_list,
            image_index=np.asarray(index, dtype=np.int64),
            input_size=np.asarray(sizes, dtype=np.int64),
            targets=torch.from_numpy(np.concatenate(targets)).to(self.device),
            valid=torch.from_numpy(np.concatenate(valids)).to(self.device),
            first_is_box=np.concatenate(is_box),
            first_points=np.concatenate(points),
            boxes=np.concatenate(boxes),
            high_res=high_res,
        )

    def _embed_full(
        self, images: list[TrainImage]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Full mode: the images of the batch through the encoder, with gradients."""
        xs = [FAM.model_input(self.model, im.load())[0] for im in images]
        return FAM.features(self.model, torch.cat(xs).to(self.device))

    # -- the simulation ----------------------------------------------------------------------
    def simulate(
        self, batch: Batch, rng: np.random.Generator, *, train: bool, scale: float = 1.0
    ) -> StepStats:
        """Run the rounds of interaction on ``batch``; with ``train``, back-propagate each
        round's loss (times ``scale``) as soon as it is computed (previous logits are
        detached, so rounds are independent graphs, except the shared encoder in full mode).
        """
        cfg = self.cfg
        b = len(batch)
        schedule = P.round_schedule(rng, cfg.point_rounds, cfg.empty_rounds)
        rounds = 1 + len(schedule)
        with torch.set_grad_enabled(train):
            if batch.embeddings is None:
                emb_all, hr_all = self._embed_full(batch.images)
            else:
                emb_all, hr_all = batch.embeddings, batch.high_res
            hr_all = FAM.decoder_features(self.model.mask_decoder, emb_all, hr_all)
        # rounds share this graph when the features learn (full mode; HQ-SAM's fusion)
        shared = any(t.requires_grad for t in (emb_all, *hr_all))
        idx = torch.from_numpy(batch.image_index).to(self.device)
        groups = [np.flatnonzero(~batch.first_is_box), np.flatnonzero(batch.first_is_box)]
        groups = [g for g in groups if len(g)]
        # every mask's points so far (box-first masks ignore column 0, their unused point)
        coords = batch.first_points[:, None].astype(np.float64)
        labels = np.ones((b, 1), dtype=np.int64)
        logits_prev: torch.Tensor | None = None
        valid_np = batch.valid.cpu().numpy()
        target_np = batch.targets.cpu().numpy()
        stats = StepStats(masks=b)
        n_backward = rounds * len(groups)
        done = 0
        for r in range(rounds):
            if r > 0 and schedule[r - 1]:
                assert logits_prev is not None
                pred = (logits_prev[:, 0] > 0).cpu().numpy()
                cells, lab = P.sample_error_points(target_np, pred, rng, valid_np)
                pts = P.lowres_to_model_points(cells, rng, self.stride, batch.input_size)
                coords = np.concatenate([coords, pts[:, None]], axis=1)
                labels = np.concatenate([labels, lab[:, None]], axis=1)
            new_logits = torch.zeros(b, 1, self.grid, self.grid, device=self.device)
            round_iou = torch.zeros(b, device=self.device)
            for g in groups:
                is_box_group = bool(batch.first_is_box[g[0]])
                gt = torch.from_numpy(g).to(self.device)
                kwargs: dict[str, Any] = {}
                n_pts = coords.shape[1] - (1 if is_box_group else 0)
                if n_pts > 0:
                    sl = slice(1, None) if is_box_group else slice(None)
                    kwargs["point_coords"] = (
                        torch.from_numpy(coords[g][:, sl]).float().to(self.device)
                    )
                    kwargs["point_labels"] = torch.from_numpy(labels[g][:, sl]).to(self.device)
                if is_box_group:
                    kwargs["boxes"] = torch.from_numpy(batch.boxes[g]).float().to(self.device)
                if logits_prev is not None:
                    kwargs["mask_input"] = logits_prev[gt]
                multimask = r == 0 and (not is_box_group or cfg.box_multimask)
                with torch.set_grad_enabled(train):
                    rows_g = idx[gt]
                    logits, iou, out = FAM.decode_loss(
                        self.model, emb_all[rows_g], tuple(t[rows_g] for t in hr_all),
                        batch.targets[gt], batch.valid[gt], cfg, multimask=multimask, **kwargs,
                    )  # fmt: skip
                done += 1
                share = len(g) / b / rounds
                if train:
                    last = done == n_backward
                    (out.loss * share * scale).backward(retain_graph=shared and not last)
                stats.loss += float(out.loss.detach()) * share
                stats.focal += float(out.focal) * share
                stats.dice += float(out.dice) * share
                stats.iou_mse += float(out.iou_mse) * share
                stats.object += float(out.object) * share
                pick = iou.detach().argmax(dim=1)  # the paper feeds the best-scored mask back
                rows = torch.arange(len(g), device=self.device)
                new_logits[gt, 0] = logits.detach()[rows, pick]
                round_iou[gt] = out.true_iou[rows, pick]
            logits_prev = new_logits
            if r == 0:
                stats.iou_first = float(round_iou.mean())
            stats.iou_last = float(round_iou.mean())
        return stats

    # -- rehearsal ---------------------------------------------------------------------------
    def rehearse_step(self, rng: np.random.Generator, *, scale: float = 1.0) -> float:
        """One batch of the labelled rehearsal images through :meth:`simulate`, its loss
        back-propagated times ``rehearse_weight * scale``; returns that batch's loss."""
        batch = None
        while batch is None:
            batch = self.sample_batch(rng, self.rehearse_images)
        st = self.simulate(batch, rng, train=True, scale=self.cfg.rehearse_weight * scale)
        return st.loss

    # -- replay ------------------------------------------------------------------------------
    def _freeze_teacher(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Frozen copies of the starting prompt encoder and mask decoder."""
        import copy

        pe = copy.deepcopy(self.model.prompt_encoder).eval()
        md = copy.deepcopy(self.model.mask_decoder)  # in the student's mode
        for p in [*pe.parameters(), *md.parameters()]:
            p.requires_grad_(False)
        return pe, md

    def _teacher_decode(
        self, emb: torch.Tensor, hr: tuple[torch.Tensor, ...], multimask: bool, **prompts: Any
    ) -> Any:
        assert self.teacher is not None
        pe, md = self.teacher
        points = None
        if prompts.get("point_coords") is not None:
            points = (prompts["point_coords"], prompts["point_labels"])
        sparse, dense = pe(points, prompts.get("boxes"), None)
        hr = FAM.decoder_features(md, emb, hr)
        return md(emb, pe.get_dense_pe(), sparse, dense, multimask, high_res_features=hr or None)

    def replay_loss(self, rng: np.random.Generator, *, train: bool, scale: float = 1.0) -> float:
        """Self-distillation on one replay image (no labels): the frozen starting decoder
        answers twice as many random points as ``replay_points``; the confident answers
        (best predicted IoU >= 0.8) give *object centres* (the point of the best mask
        farthest from its boundary, like the evaluation's first click), topped up with
        random points. On those points (three outputs) and on the boxes of their best masks
        (single output), the trained decoder's logits and IoUs are pulled towards the
        starting decoder's: ``focal_weight`` x per-pixel Bernoulli KL + ``replay_iou_weight``
        x IoU MSE + ``replay_rank_weight`` x :func:`rank_loss` (three outputs), times
        ``replay_weight``. Back-propagated with ``train``; returns the
        loss."""
        cfg = self.cfg
        assert self.embeddings is not None
        im = self.replay_images[int(rng.integers(len(self.replay_images)))]
        item = self.embeddings.get(im)
        emb = item.embedding.to(self.device)
        hr = tuple(t.to(self.device) for t in item.high_res)
        h, w = item.input_size
        n = cfg.replay_points
        valid = torch.zeros(self.grid, self.grid, dtype=torch.bool, device=self.device)
        valid[: -(-h // self.stride), : -(-w // self.stride)] = True
        labels = torch.ones(n, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            cand = np.stack([rng.integers(w, size=2 * n), rng.integers(h, size=2 * n)], axis=1)
            c_coords = torch.from_numpy(cand[:, None].astype(np.float32)).to(self.device)
            c_logits, c_iou = self._teacher_decode(
                emb, hr, True, point_coords=c_coords, point_labels=labels.repeat(2, 1)
            )
            score, pick = c_iou.max(dim=1)
            c_best = (c_logits[torch.arange(2 * n), pick] > 0) & valid
            pts = _object_centres(c_best.cpu().numpy(), score.cpu().numpy(), self.stride, n)
            pts = np.concatenate([pts, cand[: n - len(pts)]])
            coords = torch.from_numpy(pts[:, None].astype(np.float32)).to(self.device)
            t_logits, t_iou = self._teacher_decode(
                emb, hr, True, point_coords=coords, point_labels=labels
            )
            best = t_logits[torch.arange(n), t_iou.argmax(dim=1)] > 0
            boxes = _lowres_boxes(best & valid, self.stride, (h, w))
            t_box_logits, t_box_iou = self._teacher_decode(emb, hr, False, boxes=boxes)
        total = 0.0
        runs = [
            ({"point_coords": coords, "point_labels": labels}, True, t_logits, t_iou),
            ({"boxes": boxes}, False, t_box_logits, t_box_iou),
        ]
        for prompts, multimask, t_l, t_i in runs:
            with torch.set_grad_enabled(train):
                s_l, s_i = self.model.decode(
                    emb, multimask_output=multimask, **prompts,
                    high_res_features=FAM.decoder_features(self.model.mask_decoder, emb, hr),
                )  # fmt: skip
                p_t = torch.sigmoid(t_l)
                kl = F.binary_cross_entropy_with_logits(s_l, p_t, reduction="none")
                kl = kl - F.binary_cross_entropy_with_logits(t_l, p_t, reduction="none")
                kl = (kl * valid).sum(dim=(-1, -2)) / valid.sum()
                # the IoU term keeps the ranking of the three outputs (the one "auto"
                # picks), which drifts before the masks do
                loss = cfg.focal_weight * kl.mean()
                loss = loss + cfg.replay_iou_weight * ((s_i - t_i) ** 2).mean()
                if multimask and cfg.replay_rank_weight > 0:
                    loss = loss + cfg.replay_rank_weight * rank_loss(s_i, t_i)
                loss = cfg.replay_weight * loss / len(runs)
            if train:
                (loss * scale).backward()
            total += float(loss.detach())
        return total

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
        _atomic_save(FAM.checkpoint(self.model), self.paths["weights"])
        _atomic_save(
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
        _truncate_logs(self.paths, self.step)

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
                    _add(acc, st, 1 / cfg.accumulate)
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
                    row = _row(self.step, lr, acc, acc_steps, self.elapsed)
                    if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                        row.update({k: round(v, 6) for k, v in self.validate().items()})
                    _append_log(self.paths, row)
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


def rank_loss(
    student: torch.Tensor, teacher: torch.Tensor, t_teacher: float = 0.01, t_student: float = 0.02
) -> torch.Tensor:
    """Keeps *which* output ranks first (the "auto" mask), even where the teacher's predicted
    IoUs ``(B, K)`` are nearly tied: cross-entropy from the nearly one-hot softmax of the
    teacher's IoUs (temperature ``t_teacher``) to the student's (``t_student``), minus its
    value at the teacher's own IoUs (so it is 0 when the student equals the teacher)."""
    target = torch.softmax(teacher / t_teacher, dim=1)
    ce = -(target * torch.log_softmax(student / t_student, dim=1)).sum(dim=1)
    ref = -(target * torch.log_softmax(teacher / t_student, dim=1)).sum(dim=1)
    return (ce - ref).mean()


def _object_centres(
    masks: np.ndarray, scores: np.ndarray, stride: int, n: int, min_score: float = 0.8
) -> np.ndarray:
    """Model-frame points ``(k, 2)``, ``k <= n``: for the low-res masks ``(B, G, G)`` scored
    at least ``min_score`` (best first, one per distinct centre), the cell farthest from the
    mask's boundary, at its centre pixel."""
    from ..eval.clicks import farthest_point

    out: list[tuple[int, int]] = []
    for i in np.argsort(-scores, kind="stable"):
        if len(out) >= n or scores[i] < min_score:
            break
        found = farthest_point(masks[i])
        if found is None:
            continue
        x, y = found[0] * stride + stride // 2, found[1] * stride + stride // 2
        if (x, y) not in out:
            out.append((x, y))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _lowres_boxes(masks: torch.Tensor, stride: int, input_size: tuple[int, int]) -> torch.Tensor:
    """XYXY model-frame boxes ``(B, 4)`` around low-res masks ``(B, G, G)`` (cell edges);
    an empty mask gets the whole image."""
    h, w = input_size
    out = torch.tensor([[0.0, 0.0, float(w), float(h)]]).repeat(len(masks), 1)
    for i, m in enumerate(masks.cpu()):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            x0, y0 = int(xs.min()) * stride, int(ys.min()) * stride
            x1, y1 = (int(xs.max()) + 1) * stride, (int(ys.max()) + 1) * stride
            out[i] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    out[:, [0, 2]] = out[:, [0, 2]].clamp(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clamp(0, h)
    return out.to(masks.device)


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the fused kernel where torch has one for the parameters' device."""
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def _add(acc: StepStats, st: StepStats, w: float) -> None:
    for name in ("loss", "focal", "dice", "iou_mse", "object", "iou_first", "iou_last",
                 "replay", "rehearse"):  # fmt: skip
        setattr(acc, name, getattr(acc, name) + getattr(st, name) * w)
    acc.masks += st.masks


def _row(step: int, lr: float, acc: StepStats, n: int, seconds: float) -> dict[str, Any]:
    n = max(1, n)
    return {
        "step": step,
        "lr": lr,
        "loss": round(acc.loss / n, 6),
        "focal": round(acc.focal / n, 6),
        "dice": round(acc.dice / n, 6),
        "iou_mse": round(acc.iou_mse / n, 6),
        "object": round(acc.object / n, 6),
        "iou_first": round(acc.iou_first / n, 5),
        "iou_last": round(acc.iou_last / n, 5),
        "replay": round(acc.replay / n, 6),
        "rehearse": round(acc.rehearse / n, 6),
        "masks": acc.masks,
        "seconds": round(seconds, 1),
    }


def _append_log(paths: dict[str, Path], row: dict[str, Any]) -> None:
    new = not paths["csv"].is_file()
    with paths["csv"].open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in LOG_FIELDS})
    with paths["jsonl"].open("a") as f:
        f.write(V.dumps(row) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV log, numbers as floats (empty cells dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
        ]


def _truncate_logs(paths: dict[str, Path], step: int) -> None:
    """Drop log rows after ``step`` (written after the last checkpoint of a stopped run)."""
    rows = [r for r in read_log(paths["csv"]) if r["step"] <= step]
    for key in ("csv", "jsonl"):
        paths[key].unlink(missing_ok=True)
    for r in rows:
        r["step"] = int(r["step"])
        r["masks"] = int(r.get("masks", 0))
        _append_log(paths, r)


def plot_log(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss and first-round IoU against the step (train, and validation when logged)."""
    rows = read_log(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [r["loss"] for r in rows], label="train")
    ax2.plot(steps, [r["iou_first"] for r in rows], label="train, round 1")
    ax2.plot(steps, [r["iou_last"] for r in rows], label="train, last round", alpha=0.7)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax2.plot([r["step"] for r in val], [r["val_iou_first"] for r in val], "o-",
                 label="validation, round 1")  # fmt: skip
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (focal x20 + dice + IoU MSE)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("IoU of the fed-back mask")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def default_embedding_cache() -> Path:
    """Where training keeps image embeddings by default (``<segany cache>/embeddings``)."""
    from ..weights import cache_dir

    return cache_dir() / "embeddings"


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
