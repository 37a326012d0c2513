"""``segany train`` and ``segany retrain``; hooked into :mod:`segany.cli` by :func:`add_parser`.

segany train --data SRC --model mobile_sam --train decoder --steps N --out CKPT [...]
segany retrain IMAGES_DIR [--db URL] --out CKPT [--server URL] [...]

Every option left out takes the library's default (:class:`~segany.train.TrainConfig`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import validate as V

# option -> (TrainConfig field, type, help)
RECIPE_OPTIONS: dict[str, tuple[str, type, str]] = {
    "--lr": ("lr", float, "peak learning rate of AdamW"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--warmup-steps": ("warmup_steps", int, "linear warmup steps"),
    "--decay-factor": ("decay_factor", float, "learning-rate factor at each decay milestone"),
    "--images-per-step": ("images_per_step", int, "images per batch"),
    "--masks-per-image": ("masks_per_image", int, "masks sampled per image"),
    "--accumulate": ("accumulate", int, "batches accumulated per optimizer step"),
    "--point-rounds": ("point_rounds", int, "rounds adding a point from the error region"),
    "--empty-rounds": ("empty_rounds", int, "rounds without a new point (last one at the end)"),
    "--box-prob": ("box_prob", float, "odds that the first prompt is a box, not a point"),
    "--box-noise": ("box_noise", float, "box noise std as a fraction of the side"),
    "--iou-loss": ("iou_loss", str, "IoU-head error: mse, l1, or auto (SAM 2: l1, else mse)"),
    "--object-weight": ("object_weight", float, "weight of SAM 2's object-score loss"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm (0: off)"),
    "--seed": ("seed", int, "seed of the sampling of masks and prompts"),
    "--val-fraction": ("val_fraction", float, "fraction of the images held out"),
    "--split-seed": ("split_seed", int, "seed of the train/validation split"),
    "--checkpoint-every": ("checkpoint_every", int, "write weights and state every N steps"),
    "--log-every": ("log_every", int, "log a row every N steps"),
    "--val-every": ("val_every", int, "validation loss every N steps (0: never)"),
    "--val-masks": ("val_masks", int, "validation masks per evaluation"),
    "--replay-weight": ("replay_weight", float, "weight of the --replay distillation loss"),
    "--replay-points": ("replay_points", int, "prompts per replay image and step"),
    "--replay-iou-weight": ("replay_iou_weight", float, "weight of the replay IoU term"),
    "--replay-rank-weight": ("replay_rank_weight", float, "weight of the replay ranking term"),
    "--rehearse-weight": ("rehearse_weight", float, "weight of the --rehearse batches' loss"),
}


def _add_recipe(p: argparse.ArgumentParser) -> None:
    from .trainer import DEFAULT_RECIPE, RECIPES, TrainConfig

    defaults = TrainConfig()
    g = p.add_argument_group("recipe", "defaults: the library's TrainConfig")
    g.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=sorted(RECIPES),
        help="named recipe the options below override: measured (the defaults shown, "
        "measured in docs/training.md) or paper (SAM's 8+2 interactive rounds, 1000 steps) "
        f"(default: {DEFAULT_RECIPE})",
    )
    for flag, (name, typ, text) in RECIPE_OPTIONS.items():
        g.add_argument(flag, type=typ, help=f"{text} (default: {getattr(defaults, name)})")
    g.add_argument(
        "--decay-at",
        help=f"comma-separated fractions of the steps where the learning rate decays "
        f"(default: {','.join(f'{v:.3g}' for v in defaults.decay_at)}; '' for none)",
    )
    g.add_argument(
        "--box-multimask", action="store_true", help="three outputs for a first box prompt too"
    )


def _overrides(args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The recipe options given on the command line (and ``fixed``), as config fields."""
    kw: dict[str, Any] = dict(fixed)
    for name, *_ in RECIPE_OPTIONS.values():
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if getattr(args, "decay_at", None) is not None:
        kw["decay_at"] = tuple(float(v) for v in args.decay_at.split(",") if v.strip())
    if getattr(args, "box_multimask", False):
        kw["box_multimask"] = True
    return kw


