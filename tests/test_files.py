"""The one image discovery and the one atomic write."""

from __future__ import annotations

import os

import pytest

from segany.files import atomic_file, atomic_write, find_images


def test_find_images_skips_hidden_names_and_keeps_order(tmp_path) -> None:
    for rel in ("b.JPG", "a.png", "sub/c.webp", "sub/.hidden.png", ".cache/d.png",
                "notes.txt", "out/e.png", "z.gif"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "sub", tmp_path / "link")  # a symlinked folder is not followed
    got = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert got == ["a.png", "b.JPG", "z.gif", "out/e.png", "sub/c.webp"]
    got = find_images(tmp_path, exclude=tmp_path / "out")
    assert [p.name for p in got] == ["a.png", "b.JPG", "z.gif", "c.webp"]
    assert find_images(tmp_path / "a.png") == [tmp_path / "a.png"]
    assert find_images(tmp_path / "notes.txt") == []
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path) -> None:
    path = tmp_path / "deep" / "f.json"
    assert atomic_write(path, "old") == path and path.read_text() == "old"
    atomic_write(path, b"new", durable=False)
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_file(path, "w") as f:
        f.write("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary left
    with pytest.raises(TypeError):
        atomic_write(path, 3)  # type: ignore[arg-type]
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]
