"""Every command with a SAM 2 model: ``--model PATH`` of a tiny SAM 2.1 checkpoint file
(``tiny_sam2_file``: the reduced Hiera of ``sam2_tiny_test_golden.npz``, official
``{"model": state_dict}`` layout plus its size), run the way the other CLI tests run the
commands. Outcomes are compared with the in-memory model where one is known (the same
weights through :class:`Predictor` / :class:`MaskGenerator`)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from segany.cli import main
from segany.everything import PRESETS, MaskGenerator
from segany.masks import rle_to_mask
from segany.models.sam2 import Sam2
from segany.predictor import Predictor
from segany.transforms import load_image

from .conftest import REPO
from .test_eval import dataset  # noqa: F401  (the two-image COCO fixture)

SAMPLE = REPO / "examples" / "kitchen.jpg"  # 640 x 426
LOOSE = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def test_checkpoint_file_names_its_size(tiny_sam2_file, tiny_sam2):
    from segany.loader import load_model

    model = load_model(tiny_sam2_file, progress=False)
    assert isinstance(model, Sam2) and model.img_size == 256
    a, b = model.state_dict(), tiny_sam2.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "nope", "overrides": {}}, "not one of"),
        ({"name": "sam2_custom", "overrides": {"depth": 3}}, "unexpected keyword"),
        ({"name": "vit_t"}, "Missing key"),
        ("sam2_custom", "must be a dict"),
    ],
)
def test_bad_model_config_in_file_is_refused(tmp_path, tiny_sam2_file, config, message):
    import torch

    from segany.loader import load_model
    from segany.weights import WeightsError

    state = torch.load(tiny_sam2_file, weights_only=True)["model"]
    path = tmp_path / "bad.pt"
    torch.save({"model": state, "segany_model": config}, path)
    with pytest.raises(WeightsError, match=message):
        load_model(path, progress=False)


def test_segment(tmp_path, capsys, tiny_sam2_file, tiny_sam2):
    out = tmp_path / "m.png"
    argv = ["segment", str(SAMPLE), "--point", "440,330", "--model", str(tiny_sam2_file)]
    argv += ["--out", str(out), "--all-masks", "--overlay", str(tmp_path / "o.png")]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["masks"]) == 3 and summary["size"] == [640, 426]
    pred = Predictor(tiny_sam2)
    pred.set_image(load_image(SAMPLE))
    want = pred.predict(point_coords=[[440, 330]], point_labels=[1])
    for rec in summary["masks"]:
        mask = np.asarray(Image.open(tmp_path / f"m_{rec['index']}.png")) > 0
        assert mask.shape == (426, 640)
        np.testing.assert_array_equal(mask, want.masks[rec["index"]])
        assert rec["score"] == pytest.approx(float(want.scores[rec["index"]]), abs=1e-4)
    best = np.asarray(Image.open(out)) > 0
    assert best.sum() == summary["masks"][summary["best"]]["area"] > 0
    # a box with a negative click: one mask, inside the box's rows and columns mostly
    box = ["--box", "320,140,560,426", "--point", "350,300,0"]
    argv = ["segment", str(SAMPLE), *box, "--model", str(tiny_sam2_file)]
    assert main([*argv, "--out", str(tmp_path / "b.png")]) == 0
    assert len(json.loads(capsys.readouterr().out)["masks"]) == 1
    assert np.asarray(Image.open(tmp_path / "b.png")).shape == (426, 640)


def test_everything_sam2_preset(tmp_path, capsys, tiny_sam2_file, tiny_sam2):
    out = tmp_path / "ev"
    argv = ["everything", str(SAMPLE), "--out", str(out), "--format", "coco", "--preset", "sam2"]
    argv += ["--model", str(tiny_sam2_file), "--points-per-side", "3"]
    assert main([*argv, "--pred-iou-thresh", "0", "--stability-thresh", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "sam2" and summary["images"] == 1
    gen = MaskGenerator(tiny_sam2, preset="sam2", **LOOSE)
    want = gen.generate(load_image(SAMPLE))
    coco = json.loads((out / "annotations.json").read_text())
    assert summary["masks"] == len(coco["annotations"]) == len(want) > 0
    assert coco["images"][0]["width"] == 640 and coco["images"][0]["height"] == 426
    for ann, rec in zip(coco["annotations"], want, strict=True):
        mask = rle_to_mask(ann["segmentation"])
        np.testing.assert_array_equal(mask, rec["segmentation"])
    assert (out / "overlays" / "kitchen.png").is_file()


def test_everything_tiled(tmp_path, capsys, tiny_sam2_file):
    """``everything --tile-size``: the tiled generator with a SAM 2 model writes a label
    raster of the image's size with the objects it reports."""
    import rasterio

    out = tmp_path / "tiled"
    argv = ["everything", str(SAMPLE), "--out", str(out), "--model", str(tiny_sam2_file)]
    argv += ["--tile-size", "256", "--overlap", "64", "--preset", "sam2"]
    argv += ["--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-thresh", "0"]
    assert main(argv) == 0
    (image,) = json.loads(capsys.readouterr().out)["images"]
    with rasterio.open(out / "kitchen.tif") as src:
        labels = src.read(1)
    assert labels.shape == (426, 640) and image["objects"] > 0
    assert len(np.unique(labels[labels > 0])) == image["objects"]


