"""How the per-block datasets are stored: which HDF5 datasets a shard holds for a mode, and the two
functions between what consumers read (the decoded arrays of cache/format.py's `DATASETS`) and what is
stored (its `STORED_DATASETS`).

The writer calls `encode` on decoded arrays of n blocks and writes the result into the stored datasets
(`h5_create_kwargs` gives each one's filters); the reader calls `decode` on what it read. Consumers never see
the stored form: `CacheReader.block(i)` returns the decoded names.

Per mode (docs/cache-format.md decodes a block in a dozen lines of numpy):
- top-k: each position's ids sorted ascending and stored as gaps (`id-gaps`; the entropy coder then spends
  about the bits the gaps need, not 32), their log-probs in that same order, fp16 as computed (`by-id`,
  lossless) or, with `cache.quantize`, q = round(√(p / p_max) · grid) (`sqrt-grid`) plus one float32 per
  position, c = log(Σp / Σp̂) (`log-scale`), which keeps the teacher's probability mass of the k ids. A grid
  on √p puts the error where it costs nothing: |Δp| ≤ (√(p·p_max) + p_max/(4 grid))/grid ≤ 1/grid for every
  p, and each id adds about p_max/Σp/(6 grid²) to the KL of the renormalised top-k whatever its probability,
  whereas a grid on log p spends as many bits on ids of probability 1e-6 as on the most likely one.
  Decoding puts the ids back in the canonical order: descending log-prob, ties by ascending id.
- sample: every position's unique drawn ids, ascending, packed one position after another without padding
  (`packed-id-gaps`, gaps within a position) with their counts alongside (`packed-counts`); a position ends
  where its counts reach the draws, so nothing else delimits them. Decoding gives the canonical order: most
  drawn first, ties by ascending id, padded with −1 / 0.
- top-k with tail draws (`cache.tail_draws`): the top-k datasets above, plus the tail's draws packed exactly as
  sample mode's (`tail_id_gaps`, `tail_counts_by_id`).
- the tokens: as they are (`raw`), zstd-filtered; the full log-probs: as they are, unfiltered.
"""
from __future__ import annotations

from typing import Any

import hdf5plugin  # registers the zstd filter with HDF5: every reader and writer of a cache imports this module
import numpy as np

from cache import kernels
from cache.format import (
    FORMAT_VERSION,
    SCALED_GRID,
    SQRT_GRID,
    STORED,
    STORED_SCHEMES,
    STORED_TAILS,
    TAIL_DATASETS,
    counts_dtype,
    index_dtype,
    stored_shape,
)
from cache.manifest import DatasetEntry
from common.cli import UserError
from common.config import CacheMode

# zstd level of every filtered dataset: 5 % smaller than level 3 at the same decoding speed, and the writer
# thread keeps up (docs/performance.md, "Cache size")
ZSTD_LEVEL = 9


class DecodeError(ValueError):
    """Stored arrays that no encoder writes (a damaged shard); the reader names the shard and block."""


def stored_datasets(mode: CacheMode, seq_len: int, vocab_size: int, k: int, draws: int,
                    quantize: bool = False, tail_draws: int = 0, max_dp: float = 4e-3, max_kl: float = 1e-5,
                    version: int = FORMAT_VERSION) -> dict[str, DatasetEntry]:
    """The datasets a shard of `mode` stores in format `version` (this release writes FORMAT_VERSION; tests and
    benchmarks write format 2 to check that it is still read). `max_dp`, `max_kl`: format 3's quantisation budget."""
    if quantize and mode != "topk":
        raise UserError(f"cache.quantize applies to topk caches (their log-probs), not to cache.mode={mode}")
    if tail_draws and mode != "topk":
        raise UserError(f"cache.tail_draws applies to topk caches (draws outside the top k), not to cache.mode={mode}")
    scheme = STORED_SCHEMES[version][mode][1 if quantize else 0] + (STORED_TAILS[version] if tail_draws else ())
    entries = {}
    for name in scheme:
        d = STORED[name]
        # the full log-probs stay raw: zstd halves them but reads them 15x slower (docs/performance.md), and a
        # checksum pass over 300 KB per token would cost as much as the read
        filtered = name != "logprobs"
        tail = d.decodes in TAIL_DATASETS
        shape = stored_shape(d, seq_len, k, vocab_size, None if tail else draws, tail_draws)
        dtype = {"counts": counts_dtype(tail_draws if tail else draws), "index": index_dtype(int(np.prod(shape)))}
        budget = d.encoding == "sqrt-grid" and version >= 3
        entries[name] = DatasetEntry(
            shape_per_block=shape, dtype=dtype.get(d.dtype, d.dtype),
            compression="zstd" if filtered else None, compression_opts=ZSTD_LEVEL if filtered else None,
            checksum=filtered, encoding=d.encoding,
            grid=(SCALED_GRID if version >= 3 else SQRT_GRID) if d.encoding == "sqrt-grid" else None,
            max_dp=max_dp if budget else None, max_kl=max_kl if budget else None)
    return entries


