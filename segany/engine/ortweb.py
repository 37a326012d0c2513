"""onnxruntime-web for the annotator's browser decoder: fetched once from the npm registry
(version pinned, the tarball checked against the registry's SHA-512 ``integrity`` and the
SHA-512 pinned here), the few files the page needs extracted into the segany cache and
served by the annotator. Nothing is loaded from a CDN at run time.

    python -m segany.engine.ortweb        # fetch (make install / make test run it)

Only the standard library: no npm needed on the machine.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

from ..files import atomic_write

VERSION = "1.30.0"
#: ``dist.integrity`` of onnxruntime-web@VERSION in the npm registry (checked twice: against
#: the registry's answer at fetch time, and pinned here against a changed answer).
INTEGRITY = (
    "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1Si"
    "gqR4CXAfKYQ=="
)
REGISTRY = "https://registry.npmjs.org"
#: The WebAssembly-only build (global ``ort``), its Emscripten glue (loaded by ``import()``,
#: also in the worker threads) and the SIMD + threads binary (runs single-threaded when the
#: page is not cross-origin isolated).
FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


def ort_dir() -> Path:
    """``<segany cache>/web/onnxruntime-web-<VERSION>``."""
    from ..weights import cache_dir

    return cache_dir() / "web" / f"onnxruntime-web-{VERSION}"


def available(directory: Path | None = None) -> bool:
    """Whether the files the page needs are in the cache (checked by the stamp written
    after the verified extraction)."""
    d = directory or ort_dir()
    return (d / "integrity.txt").is_file() and all((d / f).is_file() for f in FILES)


def sri(data: bytes) -> str:
    """The npm ``integrity`` string (SHA-512, base64) of ``data``."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def extract(tgz: bytes, directory: Path) -> Path:
    """Check ``tgz`` against :data:`INTEGRITY` and write :data:`FILES` from its ``dist/``
    into ``directory``."""
    got = sri(tgz)
    if got != INTEGRITY:
        raise RuntimeError(
            f"onnxruntime-web-{VERSION}.tgz fails its integrity check: {got} != {INTEGRITY}"
        )
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        for name in FILES:
            member = tar.extractfile(f"package/dist/{name}")
            if member is None:
                raise RuntimeError(f"{name} is missing from onnxruntime-web-{VERSION}.tgz")
            atomic_write(directory / name, member.read(), durable=False)
        if "package/LICENSE" in tar.getnames():  # MIT: kept beside the files served
            atomic_write(directory / "LICENSE", tar.extractfile("package/LICENSE").read(),
                         durable=False)  # fmt: skip
    atomic_write(directory / "integrity.txt", INTEGRITY + "\n", durable=False)
    return directory


def fetch(directory: Path | None = None, *, timeout: float = 300.0) -> Path:
    """Download onnxruntime-web@VERSION from the npm registry into the cache (no-op when
    present); the registry's ``integrity`` must equal :data:`INTEGRITY`, and so must the
    tarball's SHA-512."""
    d = directory or ort_dir()
    if available(d):
        return d
    url = f"{REGISTRY}/onnxruntime-web/{VERSION}"
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https URL)
        meta = json.load(r)
    dist = meta.get("dist") or {}
    if dist.get("integrity") != INTEGRITY:
        raise RuntimeError(
            f"the registry's integrity of onnxruntime-web@{VERSION} is {dist.get('integrity')}, "
            f"pinned {INTEGRITY}: refusing it"
        )
    tarball = dist["tarball"]
    if not tarball.startswith(REGISTRY + "/"):
        raise RuntimeError(f"unexpected tarball address {tarball}")
    with urllib.request.urlopen(tarball, timeout=timeout) as r:  # noqa: S310
        data = r.read()
    return extract(data, d)


def main(argv: list[str] | None = None) -> int:
    try:
        d = fetch()
    except Exception as exc:  # a set-up step: say why, the annotator falls back to the server
        print(f"onnxruntime-web {VERSION} could not be fetched: {exc}", file=sys.stderr)
        return 1
    print(f"onnxruntime-web {VERSION}: {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
