"""The tiny build's publishing (never a partial build at <out>) and the key its test cache uses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tiny_world.build as tiny_build
from common.cli import UserError
from tests.conftest import REPO
from tiny_world.build import build_sources
from tiny_world.corpus import SEED


def _fake_ready_build(out, key=None):
    """A finished build of the default settings (its key is the current one unless `key` says otherwise)."""
    (out / "data").mkdir(parents=True)
    key = key or tiny_build.build_key(SEED, tiny_build.TEACHER_STEPS)
    (out / tiny_build.READY).write_text(json.dumps({"key": key, "seed": 1}))


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
    assert tiny_build.build(str(tmp_path / "tiny"))["seed"] == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="notes.txt"):
        tiny_build.build(str(tmp_path / "mine"))


def test_a_build_of_other_code_is_made_again(tmp_path, monkeypatch):
    """A build whose READY.json records another key (other code, settings or libraries) is not reused: the
    tiny table must come from this checkout's build."""
    _fake_ready_build(tmp_path / "tiny", key="0" * 16)

    def fresh(tmp, seed, teacher_steps):
        os.makedirs(os.path.join(tmp, "data"))
        return {"seed": seed, "fresh": True}
    monkeypatch.setattr(tiny_build, "_build_into", fresh)
    info = tiny_build.build(str(tmp_path / "tiny"))
    assert info["fresh"] and info["key"] == tiny_build.build_key(SEED, tiny_build.TEACHER_STEPS)
    assert json.loads((tmp_path / "tiny" / tiny_build.READY).read_text()) == info


def test_two_fresh_builds_are_byte_identical(tmp_path):
    """Two builds, each in a fresh interpreter as in two fresh clones on one machine, write the same bytes:
    corpus, tokenizer, teacher and student; an unseeded generator anywhere in the build fails this. (The thread
    count is the same for both: on some CPUs it changes how the teacher's matrix products round, an Intel Xeon
    for one, so 1 and 2 threads train different teachers there.)"""
    import hashlib

    digests = []
    for name, threads in (("a", "2"), ("b", "2")):
        code = f"import tiny_world.build as b; b.build({str(tmp_path / name)!r}, teacher_steps=12)"
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads})
        assert result.returncode == 0, result.stderr[-3000:]
        digests.append({p.relative_to(tmp_path / name).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / name).rglob("*")) if p.is_file() and p.name != "READY.json"})
    assert digests[0] == digests[1] and "teacher/model.safetensors" in digests[0]


def test_the_build_key_covers_the_project_modules_the_build_imports():
    sources = {p.relative_to(REPO).as_posix() for p in build_sources()}
    # common/__init__.py: run by importing common.data; common/config.py: also imported by common/data.py
    assert {"tiny_world/build.py", "tiny_world/corpus.py", "tiny_world/models.py", "common/__init__.py",
            "common/cli.py", "common/config.py", "common/data.py", "common/fsutil.py"} <= sources
    # no cache code, no stage, no test (common/ imports none of them): editing those must not rebuild the world
    upward = ("cache/", "stage1_teacher/", "stage2_student/", "tests/", "bench/")
    assert not [s for s in sources if s.startswith(upward)]
