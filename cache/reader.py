"""Reading a cache through its manifest. A directory without a manifest is refused, and no damaged block is
ever handed out: every block is checked after decoding, and any HDF5 read error, undecodable block or
value that no teacher writes is one `CacheDataError` naming the cache, the shard file and the block."""
from __future__ import annotations

import bisect
import os
from typing import Any

import h5py
import numpy as np

from cache import kernels
from cache.chat import chat_block_problem
from cache.chunks import ChunkError, ChunkFile
from cache.encoding import DecodeError, decode, filter_pipeline, stored_filters
from cache.format import CHAT_DATASETS, decoded_datasets, file_sha256
from cache.manifest import Manifest, ShardEntry, load_manifest
from common.cli import UserError, error_line


class CacheDataError(UserError):
    """A damaged cache: a shard HDF5 cannot read, or a block whose values no teacher writes (one line)."""


def value_range(values: np.ndarray) -> tuple[int, int]:
    """(min, max) of an integer array in one pass; (0, 0) for an empty one."""
    return kernels.value_range(np.ascontiguousarray(values)) if values.size else (0, 0)


def block_problem(decoded: dict[str, np.ndarray], vocab_size: int, draws: int | None,
                  tail_draws: int | None = None) -> str | None:
    """What is wrong with one decoded block (None: nothing): ids outside [0, vocab_size), log-probs that are
    positive or not finite, sample (or tail) slots that are not −1 exactly where their count is 0, counts that
    do not add up to the draws, a chat cache's mask or positions out of their range. Vectorised: a few passes
    over the block."""
    if (problem := chat_block_problem(decoded)) is not None:
        return problem
    for name in ("input_ids", "topk_ids"):
        if name in decoded:
            low, high = value_range(decoded[name])
            if low < 0 or high >= vocab_size:
                side = f"min {low}" if low < 0 else f"max {high}"
                return f"{name} outside [0, {vocab_size}) ({side})"
    for name in ("topk_logprobs", "logprobs"):
        if name in decoded:
            if kernels.positive_or_not_finite(np.ascontiguousarray(decoded[name]).view(np.int16)):
                values = decoded[name].astype(np.float32)
                bad = values[~(np.isfinite(values) & (values <= 0))]
                return f"{name} not finite and ≤ 0 ({bad.size} values, e.g. {bad[0]})"
    for prefix, expected in (("sample", draws), ("tail", tail_draws)):
        if f"{prefix}_ids" not in decoded:
            continue
        ids, counts = decoded[f"{prefix}_ids"], decoded[f"{prefix}_counts"]
        used, padding = counts > 0, ids == -1
        low, high = value_range(ids)
        if low < -1 or high >= vocab_size or np.any(padding & used):
            side = f"max {high}" if high >= vocab_size else f"min {min(low, -1)}"
            return f"{prefix}_ids outside [0, {vocab_size}) ({side})"
        if np.any(padding == used):  # drawn slots are in range: so some slot with a count of 0 is not -1
            return f"{prefix}_ids not -1 where {prefix}_counts is 0"
        totals = counts.sum(axis=-1, dtype=np.int64)
        if expected is not None and np.any(totals != expected):
            return f"{prefix}_counts add up to {totals[totals != expected][0]}, not the {expected} draws"
    return None


