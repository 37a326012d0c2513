"""Helpers for the annotator tests: a PostgreSQL server of our own, a uvicorn server in a
thread, a server in a subprocess, and the system Chromium."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    last: Exception | None = None
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout}s: {last}")


# -- PostgreSQL ------------------------------------------------------------------------------
class PostgresUnavailable(RuntimeError):
    pass


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


class Postgres:
    """A throw-away PostgreSQL server: ``initdb`` in a temporary folder, ``pg_ctl`` on a
    free localhost port, run as the ``postgres`` user when we are root (PostgreSQL refuses
    to run as root)."""

    def __init__(self) -> None:
        self.initdb = _pg_bin("initdb")
        self.pg_ctl = _pg_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise PostgresUnavailable(
                "PostgreSQL server binaries (initdb, pg_ctl) not found: "
                "apt-get install postgresql (make system-deps)"
            )
        self.prefix: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="segany-pg-"))
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and no 'postgres' user") from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable("running as root and 'runuser' is missing")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            self.prefix = [runuser, "-u", "postgres", "--"]
        self.data = self.tmp / "data"
        self.port = free_port()
        self.user = "segany"
        self._n = 0

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=self.tmp
        )

    def start(self) -> Postgres:
        r = self._run(
            self.initdb, "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8"
        )
        if r.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {r.stderr.strip()[-500:]}")
        opts = f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1"
        r = self._run(
            self.pg_ctl,
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.tmp / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        if r.returncode != 0:
            log = (self.tmp / "log").read_text() if (self.tmp / "log").exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {r.stderr.strip()} {log[-500:]}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import sqlalchemy as sa

        self._n += 1
        name = f"t{self._n}_{os.getpid()}"
        eng = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- browser pages ---------------------------------------------------------------------------
def open_page(opener: Any, url: str, wait_for: str | None = None, **kw: Any) -> tuple[Any, list]:
    """A new page of ``opener`` (a Playwright browser or context; ``kw`` go to its
    ``new_page``) at ``url``, and the list its uncaught script errors are appended to;
    waits for the CSS selector ``wait_for`` if given."""
    page = opener.new_page(**kw)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    if wait_for:
        page.wait_for_selector(wait_for)
    return page, errors


# -- servers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def server_thread(app: object) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/api/health", timeout=30)
        yield base
    finally:
        server.should_exit = True
        t.join(timeout=10)


def start_server_process(
    images: Path, db: str, model: Path, cache: Path, port: int, *extra: str
) -> subprocess.Popen:
    """``segany annotate`` in its own process (its output goes to ``cache/server.log``)."""
    cache.mkdir(parents=True, exist_ok=True)
    log = open(cache / "server.log", "ab")  # noqa: SIM115 - owned by the process
    env = {**os.environ, "SEGANY_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segany",
            "annotate",
            str(images),
            "--db",
            db,
            "--model",
            str(model),
            "--port",
            str(port),
            "--cache-dir",
            str(cache),
            "--no-prefetch",
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


# -- Chromium --------------------------------------------------------------------------------
def chromium_path() -> str | None:
    env = os.environ.get("SEGANY_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def old_database(path: Path, version: int, drop: tuple[str, ...]) -> str:
    """An SQLite store at ``path`` made as the current version, then taken back to schema
    ``version`` by dropping the tables that version did not have; it holds one done image
    (id 1, 4 x 4). Returns its URL (open it with ``Store`` to run the upgrade)."""
    import sqlalchemy as sa

    from segany.engine.store import Store

    url = f"sqlite:///{path}"
    Store(url).close()
    eng = sa.create_engine(url)
    with eng.begin() as c:
        for table in drop:
            c.execute(sa.text(f"DROP TABLE {table}"))
        c.execute(
            sa.text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
            {"v": str(version)},
        )
        c.execute(
            sa.text(
                "INSERT INTO images (id, path, width, height, size_bytes, mtime, status, stage,"
                " done, created_at) VALUES (1, 'a.png', 4, 4, 1, 0, 'ok', 1, 1, 0)"
            )
        )
    eng.dispose()
    return url