def h5_create_kwargs(entry: DatasetEntry) -> dict[str, Any]:
    """Filter arguments for `h5py.File.create_dataset` of a stored dataset: byte shuffle and the compression,
    then the checksum (h5py orders them so), which thus covers the bytes on disk."""
    kwargs: dict[str, Any] = {"shuffle": entry.compression is not None, "fletcher32": entry.checksum}
    if entry.compression == "zstd":
        return {**kwargs, **hdf5plugin.Zstd(clevel=entry.compression_opts)}
    return kwargs


_SHUFFLE, _FLETCHER32, _ZSTD = 2, 3, 32015  # HDF5 filter ids


def filter_pipeline(entry: DatasetEntry) -> list[tuple[int, int | None]]:
    """The (HDF5 filter id, level) pipeline `h5_create_kwargs(entry)` creates, as `stored_filters` reads it."""
    pipeline: list[tuple[int, int | None]] = []
    if entry.compression is not None:
        pipeline += [(_SHUFFLE, None), (_ZSTD, entry.compression_opts)]
    return pipeline + [(_FLETCHER32, None)] * entry.checksum


def stored_filters(dataset) -> list[tuple[int, int | None]]:
    """The filter pipeline of an open h5py dataset: (filter id, level; None for the shuffle and the checksum)."""
    plist = dataset.id.get_create_plist()
    pipeline = []
    for i in range(plist.get_nfilters()):
        code, _flags, values, _name = plist.get_filter(i)
        pipeline.append((code, None if code in (_SHUFFLE, _FLETCHER32) or not values else int(values[0])))
    return pipeline


# --- encode: decoded arrays of n blocks → stored arrays -------------------------------------------------------

