"""HQ-SAM goldens from the reference package (``segment-anything-hq==0.3``), random weights.

Real HQ-SAM weights cannot be downloaded here, so parity is shown on random ones: the
reference modules (``ImageEncoderViT`` / ``TinyViT``, ``PromptEncoder``, ``MaskDecoderHQ``,
``Sam``) are composed with a reduced configuration under ``torch.manual_seed(0)``, every
parameter is moved by seeded Gaussian noise and rounded to a float16 value, and the
reference ``SamPredictor`` runs prompts on a real photo (``examples/kitchen.jpg``). Recorded
per prompt and per ``hq_token_only`` in (False, True): the low-res logits, IoU predictions
and masks; also the image embedding.

Run with the reference venv's python (segany never imports the reference packages)::

    # the small committed golden: a reduced ViT (256 px input, 32-wide embedding)
    ~/.cache/segany-reference/venv/bin/python benchmarks/make_hq_goldens.py goldens \\
        --config vit-tiny-test --out tests/data/hq_sam_tiny_test_golden.npz
    # light HQ-SAM (TinyViT): the reference reads a 64x64 stage-1 map, so the input is
    # 1024 px and the decoder 256 wide; too large to commit (tests/test_hq_sam.py's slow
    # check makes it in a temporary directory)
    ~/.cache/segany-reference/venv/bin/python benchmarks/make_hq_goldens.py goldens \\
        --config tinyvit-test --out /tmp/light.npz --checkpoint /tmp/light.pth
    # key names and shapes of the four official builds -> tests/data/hq_sam_official_keys.json
    ~/.cache/segany-reference/venv/bin/python benchmarks/make_hq_goldens.py keys \\
        --out tests/data/hq_sam_official_keys.json

With ``vit-tiny-test`` the npz holds the weights themselves (``w:<key>``, float16, exact)
and the segany registry keywords as JSON, so a clone checks parity without the reference
package. ``--checkpoint`` saves the state dict as the official files are saved (a bare
state dict).
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
PHOTO = REPO / "examples" / "kitchen.jpg"
NOISE_STD = 0.05
# The reduced configurations; the keywords are those of segany.models.registry's
# sam_hq_vit_b / sam_hq_vit_tiny overrides, which build_reference() turns into the
# reference constructors' arguments.
CONFIGS: dict[str, dict] = {
    "vit-tiny-test": dict(
        factory="sam_hq_vit_b",
        overrides=dict(
            img_size=256,
            embed_dim=32,
            depth=3,
            num_heads=2,
            global_attn_indexes=[1],
            window_size=4,
            prompt_dim=32,
        ),
        photo_size=(200, 150),
    ),
    "tinyvit-test": dict(
        factory="sam_hq_vit_tiny",
        overrides=dict(
            # the reference merges the last stage with stride 1 only when its width is 320
            # (or 448, 576), as MobileSAM's TinyViT does; segany's merge_strides default
            embed_dims=[16, 16, 32, 320],
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 10],
            window_sizes=[7, 7, 14, 7],
        ),
        photo_size=(400, 300),
    ),
}


def build_reference(name: str) -> torch.nn.Module:
    from segment_anything_hq.modeling import (
        ImageEncoderViT,
        MaskDecoderHQ,
        PromptEncoder,
        Sam,
        TinyViT,
        TwoWayTransformer,
    )

    cfg = CONFIGS[name]["overrides"]
    torch.manual_seed(0)
    if name == "vit-tiny-test":
        size, dim, vit_dim = cfg["img_size"], cfg["prompt_dim"], cfg["embed_dim"]
        encoder = ImageEncoderViT(
            img_size=size,
            patch_size=16,
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg["window_size"],
            global_attn_indexes=cfg["global_attn_indexes"],
        )
    else:  # the reference TinyViT's neck is 256 wide and its stage-1 map read as 64x64
        size, dim, vit_dim = 1024, 256, cfg["embed_dims"][2]
        encoder = TinyViT(
            img_size=size,
            in_chans=3,
            num_classes=1000,
            embed_dims=cfg["embed_dims"],
            depths=cfg["depths"],
            num_heads=cfg["num_heads"],
            window_sizes=cfg["window_sizes"],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            mbconv_expand_ratio=4.0,
        )
    grid = size // 16
    model = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=vit_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * NOISE_STD)
            p.copy_(p.half().float())  # float16-exact: the committed golden stores them so
        saved = model.state_dict()  # not pixel_mean / pixel_std (not saved, kept exact)
        for name, b in model.named_buffers():
            if name in saved and b.is_floating_point():
                b.copy_(b.half().float())
    return model.eval()


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
        "point_box": dict(
            box=box,
            point_coords=[px(0.45, 0.6), px(0.3, 0.3)],
            point_labels=[1, 0],
            multimask_output=False,
        ),
    }


def run(name: str, out: Path, checkpoint: Path | None) -> None:
    from segment_anything_hq import SamPredictor

    model = build_reference(name)
    pred = SamPredictor(model)
    arrays: dict[str, np.ndarray] = {}
    cfg = CONFIGS[name]
    meta: dict = {
        "config": name,
        "factory": cfg["factory"],
        "overrides": cfg["overrides"],
        "noise_std": NOISE_STD,
        "cases": {},
    }
    sd = model.state_dict()
    if name == "vit-tiny-test":
        for k, v in sd.items():
            arrays[f"w:{k}"] = v.numpy().astype(np.float16)  # exact: see build_reference()
    if checkpoint is not None:
        torch.save(sd, checkpoint)
    with Image.open(PHOTO) as img:
        photo = np.asarray(img.convert("RGB").resize(cfg["photo_size"], Image.LANCZOS)).copy()
    arrays["image"] = photo
    h, w = photo.shape[:2]

    def record(key: str, out3, case: dict) -> None:
        masks, iou, low = out3
        if isinstance(masks, torch.Tensor):
            masks, iou, low = (t.numpy() for t in (masks, iou, low))
        arrays[f"{key}_masks"] = np.packbits(masks.astype(bool), axis=-1)
        arrays[f"{key}_iou"] = iou
        arrays[f"{key}_lowres"] = low
        meta["cases"][key] = case

    with torch.no_grad():
        pred.set_image(photo)
        arrays["image_embed"] = pred.features.numpy()
        cases = cases_for(h, w)
        for hq in (False, True):
            tag = "_hq" if hq else ""
            for key, case in cases.items():
                args = {k: np.asarray(v) if k != "multimask_output" else v for k, v in case.items()}
                record(key + tag, pred.predict(**args, hq_token_only=hq), {**case, "hq": hq})
            # refinement: the click's low-res logits fed back with a second click
            mask_in = arrays["click" + tag + "_lowres"]
            arrays["refine" + tag + "_mask_input"] = mask_in
            case = dict(
                point_coords=[cases["click"]["point_coords"][0], [0.2 * w, 0.2 * h]],
                point_labels=[1, 0],
                multimask_output=False,
                mask_input=True,
                hq=hq,
            )
            out3 = pred.predict(
                point_coords=np.asarray(case["point_coords"]),
                point_labels=np.asarray(case["point_labels"]),
                mask_input=mask_in,
                multimask_output=False,
                hq_token_only=hq,
            )
            record("refine" + tag, out3, case)
            # batched boxes, decoded together
            boxes = np.array(
                [
                    [0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h],
                    [0.3 * w, 0.4 * h, 0.9 * w, 0.95 * h],
                    [0.0, 0.0, w, h],
                ]
            )
            arrays["batch_boxes"] = boxes
            boxes_t = pred.transform.apply_boxes_torch(torch.as_tensor(boxes), (h, w))
            out3 = pred.predict_torch(
                None, None, boxes=boxes_t.float(), multimask_output=True, hq_token_only=hq
            )
            record("batch" + tag, out3, {"multimask_output": True, "hq": hq})
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(out, **arrays)
    print(out, out.stat().st_size, "bytes")


def dump_keys(out: Path) -> None:
    from segment_anything_hq import sam_model_registry

    table = {}
    for name in ("vit_b", "vit_l", "vit_h", "vit_tiny"):
        # shapes only: the ViTs on the meta device (TinyViT's builder reads values: CPU)
        with torch.device("cpu" if name == "vit_tiny" else "meta"):
            model = sam_model_registry[name]()
        table[f"sam_hq_{name}"] = {k: list(v.shape) for k, v in model.state_dict().items()}
        print(name, len(table[f"sam_hq_{name}"]), "keys")
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
    g.add_argument("--config", default="vit-tiny-test", choices=sorted(CONFIGS))
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--checkpoint", type=Path, help="also save the state dict here")
    k = sub.add_parser("keys")
    k.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.cmd == "keys":
        dump_keys(a.out)
    else:
        run(a.config, a.out, a.checkpoint)


if __name__ == "__main__":
    main()