def test_sam2_preset_is_the_references_defaults():
    """sam2==1.1.0 SAM2AutomaticMaskGenerator defaults (only pred_iou_thresh differs from
    SAM 1's generator); the default preset is unchanged."""
    s = PRESETS["sam2"]
    assert (s.algorithm, s.points_per_side, s.points_per_batch) == ("reference", 32, 64)
    assert (s.pred_iou_thresh, s.stability_score_thresh, s.stability_score_offset) == (
        0.8,
        0.95,
        1.0,
    )
    assert (s.box_nms_thresh, s.crop_n_layers, s.crop_nms_thresh) == (0.7, 0, 0.7)
    assert s.crop_overlap_ratio == 512 / 1500 and s.crop_n_points_downscale_factor == 1
    assert s.min_mask_region_area == 0 and s.multimask_output and not s.use_m2m
    assert PRESETS["reference"].pred_iou_thresh == 0.88


def test_m2m_and_single_mask_options(tiny_sam2):
    """use_m2m re-decodes every grid mask once (one output each); multimask_output=False
    gives one mask per point; the fast algorithm refuses both."""
    img = load_image(SAMPLE)[::2, ::2].copy()
    counts = {}
    for kw in ({}, {"use_m2m": True}, {"multimask_output": False}):
        gen = MaskGenerator(tiny_sam2, preset="sam2", box_nms_thresh=1.0, **{**LOOSE, **kw})
        gen.predictor.decode_low_res = _counting(gen.predictor.decode_low_res, calls := [])
        records = gen.generate(img)
        counts[tuple(kw)] = (len(records), [n for n, _ in calls], [mm for _, mm in calls])
    # 9 points; three masks each, then one refinement per mask with m2m
    assert counts[()][1:] == ([9], [True])
    assert counts[("use_m2m",)][1:] == ([9, 27], [True, False])
    assert counts[("multimask_output",)][1:] == ([9], [False])
    assert counts[("multimask_output",)][0] <= 9
    with pytest.raises(ValueError, match="algorithm 'reference'"):
        MaskGenerator(tiny_sam2, preset="fast", use_m2m=True)


def test_m2m_with_a_sam1_model(tiny_model, rgb_image):
    """The refinement feeds back whole low-res maps (padding included) on SAM 1 too."""
    gen = MaskGenerator(tiny_model, preset="reference", use_m2m=True, box_nms_thresh=1.0, **LOOSE)
    records = gen.generate(rgb_image)
    assert len(records) == 27  # 9 points x 3 masks, each refined to one
    assert all(r["segmentation"].shape == rgb_image.shape[:2] for r in records)
    plain = MaskGenerator(tiny_model, preset="reference", box_nms_thresh=1.0, **LOOSE)
    assert sorted(r["predicted_iou"] for r in records) != sorted(
        r["predicted_iou"] for r in plain.generate(rgb_image)
    )


def _counting(fn, calls):
    def spy(coords, labels, *args, **kwargs):
        calls.append((len(coords), kwargs.get("multimask_output", True)))
        return fn(coords, labels, *args, **kwargs)

    return spy