def encode(datasets: dict[str, DatasetEntry], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded arrays of n blocks → the stored arrays of `datasets` (format 2 or 3), same leading axis."""
    stored = {name: arrays[name] for name, entry in datasets.items() if entry.encoding == "raw"}
    if "topk_id_gaps" in datasets or "topk_vocab_gaps" in datasets:
        ids, by_id = sort_by_id(arrays["topk_ids"], arrays["topk_logprobs"])
        if "topk_id_gaps" in datasets:
            stored["topk_id_gaps"] = np.diff(ids, axis=-1, prepend=0).astype(np.uint32)
        else:
            stored["topk_vocab_gaps"], stored["topk_index_gaps"] = block_vocabulary(
                ids, np.ones(ids.shape, bool), datasets["topk_index_gaps"].dtype)
        if "topk_logprobs_by_id" in datasets:
            stored["topk_logprobs_by_id"] = by_id
        else:
            entry = datasets["topk_sqrtp_by_id"]
            q, c = (sqrt_grid(by_id, entry.grid) if entry.max_dp is None
                    else sqrt_budget(by_id, entry.max_dp, entry.max_kl))
            stored["topk_sqrtp_by_id"], stored["topk_log_scale"] = q, c
    for prefix in ("sample", "tail"):
        if f"{prefix}_id_gaps" in datasets or f"{prefix}_vocab_gaps" in datasets:
            index = datasets.get(f"{prefix}_index_gaps")
            stored.update({f"{prefix}_{name}": value for name, value in encode_draws(
                arrays[f"{prefix}_ids"], arrays[f"{prefix}_counts"], None if index is None else index.dtype).items()})
    return stored


def sort_by_id(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., k] ids and log-probs (any order) → both with each position's ids ascending (log-probs as fp16)."""
    if ids.shape != logprobs.shape:
        raise ValueError(f"topk_ids {ids.shape} and topk_logprobs {logprobs.shape} differ in shape")
    if ids.size and ids.min() < 0:
        raise ValueError(f"topk_ids below 0 (min {ids.min()})")
    order = np.argsort(ids, axis=-1, kind="stable")
    return (np.take_along_axis(ids, order, axis=-1),
            np.take_along_axis(logprobs.astype(np.float16), order, axis=-1))


def block_vocabulary(ids: np.ndarray, used: np.ndarray, index_type: str) -> tuple[np.ndarray, np.ndarray]:
    """[n, L, m] ids, ascending within each position where `used` → each block's distinct used ids ascending as
    gaps ([n, L·m] uint32, zeros after the last), and every slot's index among them as gaps within its position
    ([n, L, m]; unused slots hold garbage that the caller drops). Within a block a 7B teacher's top-k sets share
    most of their ids, so an index costs a few bits where an id gap costs twelve (docs/cache-format.md)."""
    n, length, slots = ids.shape
    vocab_gaps = np.zeros((n, length * slots), np.uint32)
    index = np.zeros(ids.shape, np.int64)
    for b in range(n):
        vocab = np.unique(ids[b][used[b]])
        vocab_gaps[b, :vocab.size] = np.diff(vocab, prepend=0)
        index[b] = np.searchsorted(vocab, ids[b])
    return vocab_gaps, np.diff(index, axis=-1, prepend=0).astype(index_type)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, grid: int | None) -> dict[str, np.ndarray]:
    """Format 2's top-k (for benchmarks and the tests of reading format 2): ids ascending as gaps, their
    log-probs as fp16 or, with a grid, `sqrt_grid`'s q and log-scale."""
    ids_sorted, by_id = sort_by_id(ids, logprobs)
    gaps = np.diff(ids_sorted, axis=-1, prepend=0).astype(np.uint32)
    if grid is None:
        return {"topk_id_gaps": gaps, "topk_logprobs_by_id": by_id}
    q, c = sqrt_grid(by_id, grid)
    return {"topk_id_gaps": gaps, "topk_sqrtp_by_id": q, "topk_log_scale": c}


