"""Writing a cache: a staging directory that survives a crash, shards written by a background thread, the
manifest last, then an atomic swap into place.

While stage one runs, everything is in `<dir>.partial`, locked exclusively (cache/lock.py):

    kd-cache.lock          the lock; it travels with the directory when the cache is published
    stage1.json            the settings that determine the contents, recorded when the directory was started
    shard-00003.h5.tmp     a shard being written
    shard-00003.h5         a complete shard, renamed from .tmp once closed
    shard-00003.h5.json    its record (sha256 of the file and of its tokens), written after the rename: a shard
                           is complete when its record exists and matches the file
    manifest.json          written after every shard: the directory is then a complete cache; the records and
                           stage1.json are deleted and the directory is renamed to `<dir>`

A rerun with the same settings keeps the complete shards and computes the rest; other settings are refused in
one line naming the setting, or with overwrite start afresh. Only files of the names above are ever deleted:
a staging directory or destination holding anything else is refused in one line naming the unexpected files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import h5py
import numpy as np

from cache.encoding import encode, h5_create_kwargs
from cache.format import (
    MANIFEST,
    STAGING_SUFFIX,
    STORED,
    STORED_CHAT,
    TAIL_DATASETS,
    decoded_datasets,
    file_sha256,
    shard_name,
)
from cache.lock import LOCK_FILE, CacheLock
from cache.manifest import DatasetEntry, Manifest, ShardEntry
from common.cli import UserError, error_line
from common.config import CacheMode, first_difference
from common.data import tokens_sha256
from common.fsutil import publish_directory, refuse_foreign, write_json_atomic, write_text_atomic
from common.schema import SchemaError, from_dict

STATE_FILE = "stage1.json"
STATE_FORMAT = "kd-logit-cache-staging"
RECORD_SUFFIX = ".json"  # shard-00003.h5.json
# Every file name stage one writes into a staging directory (the lock file aside); nothing else is deleted.
_OUR_FILES = re.compile(rf"({re.escape(STATE_FILE)}|{re.escape(MANIFEST)}|shard-\d+\.h5(\.json)?)(\.tmp)?")


@dataclass(frozen=True)
class ShardSpec:
    """Which shard a batch of blocks belongs to."""
    index: int
    first_block: int
    num_blocks: int


@dataclass(frozen=True)
class ShardRecord:
    """A complete shard: its manifest entry and the sha256 of its tokens (None for the shards of a complete
    staging directory, whose tokens the manifest's fingerprint covers)."""
    file: str
    first_block: int
    num_blocks: int
    sha256: str
    bytes: int
    tokens_sha256: Optional[str]

    @property
    def index(self) -> int:
        return int(self.file[len("shard-"):-len(".h5")])

    def entry(self) -> ShardEntry:
        return ShardEntry(self.file, self.first_block, self.num_blocks, self.sha256, self.bytes)


def write_failed(what: str, err: BaseException) -> UserError:
    """A failed write (disk full, quota, permissions) as one line; what was complete stays resumable."""
    return UserError(f"cannot write {what}: {error_line(err)}; nothing was published (complete shards are kept: "
                     f"free the space and rerun the same command to resume)")


# --- the destination ---------------------------------------------------------------------------------------

def check_destination(final_dir: str, overwrite: bool) -> None:
    """Refuse, before any expensive work, a destination that finishing would wrongly replace: anything but an
    absent or empty directory, or with overwrite a cache of ours holding nothing but its listed files; and one
    whose lock, which the swap takes, cannot be made (whether a reader holds it is asked at the swap)."""
    if not final_dir.strip():
        raise UserError("cache.dir is empty")
    if not os.path.lexists(final_dir):
        return
    if not os.path.isdir(final_dir) or os.path.islink(final_dir):  # a link would be replaced, not what it points to
        raise UserError(f"cache.dir exists and is not a directory (a file or a symbolic link): {final_dir}")
    entries = set(os.listdir(final_dir)) - {LOCK_FILE}
    if entries:
        _check_replaceable(final_dir, entries, overwrite)
    CacheLock(final_dir, exclusive=True).check_can_lock()


def _check_replaceable(final_dir: str, entries: set[str], overwrite: bool) -> None:
    if MANIFEST not in entries:
        raise UserError(f"cache.dir {final_dir} exists, is not empty and is not a cache (no {MANIFEST}); "
                        "refusing to touch it")
    try:
        with open(os.path.join(final_dir, MANIFEST), "rb") as fh:
            manifest = Manifest.from_json(fh.read().decode("utf-8", errors="replace"), MANIFEST)
    except UserError as err:
        raise UserError(f"cache.dir {final_dir} is not a cache this release wrote ({err}); refusing to touch it") \
            from None
    refuse_foreign(f"cache.dir {final_dir}", sorted(entries - {MANIFEST} - {s.file for s in manifest.shards}))
    if not overwrite:
        raise UserError(f"cache.dir {final_dir} already holds a cache; pass cache.overwrite=true or choose another "
                        "cache.dir")


# --- the staging directory ---------------------------------------------------------------------------------

@dataclass
class Resume:
    """What a staging directory holds that may be kept: complete shards by index (each still to be re-checked
    with `StagingDir.keep`) and, when the directory already holds a complete cache, that cache's manifest."""
    records: dict[int, ShardRecord] = field(default_factory=dict)
    manifest: Optional[Manifest] = None


class StagingDir:
    """`<final_dir>.partial`: created, locked, inspected, and finally published as `final_dir`."""

    def __init__(self, final_dir: str) -> None:
        self.final_dir = final_dir
        self.path = f"{os.path.normpath(final_dir)}{STAGING_SUFFIX}"
        self.contents: Optional[dict[str, Any]] = None
        self._lock = CacheLock(self.path, exclusive=True)

    def open(self, contents: Optional[dict[str, Any]], overwrite: bool) -> Resume:
        """Create or find the staging directory, lock it for this process's lifetime, and say what it holds
        that can be kept. `contents` are the settings that determine the contents (JSON values): a directory
        started with other settings is refused, naming the first that differs, or with `overwrite` emptied.
        `contents=None` never resumes: anything of ours found there is deleted."""
        self.contents = None if contents is None else json.loads(json.dumps(contents))
        self._refuse_foreign()
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the staging directory {self.path}: {error_line(err)}") from None
        self._lock.acquire()  # a second stage one on the same cache.dir stops here, touching nothing
        self._refuse_foreign()  # again, under the lock
        resume = self._inspect(overwrite)
        if not resume.records and resume.manifest is None:
            self.restart()
        return resume

    def keep(self, record: ShardRecord) -> bool:
        """Re-check a complete shard's sha256; a shard that fails is deleted (to be recomputed). Any process of
        the dump may check the shards it owns: this touches nothing else."""
        path = self._file(record.file)
        if os.path.isfile(path) and os.path.getsize(path) == record.bytes and file_sha256(path) == record.sha256:
            return True
        for name in (record.file, record.file + RECORD_SUFFIX):
            _remove(self._file(name))
        return False

    def records(self, count: int) -> list[ShardRecord]:
        """The records of shards 0 … count-1, every one of which must be complete."""
        records = []
        for index in range(count):
            record = _read_record(self._file(shard_name(index) + RECORD_SUFFIX))
            if record is None:
                raise UserError(f"{self.path}: shard {shard_name(index)} is not complete; rerun to resume")
            records.append(record)
        return records

    def finish(self, manifest: Manifest) -> Manifest:
        """Write the manifest (adding the contents settings), then drop the records and the state file: the
        staging directory now holds a complete cache and nothing else."""
        if self.contents is not None:
            manifest = dataclasses.replace(manifest, settings={"contents": self.contents, **manifest.settings})
        manifest.check()
        self._write(lambda: write_text_atomic(self._file(MANIFEST), manifest.to_json()), MANIFEST)
        listed = {MANIFEST} | {s.file for s in manifest.shards}
        for name in os.listdir(self.path):
            if _OUR_FILES.fullmatch(name) and name not in listed:
                _remove(self._file(name))
        return manifest

    def restart(self) -> None:
        """Start afresh: delete everything of ours here (the lock stays held) and record the contents again."""
        self._delete_ours()
        if self.contents is not None:
            self._write(lambda: write_json_atomic(self._file(STATE_FILE),
                                                  {"format": STATE_FORMAT, "contents": self.contents}), STATE_FILE)

    def publish(self, overwrite: bool) -> None:
        """Swap the finished cache in, holding an exclusive lock on the destination while doing so: a cache
        that a reader holds is refused in one line and the new one stays complete here."""
        check_destination(self.final_dir, overwrite)
        target = CacheLock(self.final_dir, exclusive=True) if os.path.isdir(self.final_dir) else None
        try:
            if target is not None:
                try:
                    target.acquire()
                except UserError as err:
                    raise UserError(f"{err}; the new cache is complete in {self.path}: rerun the same command "
                                    "to publish it") from None
                check_destination(self.final_dir, overwrite)  # again, under the lock
            try:
                publish_directory(self.path, self.final_dir)
            except OSError as err:
                raise UserError(f"cannot move {self.path} to {self.final_dir}: {error_line(err)}") from None
        finally:
            if target is not None:
                target.release()

    def close(self) -> None:
        self._lock.release()

    # -- internals -------------------------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _write(self, write: Callable[[], None], name: str) -> None:
        try:
            write()
        except OSError as err:
            raise write_failed(self._file(name), err) from None

    def _refuse_foreign(self) -> None:
        if not os.path.lexists(self.path):
            return
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            raise UserError(f"{self.path} exists and is not a staging directory of ours; refusing to touch it")
        refuse_foreign(f"the staging directory {self.path}",
                       sorted(n for n in os.listdir(self.path) if n != LOCK_FILE and not _OUR_FILES.fullmatch(n)))

    def _inspect(self, overwrite: bool) -> Resume:
        names = set(os.listdir(self.path)) - {LOCK_FILE}
        if all(name.endswith(".tmp") for name in names) or self.contents is None:
            return Resume()  # empty, or stopped while writing its first file: nothing to keep
        started, recorded = self._recorded_contents(names)
        if recorded is None:
            if overwrite:
                return Resume()
            raise UserError(f"{self.path} holds an unfinished dump that cannot be resumed ({started}); rerun with "
                            "cache.overwrite=true to delete it and start afresh")
        difference = first_difference(recorded, self.contents)
        if difference is not None:
            if overwrite:
                return Resume()
            key, then, now = difference
            raise UserError(f"cannot resume {self.path}: {key} was {_show(then)} when it was started, now "
                            f"{_show(now)}; restore it, or rerun with cache.overwrite=true to start afresh")
        if MANIFEST in names:
            manifest = Manifest.from_json(_read_text(self._file(MANIFEST)), self._file(MANIFEST))
            return Resume({s.index: s for s in (ShardRecord(**dataclasses.asdict(e), tokens_sha256=None)
                                                for e in manifest.shards)}, manifest)
        records = {}
        for name in names:
            if name.endswith(".h5" + RECORD_SUFFIX):
                record = _read_record(self._file(name))
                if record is not None and record.file + RECORD_SUFFIX == name:
                    records[record.index] = record
        for name in names - {STATE_FILE} - {r.file for r in records.values()} - \
                {r.file + RECORD_SUFFIX for r in records.values()}:
            _remove(self._file(name))  # incomplete: a .tmp, a shard without its record, a torn record
        return Resume(records)

    def _recorded_contents(self, names: set[str]) -> tuple[str, Optional[dict[str, Any]]]:
        """(how it was started, the contents settings it records or None)."""
        if MANIFEST in names:
            try:
                manifest = Manifest.from_json(_read_text(self._file(MANIFEST)), MANIFEST)
            except UserError as err:
                return f"its {err}", None
            contents = manifest.settings.get("contents")
            return "a complete cache", contents if isinstance(contents, dict) else {}
        if STATE_FILE not in names:
            return f"no {STATE_FILE}: left by another tool", None
        try:
            state = json.loads(_read_text(self._file(STATE_FILE)))
            if state.get("format") != STATE_FORMAT or not isinstance(state.get("contents"), dict):
                raise ValueError("not a staging state")
        except (ValueError, AttributeError) as err:
            return f"{STATE_FILE} is unreadable: {err}", None
        return "an unfinished dump", state["contents"]

    def _delete_ours(self) -> None:
        for name in os.listdir(self.path):
            if _OUR_FILES.fullmatch(name):
                _remove(self._file(name))


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def _read_record(path: str) -> Optional[ShardRecord]:
    """A shard's record, or None if it is missing or torn."""
    try:
        return from_dict(ShardRecord, json.loads(_read_text(path)), os.path.basename(path))
    except (OSError, ValueError, SchemaError):
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- the shard writer --------------------------------------------------------------------------------------

@dataclass
class _OpenShard:
    spec: ShardSpec
    path: str
    handle: h5py.File
    tokens: Any  # the running sha256 of its input_ids
    filled: int = 0


class ShardWriter:
    """Writes whole shards into `directory` on a background thread behind a bounded queue, so the producer
    (the teacher) never waits on the disk. Each shard is `shard-N.h5.tmp` until closed, then renamed, and
    its record written. An error in the thread (a full disk) is raised once, as one line, by the next `put`
    or by `close`; HDF5 files are closed by the thread that opened them."""

    def __init__(self, directory: str, mode: CacheMode, datasets: dict[str, DatasetEntry], queue_size: int = 8) -> None:
        self.directory = directory
        # the names put; `datasets` are the stored ones (cache/encoding.py)
        tail = any(STORED[name].decodes in TAIL_DATASETS for name in datasets)
        self.decoded = decoded_datasets(mode, tail, STORED_CHAT[0] in datasets)
        self.datasets = datasets
        self.write_seconds = 0.0
        self.records: list[ShardRecord] = []
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: Optional[BaseException] = None
        self._current: Optional[ShardSpec] = None  # the producer's view: the shard being filled, and how far
        self._filled = 0
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------------------------------------
    def put(self, shard: ShardSpec, arrays: dict[str, np.ndarray]) -> None:
        """Queue the next consecutive blocks of `shard` (every dataset, decoded, same leading size); a shard
        is begun by its first blocks and must be filled before the next one begins."""
        self.raise_if_failed()
        sizes = {len(a) for a in arrays.values()}
        if set(arrays) != set(self.decoded) or len(sizes) != 1:
            raise ValueError(f"expected datasets {sorted(self.decoded)} of equal length")
        count = sizes.pop()
        if shard != self._current:
            if self._current is not None and self._filled != self._current.num_blocks:
                raise ValueError(f"shard {self._current.index} got {self._filled} of {self._current.num_blocks} "
                                 "blocks before the next one began")
            self._current, self._filled = shard, 0
        if self._filled + count > shard.num_blocks:
            raise ValueError(f"more blocks than shard {shard.index} holds ({shard.num_blocks})")
        self._filled += count
        while True:  # wait in slices so a dead writer thread cannot block us forever
            try:
                self._queue.put((shard, arrays), timeout=1.0)
                return
            except queue.Full:
                self.raise_if_failed()

    def close(self) -> list[ShardRecord]:
        """Wait until everything queued is written; the records of the shards written."""
        self._stop()
        self.raise_if_failed()
        if self._current is not None and self._filled != self._current.num_blocks:
            raise ValueError(f"shard {self._current.index} got {self._filled} of {self._current.num_blocks} blocks")
        return self.records

    def abort(self) -> None:
        """Stop the thread; a shard being written stays behind as `.tmp` (deleted by the next run)."""
        self._stop()

    def _stop(self) -> None:
        if not self._thread.is_alive():
            return
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=1.0)
                break
            except queue.Full:
                continue
        self._thread.join()

    def raise_if_failed(self) -> None:
        """Raise the writer thread's error, if it had one: one line for a failed write."""
        err = self._error
        if err is None:
            return
        if isinstance(err, UserError):
            raise err
        if isinstance(err, OSError):
            raise write_failed(f"the cache in {self.directory}", err) from None
        raise RuntimeError(f"cache writer failed: {err!r}") from err

    # -- writer thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        shard: Optional[_OpenShard] = None
        try:
            while (item := self._queue.get()) is not None:
                spec, arrays = item
                start = time.perf_counter()
                if shard is None:
                    shard = self._open(spec)
                tokens_sha256(arrays["input_ids"], shard.tokens)
                stored = encode(self.datasets, arrays)
                count = len(arrays["input_ids"])
                for name, values in stored.items():
                    shard.handle[name][shard.filled:shard.filled + count] = values
                shard.filled += count
                if shard.filled == spec.num_blocks:
                    self._close(shard)
                    shard = None
                self.write_seconds += time.perf_counter() - start
        except BaseException as err:  # surfaced to the producer by raise_if_failed
            self._error = err
            if shard is not None:
                _close_quietly(shard.handle)
            while self._queue.get() is not None:  # drain so the producer never blocks on us
                pass
        else:
            if shard is not None:  # aborted mid-shard
                _close_quietly(shard.handle)

    def _open(self, spec: ShardSpec) -> _OpenShard:
        path = os.path.join(self.directory, shard_name(spec.index) + ".tmp")
        # No chunk cache: every write is of whole chunks, so the cache would only delay a failed write to close,
        # where HDF5 cannot recover from it.
        handle = h5py.File(path, "w", rdcc_nbytes=0)
        try:
            for name, entry in self.datasets.items():
                tail = tuple(entry.shape_per_block)
                handle.create_dataset(name, shape=(spec.num_blocks, *tail), dtype=entry.dtype, chunks=(1, *tail),
                                      **h5_create_kwargs(entry))
            handle.attrs["first_block"] = spec.first_block
        except BaseException:
            _close_quietly(handle)
            raise
        return _OpenShard(spec, path, handle, hashlib.sha256())

    def _close(self, shard: _OpenShard) -> None:
        handle, shard.handle = shard.handle, None
        handle.close()
        final = shard.path[: -len(".tmp")]
        os.replace(shard.path, final)
        record = ShardRecord(file=os.path.basename(final), first_block=shard.spec.first_block,
                             num_blocks=shard.spec.num_blocks, sha256=file_sha256(final),
                             bytes=os.path.getsize(final), tokens_sha256=shard.tokens.hexdigest())
        write_json_atomic(final + RECORD_SUFFIX, dataclasses.asdict(record))
        self.records.append(record)


