"""Reading a cache through its manifest. A directory without a manifest is refused."""
from __future__ import annotations

import bisect
import os
from typing import Any

import h5py
import numpy as np

from cache.encoding import decode
from cache.format import MODE_DATASETS, file_sha256
from cache.manifest import Manifest, load_manifest
from common.cli import UserError


class CacheReader:
    """Random access to blocks; h5py files are opened lazily, once per process (DataLoader workers)."""

    def __init__(self, cache_dir: str) -> None:
        self.dir = cache_dir
        self.manifest: Manifest = load_manifest(cache_dir)
        self.shards = self.manifest.shards
        self._first_blocks = [s.first_block for s in self.shards]
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        for shard in self.shards:
            if not os.path.isfile(os.path.join(cache_dir, shard.file)):
                raise UserError(f"cache {cache_dir} is missing shard {shard.file}")

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def num_blocks(self) -> int:
        return self.manifest.num_blocks

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def dataset_names(self) -> tuple[str, ...]:
        return MODE_DATASETS[self.mode]

    def __len__(self) -> int:
        return self.num_blocks

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for spawned DataLoader workers: open files stay behind and reopen lazily."""
        return {**self.__dict__, "_handles": {}}

    def _handle(self, index: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: h5py handles must not cross processes
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            self._handles[index] = h5py.File(os.path.join(self.dir, self.shards[index].file), "r")
        return self._handles[index]

    def _locate(self, block: int) -> tuple[int, int]:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
        index = bisect.bisect_right(self._first_blocks, block) - 1
        return index, block - self._first_blocks[index]

    def block(self, block: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The decoded datasets `names` (default: all of the mode) of one block, one chunk read each."""
        index, row = self._locate(block)
        handle = self._handle(index)
        stored = self.manifest.datasets
        if names == ("input_ids",):  # the tokens alone (the live-teacher route): skip the teacher's data
            stored = {"input_ids": stored["input_ids"]}
        decoded = decode(stored, {name: handle[name][row] for name in stored})
        return {name: decoded[name] for name in names or self.dataset_names}

    def read_all(self, name: str) -> np.ndarray:
        """One decoded dataset over all blocks, in order (meant for small ones, such as input_ids, and tests)."""
        if name == "input_ids":  # stored as it is read, one read per shard
            return np.concatenate([self._handle(i)[name][:] for i in range(len(self.shards))])
        return np.stack([self.block(i)[name] for i in range(self.num_blocks)])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}


def verify_cache(cache_dir: str) -> list[str]:
    """Problems found (empty: the cache is whole): checksums, dataset shapes and dtypes. Shard coverage
    and the manifest's own consistency are checked when it loads."""
    manifest = load_manifest(cache_dir)
    problems: list[str] = []
    for shard in manifest.shards:
        path = os.path.join(cache_dir, shard.file)
        if not os.path.isfile(path):
            problems.append(f"{shard.file}: missing")
            continue
        if file_sha256(path) != shard.sha256:
            problems.append(f"{shard.file}: sha256 mismatch")
            continue
        with h5py.File(path, "r") as handle:
            for name, spec in manifest.datasets.items():
                shape = (shard.num_blocks, *spec.shape_per_block)
                if name not in handle:
                    problems.append(f"{shard.file}: dataset {name} missing")
                elif handle[name].shape != shape or handle[name].dtype != np.dtype(spec.dtype):
                    problems.append(f"{shard.file}: {name} is {handle[name].shape} {handle[name].dtype}, "
                                    f"expected {shape} {spec.dtype}")
    return problems