def _config(args: argparse.Namespace, **fixed: Any) -> Any:
    from .trainer import RECIPES, TrainConfig

    return TrainConfig(**{**RECIPES[args.recipe], **_overrides(args, **fixed)})


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``retrain`` to the ``segany`` parser."""
    from ..datasets import KINDS
    from ..weights import DEFAULT_WEIGHTS
    from .rehearsal import GENERAL_SET, NO_REHEARSAL
    from .trainer import MODES, TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="fine-tune SAM on masks (COCO, SA-1B layout, the annotator's store, tracked videos)",
        description="Fine-tune with SAM's simulated interactive recipe. Writes CKPT (a normal "
        "checkpoint: use it as --model anywhere) and beside it CKPT-stem.json (metadata), "
        ".train-state.pt (for --resume), .log.csv/.log.jsonl, .loss.png and .val.json "
        "(the held-out images as COCO, for `segany eval`).",
    )
    p.add_argument("--data", required=True, help="COCO JSON or folder, SA-1B folder, store, "
                   "tracked videos (track.json, segany label's videos/, the annotator's video "
                   "export) or DAVIS PNGs")  # fmt: skip
    p.add_argument("--images", help="image folder (COCO: default DATA/images; store: the "
                   "annotated folder; tracked videos: the folder holding the videos by name, "
                   "or the one video)")  # fmt: skip
    p.add_argument(
        "--data-kind", default="auto", choices=KINDS,
        help="how to read --data (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--model",
        default=DEFAULT_WEIGHTS,
        help=f"catalogue name or checkpoint to start from (default: {DEFAULT_WEIGHTS})",
    )
    p.add_argument(
        "--train",
        default=defaults.train,
        choices=MODES,
        help="what learns: decoder (on cached embeddings; CPU), decoder+prompt, full (GPU), "
        "iou-head (the decoder's IoU head only: masks unchanged, only the choice among the "
        "three outputs), heads (hypernetwork MLPs, IoU head and output tokens; transformer "
        f"frozen) (default: {defaults.train})",
    )
    p.add_argument("--steps", type=int,
                   help=f"optimizer steps (default: the recipe's, {defaults.steps})")  # fmt: skip
    p.add_argument("--out", required=True, help="output checkpoint, e.g. runs/nuclei.pt")
    p.add_argument("--resume", action="store_true", help="continue the run of --out")
    p.add_argument(
        "--split-only",
        action="store_true",
        help="only write OUT-stem.val.json and OUT-stem.train.json (the split) and exit",
    )
    p.add_argument(
        "--embedding-cache",
        help="folder of cached embeddings (default: the segany cache's embeddings/)",
    )
    p.add_argument(
        "--replay",
        help="images (folder or COCO source) on which the decoder is kept close to the "
        "starting model, against forgetting their domain (no labels used)",
    )
    p.add_argument(
        "--rehearse",
        help="labelled masks of other domains (a source like --data, every image used): one "
        "batch of them per step, trained with the same recipe, against forgetting; "
        f"'{GENERAL_SET}' (default; its images are downloaded once) is 10 everyday COCO "
        f"photos, '{NO_REHEARSAL}' turns rehearsal off (on --resume: the run's own)",
    )
    p.add_argument("--rehearse-images", help="image folder of --rehearse (as --images)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_recipe(p)
    p.set_defaults(func=run_train)

    r = sub.add_parser(
        "retrain",
        help="model in the loop: fine-tune on the annotator's accepted masks, switch the server",
        description="Fine-tune the decoder on the accepted objects of an annotated folder "
        "(its store), write CKPT, record it in the store's model history and, with --server, "
        "make the running annotator switch to it.",
    )
    r.add_argument("images_dir", metavar="IMAGES_DIR", help="the annotated folder")
    r.add_argument("--db", help="database URL or file (default: IMAGES_DIR/.segany/annotations.db)")
    r.add_argument("--model", help="model to start from (default: the last switched-to "
                   f"checkpoint in the store's history, else {DEFAULT_WEIGHTS})")  # fmt: skip
    r.add_argument("--out", help="output checkpoint (default: IMAGES_DIR/.segany/models/"
                   "retrain-<n>.pt)")  # fmt: skip
    r.add_argument("--steps", type=int, help="optimizer steps (default: about two passes over "
                   "the accepted masks, 20 to 400)")  # fmt: skip
    r.add_argument("--train", default="decoder", choices=MODES, help="what learns")
    r.add_argument("--server", help="URL of the running annotator to switch, e.g. "
                   "http://127.0.0.1:8000")  # fmt: skip
    r.add_argument("--token", help="API token for --server (admin when auth is on)")
    r.add_argument("--embedding-cache", help="folder of cached embeddings")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_recipe(r)
    r.set_defaults(func=run_retrain)


def run_train(args: argparse.Namespace) -> int:
    from ..cli_common import CliError
    from ..files import atomic_write
    from .data import DataError, open_source, split_by_image, to_coco
    from .rehearsal import GENERAL_SET, RehearsalError
    from .trainer import output_paths, train

    fixed: dict[str, Any] = {"train": args.train}
    if args.steps is not None:
        fixed["steps"] = args.steps
    try:
        cfg = _config(args, **fixed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.train == "full" and args.device == "cpu":
        print("segany train: warning: --train full on the CPU is very slow; it is meant for "
              "a GPU (--device cuda)", file=sys.stderr)  # fmt: skip
    try:
        if args.split_only:
            data = open_source(args.data, images=args.images, kind=args.data_kind)
            tr, va = split_by_image(data.images, cfg.val_fraction, cfg.split_seed)
            paths = output_paths(args.out)
            atomic_write(paths["val"], V.dumps(to_coco(va)) + "\n")
            train_json = paths["val"].with_name(paths["val"].name.replace(".val.", ".train."))
            atomic_write(train_json, V.dumps(to_coco(tr)) + "\n")
            print(V.dumps({"train": str(train_json), "train_images": len(tr),
                              "train_masks": sum(i.num_masks for i in tr), "val": str(paths["val"]),
                              "val_images": len(va), "val_masks": sum(i.num_masks for i in va)},
                             indent=2))  # fmt: skip
            return 0
        rehearse = args.rehearse
        if rehearse is None and not args.resume:
            rehearse = GENERAL_SET
        meta = train(
            args.data,
            args.out,
            model=args.model,
            config=cfg,
            images=args.images,
            data_kind=args.data_kind,
            embedding_cache=args.embedding_cache or "default",
            resume=args.resume,
            progress=not args.quiet,
            device=args.device,
            meta={"command": " ".join(sys.argv)},
            replay=args.replay,
            rehearse=rehearse,
            rehearse_images_dir=args.rehearse_images,
        )
    except (DataError, FileNotFoundError, RehearsalError) as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"segany train: interrupted; continue with: segany train ... --out {args.out} "
              "--resume", file=sys.stderr)  # fmt: skip
        return 130
    if not args.quiet:
        shown = {k: meta[k] for k in ("weights", "steps_done", "wall_seconds") if k in meta}
        shown["split"] = {k: v for k, v in meta["split"].items() if not k.endswith("_images")}
        print(V.dumps(shown, indent=2))
    return 0


def run_retrain(args: argparse.Namespace) -> int:
    from ..cli_common import CliError
    from .data import DataError
    from .loop import LoopError, retrain_from_store, switch_server
    from .trainer import RECIPES

    try:
        fixed: dict[str, Any] = {"train": args.train}
        if args.steps is not None:
            fixed["steps"] = args.steps
        overrides = {**RECIPES[args.recipe], **_overrides(args, **fixed)}
        result = retrain_from_store(
            args.images_dir,
            db=args.db,
            model=args.model,
            out=args.out,
            config=overrides,
            embedding_cache=args.embedding_cache or "default",
            progress=not args.quiet,
        )
        if args.server:
            result["server"] = switch_server(args.server, result["checkpoint"], token=args.token)
    except (DataError, LoopError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(V.dumps(result, indent=2))
    return 0
