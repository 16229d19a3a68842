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


def test_publish_directory_with_a_trailing_slash_and_a_stale_aside_copy(tmp_path):
    final = tmp_path / "out"
    _staging(tmp_path, "out", "old")
    stale = _staging(tmp_path, f"out.old-{os.getpid()}", "crashed")  # a crashed publish under our pid
    publish_directory(str(_staging(tmp_path, "out.tmp", "new")), f"{final}{os.sep}")
    assert (final / "version").read_text() == "new"
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json_atomic_leaves_only_the_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(str(path), {"a": 1})
    write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
