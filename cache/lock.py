"""Advisory locks on a cache directory, so a cache in use is never replaced under its reader.

Every cache (and every staging directory `<dir>.partial`) holds one lock file, `kd-cache.lock`. Readers
(stage two) hold a shared `flock` on it for their lifetime; stage one holds an exclusive one on its staging
directory while it writes, and on the destination while it swaps a finished cache in. A lock that is busy
is refused at once with one line, never waited on forever. The lock file travels with the directory when
stage one publishes it, so it is listed nowhere but is always allowed (`LOCK_FILE`).

Locks are advisory and local to one machine's kernel (or an NFS server that supports flock); they guard
against our own processes, not against `rm -rf`.

A flock belongs to the open file, which a forked child (a DataLoader worker) shares through its copy of the
descriptor: an orphan of a killed run would hold the lock until it noticed and exited, and a rerun would be
refused meanwhile. A forked child never uses a lock, so it closes its copies at once (`lock_descriptor`);
the lock then lives exactly as long as the process that took it.
"""
from __future__ import annotations

import errno
import fcntl
import os

from common.cli import UserError

LOCK_FILE = "kd-cache.lock"

_held: set[int] = set()  # the lock descriptors this process holds


def lock_descriptor(fd: int) -> int:
    """Register `fd`, on which this process holds a flock, to be closed in any child forked from now on."""
    _held.add(fd)
    return fd


def close_lock_descriptor(fd: int) -> None:
    """Close a descriptor registered with `lock_descriptor` (closing it releases the flock); in a forked child,
    which closed its copy at the fork, nothing."""
    if fd in _held:
        _held.discard(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _close_in_forked_child() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


def take_flock(fd: int, exclusive: bool, busy: str, what: str) -> None:
    """The one non-blocking flock: taken on `fd` and registered (`lock_descriptor`), or `fd` closed and a
    UserError raised: `busy` when another process holds it, `cannot lock WHAT: reason` otherwise."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(busy) from None
        raise UserError(f"cannot lock {what}: {err.strerror}") from None
    lock_descriptor(fd)


class CacheLock:
    """A shared (reader) or exclusive (writer) lock on `directory`/kd-cache.lock; a context manager."""

    def __init__(self, directory: str, exclusive: bool) -> None:
        self.directory = directory
        self.exclusive = exclusive
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "CacheLock":
        """Take the lock now or raise UserError naming who holds it; retries if the directory was swapped
        (renamed) between opening the lock file and locking it."""
        while True:
            fd = self._open()
            if fd is None:
                return self  # a read-only cache nobody can replace: nothing to guard
            holder = "a running stage one or stage two" if self.exclusive else "a running stage one"
            take_flock(fd, self.exclusive, f"{self.directory} is in use by {holder} (lock {self.path} is held); "
                                           "wait for it to finish or use another directory", self.path)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            close_lock_descriptor(fd)  # the directory was replaced while we waited: lock the new one

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and not self.exclusive:
                try:
                    return os.open(self.path, os.O_RDONLY)  # flock works on a read-only descriptor
                except FileNotFoundError:
                    return None  # a read-only cache without a lock file (copied without it)
            raise UserError(f"cannot create the lock file {self.path}: {err.strerror}") from None

    def check_can_lock(self) -> None:
        """Refuse now, in the line `acquire` would give, a lock file that cannot be created or opened (a
        writer finds out before its expensive work, not at the end); whether the lock is free is `acquire`'s
        question, asked when the lock is needed."""
        fd = self._open()
        if fd is not None:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            close_lock_descriptor(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
