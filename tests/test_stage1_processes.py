"""Stage one on 2 processes (CPU, gloo), launched as users launch it: `torchrun --nproc_per_node 2 -m
stage1_teacher.dump …` and `accelerate launch … -m stage1_teacher.dump …`. The cache does not depend on the
number of processes; a process that fails or hangs stops all with one line and nothing published; a killed
2-process dump resumes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_check import parse_stage1
from cache.reader import CacheReader
from common.cli import UserError
from common.config import load_config
from stage1_teacher.dump import main as dump_main, teacher_device
from stage1_teacher.processes import Processes
from tests.conftest import REPO
from tests.test_stage1_durability import SHARDS, args_for, fingerprint, staging_of


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str, *args: str, hook: str | None = None) -> subprocess.CompletedProcess:
    """The dump on 2 processes through `launcher` (torchrun or accelerate); `hook`: ACTION@EVENT, run through
    tests/stage1_hooks.py instead."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port())]
    else:  # on a host without GPUs, accelerate starts N processes through torchrun when told --multi_gpu
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    entry = ["stage1_teacher.dump"] if hook is None else ["tests.stage1_hooks", hook]
    return subprocess.run([*cmd, "-m", *entry, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def our_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines our code wrote to stderr (the launcher's own report may follow them)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def single_threaded(fn):
    """The 1-process reference runs with one thread, as each of the launched processes does (a CPU matmul's
    rounding may depend on the thread count; the launched processes' must not depend on their number)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def contents(cache: Path) -> dict[str, list]:
    reader = CacheReader(str(cache))
    try:
        return {name: reader.read_all(name).tolist() for name in reader.dataset_names}
    finally:
        reader.close()


# the caches compared: by name, their settings (tail: top-k with tail draws, keyed by block as sample mode's)
MODES = {"topk": {"cache.mode": "topk"}, "sample": {"cache.mode": "sample"},
         "tail": {"cache.mode": "topk", "cache.tail_draws": 16}}


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("one")
    out = {}
    for mode, settings in MODES.items():
        out[mode] = root / mode
        single_threaded(lambda: dump_main(args_for(tiny, out[mode], **settings, **{"cache.seed": 3})))
    return out


@pytest.mark.parametrize("launcher, mode", [("torchrun", "topk"), ("accelerate", "sample"), ("torchrun", "tail")])
def test_two_processes_write_the_cache_one_process_writes(tiny, one_process, tmp_path, launcher, mode):
    cache = tmp_path / "cache"
    result = launch(launcher, *args_for(tiny, cache, **MODES[mode], **{"cache.seed": 3}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[stage1] 12 blocks, 1536 tokens, 3 shards" in result.stdout and "on 2 processes" in result.stdout
    summary = parse_stage1(result.stdout)  # the line bench/gpu_check.py reads
    assert (summary["tokens"], summary["processes"], summary["peak_gib"]) == (1536, 2, None)  # no GPU: no peak
    assert contents(cache) == contents(one_process[mode])  # every dataset of every block, the draws included
    ours, theirs = (json.loads((c / "manifest.json").read_text()) for c in (cache, one_process[mode]))
    assert ours["settings"].pop("processes") == 2 and theirs["settings"].pop("processes") == 1
    assert ours == theirs  # shards' sha256 included: the files are byte-identical


def test_a_failing_process_stops_all_with_one_line(tiny, tmp_path):
    cache = tmp_path / "cache"
    result = launch("torchrun", *args_for(tiny, cache), hook="fail@rank-1")
    assert result.returncode != 0
    assert our_lines(result) == ["error: rank 1 of 2: RuntimeError: test hook: failing at rank-1"]
    assert not cache.exists() and "manifest.json" not in os.listdir(staging_of(cache))


def test_a_hung_process_stops_all_within_the_timeout(tiny, tmp_path):
    cache = tmp_path / "cache"
    start = time.time()
    result = launch("torchrun", *args_for(tiny, cache, **{"teacher.sync_timeout": 5}), hook="hang@rank-1")
    assert result.returncode != 0 and time.time() - start < 120
    [line] = our_lines(result)
    assert line.startswith("error: rank 0 of 2: lost contact with the other processes (one died, or did not arrive "
                           "within teacher.sync_timeout): ")
    assert not cache.exists() and "manifest.json" not in os.listdir(staging_of(cache))


def test_a_killed_two_process_dump_resumes(tiny, one_process, tmp_path):
    """Process 0 is killed after its first shard (its launcher then stops process 1 wherever it was); the
    same command again keeps what was complete and ends with the cache an uninterrupted run writes."""
    cache = tmp_path / "cache"
    args = args_for(tiny, cache, **{"cache.seed": 3})
    killed = launch("torchrun", *args, hook="exit@shard-0")
    assert killed.returncode != 0 and not cache.exists()
    complete = len(list(staging_of(cache).glob("shard-*.h5")))
    assert complete >= 1
    resumed = launch("torchrun", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[stage1] resuming: {complete} of {SHARDS} shards complete" in resumed.stdout
    assert fingerprint(cache)[1] == fingerprint(one_process["topk"])[1]


def test_device_map_auto_writes_the_cache_of_one_process(tiny, one_process, tmp_path):
    """`teacher.device_map=auto` (accelerate's dispatch; every layer on the CPU here) writes the same cache."""
    cache = tmp_path / "cache"
    single_threaded(lambda: dump_main(args_for(tiny, cache, **{"teacher.device_map": "auto", "cache.seed": 3})))
    assert fingerprint(cache)[1] == fingerprint(one_process["topk"])[1]


def test_device_map_auto_with_two_processes_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["teacher.device_map=auto"])
    with pytest.raises(UserError) as info:
        teacher_device(cfg, Processes())
    assert str(info.value) == ("teacher.device_map=auto spreads one teacher over every visible GPU and cannot be "
                               "combined with 2 processes (each runs its own teacher): run one process")
