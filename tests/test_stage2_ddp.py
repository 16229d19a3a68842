"""Stage two on N processes (CPU, gloo) through torchrun and accelerate launch: two processes with one block
each compute what one process with two blocks computes; a process that fails stops the run in one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from stage2_student.batches import epoch_order
from stage2_student.train import main as train_main
from tests.conftest import REPO, TEST_BLOCKS, run_cli, tiny_overrides
from tests.test_stage2_durability import error_lines


@pytest.fixture(scope="module")
def cache_dir(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "cache"
    dump_main(tiny_overrides(tiny, path))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str, module: str, *args: object) -> subprocess.CompletedProcess:
    """`module` on two CPU processes, started the way a user starts them."""
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # --multi_gpu picks accelerate's torchrun-based launcher; without GPUs the processes use gloo
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port())]
    return subprocess.run([*command, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


STEPS = 6  # 12 blocks: 3 optimizer steps of 4 blocks per epoch, 2 epochs


def train_args(tiny: Path, cache: Path, out: Path, **extra: object) -> list[str]:
    return ["--cache", str(cache), *tiny_overrides(tiny, cache, **{
        "train.output_dir": out, "train.log_dir": out.parent / "logs", "train.max_steps": STEPS,
        "train.checkpoint_steps": 2, "train.hard_weight": 0.5, **extra})]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_each_process_reads_its_share_of_the_one_process_order():
    """One process, epoch 0: torch.randperm from a generator seeded train.seed + epoch, nothing drawn before it
    (the order the golden-value test pins). N processes: rank r takes every N-th block of that order."""
    one = epoch_order(TEST_BLOCKS, epoch=0, seed=42, processes=1, rank=0)
    assert one == torch.randperm(TEST_BLOCKS, generator=torch.Generator().manual_seed(42)).tolist()
    assert [epoch_order(TEST_BLOCKS, 0, 42, 2, rank) for rank in (0, 1)] == [one[0::2], one[1::2]]
    assert epoch_order(TEST_BLOCKS, 1, 42, 1, 0) != one and sorted(epoch_order(TEST_BLOCKS, 1, 42, 1, 0)) == sorted(one)
    # 5 processes for 12 blocks: 3 each, the first 3 blocks of the order read twice
    shares = [epoch_order(TEST_BLOCKS, 0, 42, 5, rank) for rank in range(5)]
    assert all(len(share) == 3 for share in shares) and sorted(sum(shares, [])) == sorted(one + one[:3])


@pytest.fixture(scope="module")
def one_process(tiny, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    result = run_cli("stage2_student.train", *train_args(tiny, cache_dir, out, **{"train.batch_size": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tiny, cache_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The uninterrupted two-process run under torchrun: its output and its output directory."""
    out = tmp_path_factory.mktemp("two") / "out"
    result = launch("torchrun", "stage2_student.train", *train_args(tiny, cache_dir, out, **{"train.batch_size": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def assert_same_as_one_process(result: subprocess.CompletedProcess, out: Path, one: Path) -> None:
    """Per-step losses within 1e-5 (relative), the same tokens and schedule, weights within fp32 tolerance."""
    assert "Processes: 2 processes, DDP over gloo" in result.stdout
    assert "Global batch: 1 × 2 × 2 processes = 4 blocks (512 tokens) per optimizer step" in result.stdout
    assert result.stdout.count("===== Training info =====") == 1  # the main process speaks
    two, reference = metrics(out), metrics(one)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # written once, by the main process
    for mine, theirs in zip(two, reference, strict=True):
        assert mine["tokens"] == theirs["tokens"] and mine["lr"] == theirs["lr"]
        for key in ("loss", "kd_loss", "hard_loss", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine["step"], key)
    mine, theirs = load_file(out / "model.safetensors"), load_file(one / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6)
    record = json.loads((out / "run.json").read_text())
    assert record["finished"] and record["processes"] == 2 and record["global_batch_blocks"] == 4


def test_two_processes_of_one_block_equal_one_process_of_two(two_processes, one_process):
    assert_same_as_one_process(*two_processes, one_process)


def test_accelerate_launch_trains_the_same(tiny, cache_dir, one_process, tmp_path):
    out = tmp_path / "out"
    result = launch("accelerate", "stage2_student.train", *train_args(tiny, cache_dir, out, **{"train.batch_size": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_one_process(result, out, one_process)


def test_two_processes_killed_and_resumed_end_bit_identical(tiny, cache_dir, two_processes, tmp_path):
    """Every process's RNG state and the data position come back: the resumed run equals the uninterrupted one."""
    out, reference = tmp_path / "out", two_processes[1]
    args = train_args(tiny, cache_dir, out, **{"train.batch_size": 1})
    killed = launch("torchrun", "tests.stage2_hooks", "kill-after-step=3", "--", *args)
    assert killed.returncode != 0 and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoints/step-2").iterdir()}
    with pytest.raises(UserError, match="made with processes=2, this run has processes=1"):
        train_main(args)  # one process cannot resume what two began
    resumed = launch("torchrun", "stage2_student.train", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 2 of 6, epoch 0, micro-batch 4 of 6" in resumed.stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    mine, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)


def test_a_failing_process_stops_the_run_in_one_line(tiny, cache_dir, tmp_path):
    out = tmp_path / "out"
    result = launch("torchrun", "tests.stage2_hooks", "fail-at-step=2:1", "--",
                    *train_args(tiny, cache_dir, out, **{"train.batch_size": 1, "train.collective_timeout_s": 60}))
    assert result.returncode != 0
    assert error_lines(result.stderr) == ["error: test hook: process 1 fails at step 2"], result.stderr[-3000:]
    assert not any(line.startswith("[rank") for line in result.stderr.splitlines()), result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["finished"] is False
    assert not (out / "model.safetensors").exists()


def test_fsdp_on_the_cpu_is_refused_in_one_line(tiny, cache_dir, tmp_path):
    with pytest.raises(UserError, match=r"train.fsdp=true shards the student across several processes on GPUs"):
        train_main(train_args(tiny, cache_dir, tmp_path / "out", **{"train.fsdp": True}))
    assert not (tmp_path / "out").exists()
