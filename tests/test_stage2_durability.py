"""Stage two under failure, through its real entry points on the tiny build: a run killed and resumed ends
with the weights of an uninterrupted one; the output directory is never half-old, half-new and nothing we did
not write is deleted; bad settings, a damaged or changing cache, a NaN loss and a full disk each end in one
line, a non-zero status and the last good checkpoint intact."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cache.reader
from cache.lock import CacheLock
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from stage2_student.evaluate import main as evaluate_main
from stage2_student.train import main as train_main
from tests.conftest import REPO, run_cli, tiny_overrides
from tests.test_lock import hold_in_other_process

STEPS = 6  # 12 blocks, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch, 2 epochs
METRIC_KEYS = ("step", "epoch", "loss", "kd_loss", "hard_loss", "lr", "grad_norm", "tokens")


@pytest.fixture(scope="module")
def cache_dir(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("durability") / "cache"
    dump_main(tiny_overrides(tiny, path))
    return path


@pytest.fixture(scope="module")
def dropout_student(tiny, tmp_path_factory) -> Path:
    """The tiny student with attention dropout, so that a resumed run that did not restore the RNG state
    would draw other dropout masks and end with other weights."""
    path = tmp_path_factory.mktemp("student") / "student"
    shutil.copytree(tiny / "student", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    return path


def train_args(tiny: Path, cache: Path, student: Path, out: Path, **extra: object) -> list[str]:
    return ["--cache", str(cache), *tiny_overrides(tiny, cache, **{
        "student.model": student, "train.output_dir": out, "train.log_dir": out.parent / f"{out.name}-logs",
        "train.max_steps": STEPS, "train.checkpoint_steps": 2, **extra})]


def hooked(*hooks_then_args: str) -> subprocess.CompletedProcess:
    """stage two's CLI with test hooks (tests/stage2_hooks.py)."""
    return run_cli("tests.stage2_hooks", *hooks_then_args)


