"""backend="auto": measured once per machine and weights, recorded, overridable."""

from __future__ import annotations

import json

import pytest

from segany import autotune as A
from segany import info
from segany import weights as W


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    monkeypatch.delenv(A.BACKEND_ENV, raising=False)
    monkeypatch.setattr(A, "candidates", lambda model: ["torch", "onnx"])
    monkeypatch.setattr(A, "load_average", lambda: 0.0)  # an idle machine unless a test says
    return tmp_path


def fake(figures):
    calls = []

    def measure(model, model_id, backend):
        calls.append(backend)
        return figures[backend]

    return measure, calls


def test_auto_measures_once_and_records(fresh_cache, tiny_model):
    measure, calls = fake(
        {
            "torch": {"encode_s": 0.40, "click_s": 0.013},
            "onnx": {"encode_s": 0.30, "click_s": 0.015},
        }
    )
    assert A.resolve_backend("auto", tiny_model, "w1", measure=measure) == "onnx"
    assert calls == ["torch", "onnx"]
    again, calls2 = fake({})  # would fail if called
    assert A.resolve_backend("auto", tiny_model, "w1", measure=again) == "onnx" and not calls2
    data = json.loads((fresh_cache / "auto-backend.json").read_text())
    (entry,) = data.values()
    assert entry["backend"] == "onnx" and entry["figures"]["torch"]["click_s"] == 0.013
    # other weights are a new measurement
    other, calls3 = fake(
        {"torch": {"encode_s": 0.1, "click_s": 0.01}, "onnx": {"encode_s": 0.2, "click_s": 0.01}}
    )
    assert A.resolve_backend("auto", tiny_model, "w2", measure=other) == "torch"
    assert calls3 == ["torch", "onnx"]


def test_clicks_weigh_against_the_encoder(fresh_cache, tiny_model):
    # onnx encodes 0.02 s faster but clicks 10 ms slower: 10 clicks per image favour torch
    measure, _ = fake(
        {
            "torch": {"encode_s": 0.34, "click_s": 0.030},
            "onnx": {"encode_s": 0.32, "click_s": 0.040},
        }
    )
    assert A.resolve_backend("auto", tiny_model, "w", measure=measure) == "torch"


def test_overrides(fresh_cache, tiny_model, monkeypatch):
    measure, calls = fake({})
    assert A.resolve_backend("onnx-int8", tiny_model, "w", measure=measure) == "onnx-int8"
    monkeypatch.setenv(A.BACKEND_ENV, "torch")
    assert A.resolve_backend("auto", tiny_model, "w", measure=measure) == "torch"
    assert not calls and not (fresh_cache / "auto-backend.json").exists()


def test_single_candidate_is_not_timed(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    monkeypatch.delenv(A.BACKEND_ENV, raising=False)

    class Sam2Like:
        input_geometry = "square"

    assert A.candidates(Sam2Like()) == ["torch"]  # SAM 2's graphs: no decoder context
    from segany.models.registry import build_model

    hq = build_model("sam_hq_vit_tiny")  # HQ-SAM: no per-image decoder context in ONNX
    assert A.candidates(hq) == ["torch"]
    measure, calls = fake({})
    assert A.resolve_backend("auto", Sam2Like(), "w", measure=measure) == "torch" and not calls


def test_info_reports_the_choice(fresh_cache, tiny_model):
    sha = W.get_spec(W.DEFAULT_WEIGHTS).sha256
    assert info.collect()["auto_backend"]["backend"] is None  # not timed yet
    measure, _ = fake(
        {"torch": {"encode_s": 0.3, "click_s": 0.01}, "onnx": {"encode_s": 0.5, "click_s": 0.02}}
    )
    A.resolve_backend("auto", tiny_model, sha[:32], measure=measure)
    report = info.collect()
    assert report["auto_backend"]["backend"] == "torch"
    assert "torch: encode 300 ms, click 10.0 ms" in report["auto_backend"]["source"]
    assert "timed at load average 0.0" in report["auto_backend"]["source"]
    assert "provisional" not in report["auto_backend"]["source"]
    assert "auto backend: torch" in info._text(report)


def test_real_measure_of_the_torch_backend(tiny_model):
    fig = A.measure_backend(tiny_model, "tiny", "torch")
    assert set(fig) == {"encode_s", "click_s"} and fig["encode_s"] > 0 and fig["click_s"] > 0


def test_backends_are_timed_in_turns(monkeypatch, tiny_model):
    """Each round times every backend once before the next round (load from other
    programs then hits them alike); the first round is a warm-up, not counted."""
    import segany.predictor as P

    calls: list[tuple[str, str]] = []

    class Fake:
        def __init__(self, model, *, backend, model_id, cache):
            self.backend = backend

        def set_image(self, image):
            calls.append(("embed", self.backend))

        def predict(self, point_coords, point_labels):
            calls.append(("click", self.backend))

    monkeypatch.setattr(P, "Predictor", Fake)
    fig = A.measure_backends(tiny_model, "tiny", ["torch", "onnx"], rounds=2)
    assert set(fig) == {"torch", "onnx"}
    embeds = [b for op, b in calls if op == "embed"]
    clicks = [b for op, b in calls if op == "click"]
    assert embeds == ["torch", "onnx"] * 2
    assert clicks == ["torch", "onnx"] * 6
    assert all(f["encode_s"] >= 0 and f["click_s"] >= 0 for f in fig.values())


def test_a_choice_timed_on_a_busy_machine_is_timed_again_when_idle(
    fresh_cache, tiny_model, monkeypatch
):
    """Timed while other work keeps half the cores busy, the choice holds (and is recorded
    as provisional) while the machine stays busy; once it is idle it is timed again."""
    monkeypatch.setattr(A.R, "available_cpus", lambda: 2)
    monkeypatch.setattr(A, "load_average", lambda: 3.0)
    busy, calls = fake(
        {"torch": {"encode_s": 0.9, "click_s": 0.4}, "onnx": {"encode_s": 0.8, "click_s": 0.1}}
    )
    assert A.resolve_backend("auto", tiny_model, "w", measure=busy) == "onnx"
    entry = A.cached_choice("w")
    assert entry["busy"] is True and entry["load"] == 3.0
    assert "(a busy machine: provisional" in A.describe(entry)
    again, calls2 = fake({})
    assert A.resolve_backend("auto", tiny_model, "w", measure=again) == "onnx" and not calls2
    monkeypatch.setattr(A, "load_average", lambda: 0.2)
    idle, calls3 = fake(
        {"torch": {"encode_s": 0.3, "click_s": 0.01}, "onnx": {"encode_s": 0.35, "click_s": 0.02}}
    )
    assert A.resolve_backend("auto", tiny_model, "w", measure=idle) == "torch"
    assert calls3 == ["torch", "onnx"]
    assert A.cached_choice("w")["busy"] is False
    final, calls4 = fake({})
    assert A.resolve_backend("auto", tiny_model, "w", measure=final) == "torch" and not calls4


def test_the_choice_is_keyed_by_the_matrix_products(monkeypatch):
    """A choice timed with torch's BLAS products does not stand for the oneDNN ones (the
    torch side's clicks got faster on AMD CPUs with AVX-512 when they came)."""
    monkeypatch.setenv("SEGANY_PRODUCTS", "blas")
    blas = A.machine_key("m")
    assert A.machine_key("m") == blas  # stable
    monkeypatch.setenv("SEGANY_PRODUCTS", "onednn")
    assert A.machine_key("m") != blas
