"""``segany annotate``: user tokens from the command line, clear errors."""

from __future__ import annotations

import json

from segany.cli import main
from segany.engine.store import Store


def test_add_user_prints_a_token_that_works(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert main(["annotate", str(images), "--db", db, "--add-user", "alice", "--admin"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["user"] == "alice" and out["admin"] is True and len(out["token"]) >= 24
    store = Store(db)
    assert store.user_by_token(out["token"]).name == "alice"
    assert store.users()[0].token_hash != out["token"]  # only the hash is stored
    # a second call gives a new token and revokes the first
    assert main(["annotate", str(images), "--db", db, "--add-user", "alice"]) == 0
    new = json.loads(capsys.readouterr().out)["token"]
    assert store.user_by_token(out["token"]) is None and store.user_by_token(new) is not None
    store.close()


def test_default_database_lives_in_the_images_folder(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    assert main(["annotate", str(images), "--add-user", "bob"]) == 0
    assert (images / ".segany" / "annotations.db").is_file()


def test_errors(tmp_path, capsys):
    assert main(["annotate", str(tmp_path / "missing")]) == 2
    assert "images folder not found" in capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    assert main(["annotate", str(images), "--db", "mysql+nodriver://x/y", "--add-user", "x"]) == 2
    assert "error" in capsys.readouterr().err
