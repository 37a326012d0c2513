"""Every command with an HQ-SAM model: ``--model PATH`` of a tiny HQ-SAM checkpoint file
(``tiny_hq_file``: the reduced ViT of ``hq_sam_tiny_test_golden.npz``, official bare state
dict), run the way tests/test_sam2_commands.py runs them for SAM 2. Outcomes are compared
with the same weights through :class:`Predictor` / :class:`MaskGenerator`, fused as the
loader fuses them (one mask per prompt: SAM's chosen output plus the HQ mask)."""

from __future__ import annotations

import copy
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from segany.cli import main
from segany.everything import MaskGenerator
from segany.masks import rle_to_mask
from segany.models import SamHQ
from segany.predictor import Predictor
from segany.transforms import load_image

from .conftest import REPO
from .test_eval import dataset  # noqa: F401  (the two-image COCO fixture)

SAMPLE = REPO / "examples" / "kitchen.jpg"  # 640 x 426
LOOSE = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def fused(model: SamHQ, **kw) -> Predictor:
    """A predictor over a fused copy, as ``load_predictor`` makes it."""
    return Predictor(copy.deepcopy(model), fuse=True, **kw)


@pytest.mark.parametrize("only", [False, True])
def test_segment_single_point(tmp_path, capsys, tiny_hq_file, tiny_hq, only):
    """A single click asks for multimask output, as for SAM: HQ-SAM answers with one mask
    (its best multimask output plus the HQ mask, or the HQ mask alone)."""
    out = tmp_path / "m.png"
    argv = ["segment", str(SAMPLE), "--point", "440,330", "--model", str(tiny_hq_file)]
    argv += ["--out", str(out), "--all-masks", "--overlay", str(tmp_path / "o.png")]
    assert main([*argv, *(["--hq-token-only"] if only else [])]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["masks"]) == 1 and summary["size"] == [640, 426]
    pred = fused(tiny_hq, hq_token_only=only)
    pred.set_image(load_image(SAMPLE))
    want = pred.predict(point_coords=[[440, 330]], point_labels=[1])
    assert want.masks.shape == (1, 426, 640)
    mask = np.asarray(Image.open(out)) > 0
    np.testing.assert_array_equal(mask, want.masks[0])
    assert summary["masks"][0]["score"] == pytest.approx(float(want.scores[0]), abs=1e-4)
    assert (tmp_path / "o.png").is_file()


