"""Shared fixtures: one quick tiny build (corpus, tokenizer, briefly trained teacher, student) per session,
and helpers to drive the real entry points."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    from tiny_world.build import build

    out = tmp_path_factory.mktemp("tiny") / "tiny"
    build(str(out), teacher_steps=TEST_TEACHER_STEPS)
    return out


def tiny_overrides(tiny: Path, cache_dir: Path, **extra: object) -> list[str]:
    """Config overrides for a small, fast run on the tiny build."""
    values: dict[str, object] = {
        "teacher.model": tiny / "teacher", "student.model": tiny / "student",
        "data.dataset": "tiny-wiki", "data.subset": "synthetic-v1", "data.local_dir": tiny / "data",
        "data.seq_len": 128, "data.max_blocks": TEST_BLOCKS, "teacher.batch_size": 4,
        "cache.dir": cache_dir, "cache.shard_blocks": 5, "cache.k": 16,
        "train.batch_size": 2, "train.gradient_accumulation": 2, "train.lr": 1e-3, "train.loss_chunk": 96,
    }
    values.update(extra)
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]


def run_cli(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
