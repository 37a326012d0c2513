"""The plan of a labeling job (``OUT/plan.json``, see :mod:`.label`): its inputs (id, path,
shard), model, generator settings and, with classes, the detector; and the checks that a
``--resume`` asks for the same job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..everything import PRESETS, GeneratorSettings
from ..files import find_images, is_image_name
from .label_shards import FORMAT_VERSION
from .label_workers import TextConfig


class LabelError(RuntimeError):
    """A labeling job that cannot start (bad source, settings differ from the job on disk)."""


# -- source ----------------------------------------------------------------------------------
def list_source(source: str | os.PathLike[str], *, exclude: Path | None = None) -> list[str]:
    """The images of ``source``: a folder or an image file (:func:`segany.files.find_images`)
    or a text file with one path per line (relative to the file's folder; blank lines and
    ``#`` comments skipped; kept in order). Duplicates are dropped. Paths under ``exclude``
    (the output folder) are skipped."""
    src = Path(source).expanduser()
    if src.is_dir() or (src.is_file() and is_image_name(src.name)):
        found = [str(p) for p in find_images(src)]
    elif src.is_file():
        found = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            found.append(os.path.abspath(p if p.is_absolute() else src.parent / p))
    else:
        raise LabelError(f"source not found: {source}")
    if exclude is not None:
        ex = os.path.abspath(exclude) + os.sep
        found = [f for f in found if not f.startswith(ex)]
    return list(dict.fromkeys(found))


# -- plan and state --------------------------------------------------------------------------
def generator_settings(preset: str, overrides: dict[str, Any] | None) -> GeneratorSettings:
    if preset not in PRESETS:
        raise LabelError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GeneratorSettings)}
    bad = sorted(set(overrides or {}) - fields)
    if bad:
        raise LabelError(f"unknown generator setting(s) {bad}; known: {sorted(fields)}")
    return PRESETS[preset].replace(**(overrides or {}))


def _model_id(model: str) -> dict[str, Any]:
    from ..weights import resolve, sha256_file

    path, spec = resolve(model, progress=True)  # fetch once here, not in every worker
    sha = spec.sha256 if spec is not None and spec.sha256 else sha256_file(path)
    return {"name": str(model), "file": path.name, "sha256": sha}


def make_plan(
    source: str, out: Path, model: str, preset: str, settings: GeneratorSettings, size: int
) -> dict[str, Any]:
    paths = list_source(source, exclude=out)
    if not paths:
        raise LabelError(f"no images found in {source}")
    return {
        "version": FORMAT_VERSION,
        "source": os.path.abspath(source),
        "model": _model_id(model),
        "preset": preset,
        "settings": dataclasses.asdict(settings),
        "shard_size": size,
        "items": [[i + 1, p, i // size] for i, p in enumerate(paths)],
        "text": None,
    }


def _detector_ref(detector: str | os.PathLike[str]) -> str:
    """How a detector is recorded in the plan: an existing folder as its absolute path (the
    workers may run elsewhere), a catalogue name or hub id as given."""
    path = Path(os.fspath(detector)).expanduser()
    return os.fspath(path.resolve()) if path.is_dir() else os.fspath(detector)


def probe_detector(detector: str) -> dict[str, Any]:
    """Load the detector once in the coordinator, so that missing weights stop the job at
    its start (with :class:`~segany.text.DetectorWeightsError`'s message) instead of in
    every worker; returns its name, kind and default thresholds."""
    from ..text import load_detector

    det = load_detector(detector)
    info = {
        "name": str(getattr(det, "name", detector)),
        "kind": type(det).__name__,
        "default_box_threshold": det.default_box_threshold,
        "default_text_threshold": det.default_text_threshold,
    }
    return info


def text_plan(
    classes: list[str],
    detector: str,
    box_threshold: float | None,
    text_threshold: float | None,
) -> dict[str, Any]:
    """The plan's ``text`` entry of a new job with classes; the thresholds are recorded as
    they apply (the detector's defaults when not given)."""
    info = probe_detector(detector)
    box = info["default_box_threshold"] if box_threshold is None else box_threshold
    text = info["default_text_threshold"] if text_threshold is None else text_threshold
    return {
        "classes": list(classes),
        "detector": detector,
        "detector_name": info["name"],
        "detector_kind": info["kind"],
        "box_threshold": None if box is None else float(box),
        "text_threshold": None if text is None else float(text),
    }


def text_config(plan: dict[str, Any]) -> TextConfig | None:
    text = plan.get("text")
    if not text:
        return None
    return TextConfig(
        classes=tuple(text["classes"]),
        detector=text["detector"],
        box_threshold=text["box_threshold"],
        text_threshold=text["text_threshold"],
    )


def extend_plan(plan: dict[str, Any], source: str, out: Path) -> int:
    """Append the source's images that the plan does not list yet, in new shards (a shard
    of the plan never changes once planned). Returns how many were added."""
    known = {p for _, p, _ in plan["items"]}
    new = [p for p in list_source(source, exclude=out) if p not in known]
    if not new:
        return 0
    size = plan["shard_size"]
    next_id = max(i for i, _, _ in plan["items"]) + 1
    next_shard = max(s for _, _, s in plan["items"]) + 1
    for k, p in enumerate(new):
        plan["items"].append([next_id + k, p, next_shard + k // size])
    return len(new)


def check_same(key: str, given: Any, stored: Any) -> None:
    if given is not None and given != stored:
        raise LabelError(
            f"--resume: {key} differs from the job in this folder ({stored!r} there, "
            f"{given!r} now); rerun with the same settings or use a new --out"
        )


def text_request(
    classes: str | Sequence[str] | None,
    detector: str | os.PathLike[str] | None,
    box_threshold: float | None,
    text_threshold: float | None,
) -> dict[str, Any]:
    """The text options as given: classes parsed, detector as recorded in a plan."""
    parsed = None
    if classes is not None:
        from ..text import parse_queries

        try:
            parsed = parse_queries(classes)
        except ValueError as exc:
            raise LabelError(f"--classes: {exc}") from None
    for name, v in (("box threshold", box_threshold), ("text threshold", text_threshold)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise LabelError(f"{name} must lie in [0, 1], got {v}")
    return {
        "classes": parsed,
        "detector": None if detector is None else _detector_ref(detector),
        "box_threshold": None if box_threshold is None else float(box_threshold),
        "text_threshold": None if text_threshold is None else float(text_threshold),
    }