def error_lines(stderr: str) -> list[str]:
    """The `error: …` lines among a run's stderr (progress bars and library warnings aside)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_same_run(out: Path, reference: Path) -> None:
    """Bit for bit the same weights and, step by step, the same metrics (timings aside)."""
    mine, theirs = weights(out), weights(reference)
    assert mine.keys() == theirs.keys()
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert different == []
    assert [{k: r[k] for k in METRIC_KEYS} for r in metrics(out)] == \
           [{k: r[k] for k in METRIC_KEYS} for r in metrics(reference)]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def run_record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny, cache_dir, dropout_student, tmp_path_factory) -> Path:
    """An uninterrupted run of the same command (a subprocess, as the interrupted runs are)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_cli("stage2_student.train", *train_args(tiny, cache_dir, dropout_student, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[stage2] verified 3 shards" in result.stdout and "MB/s" in result.stdout  # the start-up check, timed
    return out


@pytest.fixture(scope="module")
def killed_run(tiny, cache_dir, dropout_student, tmp_path_factory) -> Path:
    """The same command killed with SIGKILL right after step 3 (checkpoint step-2 complete, step 3 logged)."""
    out = tmp_path_factory.mktemp("killed") / "out"
    result = hooked("kill-after-step=3", "--", *train_args(tiny, cache_dir, dropout_student, out))
    assert result.returncode == -9, result.stderr[-3000:]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(run, target)
    return target


# -- checkpoints and resume ---------------------------------------------------------------------------------

def test_killed_run_resumes_to_the_uninterrupted_weights(tiny, cache_dir, dropout_student, reference, killed_run,
                                                         tmp_path):
    out = copy_of(killed_run, tmp_path)
    assert checkpoints(out) == ["step-2"] and len(metrics(out)) == 3 and run_record(out)["finished"] is False
    result = run_cli("stage2_student.train", *train_args(tiny, cache_dir, dropout_student, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step 2 of 6, epoch 0, micro-batch 4 of 6" in result.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]  # step 3 once, though it ran twice
    assert_same_run(out, reference)
    assert checkpoints(out) == ["step-4", "step-6"]  # train.keep_checkpoints=2
    assert run_record(out)["finished"] is True and run_record(out)["steps"] == STEPS


def test_resume_refuses_other_settings_naming_the_setting(tiny, cache_dir, dropout_student, killed_run, tmp_path):
    out = copy_of(killed_run, tmp_path)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(UserError, match=r"holds checkpoint step-2 of a run made with train\.lr=0\.001, this run "
                                        r"has train\.lr=0\.002: rerun with the same settings"):
        train_main(train_args(tiny, cache_dir, dropout_student, out, **{"train.lr": 0.002}))
    with pytest.raises(UserError, match=r"holds an earlier run and train.resume=never: pass train.overwrite=true"):
        train_main(train_args(tiny, cache_dir, dropout_student, out, **{"train.resume": "never"}))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing touched
    # the same with train.overwrite=true: the old run is deleted and a fresh one trains
    train_main(train_args(tiny, cache_dir, dropout_student, out, **{"train.lr": 0.002, "train.max_steps": 2,
                                                                    "train.overwrite": True}))
    assert [r["step"] for r in metrics(out)] == [1, 2] and checkpoints(out) == ["step-2"]
    assert run_record(out)["settings"]["train.lr"] == 0.002 and run_record(out)["finished"] is True


def test_nan_loss_stops_with_the_last_checkpoint_resumable(tiny, cache_dir, dropout_student, reference, tmp_path,
                                                          monkeypatch):
    """A loss that turns NaN at step 3 (its first micro-batch): one line, nothing applied, step-2 intact;
    the same command then resumes from it to the uninterrupted run's weights."""
    from stage2_student.losses import KDLoss

    calls = {"n": 0}
    original = KDLoss.__call__

    def nan_from_step_3(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    out = tmp_path / "out"
    monkeypatch.setattr(KDLoss, "__call__", nan_from_step_3)
    with pytest.raises(UserError, match=r"the loss became nan at step 3 .* training stopped without applying it: "
                                        r"the last complete checkpoint .*step-2 is intact") as info:
        train_main(train_args(tiny, cache_dir, dropout_student, out))
    assert "\n" not in str(info.value)
    assert checkpoints(out) == ["step-2"] and [r["step"] for r in metrics(out)] == [1, 2]
    assert not (out / "model.safetensors").exists() and run_record(out)["finished"] is False
    monkeypatch.setattr(KDLoss, "__call__", original)
    train_main(train_args(tiny, cache_dir, dropout_student, out))
    assert_same_run(out, reference)


def test_disk_full_at_the_final_save(tiny, cache_dir, dropout_student, reference, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny, cache_dir, dropout_student, out)
    result = hooked("file-size-limit-at-save=4096", "--", *args)
    assert_one_error_line(result, "cannot write the final model", "File too large",
                          f"{out}/checkpoints/step-6 is intact")
    assert checkpoints(out) == ["step-4", "step-6"]
    assert not (out / "model.tmp").exists() and not (out / "model.safetensors").exists()
    assert run_record(out)["finished"] is False  # no complete-looking model
    with pytest.raises(UserError, match="unfinished stage-two run"):
        evaluate_main(["--model", str(out), *tiny_overrides(tiny, cache_dir)])
    result = run_cli("stage2_student.train", *args)  # space freed: the same command saves it
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6 of 6" in result.stdout
    assert_same_run(out, reference)


def test_disk_full_in_torch_save_at_a_checkpoint_says_why(tiny, cache_dir, dropout_student, tmp_path):
    """torch.save (the optimizer's state) reports a failed write only as `[enforce fail at inline_container.cc]
    unexpected pos`: the line gives the OS's reason instead (here EFBIG; on a full disk ENOSPC)."""
    out = tmp_path / "out"
    model_bytes = (tiny / "student" / "model.safetensors").stat().st_size
    result = hooked(f"file-size-limit-at-checkpoint={model_bytes + 65536}", "--",
                    *train_args(tiny, cache_dir, dropout_student, out))  # the weights fit, the optimizer not
    line = assert_one_error_line(result, f"cannot write checkpoint {out}/checkpoints/step-2.tmp: File too large; "
                                         "no checkpoint was completed yet")
    assert "enforce fail" not in line and "unexpected pos" not in line
    assert not (out / "checkpoints" / "step-2.tmp").exists()


# -- the output directory ------------------------------------------------------------------------------------

def test_overwrite_killed_over_a_finished_run_leaves_no_mix(tiny, cache_dir, dropout_student, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    args = train_args(tiny, cache_dir, dropout_student, out, **{"train.lr": 0.002})
    result = hooked("kill-after-step=1", "--", *args, "train.overwrite=true")
    assert result.returncode == -9, result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == {"run.json", "metrics.jsonl"}  # the old model, tokenizer and checkpoints are gone
    assert run_record(out)["finished"] is False and run_record(out)["settings"]["train.lr"] == 0.002
    assert [r["step"] for r in metrics(out)] == [1]
    result = run_cli("stage2_student.evaluate", "--model", out, *tiny_overrides(tiny, cache_dir))
    assert_one_error_line(result, "is an unfinished stage-two run")
    # rerun without overwrite: the same settings, stopped before any checkpoint, simply start again
    result = run_cli("stage2_student.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1)) and run_record(out)["finished"] is True


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_we_did_not_write_are_never_deleted(tiny, cache_dir, dropout_student, reference, tmp_path, overwrite):
    out = copy_of(reference, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "my-best").mkdir()
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(UserError, match=r"holds files this tool did not write \(checkpoints/my-best, notes\.txt\); "
                                        r"nothing was deleted"):
        train_main(train_args(tiny, cache_dir, dropout_student, out, **{"train.overwrite": overwrite}))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_overwrite_refuses_files_we_did_not_write_at_any_depth(tiny, cache_dir, dropout_student, reference,
                                                              tmp_path):
    """Inside a complete checkpoint (what its trainer state does not list), one being written (what neither
    accelerate nor we write) and the final model's staging directory: named, and nothing is deleted."""
    out = copy_of(reference, tmp_path)
    (out / "checkpoints" / "step-6" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step-4" / "mine").mkdir()
    partial = out / "checkpoints" / "step-8.tmp"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes(b"")  # ours, by accelerate's name
    (partial / "keep.me").write_text("mine")
    (out / "model.tmp").mkdir()
    (out / "model.tmp" / "config.json").write_text("{}")
    (out / "model.tmp" / "draft.md").write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(UserError, match=r"holds files this tool did not write \(checkpoints/step-4/mine, "
                                        r"checkpoints/step-6/notes\.txt, checkpoints/step-8\.tmp/keep\.me, "
                                        r"model\.tmp/draft\.md\); nothing was deleted"):
        train_main(train_args(tiny, cache_dir, dropout_student, out, **{"train.overwrite": True}))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_a_finished_run_is_replaced_only_with_overwrite(tiny, cache_dir, dropout_student, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    with pytest.raises(UserError, match=r"holds a finished run \(6 steps\); pass train.overwrite=true"):
        train_main(train_args(tiny, cache_dir, dropout_student, out))
    assert_same_run(out, reference)


def test_a_run_json_without_our_format_is_foreign_even_with_overwrite(tiny, cache_dir, reference, tmp_path):
    """A run.json without this release's format (and without its list of files) makes the directory not ours:
    refused in one line naming what is not ours, and nothing is deleted, with train.overwrite=true too."""
    out = copy_of(reference, tmp_path)
    shutil.rmtree(out / "checkpoints")
    old = run_record(out)
    (out / "run.json").write_text(json.dumps({key: old[key] for key in ("config", "steps", "final")}))
    before = sorted(p.name for p in out.iterdir())
    model_files = [name for name in before if name not in ("run.json", "metrics.jsonl")]
    assert "model.safetensors" in model_files and "config.json" in model_files
    foreign = sorted([*model_files, "run.json (not a stage-two run record of this release)"])
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    with pytest.raises(UserError) as info:
        train_main(train_args(tiny, cache_dir, tiny / "student", out, **{"train.overwrite": True}))
    assert str(info.value) == (f"train.output_dir {out} holds files this tool did not write ({shown}); nothing was "
                               "deleted: move them away or choose another directory")
    assert sorted(p.name for p in out.iterdir()) == before


def test_one_run_at_a_time_per_output_directory(tiny, cache_dir, tmp_path):
    out = tmp_path / "out"
    process = paused_run(tiny, cache_dir, out, tmp_path / "gate", step=1)
    try:
        with pytest.raises(UserError, match=f"train.output_dir {out} is in use by another stage-two run"):
            train_main(train_args(tiny, cache_dir, tiny / "student", out))
    finally:
        result = finish(process, tmp_path / "gate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))


def test_sigterm_is_one_line_and_the_rerun_finishes(tiny, cache_dir, tmp_path):
    out = tmp_path / "out"
    process = paused_run(tiny, cache_dir, out, tmp_path / "gate", step=1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == "terminated (SIGTERM)" and error_lines(stderr) == []
    result = run_cli("stage2_student.train", *train_args(tiny, cache_dir, tiny / "student", out))
    assert result.returncode == 0, result.stderr[-3000:]  # unlocked; stopped before a checkpoint: starts again
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))


def test_ctrl_c_while_stage_two_loads_is_one_line(tiny, cache_dir, tmp_path):
    """In its first second stage two is importing torch and transformers: a Ctrl-C there is `interrupted`,
    status 130, not a traceback from the middle of an import."""
    process = subprocess.Popen([sys.executable, "-m", "stage2_student.train",
                                *train_args(tiny, cache_dir, tiny / "student", tmp_path / "out")], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    # Signal once torch's libraries are being mapped: the entry module installs its handler before `import torch`,
    # and the import then takes seconds. (A fixed delay raced the interpreter's own start on a loaded machine.)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == "interrupted"


def test_kill_9_with_dataloader_workers_frees_the_directory_at_once(tiny, cache_dir, tmp_path):
    """The main process killed mid-run with train.num_workers=2: its workers live on for a few seconds (until
    they notice), but hold neither the output directory's lock nor the cache's, so a restart is not refused."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    args = train_args(tiny, cache_dir, tiny / "student", out, **{"train.num_workers": 2})
    process = subprocess.Popen([sys.executable, "-m", "tests.stage2_hooks", f"pause-after-step=1:{gate}", "--",
                                *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # no pipe for the orphans to hold
    wait_for(Path(f"{gate}.ready"), process)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.kill()
    process.wait()
    try:
        assert len(workers) == 2 and not any("State:\tZ" in Path(f"/proc/{pid}/status").read_text()
                                             for pid in workers)  # still alive, orphaned
        from stage2_student.checkpoint import DirectoryLock

        DirectoryLock(str(out)).release()
        CacheLock(str(cache_dir), exclusive=True).acquire().release()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_evaluate_refuses_checkpoints_without_a_model(tiny, cache_dir, killed_run, tmp_path):
    out = copy_of(killed_run, tmp_path)
    (out / "run.json").unlink()
    with pytest.raises(UserError, match="holds stage-two checkpoints but no finished model"):
        evaluate_main(["--model", str(out), *tiny_overrides(tiny, cache_dir)])


# -- settings refused before anything is loaded ------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"train.temperature": "nan"}, "train.temperature must be a finite number, got nan"),
    ({"train.lr": "nan"}, "train.lr must be a finite number, got nan"),
    ({"train.lr": "inf"}, "train.lr must be a finite number, got inf"),
    ({"train.lr": 0}, "train.lr must be positive, got 0.0"),
    ({"train.kd_weight": 0, "train.hard_weight": 0},
     "train.kd_weight and train.hard_weight are both 0: the loss would be 0 and train nothing"),
    ({"train.loss": "jsd", "train.loss_beta": 0}, "train.loss=jsd with train.loss_beta=0 is identically 0 (the mixture "
                                                  "is the student itself) and trains nothing: use a β strictly between "
                                                  "0 and 1"),
    ({"train.loss": "jsd", "train.loss_beta": 1}, "train.loss=jsd with train.loss_beta=1 is identically 0 (the mixture "
                                                  "is the teacher itself) and trains nothing: use a β strictly between "
                                                  "0 and 1"),
    ({"train.loss": "skew_kl", "train.loss_alpha": 1}, "train.loss=skew_kl with train.loss_alpha=1 is identically 0 "
                                                       "(the skewed student is the teacher itself) and trains nothing: "
                                                       "use an α below 1"),
    ({"train.hard_weight": -0.5}, "train.hard_weight must be 0 or more, got -0.5"),
    ({"train.warmup_ratio": 1.5}, r"train.warmup_ratio must be in [0, 1], got 1.5"),
    ({"train.warmup_ratio": -0.1}, r"train.warmup_ratio must be in [0, 1], got -0.1"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints must be positive, got 0"),
    ({"train.output_dir": ""}, "train.output_dir is empty: name the directory to write"),
    ({"train.output_dir": "{file}/out"}, "train.output_dir {file}/out cannot be created: {file} is not a directory"),
])
def test_settings_refused_before_anything_is_loaded(tmp_path, overrides, message):
    """The cache and the student do not exist: the settings are refused before either is looked at."""
    file = tmp_path / "a-file"
    file.write_text("")
    values = {"train.output_dir": tmp_path / "out", "train.log_dir": tmp_path / "logs",
              **{key: str(value).format(file=file) for key, value in overrides.items()}}
    with pytest.raises(UserError) as info:
        train_main(["--cache", str(tmp_path / "no-cache"), "student.model=" + str(tmp_path / "no-student"),
                    *(f"{key}={value}" for key, value in values.items())])
    assert str(info.value) == message.format(file=file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing created


@pytest.mark.slow
def test_a_setting_refused_on_the_command_line_is_one_line(tmp_path):
    result = run_cli("stage2_student.train", "--cache", tmp_path / "no-cache", "train.temperature=nan",
                     f"train.output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr == "error: train.temperature must be a finite number, got nan\n"


# -- a damaged or changing cache -------------------------------------------------------------------------------

def damaged_copy(cache: Path, tmp_path: Path) -> Path:
    """The cache with one top-k id of block 9 (shard-00001.h5, its fifth block; read in the third step) out of
    the vocabulary: the
    first stored id gap of a position (format 2 stores ids as sorted gaps, cache/encoding.py) made huge,
    written through the filters so that the chunk's checksum is valid and only the value check can object."""
    import hdf5plugin  # noqa: F401 - the zstd filter, to write a stored dataset

    copy = tmp_path / "damaged"
    shutil.copytree(cache, copy)
    with h5py.File(copy / "shard-00001.h5", "r+") as handle:
        handle["topk_vocab_gaps"][4, 0] = 2**31
    return copy


def test_a_damaged_shard_is_refused_at_start(tiny, cache_dir, tmp_path):
    damaged = damaged_copy(cache_dir, tmp_path)
    result = run_cli("stage2_student.train", *train_args(tiny, damaged, tiny / "student", tmp_path / "out"))
    assert_one_error_line(result, f"cache {damaged} is damaged: shard-00001.h5: sha256 mismatch",
                          "python -m cache.verify")
    assert result.stderr.strip().count("\n") == 0  # refused before the student was loaded
    assert not (tmp_path / "out").exists()


def test_a_block_damaged_after_the_start_stops_the_run_in_one_line(tiny, cache_dir, tmp_path):
    """train.verify_cache=false lets the damaged shard in, as a shard damaged after the start check would be:
    the reader's value check stops the run, naming the shard and the block, from a DataLoader worker too."""
    damaged = damaged_copy(cache_dir, tmp_path)
    result = run_cli("stage2_student.train", *train_args(tiny, damaged, tiny / "student", tmp_path / "out", **{
        "train.verify_cache": False, "train.num_workers": 2, "train.checkpoint_steps": 1}))
    assert_one_error_line(result, "shard-00001.h5", "9")
    assert (tmp_path / "out" / "checkpoints").is_dir() and run_record(tmp_path / "out")["finished"] is False


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reader_error_reaches_the_user_as_its_own_line(tiny, cache_dir, tmp_path, monkeypatch, workers):
    """The reader refusing block 9 (what its value checks raise; read in the third step), inside a DataLoader
    worker or not: the
    run stops with exactly the reader's message, and the checkpoints before it are intact."""
    message = "cache X: shard-00001.h5 block 9: topk_ids holds -16776892, outside [0, 1000)"
    block = cache.reader.CacheReader.block

    def refusing(self, index, names=None):
        if index == 9:
            raise UserError(message)
        return block(self, index, names)

    monkeypatch.setattr(cache.reader.CacheReader, "block", refusing)
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        train_main(train_args(tiny, cache_dir, tiny / "student", out, **{"train.num_workers": workers,
                                                                         "train.checkpoint_steps": 1}))
    assert str(info.value) == message
    done = len(metrics(out))  # the steps before the one that reads block 9
    assert 0 < done < STEPS and checkpoints(out) == [f"step-{s}" for s in range(max(done - 1, 1), done + 1)]


def test_a_truncated_shard_without_verification_is_one_line(tiny, cache_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    shard = copy / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_cli("stage2_student.train", *train_args(tiny, copy, tiny / "student", tmp_path / "out",
                                                         **{"train.verify_cache": False}))
    assert_one_error_line(result, f"{copy}: shard-00001.h5: HDF5 cannot open it")  # the reader's CacheDataError


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def paused_run(tiny: Path, cache: Path, out: Path, gate: Path, step: int) -> subprocess.Popen:
    """Stage two started in the background, paused after `step` until `gate` exists."""
    args = train_args(tiny, cache, tiny / "student", out)
    process = subprocess.Popen([sys.executable, "-m", "tests.stage2_hooks", f"pause-after-step={step}:{gate}", "--",
                                *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for(Path(f"{gate}.ready"), process)
    return process


def finish(process: subprocess.Popen, gate: Path) -> subprocess.CompletedProcess:
    gate.touch()
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_cache_in_use_is_locked_against_stage_one(tiny, cache_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    process = paused_run(tiny, copy, tmp_path / "out", tmp_path / "gate", step=3)
    try:
        with pytest.raises(UserError, match="is in use by a running stage one or stage two"):
            CacheLock(str(copy), exclusive=True).acquire()  # what stage one takes to replace a cache
        # another stage one over it, with other settings: refused by its lock, or, where the lock does not
        # reach, the student stops at the next epoch instead of reading the other teacher's data
        dump = run_cli("stage1_teacher.dump", *tiny_overrides(tiny, copy, **{"cache.k": 8, "cache.overwrite": True}))
    finally:
        result = finish(process, tmp_path / "gate")
    if dump.returncode == 0:
        assert_one_error_line(result, "changed during the run", "stopped before epoch 1, after step 3",
                              "checkpoints/step-2 is intact")
    else:
        assert len(error_lines(dump.stderr)) == 1 and "in use" in dump.stderr
        assert result.returncode == 0, result.stderr[-3000:]


def test_a_manifest_changed_between_epochs_stops_the_run(tiny, cache_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    process = paused_run(tiny, copy, tmp_path / "out", tmp_path / "gate", step=3)
    try:
        manifest = copy / "manifest.json"
        manifest.write_text(manifest.read_text() + " ")  # same JSON, another file
    finally:
        result = finish(process, tmp_path / "gate")
    assert_one_error_line(result, f"cache {copy} changed during the run", "checkpoints/step-2 is intact")
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3]


def test_a_staging_directory_is_refused_as_a_cache(tiny, cache_dir, tmp_path):
    """`<cache.dir>.partial` holding a complete cache that stage one has not published (its swap was refused,
    or it has not happened yet) is not read."""
    staging = tmp_path / "cache.partial"
    shutil.copytree(cache_dir, staging)
    with pytest.raises(UserError, match=f"^{staging}/ is stage one's staging directory, not a published cache; "
                                        f"rerun stage one's command to finish and publish it as {tmp_path}/cache, "
                                        "and read that$"):
        train_main(train_args(tiny, staging, tiny / "student", tmp_path / "out") + ["--cache", f"{staging}/"])
    assert not (tmp_path / "out").exists()


def test_a_cache_being_written_by_stage_one_is_refused(tiny, cache_dir, tmp_path):
    holder = hold_in_other_process(cache_dir, exclusive=True)
    try:
        result = run_cli("stage2_student.train", *train_args(tiny, cache_dir, tiny / "student", tmp_path / "out"))
    finally:
        holder.kill()
        holder.wait()
    assert_one_error_line(result, f"{cache_dir} is in use by a running stage one")
    assert not (tmp_path / "out").exists()


def test_verification_can_be_skipped_and_reports_its_speed(tiny, cache_dir, tmp_path, capsys):
    train_main(train_args(tiny, cache_dir, tiny / "student", tmp_path / "a", **{"train.max_steps": 1}))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[stage2] verified"))
    megabytes = sum(p.stat().st_size for p in cache_dir.glob("shard-*.h5")) / 1e6
    assert f"3 shards ({megabytes:.1f} MB)" in line and math.isfinite(float(line.split("(")[2].split()[0]))
    train_main(train_args(tiny, cache_dir, tiny / "student", tmp_path / "b", **{"train.max_steps": 1,
                                                                              "train.verify_cache": False}))
    assert "[stage2] verified" not in capsys.readouterr().out
    assert np.isfinite(metrics(tmp_path / "b")[0]["loss"])