def _sqrt_grid_at(logprobs64: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q = round(√(p / p_max) · grid) and c = log(Σp / Σp̂), p̂ = (max(q, ¼) / grid)² (grid: a scalar or per row)."""
    top = logprobs64.max(-1, keepdims=True)
    q = np.rint(np.exp((logprobs64 - top) / 2) * grid).astype(np.uint16)  # √(p / p_max) ≤ 1: q ≤ grid
    approx = np.square(np.maximum(q, 0.25) / grid)
    log_mass = top[..., 0] + np.log(np.exp(logprobs64 - top).sum(-1))  # in log space: underflowed rows stay finite
    return q, (log_mass - np.log(approx.sum(-1))).astype(np.float32)


def sqrt_grid(logprobs_by_id: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Format 2's quantisation: `_sqrt_grid_at` one grid for every position. Relative to the position's most
    likely id, so a flat position (small p_max) is as finely quantised, relative to its mass, as a confident
    one."""
    return _sqrt_grid_at(logprobs_by_id.astype(np.float64), np.float64(grid))


GRID_LADDER = 2.0 ** (np.arange(16, 57) / 4)  # the grids format 3 chooses among: 16 … 16,384, 2^(1/4) apart


def sqrt_budget(logprobs_by_id: np.ndarray, max_dp: float, max_kl: float) -> tuple[np.ndarray, np.ndarray]:
    """Format 3's quantisation: each position on the coarsest grid of GRID_LADDER whose decoded log-probs (as
    `sqrt_grid_logprobs` gives them, fp16 rounding included) are each within `max_dp` of the given ones in
    probability and whose renormalised top-k is within `max_kl` of theirs (KL), found by bisection. The grid is
    folded into c (c − 2 log grid), so the decoder's grid is 1 and every position may have its own. Chosen from
    the position's own values, so any number of processes writing one cache agree."""
    shape, k = logprobs_by_id.shape, logprobs_by_id.shape[-1]
    logprobs64 = logprobs_by_id.reshape(-1, k).astype(np.float64)
    p = np.exp(logprobs64)
    mass = p.sum(-1, keepdims=True)
    log_p = np.log(np.maximum(p / np.maximum(mass, 1e-300), 1e-300))

    def at(rungs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        grid = GRID_LADDER[rungs][:, None]
        q, c = _sqrt_grid_at(logprobs64, grid)
        c = (c - 2 * np.log(grid[:, 0])).astype(np.float32)
        p_hat = np.exp(sqrt_grid_logprobs(q, c, SCALED_GRID).astype(np.float64))
        log_p_hat = np.log(np.maximum(p_hat / np.maximum(p_hat.sum(-1, keepdims=True), 1e-300), 1e-300))
        kl = np.sum(p / np.maximum(mass, 1e-300) * (log_p - log_p_hat), axis=-1)
        return q, c, (np.abs(p_hat - p).max(-1) <= max_dp) & (kl <= max_kl)

    low = np.zeros(len(p), np.int64)
    high = np.full(len(p), len(GRID_LADDER) - 1)  # the finest grid: taken even if it misses (a budget too tight)
    while (open_ := low < high).any():
        middle = (low + high) // 2
        _, _, ok = at(middle)
        high = np.where(open_ & ok, middle, high)
        low = np.where(open_ & ~ok, middle + 1, low)
    q, c, _ = at(high)
    return q.reshape(shape), c.reshape(shape[:-1])


def encode_draws(ids: np.ndarray, counts: np.ndarray, index_type: str | None = None) -> dict[str, np.ndarray]:
    """[n, L, m] unique drawn ids (−1 padded) and counts (0 padded, each position adding up to m draws) →
    [n, L·m] packed arrays, ascending ids within each position, zeros after the last (sample mode's draws and
    the top-k tail's alike): `id_gaps` (format 2), or with `index_type` the block's `vocab_gaps` and
    `index_gaps` (format 3); `counts_by_id` in both."""
    if ids.shape != counts.shape:
        raise ValueError(f"drawn ids {ids.shape} and counts {counts.shape} differ in shape")
    n, length, slots = ids.shape
    totals = counts.sum(-1, dtype=np.int64)
    if (totals != slots).any():
        raise ValueError(f"draw counts must add up to the {slots} draws at every position")
    used = counts > 0
    if (ids[used] < 0).any():
        raise ValueError("drawn ids below 0 where counts are positive")
    key = np.where(used, ids.astype(np.int64), np.iinfo(np.int64).max)  # padding last
    order = np.argsort(key, axis=-1, kind="stable")
    ids_sorted = np.take_along_axis(ids, order, axis=-1).astype(np.int64)
    counts_sorted = np.take_along_axis(counts, order, axis=-1)
    used_sorted = counts_sorted > 0  # each row: its used slots first
    stored = {}
    if index_type is None:
        values, name = ids_sorted, "id_gaps"
    else:
        stored["vocab_gaps"], index_gaps = block_vocabulary(ids_sorted, used_sorted, index_type)
        values, name = np.cumsum(index_gaps.astype(np.int64), axis=-1), "index_gaps"
    gaps = values.copy()
    gaps[..., 1:] -= values[..., :-1]  # within a position; slot 0 keeps the id (index) itself
    packed_gaps = np.zeros((n, length * slots), np.uint32 if index_type is None else index_type)
    packed_counts = np.zeros((n, length * slots), counts.dtype)
    for b in range(n):
        mask = used_sorted[b]
        total = int(mask.sum())
        packed_gaps[b, :total] = gaps[b][mask]
        packed_counts[b, :total] = counts_sorted[b][mask]
    return {**stored, name: packed_gaps, "counts_by_id": packed_counts}


# --- decode: stored arrays (one block or n) → decoded arrays ---------------------------------------------------

def decode(datasets: dict[str, DatasetEntry], stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored arrays (one block, or a leading axis of blocks) → the decoded arrays. Raises DecodeError for
    stored arrays no encoder writes."""
    decoded = {name: stored[name] for name, entry in datasets.items() if entry.encoding == "raw" and name in stored}
    if "topk_id_gaps" in stored or "topk_vocab_gaps" in stored:
        if "topk_sqrtp_by_id" in stored:
            logprobs = sqrt_grid_logprobs(stored["topk_sqrtp_by_id"], stored["topk_log_scale"],
                                          datasets["topk_sqrtp_by_id"].grid)
        else:
            logprobs = stored["topk_logprobs_by_id"]
        if "topk_id_gaps" in stored:
            ids = running_sums(stored["topk_id_gaps"]).astype(np.int32)  # a damaged gap wraps: the reader sees it
        else:
            try:
                ids = vocabulary_ids(stored["topk_vocab_gaps"], stored["topk_index_gaps"])
            except DecodeError as err:
                raise DecodeError(f"topk_{err}") from None
        decoded["topk_ids"], decoded["topk_logprobs"] = canonical_topk(ids, logprobs)
    length = datasets["input_ids"].shape_per_block[0]
    for prefix in ("sample", "tail"):
        if f"{prefix}_counts_by_id" not in stored:
            continue
        index = f"{prefix}_index_gaps" in stored
        gaps = stored[f"{prefix}_index_gaps" if index else f"{prefix}_id_gaps"]
        vocab, counts = stored.get(f"{prefix}_vocab_gaps"), stored[f"{prefix}_counts_by_id"]
        try:
            if gaps.ndim == 1:
                decoded[f"{prefix}_ids"], decoded[f"{prefix}_counts"] = decode_draws(gaps, counts, length, vocab)
            else:
                blocks = [decode_draws(g, c, length, None if vocab is None else v)
                          for g, c, v in zip(gaps, counts, vocab if index else gaps)]
                decoded[f"{prefix}_ids"] = np.stack([b[0] for b in blocks])
                decoded[f"{prefix}_counts"] = np.stack([b[1] for b in blocks])
        except DecodeError as err:
            raise DecodeError(f"{prefix}_{err}") from None
    return decoded


def running_sums(values: np.ndarray) -> np.ndarray:
    """The running sums of integer `values` along the last axis, int64."""
    if values.size == 0:
        return np.zeros(values.shape, np.int64)
    rows = np.ascontiguousarray(values).reshape(-1, values.shape[-1])
    return kernels.running_sums(rows).reshape(values.shape)


def vocabulary_ids(vocab_gaps: np.ndarray, index_gaps: np.ndarray) -> np.ndarray:
    """Format 3's top-k ids: [..., L·k] block vocabulary gaps and [..., L, k] index gaps → [..., L, k] int32 ids,
    each the running sum of its block's vocabulary gaps up to the running sum of its position's index gaps.
    A DecodeError's message starts with the stored dataset's name less its prefix."""
    vocab = np.ascontiguousarray(vocab_gaps).reshape(-1, vocab_gaps.shape[-1])
    index = np.ascontiguousarray(index_gaps).reshape(len(vocab), -1, index_gaps.shape[-1])
    ids = np.empty((len(vocab), index[0].size), np.int32)
    if kernels.vocabulary_ids(vocab, index, ids) >= 0:  # a damaged gap wraps instead: the reader's range check
        raise DecodeError(f"index_gaps: an index past the block's {vocab.shape[-1]} ids")
    return ids.reshape(index_gaps.shape)


_TWICE_LOG: dict[int, np.ndarray] = {}  # grid → 2 log(max(q, ¼) / grid) for every uint16 q, float32


def sqrt_grid_logprobs(q: np.ndarray, log_scale: np.ndarray, grid: int) -> np.ndarray:
    """log p̂ = 2 log(max(q, ¼) / grid) + c in float32, clipped to fp16's finite non-positive range, as fp16
    (q = 0: √p below half a step). The first term comes from a table of its 65,536 values per grid, computed
    as it was per value (so format 2 reads as it always did, to the bit)."""
    if grid not in _TWICE_LOG:
        q_values = np.maximum(np.arange(1 << 16, dtype=np.float32), np.float32(0.25))
        _TWICE_LOG[grid] = 2 * np.log(q_values / np.float32(grid))
    k = q.shape[-1]
    out = np.empty(q.shape, np.uint16)
    kernels.sqrt_grid_bits(np.ascontiguousarray(q).reshape(-1, k), np.ascontiguousarray(log_scale).reshape(-1),
                           _TWICE_LOG[grid], out.reshape(-1, k))
    return out.view(np.float16)


def canonical_topk(ids: np.ndarray, logprobs_by_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids (ascending) and their fp16 log-probs → both in the canonical order: descending log-prob, ties by
    ascending id. Each row sorts integer keys (|log p|'s 15 bits, then the slot: -0.0 and 0.0 tie, equal values
    keep the id order; numpy's sort of short rows is vectorised) and the rows are gathered by them."""
    shape, k = ids.shape, ids.shape[-1]
    slot_bits = max(1, (k - 1).bit_length())
    bits = np.ascontiguousarray(logprobs_by_id).view(np.uint16).reshape(-1, k)
    keys = np.empty(bits.shape, np.uint32 if 15 + slot_bits <= 32 else np.uint64)
    kernels.order_keys(bits, keys, slot_bits)
    keys.sort(axis=-1)
    ids_out, bits_out = np.empty(bits.shape, ids.dtype), np.empty(bits.shape, np.uint16)
    kernels.gather_sorted(keys, slot_bits, np.ascontiguousarray(ids).reshape(-1, k), bits, ids_out, bits_out)
    return ids_out.reshape(shape), bits_out.view(np.float16).reshape(shape)


def decode_draws(gaps: np.ndarray, counts: np.ndarray, length: int,
                 vocab_gaps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One block's packed [L·m] gaps (of ids; format 3: of indices into `vocab_gaps`'s ids) and counts → [L, m]
    ids and counts, most drawn first, ties by ascending id, −1 / 0 padded. m is the draws (every position's
    counts add up to it). A DecodeError's message starts with the stored dataset's name less its prefix
    (`counts_by_id: …`), which the caller adds."""
    draws = counts.shape[0] // length
    used = int(np.count_nonzero(counts))
    entries = counts[:used]
    if used == 0 or not entries.all():
        raise DecodeError("counts_by_id: a zero count among the used entries")
    ends = running_sums(entries)
    is_last = ends % draws == 0
    if ends[-1] != length * draws or np.count_nonzero(is_last) != length:
        raise DecodeError(f"counts_by_id: the counts do not add up to {draws} draws at each of {length} positions")
    position = (ends - 1) // draws
    first = np.flatnonzero(np.concatenate(([True], is_last[:-1])))  # each position's first entry
    sizes = np.diff(np.append(first, used))
    steps = gaps[:used].astype(np.int64)
    running = running_sums(steps)
    ids = running - np.repeat(running[first] - steps[first], sizes)
    name = "id_gaps" if vocab_gaps is None else "index_gaps"
    low, high = kernels.value_range(ids)
    if vocab_gaps is not None:
        if low < 0 or high >= vocab_gaps.shape[0]:
            raise DecodeError(f"{name}: an index past the block's {vocab_gaps.shape[0]} ids")
        ids = running_sums(vocab_gaps[: high + 1])[ids]  # the used part of the vocabulary
        low, high = kernels.value_range(ids)
    if low < 0 or high > np.iinfo(np.int32).max:
        raise DecodeError(f"{name}: ids out of the int32 range")
    # most drawn first; ties keep the stored ascending-id order (stable sort), positions stay grouped
    order = np.argsort(position * (draws + 1) + (draws - entries), kind="stable")
    slot = np.arange(used) - np.repeat(first, sizes)
    out_ids = np.full((length, draws), -1, np.int32)
    out_counts = np.zeros((length, draws), counts.dtype)
    out_ids[position, slot] = ids[order]
    out_counts[position, slot] = entries[order]
    return out_ids, out_counts
