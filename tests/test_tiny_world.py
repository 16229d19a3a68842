"""The tiny build's publishing (never a partial build at <out>) and the key its test cache uses."""
from __future__ import annotations

import json
import os

import pytest

import tiny_world.build as tiny_build
from common.cli import UserError
from tests.conftest import REPO, build_sources


def _fake_ready_build(out):
    (out / "data").mkdir(parents=True)
    (out / tiny_build.READY).write_text(json.dumps({"seed": 1}))


def _crashing_build(tmp, seed, teacher_steps):
    os.makedirs(os.path.join(tmp, "data"))  # the build had started writing its temporary directory
    raise RuntimeError("crashed mid-build")


def test_a_crashed_build_leaves_neither_a_build_nor_its_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_build, "_build_into", _crashing_build)
    with pytest.raises(RuntimeError):
        tiny_build.build(str(tmp_path / "tiny"))
    assert list(tmp_path.iterdir()) == []


def test_a_crashed_rebuild_keeps_the_old_build(tmp_path, monkeypatch):
    _fake_ready_build(tmp_path / "tiny")
    monkeypatch.setattr(tiny_build, "_build_into", _crashing_build)
    with pytest.raises(RuntimeError):
        tiny_build.build(str(tmp_path / "tiny"), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert tiny_build.is_ready(str(tmp_path / "tiny"))


def test_a_ready_build_is_reused_and_a_foreign_directory_refused(tmp_path, monkeypatch):
    _fake_ready_build(tmp_path / "tiny")
    monkeypatch.setattr(tiny_build, "_build_into", _crashing_build)  # would raise if it were called
    assert tiny_build.build(str(tmp_path / "tiny")) == {"seed": 1}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="notes.txt"):
        tiny_build.build(str(tmp_path / "mine"))


def test_the_build_key_covers_the_project_modules_the_build_imports():
    sources = {p.relative_to(REPO).as_posix() for p in build_sources()}
    # common/__init__.py: run by importing common.data; common/config.py: also imported by common/data.py
    assert {"tiny_world/build.py", "tiny_world/corpus.py", "tiny_world/models.py", "common/__init__.py",
            "common/cli.py", "common/config.py", "common/data.py", "common/fsutil.py"} <= sources
    # no cache code, no stage, no test (common/ imports none of them): editing those must not rebuild the world
    upward = ("cache/", "stage1_teacher/", "stage2_student/", "tests/", "bench/")
    assert not [s for s in sources if s.startswith(upward)]
