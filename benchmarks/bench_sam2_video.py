"""SAM 2.1 video tracking speed: segany's SAM 2 tracker against the reference
``SAM2VideoPredictor`` (``sam2==1.1.0``) on the same weights and frames.

Both sides load one checkpoint (random weights in the official layout made here by
segany's builder with a fixed seed, or ``--checkpoint`` a real file) and the first
``--frames`` frames of a DAVIS sequence; each runs in its own process with the same thread
count, the reference first, then segany, then (``--rounds`` > 1) again in turn. Timed:
``init_state`` + one click on frame 0 (``add``) and ``propagate_in_video`` over the
frames (``propagate``, one object). Printed: the CPU model, per side the seconds and
frames per second of the propagation (median over rounds), the ratio segany /
reference of the frames per second, and per segany side how far its logits at video size
are from the reference's on every frame (last round): relative L2, and the share of
confident pixels (reference logit beyond +-1) whose sign differs; with ``--bf16`` also
the bf16 side against segany's fp32 side (the drift bf16 adds).

    python benchmarks/bench_sam2_video.py --reference-python \\
        ~/.cache/segany-reference/venv/bin/python [--config sam2.1_hiera_t] [--frames 12] [--bf16]

``--bf16`` adds segany with the frames encoded by a bfloat16 copy of the image encoder
(``segany track --precision bf16``; masks differ from fp32's, see docs/sam2.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAVIS = REPO.parent / "shared" / "data" / "davis16_video" / "JPEGImages" / "480p"

WORKER = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
side, config, ckpt, threads, frames = sys.argv[1:6]
torch.set_num_threads(int(threads))
if side == "reference":
    from sam2.build_sam import build_sam2_video_predictor
    pred = build_sam2_video_predictor(config, ckpt, device="cpu")
else:
    from segany.compat import build_sam2_video_predictor
    from segany.models.fuse import fuse_for_inference
    pred = build_sam2_video_predictor(config, ckpt, device="cpu")
    fuse_for_inference(pred.model)  # as segany track's predictor does
    if side == "segany-bf16":  # as segany track --precision bf16 does
        from segany.predictor import Predictor
        from segany.video.sam2_tracker import tracker_for
        bf16 = tracker_for(Predictor(pred.model, precision="bf16"))
        pred.tracker.encoder, pred.tracker.attention = bf16.encoder, bf16.attention
t0 = time.perf_counter()
with torch.inference_mode():
    state = pred.init_state(frames)
    n = state["num_frames"]
    h, w = state["video_height"], state["video_width"]
    pred.add_new_points_or_box(state, 0, 1, points=[[w * 0.5, h * 0.5]], labels=[1])
    t1 = time.perf_counter()
    areas, kept = [], {}
    for f, ids, masks in pred.propagate_in_video(state):
        areas.append(int((masks[0] > 0).sum()))
        kept[str(f)] = masks[0, 0].float().numpy().astype("float16")  # logits
t2 = time.perf_counter()
import numpy as np
np.savez_compressed(sys.argv[6], **kept)
print(json.dumps({"add": t1 - t0, "propagate": t2 - t1, "frames": n, "areas": areas}))
"""


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_checkpoint(config: str, path: Path) -> None:
    import torch

    from segany.models import build_model

    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():  # parameters only: buffers are the reference's own
            p.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    with torch.no_grad():
        # random object scores sit near 0: shift them up so that the object is seen on
        # every frame and the masks compared below are not all "absent"
        state["sam_mask_decoder.pred_obj_score_head.layers.2.bias"].add_(5.0)
    torch.save({"model": state}, path)


def run_side(python: str, side: str, args: list[str], threads: int, masks: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [python, "-c", WORKER, side, *args, str(masks)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reference-python", required=True)
    ap.add_argument("--config", default="sam2.1_hiera_t")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--sequence", default="blackswan")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="also segany with the bfloat16 frame encoder (CPUs with bf16 units only)",
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = a.checkpoint
        if ckpt is None:
            ckpt = tmp / "random.pt"
            make_checkpoint(a.config, ckpt)
        clip = tmp / "frames"
        clip.mkdir()
        for i, src in enumerate(sorted((DAVIS / a.sequence).glob("*.jpg"))[: a.frames]):
            (clip / f"{i:05d}.jpg").symlink_to(src)
        config = f"configs/{a.config.rsplit('_hiera', 1)[0]}/{a.config}.yaml"
        args = [config, str(ckpt), str(a.threads), str(clip)]
        sides = ["segany", *(["segany-bf16"] if a.bf16 else [])]
        runs: dict[str, list[dict]] = {"reference": [], **{s: [] for s in sides}}
        for _ in range(a.rounds):
            ref = run_side(a.reference_python, "reference", args, a.threads, tmp / "reference.npz")
            runs["reference"].append(ref)
            for side in sides:
                runs[side].append(
                    run_side(sys.executable, side, args, a.threads, tmp / f"{side}.npz")
                )
        import numpy as np

        agree = {}
        pairs = [(side, "reference") for side in sides]
        if "segany-bf16" in sides:
            pairs.append(("segany-bf16", "segany"))  # the drift of bf16 from our fp32
        for side, base in pairs:
            ref_masks = np.load(tmp / f"{base}.npz")
            ours = np.load(tmp / f"{side}.npz")
            rel, flips = [], []
            for f in ref_masks.files:
                r, o = ref_masks[f].astype(np.float32), ours[f].astype(np.float32)
                rel.append(float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-9)))
                sure = np.abs(r) > 1
                flips.append(float(((o[sure] > 0) != (r[sure] > 0)).mean()) if sure.any() else 0)
            agree[(side, base)] = (rel, flips)
    print(f"CPU: {cpu_model()}; threads {a.threads}; {a.config}; {a.sequence} x {a.frames} frames")
    fps = {}
    for side, rs in runs.items():
        prop = statistics.median(r["propagate"] for r in rs)
        add = statistics.median(r["add"] for r in rs)
        fps[side] = rs[0]["frames"] / prop
        print(
            f"{side:9s} init+click {add:6.2f} s  propagate {prop:7.2f} s  {fps[side]:.3f} frames/s"
        )
    for side in sides:
        print(f"{side} / reference frames per second: {fps[side] / fps['reference']:.2f}x")
    for side in runs:
        print(f"mask areas per frame, {side}: {runs[side][0]['areas']}")
    for (side, base), (rel, flips) in agree.items():
        print(
            f"{side} against {base}, per frame: logits relative L2 mean {np.mean(rel):.2e}"
            f" (max {max(rel):.2e}); confident pixels (|logit| > 1) of another sign: mean "
            f"{np.mean(flips):.2e} (max {max(flips):.2e})"
        )


if __name__ == "__main__":
    main()
