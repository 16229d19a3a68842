"""Atomic publishing: a directory is replaced whole, and nothing is left beside it."""
from __future__ import annotations

import json
import os

from common.fsutil import publish_directory, write_json_atomic


def _staging(parent, name: str, version: str):
    staging = parent / name
    staging.mkdir()
    (staging / "version").write_text(version)
    return staging


def test_publish_directory_creates_then_replaces_and_removes_the_old_one(tmp_path):
    final = tmp_path / "out"
    for version in ("one", "two"):
        publish_directory(str(_staging(tmp_path, f"out.tmp-{version}", version)), str(final))
        assert (final / "version").read_text() == version
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging renamed, old copy gone


def test_publish_directory_with_a_trailing_slash_leaves_a_directory_it_did_not_create(tmp_path):
    """A directory already named `<final>.old-<pid>` (ours from a crashed publish, or anyone's) was not moved
    aside by this publish: it is left as it is, and the old `final` goes aside under another name."""
    final = tmp_path / "out"
    _staging(tmp_path, "out", "old")
    aside = _staging(tmp_path, f"out.old-{os.getpid()}", "not this publish's")
    publish_directory(str(_staging(tmp_path, "out.tmp", "new")), f"{final}{os.sep}")
    assert (final / "version").read_text() == "new"
    assert (aside / "version").read_text() == "not this publish's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", aside.name]


def test_publish_directory_with_nothing_to_replace_touches_nothing_else(tmp_path):
    aside = _staging(tmp_path, f"out.old-{os.getpid()}", "mine")
    publish_directory(str(_staging(tmp_path, "out.tmp", "new")), str(tmp_path / "out"))
    assert (tmp_path / "out" / "version").read_text() == "new" and (aside / "version").read_text() == "mine"


def test_write_json_atomic_leaves_only_the_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(str(path), {"a": 1})
    write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