class CacheReader:
    """Random access to blocks; h5py files are opened lazily, once per process (DataLoader workers)."""

    def __init__(self, cache_dir: str) -> None:
        self.dir = cache_dir
        self.manifest: Manifest = load_manifest(cache_dir)
        self.shards = self.manifest.shards
        self._first_blocks = [s.first_block for s in self.shards]
        self._handles: dict[int, h5py.File] = {}
        self._datasets: dict[int, dict[str, h5py.Dataset]] = {}  # looking one up by name costs more than a read
        self._chunks: dict[int, ChunkFile] = {}
        self._pid = os.getpid()
        self._draws = self.manifest.sample.draws if self.manifest.sample is not None else None
        self._tail_draws = self.manifest.tail.draws if self.manifest.tail is not None else None
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
        return decoded_datasets(self.mode, self.manifest.tail is not None, self.chat)

    @property
    def chat(self) -> bool:
        """A cache of conversations (data.rows=chat): blocks add `loss_mask` and `position_ids`."""
        return self.manifest.dataset.rows == "chat"

    def __len__(self) -> int:
        return self.num_blocks

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for spawned DataLoader workers: open files stay behind and reopen lazily."""
        return {**self.__dict__, "_handles": {}, "_datasets": {}, "_chunks": {}}

    def _damaged(self, shard: ShardEntry, what: str, block: int | None = None) -> CacheDataError:
        where = shard.file if block is None else f"{shard.file} block {block}"
        return CacheDataError(f"{self.dir}: {where}: {what}")

    def _handle(self, index: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: h5py handles must not cross processes
            self._handles, self._datasets, self._chunks, self._pid = {}, {}, {}, os.getpid()
        if index not in self._handles:
            shard = self.shards[index]
            try:
                # no chunk cache: a block is one chunk per dataset, read once, so the cache never hits on random
                # access and its bookkeeping costs ~50 µs a block (docs/performance.md, "Cache size")
                handle = h5py.File(os.path.join(self.dir, shard.file), "r", rdcc_nbytes=0)
            except OSError as err:
                raise self._damaged(shard, f"HDF5 cannot open it ({error_line(err)})") from None
            problem = layout_problem(handle, self.manifest, shard)
            if problem:
                handle.close()
                raise self._damaged(shard, problem)
            try:
                chunks = ChunkFile(os.path.join(self.dir, shard.file), handle, self.manifest.datasets)
            except (OSError, RuntimeError, ValueError) as err:
                handle.close()
                raise self._damaged(shard, f"HDF5 cannot list its chunks ({error_line(err)})") from None
            self._handles[index], self._chunks[index] = handle, chunks
            self._datasets[index] = {name: handle[name] for name in self.manifest.datasets}
        return self._handles[index]

    def _locate(self, block: int) -> tuple[int, int]:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
        index = bisect.bisect_right(self._first_blocks, block) - 1
        return index, block - self._first_blocks[index]

    def block(self, block: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The decoded datasets `names` (default: all of the mode) of one block, one chunk read each, checked."""
        index, row = self._locate(block)
        shard = self.shards[index]
        self._handle(index)
        datasets, chunks = self._datasets[index], self._chunks[index]
        stored = self.manifest.datasets
        if names is not None and set(names) <= {"input_ids", *CHAT_DATASETS}:  # the tokens alone (the live-teacher
            stored = {name: stored[name] for name in names}  # route, with a chat cache's mask): no teacher data
        try:
            arrays = {}
            for name in stored:
                array = chunks.read(name, row)
                arrays[name] = datasets[name][row] if array is None else array
            decoded = decode(stored, arrays)
        except (DecodeError, ChunkError) as err:
            raise self._damaged(shard, str(err), block) from None
        except (OSError, RuntimeError, KeyError, ValueError) as err:  # h5py's errors of a damaged chunk
            raise self._damaged(shard, f"HDF5 read failed ({error_line(err)})", block) from None
        problem = block_problem(decoded, self.vocab_size, self._draws, self._tail_draws)
        if problem:
            raise self._damaged(shard, problem, block)
        return {name: decoded[name] for name in names or self.dataset_names}

    def read_all(self, name: str) -> np.ndarray:
        """One decoded dataset over all blocks, in order (meant for small ones, such as input_ids, and tests)."""
        if name == "input_ids":  # stored as it is read, one read per shard
            parts = []
            for index, shard in enumerate(self.shards):
                handle = self._handle(index)
                try:
                    tokens = handle[name][:]
                except (OSError, RuntimeError, KeyError, ValueError) as err:
                    raise self._damaged(shard, f"HDF5 read failed ({error_line(err)})") from None
                if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                    raise self._damaged(shard, f"input_ids outside [0, {self.vocab_size})")
                parts.append(tokens)
            return np.concatenate(parts)
        return np.stack([self.block(i)[name] for i in range(self.num_blocks)])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        for chunks in self._chunks.values():
            chunks.close()
        self._handles, self._datasets, self._chunks = {}, {}, {}


def layout_problem(handle: h5py.File, manifest: Manifest, shard: ShardEntry) -> str | None:
    """How an open shard's stored datasets differ from the manifest (shape, dtype, filters); None if they don't."""
    for name, spec in manifest.datasets.items():
        shape = (shard.num_blocks, *spec.shape_per_block)
        if name not in handle:
            return f"dataset {name} missing"
        dataset = handle[name]
        if dataset.shape != shape or dataset.dtype != np.dtype(spec.dtype):
            return f"{name} is {dataset.shape} {dataset.dtype}, expected {shape} {spec.dtype}"
        if (found := stored_filters(dataset)) != filter_pipeline(spec):
            return f"{name} has filters {found}, expected {filter_pipeline(spec)} ({spec.compression})"
    return None


def verify_cache(cache_dir: str, every_block: bool = False) -> list[str]:
    """Problems found (empty: the cache is whole): checksums; then, in each shard whose checksum matches, the
    stored datasets' shapes, dtypes and filters against the manifest; with `every_block` (`python -m
    cache.verify`), also every block decoded and checked as the reader does (the first damaged block of a shard
    is reported). Shard coverage and the manifest's own consistency are checked when it loads."""
    manifest = load_manifest(cache_dir)
    problems: list[str] = []
    intact = []
    for shard in manifest.shards:
        path = os.path.join(cache_dir, shard.file)
        if not os.path.isfile(path):
            problems.append(f"{shard.file}: missing")
        elif (size := os.path.getsize(path)) < shard.bytes:
            problems.append(f"{shard.file}: truncated ({size} of the {shard.bytes} bytes the manifest records)")
        elif file_sha256(path) != shard.sha256:
            problems.append(f"{shard.file}: sha256 mismatch")
        else:
            intact.append(shard)
    if len(intact) < len(manifest.shards) and any(p.endswith(": missing") for p in problems):
        return problems  # the reader needs every shard present
    reader = CacheReader(cache_dir)
    try:
        for index, shard in enumerate(manifest.shards):
            if shard not in intact:
                continue
            try:
                reader._handle(index)  # opens the shard and compares its datasets with the manifest
                for block in range(shard.first_block, shard.first_block + shard.num_blocks) if every_block else ():
                    reader.block(block)
            except CacheDataError as err:
                problems.append(str(err).removeprefix(f"{cache_dir}: "))
    finally:
        reader.close()
    return problems
