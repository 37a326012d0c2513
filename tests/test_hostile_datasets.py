"""Malformed COCO files given to ``segany eval``, ``train`` and ``stats``: one clear error
naming the file, the annotation and the problem; never a crash, never a silent mask.

The cases run in a subprocess with a 6 GB address-space limit: before the validation layer
a NaN polygon drove pycocotools to 17.8 GB and a 1e9 coordinate segfaulted the process, so a
regression fails this test instead of taking the machine down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

H, W = 40, 60
NAN = float("nan")
CASES = {
    "nan polygon": ({"segmentation": [[1, 1, NAN, 1, 30, 30]]}, "polygon 0 holds NaN or infinity"),
    "inf polygon": ({"segmentation": [[1, 1, 1e400, 1, 30, 30]]}, "polygon 0 holds NaN"),
    "1e9 polygon": ({"segmentation": [[1, 1, 1e9, 1, 30, 30]]}, "far outside the 60x40 image"),
    "3-number polygon": ({"segmentation": [[1, 1, 30]]}, "polygon 0 has 3 numbers"),
    "empty rle": ({"segmentation": {"size": [H, W], "counts": ""}}, "runs sum to 0"),
    "short rle": ({"segmentation": {"size": [H, W], "counts": "1"}}, "runs sum to 1"),
    "long rle": ({"segmentation": {"size": [H, W], "counts": "0ZZ<"}}, "expected height"),
    "no segmentation": ({"segmentation": None}, "has no segmentation"),
    "no category": ({"category_id": None}, "has no category_id"),
}
COMMANDS = {
    "eval": ["eval", "points", "{root}", "--out", "{root}/eval"],
    "train": ["train", "--data", "{root}", "--out", "{root}/m.pt", "--steps", "1"],
    "stats": ["stats", "{root}/annotations.json", "--out", "{root}/stats"],
}

DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    from segany.cli import main
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        print(json.dumps({"rc": rc, "err": err.getvalue()}), flush=True)
    """
)


def _write_case(root: Path, change: dict) -> None:
    ann = {"id": 5, "image_id": 1, "category_id": 1, "area": 10, "iscrowd": 0}
    ann["segmentation"] = [[1, 1, 30, 1, 30, 30]]
    for k, v in change.items():
        if v is None:
            ann.pop(k)
        else:
            ann[k] = v
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
        "annotations": [ann],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / "a.jpg")
    (root / "annotations.json").write_text(json.dumps(data))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_malformed_coco_gives_one_clear_error(tmp_path, command):
    runs = []
    for name, (change, _) in CASES.items():
        root = tmp_path / name.replace(" ", "_")
        _write_case(root, change)
        runs.append([a.format(root=root) for a in COMMANDS[command]])
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(CASES)
    for (name, (_, message)), res in zip(CASES.items(), results, strict=True):
        err = res["err"]
        assert res["rc"] == 2, (name, res)
        assert "Traceback" not in err, (name, err)
        assert err.count("\n") == 1, (name, err)  # one line
        assert "annotations.json: annotation 5" in err, (name, err)
        assert message in err, (name, err)