def _close_quietly(handle: Optional[h5py.File]) -> None:
    """Close an HDF5 file after a failed write. A close that fails leaves HDF5 holding the file, and a
    second close releases it (otherwise the interpreter's exit crashes inside HDF5)."""
    if handle is None:
        return
    for _ in range(2):
        try:
            handle.close()
            return
        except Exception:  # noqa: BLE001 - the write error is what gets reported
            continue


# --- writing a cache from arrays in memory -----------------------------------------------------------------

@dataclass
class CacheLayout:
    mode: str
    num_blocks: int
    seq_len: int
    datasets: dict[str, DatasetEntry]
    shard_blocks: int

    def shard_ranges(self) -> list[tuple[int, int]]:
        """(first_block, num_blocks) of each shard."""
        step = self.shard_blocks
        return [(first, min(step, self.num_blocks - first)) for first in range(0, self.num_blocks, step)]


class CacheWriter:
    """A whole cache of a known number of blocks, put in order in batches of any size (tests, tools that
    re-encode a cache). Stage one, which learns the number of blocks only at the end and resumes, drives
    `StagingDir` and `ShardWriter` itself."""

    def __init__(self, final_dir: str, layout: CacheLayout, overwrite: bool = False, queue_size: int = 8) -> None:
        check_destination(final_dir, overwrite)
        self.final_dir, self.layout, self.overwrite = final_dir, layout, overwrite
        self.staging = StagingDir(final_dir)
        self.staging.open(contents=None, overwrite=True)
        self.staging_dir = self.staging.path
        self._specs = [ShardSpec(i, first, count) for i, (first, count) in enumerate(layout.shard_ranges())]
        self._next_block = 0
        self._shards = ShardWriter(self.staging.path, layout.mode, layout.datasets, queue_size)

    @property
    def write_seconds(self) -> float:
        return self._shards.write_seconds

    @property
    def shards(self) -> list[ShardEntry]:
        return [r.entry() for r in self._shards.records]

    def put(self, arrays: dict[str, np.ndarray]) -> None:
        """Queue the next consecutive blocks (every dataset of the layout, same leading size)."""
        sizes = {len(a) for a in arrays.values()}
        decoded = self._shards.decoded  # what is put; layout.datasets are what is stored
        if set(arrays) != set(decoded) or len(sizes) != 1:
            raise ValueError(f"expected datasets {sorted(decoded)} of equal length")
        count = sizes.pop()
        if self._next_block + count > self.layout.num_blocks:
            raise ValueError("more blocks than the layout holds")
        offset = 0
        while offset < count:
            spec = self._specs[(self._next_block + offset) // self.layout.shard_blocks]
            take = min(count - offset, spec.first_block + spec.num_blocks - self._next_block - offset)
            self._shards.put(spec, {name: a[offset:offset + take] for name, a in arrays.items()})
            offset += take
        self._next_block += count

    def finish(self, manifest: Manifest) -> Manifest:
        """Flush, write the manifest (the caller's, with the shards written) last, and move the finished
        cache into place."""
        try:
            if self._next_block != self.layout.num_blocks:
                self._shards.abort()
                self._shards.raise_if_failed()  # the cause, if the thread failed
                raise ValueError(f"wrote {self._next_block} of {self.layout.num_blocks} blocks")
            layout = (self.layout.mode, self.layout.num_blocks, self.layout.seq_len, self.layout.datasets)
            if (manifest.mode, manifest.num_blocks, manifest.seq_len, manifest.datasets) != layout or manifest.shards:
                raise ValueError("the manifest does not describe the layout written, or already lists shards")
            self._shards.close()
            full = self.staging.finish(dataclasses.replace(manifest, shards=self.shards))
            self.staging.publish(self.overwrite)
            return full
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the writer; unless finished, the staging directory stays behind, manifest-less."""
        self._shards.abort()
        self.staging.close()

