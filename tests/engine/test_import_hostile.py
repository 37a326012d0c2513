"""Hostile COCO imports and a seeded fuzzer over the accept, predict, update and import
bodies (issue #18, items 1, 2, 8), each in a subprocess whose address space is capped
(``hostile_worker.py``): a regression that lets a NaN polygon reach pycocotools makes that
process fail (MemoryError, or a crash), not the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT = "/api/import/coco"


def _coco(seg=None, **ann) -> str:
    a = {"id": 7, "image_id": 1, "category_id": 1, "segmentation": seg}
    a.update(ann)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 144, "height": 96}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [a],
    }
    return json.dumps(data)


def _run(tmp_path: Path, *args: str, timeout: float = 240) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEGANY_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "tests.engine.hostile_worker", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, f"worker died ({r.returncode}): {r.stderr[-3000:]}"
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


SQUARE = [10, 10, 60, 10, 60, 50, 10, 50]
CASES = [
    # item 1: polygons that made pycocotools allocate without bound or segfault
    (_coco([[10, 10, float("nan"), 10, 60, 50]]), "polygon 0 holds NaN or infinity"),
    (_coco([[10, 10, float("inf"), 10, 60, 50]]), "polygon 0 holds NaN or infinity"),
    (_coco([[10, 10, 1e9, 10, 60, 50]]).replace("1000000000.0", "1e400"), "NaN or infinity"),
    (_coco([[10, 10, 1e9, 10, 60, 50]]), "far outside the 144x96 image"),
    # item 2: compressed RLE whose runs do not sum to H * W
    (_coco({"size": [96, 144], "counts": ""}), "runs sum to 0, expected height * width = 13824"),
    (_coco({"size": [96, 144], "counts": "1"}), "runs sum to 1, expected"),
    (_coco({"size": [96, 144], "counts": "ZZZZZZ"}), "counts ends in the middle of a run"),
    (_coco({"size": [96, 144], "counts": [13824, 5]}), "runs sum to 13829"),
    (_coco({"size": [96, 145], "counts": [13920]}), "does not match the image [96, 144]"),
    # item 8: odd COCO files
    (_coco([[1, 2, 3]]), "polygon 0 has 3 numbers"),
    (_coco([SQUARE], id=[7]), "annotation [7] (annotations[0]): id must be an integer"),
    (_coco([SQUARE], image_id=[1]), "image_id must be an integer, got [1]"),
    (_coco([SQUARE], image_id=2), "image_id 2 is not in 'images'"),
    (_coco([SQUARE], category_id="9" * 10_000), "category_id must be an integer, got '999"),
    (_coco([SQUARE], category_id=int("9" * 4000)), "category_id 999"),
    (_coco([SQUARE], category_id=3), "category_id 3 is not in 'categories'"),
    (_coco([SQUARE], score=float("nan")), "score must be finite, got nan"),
    (_coco([SQUARE], score=float("-inf")), "score must be finite, got -inf"),
    (_coco(None), "segmentation must be polygons or an RLE dict, got None"),
    (
        _coco([SQUARE]).replace('"name": "cat"', '"name": "   "'),
        "categories[0] (id 1): the name is blank",
    ),  # fmt: skip
    (
        _coco([SQUARE]).replace('"name": "cat"', '"name": "c\\u0000t"'),
        "categories[0] (id 1): the name is refused (category must not hold control characters)",
    ),  # fmt: skip
    (_coco([SQUARE]).replace('"name": "cat"', '"name": 5'), "name must be a string"),
    (
        _coco([SQUARE]).replace('"images": [{"id": 1,', '"images": [{"id": [1],'),
        "images[0]: id must be an integer",
    ),  # fmt: skip
]


def test_hostile_imports_refused_before_pycocotools(tmp_path):
    cases = [{"url": IMPORT, "body": body} for body, _ in CASES]
    # a good import after them: nothing before it was stored, and it still works
    cases.append({"url": IMPORT, "body": _coco([SQUARE])})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = _run(tmp_path, str(tmp_path / "cases.json"))
    assert len(out) == len(cases) + 1, out
    for (body, needle), got in zip(CASES, out, strict=False):
        assert got["status"] == 422, (body[:200], got)
        detail = json.loads(got["body"])["detail"]
        assert detail.startswith("COCO import refused: "), detail
        assert needle in detail, (needle, detail)
        assert len(detail) < 400, detail
        if "annotations" in needle or "annotation" in detail:
            assert "annotation 7 (annotations[0])" in detail or "[7]" in detail, detail
    assert out[len(CASES)]["status"] == 200
    assert json.loads(out[len(CASES)]["body"])["annotations"] == 1
    assert out[-1] == {"annotations": 1, "health": 200}


def test_fuzz_accept_predict_update_import(tmp_path):
    """200 seeded random bodies (a quarter each of predict, accept, update and import):
    never a 5xx, never NaN/Infinity in an answer, every answer JSON, exports still work, the
    process stays within its capped memory."""
    (out,) = _run(tmp_path, "--fuzz", "18", "200")
    assert out.get("ok") is True, out
    statuses = out["statuses"]
    assert all(int(s) < 500 for s in statuses), statuses
    assert statuses.get("422", 0) > 50 and statuses.get("200", 0) + statuses.get("201", 0) > 10


def test_parse_coco_decodes_annotations_lazily():
    import io

    import pytest

    from segany.engine.coco_import import JsonArray, parse_coco

    def parse(text: str):
        return parse_coco(io.BytesIO(text.encode()))

    doc = parse(' {"annotations" : [ {"id": 1}, {"id": 2} ] ,\n "images": [], "x": NaN } ')
    assert isinstance(doc["annotations"], JsonArray) and doc["images"] == []
    assert list(doc["annotations"]) == [{"id": 1}, {"id": 2}]
    assert list(doc["annotations"]) == [{"id": 1}, {"id": 2}]  # iterable again
    assert list(parse('{"annotations": []}')["annotations"]) == []
    assert parse('{"annotations": 5}')["annotations"] == 5  # refused later, with a message
    assert parse("{}") == {} and parse("[1, 2]") == [1, 2]
    assert parse('{"a": 1, "a": 2}') == {"a": 2}  # as json.loads
    for bad in ('{"annotations": [1, 2', '{"annotations": [1 2]}', '{"a": 1} x', '{"a" 1}',
                '{"a": 1,}', "", "\xff", '{"annotations": [1,]}'):  # fmt: skip
        with pytest.raises(ValueError):
            parse(bad)
