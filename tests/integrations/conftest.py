"""The real Label Studio module (``test_labelstudio_real.py``) is slow to prepare: its venv
takes minutes to build on a fresh machine. When that module is collected, its tests are moved
to the end of the run and the venv build starts at once in the background, so the download
and install overlap the rest of the suite; the module's fixture waits for it."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

REAL = "test_labelstudio_real.py"
SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "labelstudio-venv.sh"
#: The background build: (process, file with its stdout), or None when not started.
BUILD: dict[str, object] = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: build only for selected tests
def pytest_collection_modifyitems(session, config, items) -> None:
    real = [it for it in items if it.path.name == REAL]
    if not real or os.environ.get("SEGANY_SKIP_LABELSTUDIO") == "1":
        return
    items[:] = [it for it in items if it.path.name != REAL] + real
    if "proc" not in BUILD and not config.option.collectonly:
        out = tempfile.NamedTemporaryFile(prefix="segany-ls-venv-", suffix=".out", delete=False)
        BUILD["out"] = Path(out.name)
        BUILD["proc"] = subprocess.Popen(
            ["bash", str(SCRIPT)], stdout=out, stderr=subprocess.DEVNULL, start_new_session=True
        )
        out.close()


def background_build() -> tuple[int, str] | None:
    """Wait for the background build: ``(return code, its stdout)``, or None if none ran."""
    proc = BUILD.get("proc")
    if proc is None:
        return None
    assert isinstance(proc, subprocess.Popen)
    code = proc.wait(timeout=1800)
    out = BUILD["out"]
    assert isinstance(out, Path)
    return code, out.read_text()
