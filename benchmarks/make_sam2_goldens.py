"""SAM 2 goldens from the reference package (``sam2==1.1.0``) with seeded random weights.

Real SAM 2 weights cannot be downloaded here, so parity is shown on random ones: the
reference model is built from an official config (hydra, as ``sam2.build_sam.build_sam2``
does) under ``torch.manual_seed(0)``, every parameter is then moved by seeded Gaussian noise
(so that nothing initialised to zero or one stays trivial), and ``SAM2ImagePredictor`` runs
prompts on real photos. Recorded: the image features, and per prompt the low-res logits,
IoU predictions, object scores (hooked from the decoder) and masks.

Run with the reference venv's python (segany never imports the reference packages)::

    # the small committed golden (a reduced Hiera, same reference code path)
    ~/.cache/segany-reference/venv/bin/python benchmarks/make_sam2_goldens.py goldens \\
        --config tiny-test --out tests/data/sam2_tiny_test_golden.npz
    # an official config, e.g. for tests/test_sam2.py's slow check
    ~/.cache/segany-reference/venv/bin/python benchmarks/make_sam2_goldens.py goldens \\
        --config configs/sam2.1/sam2.1_hiera_t.yaml --out /tmp/t.npz --checkpoint /tmp/t.pt
    # key names and shapes of every official config -> tests/data/sam2_official_keys.json
    ~/.cache/segany-reference/venv/bin/python benchmarks/make_sam2_goldens.py keys \\
        --out tests/data/sam2_official_keys.json

Every parameter is rounded to a float16 value before the run. With ``tiny-test`` the npz
holds the image-path weights themselves (``w:<key>``, float16, exact; the video-memory
modules left out) and the config as JSON, so a clone checks parity
without the reference package.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DAVIS = REPO.parent / "shared" / "data" / "davis17_firstframes" / "images"
IMAGES = {  # file, size the photo is reduced to (width, height)
    "tiny-test": [
        ("d17testdev_bike-trial_00000.jpg", (200, 112)),
        ("d17testdev_dolphins_00000.jpg", (96, 150)),
    ],
    "official": [
        ("d17testdev_bike-trial_00000.jpg", (480, 270)),
        ("d17testdev_dolphins_00000.jpg", (240, 320)),
    ],
}
OFFICIAL = [
    f"configs/{v}/{v}_hiera_{s}.yaml" for v in ("sam2.1", "sam2") for s in ("t", "s", "b+", "l")
]
# A reduced Hiera / neck / decoder width on the tiny config, 256 px input. The keyword
# names are those of segany.models.registry.sam2_custom; the hydra overrides say the same.
TINY_TEST = dict(
    embed_dim=16,
    num_heads=1,
    stages=[1, 2, 3, 1],
    window_spec=[8, 4, 6, 3],
    global_att_blocks=[4],
    window_pos_embed_bkg_spatial_size=[7, 7],
    d_model=32,
    img_size=256,
)
TINY_TEST_OVERRIDES = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,2,3,1]",
    "++model.image_encoder.trunk.window_spec=[8,4,6,3]",
    "++model.image_encoder.trunk.global_att_blocks=[4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[7,7]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
]
MEMORY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "mask_downsample.",
    "no_obj_ptr",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "no_obj_embed_spatial",
)
NOISE_STD = 0.05


def build(config: str, overrides: list[str]) -> torch.nn.Module:
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2(config, None, device="cpu", hydra_overrides_extra=overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * NOISE_STD)
            # values a float16 file holds exactly (the committed golden stores them so)
            p.copy_(p.half().float())
        for _, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())
    return model.eval()


def load_photo(name: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(DAVIS / name) as img:
        return np.asarray(img.convert("RGB").resize(size, Image.LANCZOS)).copy()


def cases_for(h: int, w: int) -> dict[str, dict]:
    """Prompts in the image frame, scaled to the image."""

    def px(fx: float, fy: float) -> list[float]:
        return [round(fx * w, 1), round(fy * h, 1)]

    box = [*px(0.25, 0.2), *px(0.7, 0.85)]
    return {
        "click": dict(point_coords=[px(0.5, 0.55)], point_labels=[1], multimask_output=True),
        "click_single": dict(
            point_coords=[px(0.5, 0.55)], point_labels=[1], multimask_output=False
        ),
        "two_clicks": dict(
            point_coords=[px(0.4, 0.5), px(0.8, 0.3)], point_labels=[1, 0], multimask_output=True
        ),
        "box": dict(box=box, multimask_output=False),
        "box_multi": dict(box=box, multimask_output=True),
        "point_box": dict(
            box=box,
            point_coords=[px(0.45, 0.6), px(0.3, 0.3)],
            point_labels=[1, 0],
            multimask_output=False,
        ),
    }


def run(
    config: str, overrides: list[str], images: list, out: Path, checkpoint: Path | None, tiny: bool
) -> None:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build(config, overrides)
    side = model.image_size
    pred = SAM2ImagePredictor(model)
    pred._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
    scores: list[torch.Tensor] = []
    model.sam_mask_decoder.register_forward_hook(
        lambda m, i, o: scores.append(o[3].detach().clone())
    )
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"config": config, "overrides": overrides, "noise_std": NOISE_STD, "cases": {}}
    sd = model.state_dict()
    if tiny:
        meta["segany_config"] = TINY_TEST
        for k, v in sd.items():
            if not k.startswith(MEMORY_PREFIXES):
                arrays[f"w:{k}"] = v.numpy().astype(np.float16)  # exact: see build()
    if checkpoint is not None:
        torch.save({"model": sd}, checkpoint)

    def record(key: str, out3, case: dict) -> None:
        masks, iou, low = out3
        arrays[f"{key}_masks"] = np.packbits(masks.astype(bool), axis=-1)
        arrays[f"{key}_iou"] = iou
        arrays[f"{key}_lowres"] = low
        arrays[f"{key}_objscore"] = torch.cat(scores).numpy()
        meta["cases"][key] = case
        scores.clear()

    with torch.no_grad():
        photos = [load_photo(n, s) for n, s in images]
        for i, img in enumerate(photos):
            arrays[f"image{i}"] = img
        img = photos[0]
        pred.set_image(img)
        arrays["image_embed"] = pred._features["image_embed"].numpy()
        arrays["high_res_s0"] = pred._features["high_res_feats"][0].numpy()
        arrays["high_res_s1"] = pred._features["high_res_feats"][1].numpy()
        h, w = img.shape[:2]
        cases = cases_for(h, w)
        for key, case in cases.items():
            scores.clear()
            args = {k: np.asarray(v) if k != "multimask_output" else v for k, v in case.items()}
            record(key, pred.predict(**args), case)
        # refinement: the click's best low-res logits fed back with a second click
        best = int(np.argmax(arrays["click_iou"]))
        arrays["refine_mask_input"] = arrays["click_lowres"][best][None]
        case = dict(
            point_coords=[cases["click"]["point_coords"][0], [0.2 * w, 0.2 * h]],
            point_labels=[1, 0],
            multimask_output=False,
            mask_input=True,
        )
        record(
            "refine",
            pred.predict(
                point_coords=np.asarray(case["point_coords"]),
                point_labels=np.asarray(case["point_labels"]),
                mask_input=arrays["refine_mask_input"],
                multimask_output=False,
            ),
            case,
        )
        # batched boxes (one prompt each, decoded together)
        boxes = np.array(
            [
                [0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h],
                [0.3 * w, 0.4 * h, 0.9 * w, 0.95 * h],
                [0.0, 0.0, w, h],
            ]
        )
        arrays["batch_boxes"] = boxes
        record(
            "batch",
            pred.predict(box=boxes, multimask_output=True),
            {"boxes": boxes.tolist(), "multimask_output": True},
        )
        # batched clicks
        pts = np.array([[[0.3 * w, 0.3 * h]], [[0.6 * w, 0.7 * h]]])
        arrays["batch_points"] = pts
        record(
            "batch_points",
            pred.predict(point_coords=pts, point_labels=np.ones((2, 1)), multimask_output=False),
            {"multimask_output": False},
        )
        # two images at once: set_image_batch / predict_batch
        pred.set_image_batch(photos)
        clicks = [np.array([[0.5 * p.shape[1], 0.5 * p.shape[0]]]) for p in photos]
        arrays["images_clicks"] = np.stack(clicks)
        m, s, lo = pred.predict_batch(clicks, [np.array([1])] * len(photos), multimask_output=True)
        for j in range(len(photos)):
            arrays[f"imgbatch{j}_masks"] = np.packbits(m[j].astype(bool), axis=-1)
            arrays[f"imgbatch{j}_iou"] = s[j]
            arrays[f"imgbatch{j}_lowres"] = lo[j]
        arrays["imgbatch1_embed_mean"] = pred._features["image_embed"][1].mean((1, 2)).numpy()
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(out, **arrays)
    print(out, out.stat().st_size, "bytes")


def dump_keys(out: Path) -> None:
    table = {}
    for cfg in OFFICIAL:
        model = build(cfg, [])
        table[cfg] = {k: list(v.shape) for k, v in model.state_dict().items()}
        print(cfg, len(table[cfg]), "keys")
        del model
    out.write_text(json.dumps(table, separators=(",", ":")))
    print(out, out.stat().st_size, "bytes")


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("goldens")
    g.add_argument("--config", default="tiny-test", help="tiny-test or an official config name")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--checkpoint", type=Path, help="also save {'model': state_dict} here")
    k = sub.add_parser("keys")
    k.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.cmd == "keys":
        dump_keys(a.out)
    elif a.config == "tiny-test":
        run(
            "configs/sam2.1/sam2.1_hiera_t.yaml",
            TINY_TEST_OVERRIDES,
            IMAGES["tiny-test"],
            a.out,
            a.checkpoint,
            True,
        )
    else:
        run(a.config, [], IMAGES["official"], a.out, a.checkpoint, False)


if __name__ == "__main__":
    main()
