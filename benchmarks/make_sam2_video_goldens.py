"""SAM 2 video goldens from the reference ``SAM2VideoPredictor`` (``sam2==1.1.0``) on seeded
random weights.

The reference video model is built from ``configs/sam2.1/sam2.1_hiera_t.yaml`` with the
image path reduced as in ``make_sam2_goldens.py`` (``tiny-test``) and the memory reduced the
same way (memory attention and memory encoder 32 wide, memories 16 wide, two attention
layers), under ``torch.manual_seed(0)``; every parameter is then moved by seeded Gaussian
noise, the object-score head's last layer is scaled and shifted (its scores all sit near
+0.05 otherwise), and every parameter is rounded to a float16 value. The clip is six frames
of DAVIS-2016 ``horsejump-high`` reduced to 160x90 (committed as JPEG files in
``tests/data/sam2_video_clip/``).

The session, in this order: object 1 gets a click on frame 0, object 2 a box on frame 0,
object 3 an empty mask on frame 0 (absent there: the occlusion path); propagation forward;
a correction of object 1 on frame 3 (one positive and one negative click,
``clear_old_points=False``); a mask for object 2 on frame 4; propagation forward from frame
0 again; propagation backward from frame 4. (The reference fails on the CPU when a frame
has no object pointer to attend to, e.g. backward from the last frame: its stored memories
are bfloat16 and nothing promotes them.) Recorded per call and frame: the video-resolution
masks (logits > 0, packed bits), and per object the low-res logits, object score logit and
object pointer held in the inference state.

Settings: those of ``build_sam2_video_predictor`` (``apply_postprocessing``) except
``fill_hole_area=0`` (the reference's hole filling needs its CUDA extension, which is not
built here, so it is skipped anyway) and ``add_all_frames_to_correct_as_cond=true`` (so a
correction on a tracked frame becomes a conditioning frame and changes what follows).

Run with the reference venv's python::

    ~/.cache/segany-reference/venv/bin/python benchmarks/make_sam2_video_goldens.py \\
        --out tests/data/sam2_video_tiny_golden.npz

The npz holds the weights (``w:<key>``, float16, exact) and the segany config as JSON, so a
clone checks parity without the reference package.
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
DAVIS = REPO.parent / "shared" / "data" / "davis16_video" / "JPEGImages" / "480p"
CLIP = REPO / "tests" / "data" / "sam2_video_clip"
SEQUENCE, FRAMES, SIZE = "horsejump-high", 6, (160, 90)
NOISE_STD = 0.05
SCORE_SPREAD, SCORE_SHIFT = 100.0, 4.0
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# segany.models.registry.sam2_custom keywords (image path: as make_sam2_goldens' tiny-test)
SEGANY_CONFIG = dict(
    embed_dim=16,
    num_heads=1,
    stages=[1, 2, 3, 1],
    window_spec=[8, 4, 6, 3],
    global_att_blocks=[4],
    window_pos_embed_bkg_spatial_size=[7, 7],
    d_model=32,
    img_size=256,
    memory="2.1",
    mem_dim=16,
    memory_layers=2,
    memory_feedforward=64,
)
OVERRIDES = [
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
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=2",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    # build_sam2_video_predictor's post-processing settings, hole filling off (see above)
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=0",
    "++model.add_all_frames_to_correct_as_cond=true",
]
# segany compat keywords equal to the last two overrides
PREDICTOR_OPTIONS = dict(fill_hole_area=0, add_all_frames_to_correct_as_cond=True)


def write_clip() -> None:
    CLIP.mkdir(parents=True, exist_ok=True)
    for i in range(FRAMES):
        with Image.open(DAVIS / SEQUENCE / f"{i:05d}.jpg") as img:
            small = img.convert("RGB").resize(SIZE, Image.LANCZOS)
        small.save(CLIP / f"{i:05d}.jpg", quality=90)


def build() -> torch.nn.Module:
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    model = build_sam2_video_predictor(
        CONFIG, None, device="cpu", hydra_overrides_extra=OVERRIDES, apply_postprocessing=False
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * NOISE_STD)
        # spread the object scores (all near +0.05 otherwise) so that some frames predict
        # the object absent and the occlusion path runs
        head = model.sam_mask_decoder.pred_obj_score_head.layers[2]
        head.weight.mul_(SCORE_SPREAD)
        head.bias.mul_(SCORE_SPREAD).sub_(SCORE_SHIFT)
        for _, p in model.named_parameters():
            p.copy_(p.half().float())  # values a float16 file holds exactly
    return model.eval()


def session(pred, state) -> list[tuple[str, dict]]:
    """The prompts, in order (video pixels)."""
    w, h = SIZE
    return [
        ("add_points", dict(frame_idx=0, obj_id=1, points=[[0.45 * w, 0.5 * h]], labels=[1])),
        ("add_box", dict(frame_idx=0, obj_id=2, box=[0.1 * w, 0.15 * h, 0.55 * w, 0.9 * h])),
        ("add_mask", dict(frame_idx=0, obj_id=3, mask="empty")),
        ("propagate", dict()),
        (
            "add_points",
            dict(
                frame_idx=3,
                obj_id=1,
                points=[[0.6 * w, 0.4 * h], [0.2 * w, 0.8 * h]],
                labels=[1, 0],
                clear_old_points=False,
            ),
        ),
        ("add_mask", dict(frame_idx=4, obj_id=2, mask="ellipse")),
        ("propagate", dict(start_frame_idx=0)),
        ("propagate", dict(start_frame_idx=4, reverse=True)),
    ]


def object_mask(kind: str) -> np.ndarray:
    """A mask prompt at video size: an ellipse, or empty (the object is absent there)."""
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    ellipse = ((xx - 0.4 * w) / (0.2 * w)) ** 2 + ((yy - 0.55 * h) / (0.3 * h)) ** 2 <= 1.0
    return ellipse if kind == "ellipse" else np.zeros_like(ellipse)


def stored(state, obj_idx: int, frame: int) -> dict | None:
    d = state["output_dict_per_obj"][obj_idx]
    t = state["temp_output_dict_per_obj"][obj_idx]
    for src in (t["cond_frame_outputs"], t["non_cond_frame_outputs"]):
        if frame in src:
            return src[frame]
    return d["cond_frame_outputs"].get(frame) or d["non_cond_frame_outputs"].get(frame)


def run(out: Path) -> None:
    model = build()
    state = model.init_state(str(CLIP))
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {
        "config": CONFIG,
        "overrides": OVERRIDES,
        "noise_std": NOISE_STD,
        "segany_config": SEGANY_CONFIG,
        "predictor_options": PREDICTOR_OPTIONS,
        "steps": [],
    }
    for k, v in model.state_dict().items():
        arrays[f"w:{k}"] = v.numpy().astype(np.float16)

    def record(key: str, frame: int, obj_ids, video_res: torch.Tensor) -> None:
        arrays[f"{key}_video"] = np.packbits(video_res[:, 0].numpy() > 0, axis=-1)
        for idx, oid in enumerate(obj_ids):
            out_ = stored(state, idx, frame) if frame is not None else None
            if out_ is None:
                continue
            arrays[f"{key}_obj{oid}_lowres"] = out_["pred_masks"][0, 0].float().numpy()
            arrays[f"{key}_obj{oid}_score"] = out_["object_score_logits"].float().numpy()
            arrays[f"{key}_obj{oid}_ptr"] = out_["obj_ptr"].float().numpy()

    with torch.inference_mode():
        for i, (kind, args) in enumerate(session(model, state)):
            if kind == "add_points" or kind == "add_box":
                f, ids, video = model.add_new_points_or_box(state, **args)
                record(f"s{i}", f, ids, video)
                meta["steps"].append({"kind": kind, **args, "frames": [f]})
            elif kind == "add_mask":
                f, ids, video = model.add_new_mask(
                    state, **{**args, "mask": object_mask(args["mask"])}
                )
                record(f"s{i}", f, ids, video)
                meta["steps"].append({"kind": kind, **args, "frames": [f]})
            else:
                frames = []
                for f, ids, video in model.propagate_in_video(state, **args):
                    record(f"s{i}_f{f}", f, ids, video)
                    frames.append(f)
                meta["steps"].append({"kind": kind, **args, "frames": frames})
            print(kind, meta["steps"][-1]["frames"])
    for k, v in arrays.items():
        if k.endswith("_score"):
            print(k, v.ravel())
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(out, **arrays)
    print(out, out.stat().st_size, "bytes")


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--write-clip", action="store_true", help="(re)write the committed frames")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.write_clip or not CLIP.is_dir():
        write_clip()
    run(a.out)


if __name__ == "__main__":
    main()
