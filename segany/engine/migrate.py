"""Schema upgrades of the annotator's database, run by :class:`~.store.Store` on open.

Each step is idempotent (it checks what exists first) and runs in one transaction with the
new version number, so an interrupted upgrade is redone on the next start.

- 1 -> 2: ``users.token_trusted`` (false for every existing token: version 1 let anyone
  mint tokens, even admin ones, while auth was off, so none of them is trusted with auth
  on; the first start with ``--auth`` then prints a new admin token) and
  ``annotations.replaces_id`` with its unique index (one fix per pending object).
- 2 -> 3: ``categories`` (created by the store before the upgrade) filled with the classes
  in use, in order of first use (smallest annotation id); names that differ only in case or
  white space become one class, spelled as first used, and their annotations are renamed.
- 3 -> 4: ``image_work`` (leases, review states, assignees) and ``request_keys`` (the keys
  of retried writes), both new tables created by the store before the upgrade; images
  already marked done stay done with review state ``none`` (rows are made on first use).
- 4 -> 5: ``trash`` (deleted objects, restorable under their id: :mod:`.edits`), a new table
  created by the store before the upgrade, empty (objects deleted before it are gone for
  good). ``annotations`` keeps its table: only databases created at schema 5 on SQLite
  have ``AUTOINCREMENT`` ids; in an upgraded one a restore whose id was given to a newer
  object takes a new id (the answer says so).
- 5 -> 6: ``videos``, ``tracks`` and ``track_frames`` (the annotator's videos and the
  objects followed through them: :mod:`.video_store`), new tables created by the store
  before the upgrade, empty.
- 6 -> 7: ``video_work`` (video leases: :mod:`.work_store`), a new table created by the
  store before the upgrade, empty; ``tracks.clicks`` (0) and ``tracks.seconds`` (NULL: the
  time of objects made before is not known); indexes on ``request_keys.created_at`` and
  ``trash.deleted_at`` (the purge of old rows: :mod:`.purge`).
"""

from __future__ import annotations

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine


def _version(conn: Connection) -> int:
    row = conn.execute(text("SELECT value FROM segany_meta WHERE key = 'schema_version'")).first()
    return int(row[0]) if row else 0


class SchemaTooNew(Exception):
    """The database was written by a newer segany (:class:`~.store.Store` reports it as a
    ``StoreError``)."""


def upgrade(engine: Engine, target: int) -> None:
    """Bring an existing database up to schema ``target``. Raises :class:`SchemaTooNew`
    when the database is newer than this segany."""
    with engine.begin() as conn:
        version = _version(conn)
        if version > target:
            raise SchemaTooNew(
                f"database schema version {version} is newer than this segany ({target}); "
                "upgrade segany"
            )
        if version < 2 <= target:
            _to_2(conn)
            conn.execute(
                text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": "2"},
            )
        if version < 3 <= target:
            _to_3(conn)
            conn.execute(
                text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": "3"},
            )
        if version < 4 <= target:  # the new tables exist already (created by the store)
            conn.execute(
                text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": "4"},
            )
        if version < 5 <= target:  # ``trash`` exists already (created by the store)
            conn.execute(
                text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": "5"},
            )
        if version < 6 <= target:  # the video tables exist already (created by the store)
            conn.execute(
                text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": "6"},
            )
        if version < 7 <= target:  # ``video_work`` exists already (created by the store)
            _to_7(conn)
            conn.execute(
                text("UPDATE segany_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": "7"},
            )


def _add_columns(conn: Connection, table: str, columns: dict[str, str]) -> None:
    """``ALTER TABLE table ADD COLUMN name ddl`` for each of ``columns`` (name -> type and
    constraints) the table lacks; nothing when the table itself does not exist."""
    insp = inspect(conn)
    if table not in insp.get_table_names():
        return
    have = {c["name"] for c in insp.get_columns(table)}
    for name, ddl in columns.items():
        if name not in have:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _to_2(conn: Connection) -> None:
    tables = set(inspect(conn).get_table_names())
    _add_columns(conn, "users", {"token_trusted": "BOOLEAN NOT NULL DEFAULT FALSE"})
    if "annotations" in tables:
        _add_columns(
            conn,
            "annotations",
            {"replaces_id": "INTEGER REFERENCES annotations(id) ON DELETE SET NULL"},
        )
        conn.execute(
            text(
                "CREATE UNIQUE INDEX IF NOT EXISTS ux_annotations_replaces_id "
                "ON annotations (replaces_id)"
            )
        )


def category_key(name: str) -> str:
    """What makes two category names the same class: case and runs of white space do not
    count (``"Dog"``, ``"dog"`` and ``" dog "`` are one class)."""
    return " ".join(name.split()).casefold()


def _to_3(conn: Connection) -> None:
    import time

    if "annotations" not in set(inspect(conn).get_table_names()):
        return
    rows = conn.execute(
        text("SELECT category, MIN(id) AS first FROM annotations GROUP BY category ORDER BY first")
    ).all()
    known = {k: n for k, n in conn.execute(text("SELECT key, name FROM categories")).all()}
    for name, _ in rows:
        key = category_key(name)
        if key not in known:
            known[key] = " ".join(name.split())
            conn.execute(
                text("INSERT INTO categories (key, name, created_at) VALUES (:k, :n, :t)"),
                {"k": key, "n": known[key], "t": time.time()},
            )
        if known[key] != name:
            conn.execute(
                text("UPDATE annotations SET category = :n WHERE category = :o"),
                {"n": known[key], "o": name},
            )


def _to_7(conn: Connection) -> None:
    tables = set(inspect(conn).get_table_names())
    _add_columns(conn, "tracks", {"clicks": "INTEGER NOT NULL DEFAULT 0", "seconds": "FLOAT"})
    for table, column in (("request_keys", "created_at"), ("trash", "deleted_at")):
        if table in tables:
            conn.execute(
                text(f"CREATE INDEX IF NOT EXISTS ix_{table}_{column} ON {table} ({column})")
            )
