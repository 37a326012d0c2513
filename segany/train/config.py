"""The training configuration: :class:`TrainConfig` (one schema for ``segany train``, the
annotator's retrain route and the trainer), the named :data:`RECIPES` and the learning-rate
schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import prompts as P

MODES = ("decoder", "decoder+prompt", "full", "iou-head", "heads")


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
