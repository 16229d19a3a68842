"""Writing a cache: shards filled by a background thread behind a bounded queue, then the manifest.

Everything is built in `<dir>.partial`; each shard is written as `shard-N.h5.tmp` and renamed when
complete; the manifest is written last and only then does `<dir>.partial` become `<dir>`. A crash
leaves no directory that a reader could take for a whole cache.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field

import h5py
import numpy as np

from cache.encoding import encode, h5_create_kwargs
from cache.format import MANIFEST, MODE_DATASETS, file_sha256, shard_name
from cache.manifest import DatasetEntry, Manifest, ShardEntry
from common.cli import UserError
from common.fsutil import publish_directory, write_text_atomic


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


def check_destination(final_dir: str, overwrite: bool) -> None:
    """Refuse before any expensive work if finishing would destroy data."""
    if not os.path.exists(final_dir):
        return
    if not os.path.isdir(final_dir):
        raise UserError(f"cache.dir exists and is not a directory: {final_dir}")
    entries = os.listdir(final_dir)
    if not entries:
        return
    if MANIFEST not in entries:
        raise UserError(f"cache.dir {final_dir} exists, is not empty and is not a cache; refusing to touch it")
    if not overwrite:
        raise UserError(f"cache.dir {final_dir} already holds a cache; pass cache.overwrite=true or choose another "
                        "cache.dir")


@dataclass
class _ShardState:
    index: int
    first: int
    count: int
    path: str
    handle: h5py.File
    filled: int = 0


@dataclass
class CacheWriter:
    final_dir: str
    layout: CacheLayout
    overwrite: bool = False
    queue_size: int = 8
    shards: list[ShardEntry] = field(default_factory=list)
    write_seconds: float = 0.0

    def __post_init__(self) -> None:
        check_destination(self.final_dir, self.overwrite)
        self.staging_dir = f"{self.final_dir.rstrip('/')}.partial"
        if os.path.isdir(self.staging_dir):
            shutil.rmtree(self.staging_dir)  # an earlier run's leftover: incomplete by construction
        os.makedirs(self.staging_dir)
        self._ranges = self.layout.shard_ranges()
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._error: BaseException | None = None
        self._next_block = 0
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------------
    def put(self, arrays: dict[str, np.ndarray]) -> None:
        """Queue the next consecutive blocks (every dataset of the layout, same leading size)."""
        self._raise_if_failed()
        sizes = {len(a) for a in arrays.values()}
        decoded = MODE_DATASETS[self.layout.mode]  # what is put; layout.datasets are what is stored
        if set(arrays) != set(decoded) or len(sizes) != 1:
            raise ValueError(f"expected datasets {sorted(decoded)} of equal length")
        count = sizes.pop()
        if self._next_block + count > self.layout.num_blocks:
            raise ValueError("more blocks than the layout holds")
        self._next_block += count
        while True:  # wait in slices so a dead writer thread cannot block us forever
            try:
                self._queue.put(arrays, timeout=1.0)
                return
            except queue.Full:
                self._raise_if_failed()

    def finish(self, manifest: Manifest) -> Manifest:
        """Flush, write the manifest (the caller's, with the shards written) last, and move the finished
        cache into place."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        if self._next_block != self.layout.num_blocks:
            raise ValueError(f"wrote {self._next_block} of {self.layout.num_blocks} blocks")
        layout = (self.layout.mode, self.layout.num_blocks, self.layout.seq_len, self.layout.datasets)
        if (manifest.mode, manifest.num_blocks, manifest.seq_len, manifest.datasets) != layout or manifest.shards:
            raise ValueError("the manifest does not describe the layout written, or already lists shards")
        full = dataclasses.replace(manifest, shards=list(self.shards))
        full.check()
        write_text_atomic(os.path.join(self.staging_dir, MANIFEST), full.to_json())
        self._move_into_place()
        return full

    def abort(self) -> None:
        """Stop the writer; the staging directory stays behind, manifest-less, for inspection."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:
                pass
            self._thread.join(timeout=30.0)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"cache writer failed: {self._error!r}") from self._error

    def _move_into_place(self) -> None:
        if os.path.exists(self.final_dir):
            check_destination(self.final_dir, self.overwrite)  # still safe to replace?
        publish_directory(self.staging_dir, self.final_dir)

    # -- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        shard: _ShardState | None = None
        try:
            while (arrays := self._queue.get()) is not None:
                start = time.perf_counter()
                arrays = encode(self.layout.datasets, arrays)
                offset, total = 0, len(next(iter(arrays.values())))
                while offset < total:
                    if shard is None:
                        shard = self._open_shard(len(self.shards))
                    take = min(total - offset, shard.count - shard.filled)
                    for name, values in arrays.items():
                        shard.handle[name][shard.filled:shard.filled + take] = values[offset:offset + take]
                    shard.filled += take
                    offset += take
                    if shard.filled == shard.count:
                        self._close_shard(shard)
                        shard = None
                self.write_seconds += time.perf_counter() - start
        except BaseException as err:  # surfaced to the producer by _raise_if_failed
            self._error = err
            if shard is not None:
                shard.handle.close()
            while self._queue.get() is not None:  # drain so the producer never blocks on us
                pass

    def _open_shard(self, index: int) -> _ShardState:
        first, count = self._ranges[index]
        path = os.path.join(self.staging_dir, shard_name(index) + ".tmp")
        handle = h5py.File(path, "w")
        for name, spec in self.layout.datasets.items():
            tail = tuple(spec.shape_per_block)
            handle.create_dataset(name, shape=(count, *tail), dtype=spec.dtype, chunks=(1, *tail),
                                  **h5_create_kwargs(spec))
        handle.attrs["first_block"] = first
        return _ShardState(index, first, count, path, handle)

    def _close_shard(self, shard: _ShardState) -> None:
        shard.handle.close()
        final = shard.path[: -len(".tmp")]
        os.replace(shard.path, final)
        self.shards.append(ShardEntry(file=os.path.basename(final), first_block=shard.first, num_blocks=shard.count,
                                      sha256=file_sha256(final), bytes=os.path.getsize(final)))