def test_everything_reference_preset(tmp_path, capsys, tiny_hq_file, tiny_hq):
    """``everything`` with HQ-SAM: the grid's points each give one mask (the reference
    generator of ``segment_anything_hq`` calls its predictor with multimask output and
    ``hq_token_only=False``; its defaults are SAM 1's, the ``reference`` preset)."""
    out = tmp_path / "ev"
    argv = ["everything", str(SAMPLE), "--out", str(out), "--format", "coco"]
    argv += ["--preset", "reference", "--model", str(tiny_hq_file), "--points-per-side", "3"]
    assert main([*argv, "--pred-iou-thresh", "0", "--stability-thresh", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 1
    gen = MaskGenerator(fused(tiny_hq), preset="reference", box_nms_thresh=1.0, **LOOSE)
    gen.generate(load_image(SAMPLE))
    assert gen.last_prompts == 9
    gen = MaskGenerator(fused(tiny_hq), preset="reference", **LOOSE)
    want = gen.generate(load_image(SAMPLE))
    coco = json.loads((out / "annotations.json").read_text())
    assert summary["masks"] == len(coco["annotations"]) == len(want) > 0
    for ann, rec in zip(coco["annotations"], want, strict=True):
        np.testing.assert_array_equal(rle_to_mask(ann["segmentation"]), rec["segmentation"])


def test_generator_one_mask_per_point(tiny_hq):
    """Nine points, one mask each (no NMS, no filter), on both algorithms; the fast one's
    low-res path keeps each point's own mask."""
    img = load_image(SAMPLE)[::2, ::2].copy()
    for preset in ("reference", "fast"):
        gen = MaskGenerator(
            tiny_hq, preset=preset, box_nms_thresh=1.0, refine_points_per_side=(),
            dense_below_cover=0.0, **LOOSE,
        )  # fmt: skip
        records = gen.generate(img)
        assert gen.last_prompts == 9 and 0 < len(records) <= 9, preset
        points = {tuple(r["point_coords"][0]) for r in records}
        assert len(points) == len(records), preset  # never two masks from one point


def test_annotate_service_embeds_and_predicts(tmp_path, tiny_hq_file, tiny_hq):
    """The annotator on an HQ-SAM model: a click gives one candidate (the Predictor's), a
    refinement with it as mask input, a box, ``hq_token_only`` per request, pre-fill; a
    second service reads the embedding (with the HQ features) from the disk cache."""
    from fastapi.testclient import TestClient

    from segany.engine.server import build_service, create_app

    images = tmp_path / "images"
    images.mkdir()
    rgb = load_image(SAMPLE)[::2, ::2].copy()  # 213 x 320
    Image.fromarray(rgb).save(images / "k.png")
    kw = dict(db=f"sqlite:///{tmp_path / 'a.db'}", model=str(tiny_hq_file), prefetch=False)
    cache = tmp_path / "cache"

    def run(svc):
        with TestClient(create_app(svc), base_url="http://localhost") as client:
            (im,) = client.get("/api/images").json()["images"]
            assert client.post(f"/api/images/{im['id']}/open").status_code == 200
            url = f"/api/images/{im['id']}/predict"
            r = client.post(url, json={"points": [[200, 150]], "labels": [1]})
            assert r.status_code == 200, r.text
            first = r.json()
            chosen = first["masks"][first["best"]]["mask_input_id"]
            r = client.post(url, json={"points": [[200, 150]], "labels": [1], "multimask": False,
                                       "mask_input_id": chosen})  # fmt: skip
            assert r.status_code == 200, r.text
            refined = r.json()
            r = client.post(url, json={"box": [100, 60, 260, 200]})
            assert r.status_code == 200, r.text
            boxed = r.json()
            r = client.post(url, json={"box": [100, 60, 260, 200], "hq_token_only": True})
            assert r.status_code == 200, r.text
            only = r.json()
            r = client.post(
                f"/api/images/{im['id']}/prefill",
                json={"pred_iou_thresh": 0, "stability_score_thresh": 0, "points_per_side": 2,
                      "min_area": 0},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            filled = r.json()
            assert filled["created"] == len(filled["annotations"]) > 0
            return first, refined, boxed, only

    svc = build_service(images, cache_dir=cache, **kw)
    try:
        first, refined, boxed, only = run(svc)
    finally:
        svc.close()
        svc.store.close()
    assert first["width"] == 320 and first["height"] == 213 and len(first["masks"]) == 1
    pred = fused(tiny_hq)
    pred.set_image(rgb)
    want = pred.predict(point_coords=[[200, 150]], point_labels=[1])
    np.testing.assert_array_equal(rle_to_mask(first["masks"][0]["segmentation"]), want.masks[0])
    assert first["masks"][0]["score"] == pytest.approx(float(want.scores[0]), abs=1e-3)
    assert len(refined["masks"]) == 1 and len(boxed["masks"]) == 1
    box = np.array([100.0, 60, 260, 200])
    for got, flag in ((boxed, False), (only, True)):
        pred.hq_token_only = flag
        want = pred.predict(box=box)  # the request's default: multimask
        np.testing.assert_array_equal(rle_to_mask(got["masks"][0]["segmentation"]), want.masks[0])
    assert boxed["masks"][0]["segmentation"] != only["masks"][0]["segmentation"]
    assert len(list(cache.rglob("*.pt"))) == 1  # the embedding on disk
    svc = build_service(images, cache_dir=cache, **kw)
    svc.model.image_encoder.forward = None  # an encoding now would fail
    try:
        again = run(svc)
    finally:
        svc.close()
        svc.store.close()
    for a, b in zip(again, (first, refined, boxed, only), strict=True):
        assert [m["segmentation"] for m in a["masks"]] == [m["segmentation"] for m in b["masks"]]


def test_label(tmp_path, tiny_hq_file):
    """``segany label`` with one worker process, which loads the HQ file by path."""
    src = tmp_path / "src"
    src.mkdir()
    rgb = load_image(SAMPLE)
    sizes = [(96, 128), (80, 120)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rgb[i * 50 : i * 50 + h, i * 40 : i * 40 + w]).save(src / f"i{i}.png")
    argv = ["label", str(src), "--out", str(tmp_path / "out"), "--model", str(tiny_hq_file)]
    argv += ["--preset", "reference", "--workers", "1", "--no-progress"]
    assert main([*argv, *(f"--set={k}={v}" for k, v in LOOSE.items())]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report = manifest["counts"]
    assert report["images"] == 2 and report["errors"] == 0 and 0 < report["masks"] <= 18
    found = {}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard["path"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    ann = json.loads(tar.extractfile(m).read())
                    found[ann["image"]["file_name"]] = ann
    assert len(found) == 2 and sum(len(a["annotations"]) for a in found.values()) == report["masks"]
    for ann in found.values():
        h, w = ann["image"]["height"], ann["image"]["width"]
        for a in ann["annotations"]:
            assert rle_to_mask(a["segmentation"]).shape == (h, w) and a["area"] > 0


def test_eval_points_boxes_proposals_instances(dataset, tmp_path, tiny_hq_file):  # noqa: F811
    base = [str(dataset), "--model", str(tiny_hq_file), "--quiet"]
    assert main(["eval", "points", *base, "--out", str(tmp_path / "p"), "--max-clicks", "3"]) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["model"] == tiny_hq_file.stem and res["masks"] == 3
    assert set(res["miou"]) == {"1", "2", "3"}
    # one candidate per click: the oracle has nothing else to pick
    assert res["oracle_miou_1"] == pytest.approx(res["miou"]["1"])
    # the command's figures are the library's on the same model, loaded as the CLI loads it
    from segany.eval import protocols as EP
    from segany.loader import load_predictor

    pred, ds = load_predictor(tiny_hq_file, progress=False), EP.CocoDataset(dataset)
    assert res["miou"] == pytest.approx(EP.run_points(pred, ds, max_clicks=3)["miou"], abs=1e-6)
    assert main(["eval", "boxes", *base, "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["masks"] == 3
    assert res["miou"] == pytest.approx(EP.run_boxes(pred, ds)["miou"], abs=1e-6)
    argv = ["eval", "proposals", *base, "--out", str(tmp_path / "pr"), "--preset", "reference"]
    assert main([*argv, "--points-per-side", "3"]) == 0
    res = json.loads((tmp_path / "pr" / "results.json").read_text())
    assert res["settings"]["points_per_side"] == 3 and 0 <= res["ar_100"] <= 100
    argv = ["eval", "instances", *base, "--out", str(tmp_path / "i"), "--boxes", "gt"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "i" / "results.json").read_text())
    assert res["detections"] == 3 and res["box_ap"] == pytest.approx(100.0)
    lib = EP.run_instances(pred, ds, EP.load_detections("gt", ds))
    assert res["mask_ap"] == pytest.approx(lib["mask_ap"], abs=1e-6)


def test_weights_list_shows_hq(capsys):
    """The four HQ-SAM entries with their file, hash (or that none is published) and URL."""
    assert main(["weights", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    for size in ("vit_tiny", "vit_b", "vit_l", "vit_h"):
        line = rows[f"sam_hq_{size}"]
        assert f"huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_{size}.pth" in line
    assert "a7ac14a08532" in rows["sam_hq_vit_h"] and "0f32c075ccdd" in rows["sam_hq_vit_tiny"]
    for size in ("vit_b", "vit_l"):
        assert " not public " in rows[f"sam_hq_{size}"]  # the authors publish no SHA-256


def test_model_switch_keeps_embeddings_only_with_the_same_hq_features(
    tmp_path, tiny_hq, tiny_hq_file
):
    """The annotator keeps cached embeddings across a model switch only when the weights
    behind them are unchanged: for HQ-SAM, the encoder and the modules fusing the HQ
    features (an HQ-SAM fine-tune changes those, SAM's IoU head does not)."""
    import torch

    from segany.engine.server import build_service

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(load_image(SAMPLE)[::4, ::4].copy()).save(images / "k.png")
    svc = build_service(images, db=f"sqlite:///{tmp_path / 'a.db'}", model=str(tiny_hq_file),
                        prefetch=False)  # fmt: skip
    try:
        for part, kept in (("iou_prediction_head", True), ("compress_vit_feat", False)):
            model = copy.deepcopy(tiny_hq)
            with torch.no_grad():
                next(getattr(model.mask_decoder, part).parameters()).add_(0.5)
            switched = svc.switch_model(Predictor(model, fuse=True), name=part)  # as loaded
            assert switched["embeddings_kept"] is kept
    finally:
        svc.close()
        svc.store.close()


# -- the reference generator ---------------------------------------------------------------

#: tests/data/hq_amg_tiny_golden.json.gz, made by benchmarks/make_hq_amg_golden.py
#: (reference python): ``segment_anything_hq.SamAutomaticMaskGenerator`` on the tiny HQ-SAM
#: and the photo of hq_sam_tiny_test_golden.npz, four small runs (every mask; both filters;
#: box NMS; one crop layer). Tolerances as tests/test_sam2_amg.py's: same records in the
#: same order, mask IoU >= 0.999, predicted IoU 1e-5, stability 1e-4, boxes equal.
HQ_AMG_GOLDEN = REPO / "tests" / "data" / "hq_amg_tiny_golden.json.gz"


def _amg_golden() -> dict:
    import gzip

    with gzip.open(HQ_AMG_GOLDEN, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("run", sorted(_amg_golden()["runs"]))
def test_generator_matches_reference(run, tiny_hq):
    from segany.compat.hq import SamAutomaticMaskGenerator

    from .conftest import HQ_GOLDEN

    spec = _amg_golden()["runs"][run]
    image = np.load(HQ_GOLDEN)["image"]
    gen = SamAutomaticMaskGenerator(tiny_hq, output_mode="coco_rle", **spec["options"])
    ours, ref = gen.generate(image), spec["records"]
    assert len(ref) > 0 and len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert set(a) == set(b)
        ma, mb = rle_to_mask(a["segmentation"]), rle_to_mask(b["segmentation"])
        assert (ma & mb).sum() / max((ma | mb).sum(), 1) >= 0.999
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-4)
        np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-4)
        assert a["bbox"] == b["bbox"] and a["crop_box"] == b["crop_box"]
