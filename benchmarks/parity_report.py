"""Print per-case differences between segany and the recorded reference goldens.

Usage: .venv/bin/python benchmarks/parity_report.py [--reference DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from segany.loader import load_model
from segany.models import model_from_state_dict
from segany.predictor import Predictor

DEFAULT_REF = Path(__file__).resolve().parents[2] / "shared" / "reference"


def report(fname: str, model, ref: Path) -> None:
    index = json.loads((ref / "index.json").read_text())[fname]
    z = np.load(ref / fname)
    p = Predictor(model)
    p.set_image(z["image"])
    width = z["image"].shape[1]
    emb = np.abs(p.embedding.numpy() - z["embedding"]).max()
    print(f"{fname}: embedding max |diff| {emb:.2e}")
    cases = dict(index["cases"])
    cases["refine"] = index["refine"]
    for key, case in [*cases.items(), ("batch", None)]:
        if case is None:
            out = p.predict_batch(boxes=z["batch_boxes"], multimask_output=True)
            name = "4 boxes batched"
        else:
            get = lambda k, c=case: np.asarray(c[k]) if k in c else None  # noqa: E731
            out = p.predict(
                point_coords=get("point_coords"),
                point_labels=get("point_labels"),
                box=get("box"),
                mask_input=z["refine_mask_input"] if "mask_input" in case else None,
                multimask_output=case["multimask_output"],
            )
            name = case["name"]
        ref_masks = np.unpackbits(z[f"{key}_masks"], axis=-1, count=width).astype(bool)
        px = int((out.masks != ref_masks).sum())
        iou = np.abs(out.scores - z[f"{key}_iou"]).max()
        low = np.abs(out.low_res_logits - z[f"{key}_lowres"]).max()
        print(
            f"  {name:24s} mask px differing {px:4d} of {int(ref_masks.sum()):7d}"
            f"  iou {iou:.1e}  low-res {low:.1e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=DEFAULT_REF)
    args = ap.parse_args()
    torch.set_num_threads(2)
    mobile = load_model("mobile_sam", progress=False)
    for f in ("mobilesam_astronaut.npz", "mobilesam_coffee.npz", "mobilesam_bike_trial.npz"):
        report(f, mobile, args.reference)
    sd = np.load(args.reference / "vit_arch_state_dict.npz")
    vit = model_from_state_dict({k: torch.from_numpy(sd[k]) for k in sd.files})
    report("vit_arch_chelsea.npz", vit, args.reference)


if __name__ == "__main__":
    main()
