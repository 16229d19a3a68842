"""Cache locks across processes: readers share, a writer excludes, a swapped directory is re-locked."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cache.lock import LOCK_FILE, CacheLock
from common.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def hold_in_other_process(directory: Path, exclusive: bool) -> subprocess.Popen:
    """A second process that takes the lock, says so, and holds it until killed."""
    code = (f"from cache.lock import CacheLock; l = CacheLock({str(directory)!r}, {exclusive}).acquire(); "
            "print('held', flush=True); import time; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("other_exclusive, mine_exclusive, ok", [
    (False, False, True),   # two readers
    (False, True, False),   # a writer while a reader reads
    (True, False, False),   # a reader while a writer writes
    (True, True, False),    # two writers
])
def test_lock_compatibility_between_processes(tmp_path, other_exclusive, mine_exclusive, ok):
    other = hold_in_other_process(tmp_path, other_exclusive)
    try:
        lock = CacheLock(str(tmp_path), mine_exclusive)
        if ok:
            with lock:
                assert lock.held
        else:
            with pytest.raises(UserError, match="is in use by") as info:
                lock.acquire()
            assert "\n" not in str(info.value) and not lock.held
    finally:
        other.kill()
        other.wait()
    with CacheLock(str(tmp_path), True) as lock:  # the holder's death released it
        assert lock.held


def test_a_directory_swapped_under_the_lock_is_relocked(tmp_path):
    """Lock a directory whose lock file is replaced by a rename (stage one publishing a new cache):
    the lock taken is the one now at the path."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = CacheLock(str(cache), exclusive=False).acquire()
    inode = os.stat(cache / LOCK_FILE).st_ino
    lock.release()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_FILE).write_text("")
    os.rename(cache, tmp_path / "old")
    os.rename(fresh, cache)
    with CacheLock(str(cache), exclusive=False) as again:
        assert os.fstat(again._fd).st_ino == os.stat(cache / LOCK_FILE).st_ino != inode


def test_read_only_cache_without_lock_file_can_be_read(tmp_path, monkeypatch):
    """A cache copied without its lock file onto a read-only file system: none can be made. Nobody
    can replace it, so a reader proceeds unlocked; a writer is refused in one line."""
    import errno

    import cache.lock

    def read_only_open(path, flags, mode=0o777):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        raise FileNotFoundError(path)

    monkeypatch.setattr(cache.lock.os, "open", read_only_open)
    with CacheLock(str(tmp_path), exclusive=False) as lock:
        assert not lock.held
    with pytest.raises(UserError, match="cannot create the lock file .*Read-only file system"):
        CacheLock(str(tmp_path), exclusive=True).acquire()


# A process that takes both kinds of lock (the cache's, and stage two's on its output directory), then forks a
# child that keeps running, as a DataLoader worker does, and waits. The child prints its pid once it runs (its
# fork handlers have run by then), so the test never races a child the scheduler has not started yet.
LOCKS_THEN_FORK = """
import os, sys, time
from cache.lock import CacheLock
from stage2_student.checkpoint import DirectoryLock
cache_lock = CacheLock(sys.argv[1], exclusive=True).acquire()
out_lock = DirectoryLock(sys.argv[2])
if os.fork() == 0:
    print(os.getpid(), flush=True)
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


def test_kill_9_releases_the_locks_at_once_although_a_forked_child_lives_on(tmp_path):
    """The holder is killed; its forked child (an orphaned DataLoader worker) is still running, yet the cache
    lock and the output-directory lock are free at once: the child closed its copies when it was forked."""
    from stage2_student.checkpoint import DirectoryLock

    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCKS_THEN_FORK, str(cache), str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match="is in use by"):
            CacheLock(str(cache), exclusive=False).acquire()  # held while the holder lives
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # the orphan is still alive
        with CacheLock(str(cache), exclusive=True) as lock:
            assert lock.held
        DirectoryLock(str(out)).release()
    finally:
        holder.kill()
        holder.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
