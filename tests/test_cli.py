"""The command line, run in-process."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from segany.cli import main

from .conftest import REPO

SAMPLE = REPO / "examples" / "kitchen.jpg"


def test_segment_writes_mask_overlay_and_json(tmp_path, capsys, mobile_sam):
    out = tmp_path / "m.png"
    code = main(
        [
            "segment",
            str(SAMPLE),
            "--point",
            "440,330",
            "--out",
            str(out),
            "--overlay",
            str(tmp_path / "o.png"),
            "--all-masks",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["masks"]) == 3 and summary["size"] == [640, 426]
    mask = np.asarray(Image.open(out))
    assert mask.shape == (426, 640) and set(np.unique(mask)) <= {0, 255}
    best = summary["masks"][summary["best"]]
    assert best["score"] == max(m["score"] for m in summary["masks"])
    assert (mask > 0).sum() == best["area"]
    assert mask[330, 440] == 255  # the clicked pixel is in the mask
    for rec in summary["masks"]:
        assert (tmp_path / f"m_{rec['index']}.png").exists()
    panel = np.asarray(Image.open(tmp_path / "o.png"))  # three candidates side by side
    assert panel.shape[0] > 426 and panel.shape[1] == 3 * 640 + 2 * 6 and panel.shape[2] == 3


def test_segment_box_and_negative_point(tmp_path, capsys, mobile_sam):
    code = main(
        ["segment", str(SAMPLE), "--box", "320,140,560,426", "--point", "350,300,0",
         "--out", str(tmp_path / "b.png")]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["masks"]) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["segment", str(SAMPLE), "--out", "x.png"], "at least one --point"),
        (["segment", "missing.jpg", "--point", "1,1", "--out", "x.png"], "no such image"),
        (["segment", str(SAMPLE), "--point", "9999,1", "--out", "x.png"], "outside"),
        (["segment", str(SAMPLE), "--point", "1,1", "--model", "nope", "--out", "x.png"], "nope"),
    ],
)
def test_segment_errors(args, message, capsys, tmp_path, monkeypatch, mobile_sam):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bad_point_syntax(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(SAMPLE), "--point", "1;2", "--out", "x.png"])
    assert exc.value.code == 2
    assert "--point" in capsys.readouterr().err


def test_weights_list_and_path(capsys, mobile_sam):
    assert main(["weights", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"mobile_sam", "sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert main(["weights", "path", "mobile_sam"]) == 0
    assert capsys.readouterr().out.strip().endswith("mobile_sam.pt")


def test_threads_oversubscription_refused(capsys):
    import os

    with pytest.raises(SystemExit) as exc:
        main(["--threads", str((os.cpu_count() or 1) + 1), "weights", "list"])
    assert exc.value.code == 2
    assert "oversubscribe" in capsys.readouterr().err


def test_parser_built_for_the_named_command_only():
    from segany.cli import _command_of, build_parser

    assert _command_of(["--threads", "2", "everything", "a.jpg"]) == "everything"
    assert _command_of(["--threads=1", "stats", "x"]) == "stats"
    assert _command_of(["-h"]) is None and _command_of([]) is None
    one = build_parser("everything")
    assert one.parse_args(["everything", "a.jpg", "--out", "o"]).command == "everything"
    with pytest.raises(SystemExit):  # the other commands are not there
        one.parse_args(["train", "--data", "d", "--out", "o"])
    full = build_parser()
    assert full.parse_args(["train", "--data", "d", "--out", "o"]).command == "train"


def test_precision_option_reaches_the_predictor(monkeypatch, tmp_path):
    """``--precision bf16`` on segment / everything / eval is passed to load_predictor;
    fp32 is the default and other values are refused by the parser."""
    from segany import cli

    seen = []

    def fake_load_predictor(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        raise cli.CliError("stop here")

    monkeypatch.setattr("segany.loader.load_predictor", fake_load_predictor)
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    for argv in (
        ["segment", str(img), "--point", "1,1,1", "--out", str(tmp_path), "--precision", "bf16"],
        ["everything", str(img), "--out", str(tmp_path / "o"), "--precision", "bf16"],
        ["segment", str(img), "--point", "1,1,1", "--out", str(tmp_path)],
    ):
        assert cli.main(argv) == 2
    assert seen == ["bf16", "bf16", "fp32"]
    with pytest.raises(SystemExit):
        cli.build_parser("segment").parse_args(["segment", "a", "--out", "o", "--precision", "x"])
    parser = cli.build_parser("eval")
    args = parser.parse_args(["eval", "points", "d", "--out", "o", "--precision", "bf16"])
    assert args.precision == "bf16"


@pytest.mark.parametrize("shape", [(1, 3000), (4000, 1), (2, 9000)])
def test_segment_thin_images(tmp_path, capsys, mobile_sam, shape):
    """Aspect ratios beyond 2048:1 used to resize to a zero-pixel side (a traceback)."""
    img = tmp_path / "thin.png"
    Image.fromarray(np.full((*shape, 3), 120, np.uint8)).save(img)
    x, y = shape[1] // 2, shape[0] // 2
    out = tmp_path / "m.png"
    assert main(["segment", str(img), "--point", f"{x},{y}", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["size"] == [shape[1], shape[0]]
    assert np.asarray(Image.open(out)).shape == shape


def test_everything_batch_survives_bad_images(tmp_path, capsys, mobile_sam, monkeypatch):
    from segany.everything import MaskGenerator

    src = tmp_path / "in"
    src.mkdir()
    Image.open(SAMPLE).resize((160, 107)).save(src / "a_good.jpg")
    (src / "b_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.full((1, 3000, 3), 200, np.uint8)).save(src / "c_thin.png")
    Image.open(SAMPLE).resize((64, 43)).save(src / "d_fails.jpg")
    generate = MaskGenerator.generate

    def flaky(self, image, *a, **k):  # an error inside the model on one image
        if image.shape[:2] == (43, 64):
            raise RuntimeError("simulated failure")
        return generate(self, image, *a, **k)

    monkeypatch.setattr(MaskGenerator, "generate", flaky)
    out = tmp_path / "out"
    argv = ["everything", str(src), "--out", str(out), "--points-per-side", "4"]
    code = main([*argv, "--preset", "reference"])  # the default preset takes a minute on
    assert code == 0  # the uniform 1x3000 image (docs/hardening.md)
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2
    skipped = {s["path"].split("/")[-1]: s["error"] for s in summary["skipped"]}
    assert set(skipped) == {"b_broken.jpg", "d_fails.jpg"}
    assert "simulated failure" in skipped["d_fails.jpg"]
    assert sorted(p.name for p in out.glob("*.json")) == ["a_good.json", "c_thin.json"]


def test_out_is_a_file_or_the_disk_is_full(tmp_path, capsys, mobile_sam, monkeypatch):
    afile = tmp_path / "taken"
    afile.write_text("x")
    code = main(["everything", str(SAMPLE), "--out", str(afile), "--points-per-side", "4"])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {afile} is a file" in err and "Traceback" not in err
    # a mask written under a path whose parent is a file
    code = main(["segment", str(SAMPLE), "--point", "440,330", "--out", str(afile / "m.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("segany: error: ") and str(afile) in err
    assert err.count("\n") == 1

    # a full disk: PIL's writes fail with ENOSPC
    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "m.png"
    code = main(["segment", str(SAMPLE), "--point", "440,330", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err == f"segany: error: No space left on device: {out}\n"


def test_info_reports_the_cpu_and_what_it_allows(capsys, monkeypatch):
    from segany import runtime

    fake = {"model": "Fake Xeon", "arch": "x86_64", "flags": frozenset({"avx2", "amx_bf16", "x"})}
    monkeypatch.setattr(runtime, "cpu_info", lambda: fake)
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["model"] == "Fake Xeon"
    assert report["cpu"]["flags"] == ["avx2", "amx_bf16"]  # only the flags that matter
    assert report["precisions"] == ["fp32", "bf16"]
    assert report["backends"][0] == "torch" and report["threads"] >= 1
    assert report["versions"]["torch"].startswith("2.13.0")
    monkeypatch.setattr(runtime, "cpu_info", lambda: {**fake, "flags": frozenset({"avx2"})})
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "cpu: Fake Xeon (x86_64)" in text and "bf16 refused" in text
    assert "matrix products: torch's BLAS" in text  # an Intel-like CPU: MKL's own kernels
    assert "small attention windows: the fused attention kernel" in text
    amd = {"model": "Fake EPYC", "vendor": "AuthenticAMD", "arch": "x86_64"}
    monkeypatch.setattr(runtime, "cpu_info", lambda: {**amd, "flags": frozenset({"avx512f"})})
    monkeypatch.delenv("SEGANY_PRODUCTS", raising=False)
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["vendor"] == "AuthenticAMD"
    assert report["cpu"]["products"] == (
        "onednn" if torch.backends.mkldnn.is_available() else "blas"
    )
    assert report["cpu"]["window_attention"] == (
        "products" if torch.backends.mkldnn.is_available() else "kernel"
    )
