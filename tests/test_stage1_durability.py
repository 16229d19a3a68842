"""Stage one when things go wrong (issue 8's table, stage one's rows): killed and rerun, two dumps at once,
overwrites of what is not ours or is being read, a full disk, bad settings, a broken tokenizer. Each ends in
one line and the right status, nothing half-written is taken for whole, and a rerun of the same command
finishes the cache exactly as an uninterrupted run would have."""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache.lock import LOCK_FILE
from cache.reader import verify_cache
from cache.writer import StagingDir
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from tests.conftest import REPO, tiny_overrides
from tests.test_lock import hold_in_other_process

SHARDS = 3  # TEST_BLOCKS = 12 blocks in shards of 5: 5, 5, 2


def args_for(tiny: Path, cache: Path, **extra: object) -> list[str]:
    return tiny_overrides(tiny, cache, **{"cache.shard_blocks": 5, **extra})


def dump_cli(*args: str, hook: str | None = None, limit_bytes: int | None = None,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m stage1_teacher.dump ARGS` in a fresh process; `hook`: ACTION@EVENT, run through
    tests/stage1_hooks.py instead; `limit_bytes`: no file may grow past it (RLIMIT_FSIZE, SIGXFSZ ignored: writes
    fail with EFBIG, as on a full disk)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    entry = ["stage1_teacher.dump"] if hook is None else ["tests.stage1_hooks", hook]
    cmd = [sys.executable, "-m", *entry, *map(str, args)]
    kwargs = dict(cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  preexec_fn=limit if limit_bytes is not None else None)
    if not wait:
        return subprocess.Popen(cmd, **kwargs)
    return subprocess.run(cmd, timeout=300, **kwargs)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Our lines on stderr (progress bars aside); there must be no traceback at all."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def fingerprint(cache: Path) -> tuple[bytes, dict[str, str]]:
    """The manifest's bytes and every shard's sha256, computed here."""
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("shard-*.h5"))}
    return (cache / "manifest.json").read_bytes(), shards


def staging_of(cache: Path) -> Path:
    return cache.parent / f"{cache.name}.partial"


# the caches compared: by name, their settings (tail: top-k with tail draws, keyed by block as sample mode's)
MODES = {"topk": {"cache.mode": "topk"}, "sample": {"cache.mode": "sample"},
         "tail": {"cache.mode": "topk", "cache.tail_draws": 16}}


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted dumps to compare with."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for mode, settings in MODES.items():
        out[mode] = root / mode
        dump_main(args_for(tiny, out[mode], **settings))
    return out


@pytest.mark.parametrize("mode, point, complete", [
    ("topk", "shard-0", 1),  # killed after the first shard was complete
    ("sample", "shard-1", 2),  # draws keyed by block: the resumed shards draw as the first run would have
    ("tail", "shard-1", 2),  # and so do the tail draws
    ("topk", "publish", SHARDS),  # killed with the manifest written, before the swap
])
def test_killed_dump_resumes_to_the_same_cache(tiny, clean, tmp_path, capsys, mode, point, complete):
    cache = tmp_path / "cache"
    args = args_for(tiny, cache, **MODES[mode])
    killed = dump_cli(*args, hook=f"exit@{point}")
    assert killed.returncode == 137, killed.stderr[-2000:]
    staging = staging_of(cache)
    assert not cache.exists() and staging.is_dir()
    assert ("manifest.json" in os.listdir(staging)) == (point == "publish")
    assert len(list(staging.glob("shard-*.h5"))) == complete
    if point != "publish":  # nothing a reader would take for a cache; at "publish" it is one, complete
        with pytest.raises(UserError, match="no manifest.json"):
            verify_cache(str(staging))

    dump_main(args)  # the same command again
    out = capsys.readouterr().out
    assert f"[stage1] resuming: {complete} of {SHARDS} shards complete in {staging}" in out
    resumed = min(5 * complete, 12)
    assert f"{SHARDS} shards ({resumed} blocks resumed)" in out
    assert fingerprint(cache) == fingerprint(clean[mode])  # every shard's sha256, and the manifest
    assert not staging.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([LOCK_FILE, "manifest.json", *fingerprint(cache)[1]])


def test_a_damaged_complete_shard_is_computed_again(tiny, clean, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = args_for(tiny, cache)
    assert dump_cli(*args, hook="exit@shard-1").returncode == 137
    shard = staging_of(cache) / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[-17] ^= 0xFF
    shard.write_bytes(bytes(data))
    dump_main(args)
    out = capsys.readouterr().out
    assert "[stage1] shard-00000.h5 does not match its sha256; it is computed again" in out
    assert f"[stage1] resuming: 1 of {SHARDS} shards complete" in out
    assert fingerprint(cache) == fingerprint(clean["topk"])


def test_other_settings_are_refused_naming_them_and_overwrite_starts_afresh(tiny, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert dump_cli(*args_for(tiny, cache, **{"cache.k": 16}), hook="exit@shard-0").returncode == 137
    staging = staging_of(cache)
    before = sorted(os.listdir(staging))
    refused = dump_cli(*args_for(tiny, cache, **{"cache.k": 8}))
    assert refused.returncode == 2
    assert error_lines(refused) == [f"error: cannot resume {staging}: cache.k was 16 when it was started, now 8; "
                                    "restore it, or rerun with cache.overwrite=true to start afresh"]
    assert sorted(os.listdir(staging)) == before  # nothing deleted
    dump_main(args_for(tiny, cache, **{"cache.k": 8, "cache.overwrite": "true"}))
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((cache / "manifest.json").read_text())["k"] == 8 and verify_cache(str(cache)) == []


def test_changed_data_is_refused_and_overwrite_starts_afresh(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    cache = tmp_path / "cache"
    args = args_for(tiny, cache, **{"data.local_dir": data})
    assert dump_cli(*args, hook="exit@shard-1").returncode == 137
    train = data / "wiki.train.raw"
    train.write_text("An edited first line.\n" + train.read_text(encoding="utf-8"), encoding="utf-8")
    refused = dump_cli(*args)
    assert refused.returncode == 2
    assert error_lines(refused) == [f"error: the data changed since {staging_of(cache)} was started: shard-00000.h5 "
                                    "holds other tokens than it gives now; rerun with cache.overwrite=true to start "
                                    "afresh"]
    assert "Loading weights" not in refused.stderr  # refused before the teacher was loaded
    dump_main([*args, "cache.overwrite=true"])
    out = capsys.readouterr().out
    assert "[stage1] starting afresh: the data changed" in out and "resuming" not in out
    assert verify_cache(str(cache)) == []


def test_two_dumps_on_one_cache_dir_then_kill_9_and_rerun(tiny, clean, tmp_path, capsys):
    """The second dump refuses in one line and touches nothing; the first, killed with SIGKILL while it holds
    the lock, leaves complete shards that the rerun keeps."""
    cache = tmp_path / "cache"
    args = args_for(tiny, cache)
    first = dump_cli(*args, hook="hang@shard-0", wait=False)
    staging = staging_of(cache)
    try:
        deadline = time.time() + 240
        while not (staging / "shard-00000.h5.json").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        before = {p.name: p.read_bytes() for p in staging.iterdir()}
        second = dump_cli(*args)
        assert second.returncode == 2
        assert error_lines(second) == [f"error: {staging} is in use by a running stage one or stage two (lock "
                                       f"{staging / LOCK_FILE} is held); wait for it to finish or use another "
                                       "directory"]
        assert {p.name: p.read_bytes() for p in staging.iterdir()} == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL and not cache.exists()
    dump_main(args)
    assert f"[stage1] resuming: 1 of {SHARDS} shards complete" in capsys.readouterr().out
    assert fingerprint(cache) == fingerprint(clean["topk"])


def test_sigterm_is_one_line_and_the_rerun_finishes(tiny, clean, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = args_for(tiny, cache)
    dump = dump_cli(*args, wait=False)
    deadline = time.time() + 240
    while not staging_of(cache).exists():  # made after the settings are checked, before the teacher pass
        assert dump.poll() is None and time.time() < deadline, dump.stderr.read() if dump.poll() else "slow"
        time.sleep(0.05)
    dump.send_signal(signal.SIGTERM)
    _, stderr = dump.communicate(timeout=120)
    assert dump.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == "terminated (SIGTERM)"
    dump_main(args)  # the lock was released; the same command finishes the cache
    assert fingerprint(cache) == fingerprint(clean["topk"])


def test_overwrite_checks_the_destination_lock_before_the_teacher_pass(tiny, clean, tmp_path):
    """The swap needs the destination's lock file: one that cannot be made (here a directory holds its name) is
    refused at the start, before the staging directory or the teacher, not after the whole pass."""
    cache = tmp_path / "cache"
    shutil.copytree(clean["topk"], cache)
    (cache / LOCK_FILE).unlink(missing_ok=True)
    (cache / LOCK_FILE).mkdir()
    with pytest.raises(UserError, match=f"^cannot create the lock file {cache / LOCK_FILE}: Is a directory$"):
        dump_main(args_for(tiny, cache, **{"cache.k": 8, "cache.overwrite": "true"}))
    assert not staging_of(cache).exists()


def test_overwrite_refuses_what_is_not_ours(tiny, clean, tmp_path):
    """cache.overwrite=true replaces only a cache of ours holding nothing but its files; a foreign manifest,
    an unexpected file, or foreign files in the staging directory are refused, each in one line, and kept."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my experiment"}')
    (foreign / "results.csv").write_text("1,2,3\n")
    refused = dump_cli(*args_for(tiny, foreign, **{"cache.overwrite": "true"}))
    assert refused.returncode == 2
    assert error_lines(refused) == [f"error: cache.dir {foreign} is not a cache this release wrote (manifest.json: "
                                    "not a kd-logit-cache manifest); refusing to touch it"]
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.json", "results.csv"]
    assert not staging_of(foreign).exists()

    ours = tmp_path / "ours"
    shutil.copytree(clean["topk"], ours)
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=re.escape(f"cache.dir {ours} holds files this tool did not write (notes.txt); "
                                                  "nothing was deleted: move them away or choose another directory")):
        dump_main(args_for(tiny, ours, **{"cache.overwrite": "true"}))
    assert (ours / "notes.txt").read_text() == "mine" and verify_cache(str(ours)) == []

    cache = tmp_path / "cache"
    staging = staging_of(cache)
    staging.mkdir()
    (staging / "shard-00000.h5").write_text("ours by name")
    (staging / "thesis.tex").write_text("not ours")
    expected = f"the staging directory {staging} holds files this tool did not write (thesis.tex); nothing was deleted"
    with pytest.raises(UserError, match=re.escape(expected)):
        dump_main(args_for(tiny, cache, **{"cache.overwrite": "true"}))
    assert sorted(p.name for p in staging.iterdir()) == ["shard-00000.h5", "thesis.tex"]  # not even a lock file


def test_overwrite_while_a_reader_holds_the_cache(tiny, clean, tmp_path, capsys):
    """The swap needs the destination's exclusive lock: with a stage two reading, the overwrite is refused in
    one line, the old cache stays whole, the new one complete in the staging directory; a rerun publishes it
    without running the teacher."""
    cache = tmp_path / "cache"
    shutil.copytree(clean["topk"], cache)
    old = fingerprint(cache)
    args = args_for(tiny, cache, **{"cache.k": 8, "cache.overwrite": "true"})
    reader = hold_in_other_process(cache, exclusive=False)
    try:
        refused = dump_cli(*args)
    finally:
        reader.kill()
        reader.wait()
    staging = staging_of(cache)
    assert refused.returncode == 2
    assert error_lines(refused) == [f"error: {cache} is in use by a running stage one or stage two (lock "
                                    f"{cache / LOCK_FILE} is held); wait for it to finish or use another directory; "
                                    f"the new cache is complete in {staging}: rerun the same command to publish it"]
    assert fingerprint(cache) == old
    assert verify_cache(str(staging)) == []
    dump_main(args)
    out = capsys.readouterr().out
    assert f"[stage1] resuming: {SHARDS} of {SHARDS} shards complete" in out and "(12 blocks resumed)" in out
    assert json.loads((cache / "manifest.json").read_text())["k"] == 8 and not staging.exists()


def test_disk_full_is_one_line_and_the_rerun_finishes(tiny, tmp_path):
    """Writes that fail (EFBIG here, ENOSPC on a full disk: the same path) surface once, as one line, with
    no traceback and no crash in HDF5 (a limit per file: the first shard fails; keeping the shards completed
    before a failure is what the kill tests show)."""
    cache = tmp_path / "cache"
    args = args_for(tiny, cache, **{"cache.mode": "full"})  # 1.3 MB shards
    full = dump_cli(*args, limit_bytes=1_000_000)
    assert full.returncode == 2, full.stderr[-3000:]
    assert error_lines(full) == [f"error: cannot write the cache in {staging_of(cache)}: File too large; nothing was "
                                 "published (complete shards are kept: free the space and rerun the same command to "
                                 "resume)"]
    assert not cache.exists() and "manifest.json" not in os.listdir(staging_of(cache))
    dump_main(args)
    assert verify_cache(str(cache)) == []


@pytest.mark.parametrize("override, message", [
    ("cache.dir=", "cache.dir is empty"),
    ("cache.k=0", "cache.k must be positive, got 0"),
    ("cache.sample_temperature=nan", "cache.sample_temperature must be a finite number, got nan"),
    ("cache.sample_temperature=inf", "cache.sample_temperature must be a finite number, got inf"),
    ("cache.sample_temperature=0", "cache.sample_temperature must be positive or null, got 0.0"),
    ("cache.draws=0", "cache.draws must be in [1, 4294967295], got 0"),
    ("cache.seed=-1", "cache.seed must be 0 or more, got -1"),
    ("cache.shard_blocks=0", "cache.shard_blocks must be positive, got 0"),
    ("cache.queue_size=0", "cache.queue_size must be positive, got 0"),
    ("teacher.batch_size=0", "teacher.batch_size must be positive, got 0"),
    ("teacher.sync_timeout=nan", "teacher.sync_timeout must be a finite number, got nan"),
    ("data.seq_len=1", "data.seq_len must be at least 2, got 1"),
    ("data.max_blocks=0", "data.max_blocks must be positive or null, got 0"),
    ("cache.tail_draws=4294967296", "cache.tail_draws must be in [0, 4294967295], got 4294967296"),
    ("cache.dir=c.partial/", "cache.dir c.partial/ ends with .partial, the name of stage one's staging directories; "
                             "choose another name"),
])
def test_bad_settings_are_refused_before_anything_is_touched(tiny, tmp_path, monkeypatch, override, message):
    import stage1_teacher.dump

    monkeypatch.setattr(stage1_teacher.dump, "load_causal_lm", lambda *a, **k: pytest.fail("teacher loaded"))
    monkeypatch.chdir(tmp_path)
    mode = "sample" if "sample" in override or "draws" in override or "seed" in override else "topk"
    with pytest.raises(UserError) as info:
        dump_main(["--config", str(REPO / "pipeline.yaml"), *args_for(tiny, tmp_path / "cache", **{"cache.mode": mode}),
                   override])
    assert str(info.value) == message
    assert os.listdir(tmp_path) == []  # no cache, no staging directory (not even `.partial` for cache.dir=)


def test_unwritable_cache_dir_is_refused_before_the_teacher_loads(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = dump_cli(*args_for(tiny, blocker / "cache"))
    assert result.returncode == 2
    assert error_lines(result) == [f"error: cannot create the staging directory {blocker}/cache.partial: Not a "
                                   f"directory ({blocker}/cache.partial)"]
    assert "Loading weights" not in result.stderr


def test_a_broken_tokenizer_file_is_one_line(tiny, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny / "teacher", teacher)
    spec = json.loads((teacher / "tokenizer.json").read_text())
    spec["model"]["merges"].append(["no-such-token", "nor-this-one"])
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    result = dump_cli(*args_for(tiny, tmp_path / "cache", **{"teacher.model": teacher}))
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith(f"error: cannot load teacher tokenizer {teacher}: ")
    assert not (tmp_path / "cache.partial").exists()


def test_a_dump_stopped_while_writing_its_first_file_is_resumed_afresh(tmp_path):
    """Stopped (SIGTERM, Ctrl-C) between creating the staging directory and finishing stage1.json, a dump
    leaves only a .tmp: the rerun starts there afresh. A shard without stage1.json is still refused."""
    cache = tmp_path / "cache"
    staging = staging_of(cache)
    staging.mkdir()
    (staging / "stage1.json.tmp").write_text("")
    writer = StagingDir(str(cache))
    try:
        resume = writer.open({"cache.k": 16}, overwrite=False)
    finally:
        writer.close()
    assert (resume.records, resume.manifest) == ({}, None)
    assert sorted(os.listdir(staging)) == [LOCK_FILE, "stage1.json"]
    assert json.loads((staging / "stage1.json").read_text())["contents"] == {"cache.k": 16}

    (staging / "stage1.json").unlink()
    (staging / "shard-00000.h5").write_text("")
    writer = StagingDir(str(cache))
    try:
        with pytest.raises(UserError, match=f"^{staging} holds an unfinished dump that cannot be resumed \\(no "
                                            "stage1.json: left by another tool\\); rerun with cache.overwrite=true to "
                                            "delete it and start afresh$"):
            writer.open({"cache.k": 16}, overwrite=False)
    finally:
        writer.close()