def test_annotate_service_embeds_and_predicts(tmp_path, tiny_sam2_file, tiny_sam2):
    """The annotator on a SAM 2 model: click, refine with the candidate as mask input, box;
    a second service reads the embedding (with its high-res maps) from the disk cache."""
    from fastapi.testclient import TestClient

    from segany.engine.server import build_service, create_app

    images = tmp_path / "images"
    images.mkdir()
    rgb = load_image(SAMPLE)[::2, ::2].copy()  # 213 x 320
    Image.fromarray(rgb).save(images / "k.png")
    kw = dict(db=f"sqlite:///{tmp_path / 'a.db'}", model=str(tiny_sam2_file), prefetch=False)
    cache = tmp_path / "cache"

    def run(svc):
        with TestClient(create_app(svc), base_url="http://localhost") as client:
            (im,) = client.get("/api/images").json()["images"]
            assert client.post(f"/api/images/{im['id']}/open").status_code == 200
            r = client.post(
                f"/api/images/{im['id']}/predict", json={"points": [[200, 150]], "labels": [1]}
            )
            assert r.status_code == 200, r.text
            first = r.json()
            chosen = first["masks"][first["best"]]["mask_input_id"]
            r = client.post(
                f"/api/images/{im['id']}/predict",
                json={"points": [[200, 150]], "labels": [1], "multimask": False,
                      "mask_input_id": chosen},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            refined = r.json()
            r = client.post(f"/api/images/{im['id']}/predict", json={"box": [100, 60, 260, 200]})
            assert r.status_code == 200, r.text
            boxed = r.json()
            # stage 2 pre-fill: the generator on the cached embedding (thresholds off)
            r = client.post(
                f"/api/images/{im['id']}/prefill",
                json={"pred_iou_thresh": 0, "stability_score_thresh": 0, "points_per_side": 2,
                      "min_area": 0},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            filled = r.json()
            assert filled["created"] == len(filled["annotations"]) > 0
            for a in filled["annotations"]:
                assert rle_to_mask(a["segmentation"]).shape == (213, 320)
            return first, refined, boxed

    svc = build_service(images, cache_dir=cache, **kw)
    try:
        first, refined, boxed = run(svc)
    finally:
        svc.close()
        svc.store.close()
    assert first["width"] == 320 and first["height"] == 213 and len(first["masks"]) == 3
    pred = Predictor(tiny_sam2)
    pred.set_image(rgb)
    want = pred.predict(point_coords=[[200, 150]], point_labels=[1])
    for m, mask, score in zip(first["masks"], want.masks, want.scores, strict=True):
        np.testing.assert_array_equal(rle_to_mask(m["segmentation"]), mask)
        assert m["score"] == pytest.approx(float(score), abs=1e-3)
        assert m["area"] == int(mask.sum())
    assert len(refined["masks"]) == 1 and len(boxed["masks"]) == 3
    assert rle_to_mask(boxed["masks"][0]["segmentation"]).shape == (213, 320)
    assert len(list(cache.rglob("*.pt"))) == 1  # the embedding on disk
    svc = build_service(images, cache_dir=cache, **kw)
    svc.model.image_encoder.forward = None  # an encoding now would fail
    try:
        again = run(svc)
    finally:
        svc.close()
        svc.store.close()
    for a, b in zip(again, (first, refined, boxed), strict=True):
        assert [m["segmentation"] for m in a["masks"]] == [m["segmentation"] for m in b["masks"]]


def test_label(tmp_path, capsys, tiny_sam2_file):
    """``segany label`` with one worker process, which loads the SAM 2 file by path."""
    src = tmp_path / "src"
    src.mkdir()
    rgb = load_image(SAMPLE)
    sizes = [(96, 128), (80, 120)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rgb[i * 50 : i * 50 + h, i * 40 : i * 40 + w]).save(src / f"i{i}.png")
    argv = ["label", str(src), "--out", str(tmp_path / "out"), "--model", str(tiny_sam2_file)]
    argv += ["--preset", "sam2", "--workers", "1", "--no-progress"]
    assert main([*argv, *(f"--set={k}={v}" for k, v in LOOSE.items())]) == 0
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert report["images"] == 2 and report["errors"] == 0 and report["masks"] > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
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
        assert (h, w) in sizes and ann["annotations"]
        for a in ann["annotations"]:
            assert rle_to_mask(a["segmentation"]).shape == (h, w) and a["area"] > 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["model"]["file"] == tiny_sam2_file.name and plan["preset"] == "sam2"


def test_eval_points_and_boxes(dataset, tmp_path, tiny_sam2_file):  # noqa: F811
    base = [str(dataset), "--model", str(tiny_sam2_file), "--quiet"]
    assert main(["eval", "points", *base, "--out", str(tmp_path / "p"), "--max-clicks", "3"]) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["model"] == tiny_sam2_file.stem and res["masks"] == 3
    assert set(res["miou"]) == {"1", "2", "3"} and res["oracle_miou_1"] >= res["miou"]["1"]
    # the command's figures are the library's on the same model, loaded as the CLI loads it
    from segany.eval import protocols as EP
    from segany.loader import load_predictor

    pred, ds = load_predictor(tiny_sam2_file, progress=False), EP.CocoDataset(dataset)
    lib = EP.run_points(pred, ds, max_clicks=3)
    assert res["miou"] == pytest.approx(lib["miou"], abs=1e-6)
    assert main(["eval", "boxes", *base, "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["masks"] == 3
    assert res["miou"] == pytest.approx(EP.run_boxes(pred, ds)["miou"], abs=1e-6)
    assert sum(v["masks"] for v in res["miou_by_size"].values()) == 3
    argv = ["eval", "proposals", *base, "--out", str(tmp_path / "pr"), "--preset", "sam2"]
    assert main([*argv, "--points-per-side", "3"]) == 0
    res = json.loads((tmp_path / "pr" / "results.json").read_text())
    assert res["preset"] == "sam2" and res["settings"]["pred_iou_thresh"] == 0.8
    assert res["settings"]["points_per_side"] == 3 and 0 <= res["ar_100"] <= 100
    argv = ["eval", "instances", *base, "--out", str(tmp_path / "i"), "--boxes", "gt"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "i" / "results.json").read_text())
    assert res["detections"] == 3 and res["box_ap"] == pytest.approx(100.0)
    assert res["mask_ap"] is not None and 0 <= res["mask_ap"] <= 100


def test_weights_list_shows_sam2(capsys):
    assert main(["weights", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    for v, day in (("sam2.1", "092824"), ("sam2", "072824")):
        for size, short in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l")):
            line = rows[f"{v}_hiera_{size}"]
            assert f"{v}_hiera_{short} " in line
            assert f"segment_anything_2/{day}/{v}_hiera_{size}.pt" in line


def test_segment_tiled_keeps_high_res_maps(tmp_path, capsys, tiny_sam2_file, tiny_sam2):
    """``segment --tile-size`` (large images): tiles are embedded in SAM 2's square frame
    and the tile store keeps the high-resolution maps, so a second run answers from the
    store alone with the same masks."""
    from segany.tiles import TiledPredictor

    cache = tmp_path / "tiles"
    argv = ["segment", str(SAMPLE), "--point", "440,330", "--model", str(tiny_sam2_file)]
    argv += ["--tile-size", "256", "--overlap", "64", "--embedding-cache", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "t.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(tmp_path / "t.png")) > 0
    assert mask.shape == (426, 640) and mask.sum() == summary["area"] > 0
    tp = TiledPredictor(Predictor(tiny_sam2), tile=256, overlap=64, cache_dir=cache)
    tp.predictor.embed = None  # every tile comes from the store written by the command
    tp.set_image(load_image(SAMPLE))
    pred = tp.predict(np.array([[440.0, 330.0]]), np.array([1]))
    stored = tp.tile_embedding(1, 2)
    assert tp.embedded == 0 and stored.input_size == (256, 256)
    assert [t.shape for t in stored.high_res] == [(1, 4, 64, 64), (1, 8, 32, 32)]
    best = int(np.argmax(pred.scores))
    assert best == summary["best"] and list(pred.tile) == summary["tile"]
    assert float(pred.scores[best]) == pytest.approx(summary["score"], abs=1e-4)
    np.testing.assert_array_equal(pred.masks[best], mask)
