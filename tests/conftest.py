"""Shared fixtures: one quick tiny build (corpus, tokenizer, briefly trained teacher, student), cached
between sessions, and helpers to drive the real entry points."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TEST_TEACHER_STEPS = 40  # a weak teacher is enough to check numbers; the real default trains longer
TEST_BLOCKS = 12
BUILD_CACHE = REPO / ".cache"  # git-ignored: tiny builds, one directory per build key


def _file_states(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="session")
def tiny() -> Path:
    """The quick tiny build, reused across sessions while its key holds; tests only read it."""
    from tiny_world.build import build, build_key
    from tiny_world.corpus import SEED

    out = BUILD_CACHE / f"tiny-{build_key(SEED, TEST_TEACHER_STEPS)}"
    BUILD_CACHE.mkdir(exist_ok=True)
    with open(BUILD_CACHE / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session waits for this build instead of replacing it
        build(str(out), teacher_steps=TEST_TEACHER_STEPS)  # returns at once if READY.json exists
        for stale in BUILD_CACHE.glob("tiny-*"):  # builds of other code or settings: never read again
            if stale != out and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    before = _file_states(out)
    yield out
    if _file_states(out) != before:
        shutil.rmtree(out)  # never reuse a build a test has changed
        pytest.fail(f"a test wrote into the shared tiny build {out}; copy what you change (see _student_with)")


def tiny_overrides(tiny: Path, cache_dir: Path, **extra: object) -> list[str]:
    """Config overrides for a small, fast run on the tiny build."""
    values: dict[str, object] = {
        "teacher.model": tiny / "teacher", "student.model": tiny / "student",
        "data.dataset": "tiny-wiki", "data.subset": "synthetic-v1", "data.local_dir": tiny / "data",
        "data.seq_len": 128, "data.max_blocks": TEST_BLOCKS, "teacher.batch_size": 4,
        "cache.dir": cache_dir, "cache.shard_blocks": 5, "cache.k": 16, "cache.tail_draws": 0,
        "train.batch_size": 2, "train.gradient_accumulation": 2, "train.lr": 1e-3, "train.loss_chunk": 96,
    }
    values.update(extra)
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]


def run_cli(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow`: every test that needs the tiny build (it dumps caches, trains or launches the real entry points on
    it), besides those marked by hand. `bash scripts/test.sh --quick` runs the others (`-m "not slow"`)."""
    for item in items:
        if "tiny" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
