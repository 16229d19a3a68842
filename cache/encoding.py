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

import hdf5plugin  # registers the zstd filter with HDF5: every reader and writer of format 2 imports this module
import numpy as np

from cache.format import SQRT_GRID, STORED, STORED_SCHEMES, STORED_TAIL, counts_dtype, stored_shape
from cache.manifest import DatasetEntry
from common.cli import UserError
from common.config import CacheMode

# zstd level of every filtered format-2 dataset: 5 % smaller than level 3 at the same decoding speed, and the writer
# thread keeps up (docs/performance.md, "Cache size")
ZSTD_LEVEL = 9


class DecodeError(ValueError):
    """Stored arrays that no encoder writes (a damaged shard); the reader names the shard and block."""


def stored_datasets(mode: CacheMode, seq_len: int, vocab_size: int, k: int, draws: int,
                    quantize: bool = False, tail_draws: int = 0) -> dict[str, DatasetEntry]:
    """The datasets a shard of `mode` stores, as this release writes them (format 2)."""
    if quantize and mode != "topk":
        raise UserError(f"cache.quantize applies to topk caches (their log-probs), not to cache.mode={mode}")
    if tail_draws and mode != "topk":
        raise UserError(f"cache.tail_draws applies to topk caches (draws outside the top k), not to cache.mode={mode}")
    scheme = STORED_SCHEMES[mode][1 if quantize else 0] + (STORED_TAIL if tail_draws else ())
    entries = {}
    for name in scheme:
        d = STORED[name]
        # the full log-probs stay raw: zstd halves them but reads them 15x slower (docs/performance.md), and a
        # checksum pass over 300 KB per token would cost as much as the read
        filtered = name != "logprobs"
        tail = name in STORED_TAIL
        entries[name] = DatasetEntry(
            shape_per_block=stored_shape(d, seq_len, k, vocab_size, None if tail else draws, tail_draws),
            dtype=counts_dtype(tail_draws if tail else draws) if d.dtype == "counts" else d.dtype,
            compression="zstd" if filtered else None, compression_opts=ZSTD_LEVEL if filtered else None,
            checksum=filtered, encoding=d.encoding, grid=SQRT_GRID if d.encoding == "sqrt-grid" else None)
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
    """Decoded arrays of n blocks → the stored arrays of `datasets`, same leading axis."""
    stored = {name: arrays[name] for name, entry in datasets.items() if entry.encoding == "raw"}
    if "topk_id_gaps" in datasets:
        grid = datasets["topk_sqrtp_by_id"].grid if "topk_sqrtp_by_id" in datasets else None
        stored.update(encode_topk(arrays["topk_ids"], arrays["topk_logprobs"], grid))
    if "sample_id_gaps" in datasets:
        stored["sample_id_gaps"], stored["sample_counts_by_id"] = encode_draws(arrays["sample_ids"],
                                                                                arrays["sample_counts"])
    if "tail_id_gaps" in datasets:
        stored["tail_id_gaps"], stored["tail_counts_by_id"] = encode_draws(arrays["tail_ids"], arrays["tail_counts"])
    return stored


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, grid: int | None) -> dict[str, np.ndarray]:
    """[..., k] ids and fp16 log-probs (any order) → ids ascending as gaps, log-probs in that order: fp16 as
    given, or (grid) q = round(√(p / p_max) · grid) with each position's log-scale c = log(Σp / Σp̂), p̂ =
    (max(q, ¼) / grid)²: relative to the position's most likely id, so a flat position (small p_max) is as
    finely quantised, relative to its mass, as a confident one."""
    if ids.shape != logprobs.shape:
        raise ValueError(f"topk_ids {ids.shape} and topk_logprobs {logprobs.shape} differ in shape")
    if ids.size and ids.min() < 0:
        raise ValueError(f"topk_ids below 0 (min {ids.min()})")
    order = np.argsort(ids, axis=-1, kind="stable")
    ids_sorted = np.take_along_axis(ids, order, axis=-1)
    gaps = np.diff(ids_sorted, axis=-1, prepend=0).astype(np.uint32)
    by_id = np.take_along_axis(logprobs.astype(np.float16), order, axis=-1)
    if grid is None:
        return {"topk_id_gaps": gaps, "topk_logprobs_by_id": by_id}
    logprobs64 = by_id.astype(np.float64)
    top = logprobs64.max(-1, keepdims=True)
    q = np.rint(np.exp((logprobs64 - top) / 2) * grid).astype(np.uint16)  # √(p / p_max) ≤ 1: q ≤ grid
    approx = np.square(np.maximum(q, 0.25) / grid)
    log_mass = top[..., 0] + np.log(np.exp(logprobs64 - top).sum(-1))  # in log space: underflowed rows stay finite
    log_scale = log_mass - np.log(approx.sum(-1))
    return {"topk_id_gaps": gaps, "topk_sqrtp_by_id": q, "topk_log_scale": log_scale.astype(np.float32)}


def encode_draws(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, L, m] unique drawn ids (−1 padded) and counts (0 padded, each position adding up to m draws) →
    [n, L·m] packed gaps and counts, ascending ids within each position, zeros after the last (sample mode's
    draws and the top-k tail's alike)."""
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
    gaps = ids_sorted.copy()
    gaps[..., 1:] -= ids_sorted[..., :-1]  # within a position; slot 0 keeps the id itself
    packed_gaps = np.zeros((n, length * slots), np.uint32)
    packed_counts = np.zeros((n, length * slots), counts.dtype)
    for b in range(n):
        mask = used_sorted[b]
        total = int(mask.sum())
        packed_gaps[b, :total] = gaps[b][mask]
        packed_counts[b, :total] = counts_sorted[b][mask]
    return packed_gaps, packed_counts


# --- decode: stored arrays (one block or n) → decoded arrays ---------------------------------------------------

def decode(datasets: dict[str, DatasetEntry], stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored arrays (one block, or a leading axis of blocks) → the decoded arrays. Raises DecodeError for
    stored arrays no encoder writes."""
    decoded = {name: stored[name] for name, entry in datasets.items() if entry.encoding == "raw" and name in stored}
    if "topk_id_gaps" in stored:
        if "topk_sqrtp_by_id" in stored:
            logprobs = sqrt_grid_logprobs(stored["topk_sqrtp_by_id"], stored["topk_log_scale"],
                                          datasets["topk_sqrtp_by_id"].grid)
        else:
            logprobs = stored["topk_logprobs_by_id"]
        decoded["topk_ids"], decoded["topk_logprobs"] = decode_topk(stored["topk_id_gaps"], logprobs)
    length = datasets["input_ids"].shape_per_block[0]
    for prefix in ("sample", "tail"):
        if f"{prefix}_id_gaps" not in stored:
            continue
        gaps, counts = stored[f"{prefix}_id_gaps"], stored[f"{prefix}_counts_by_id"]
        try:
            if gaps.ndim == 1:
                decoded[f"{prefix}_ids"], decoded[f"{prefix}_counts"] = decode_draws(gaps, counts, length)
            else:
                blocks = [decode_draws(g, c, length) for g, c in zip(gaps, counts)]
                decoded[f"{prefix}_ids"] = np.stack([b[0] for b in blocks])
                decoded[f"{prefix}_counts"] = np.stack([b[1] for b in blocks])
        except DecodeError as err:
            raise DecodeError(f"{prefix}_{err}") from None
    return decoded


def sqrt_grid_logprobs(q: np.ndarray, log_scale: np.ndarray, grid: int) -> np.ndarray:
    """log p̂ = 2 log(max(q, ¼) / grid) + c in float32, clipped to fp16's finite non-positive range, as fp16
    (q = 0: √p below half a step)."""
    value = 2 * np.log(np.maximum(q, np.float32(0.25)) / np.float32(grid)) + log_scale[..., None]
    return np.clip(value, np.float32(-65504), np.float32(0)).astype(np.float16)


def decode_topk(gaps: np.ndarray, logprobs_by_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids (ascending, as gaps) and their fp16 log-probs → both in the canonical order: descending log-prob,
    ties by ascending id. Each row sorts integer keys (|log p|'s 15 bits, then the slot: -0.0 and 0.0 tie, equal
    values keep the id order) and the rows are gathered by flat index: 3x faster than a stable argsort per row
    and take_along_axis."""
    shape, k = gaps.shape, gaps.shape[-1]
    slot_bits = max(1, (k - 1).bit_length())
    key_type = np.uint32 if 15 + slot_bits <= 32 else np.uint64
    keys = (logprobs_by_id.reshape(-1, k).view(np.uint16) & np.uint16(0x7FFF)).astype(key_type)
    keys <<= key_type(slot_bits)
    keys |= np.arange(k, dtype=key_type)
    keys.sort(axis=-1)
    keys &= key_type((1 << slot_bits) - 1)
    flat = keys.astype(np.intp)
    flat += np.arange(0, flat.size, k, dtype=np.intp)[:, None]
    ids = np.cumsum(gaps, axis=-1, dtype=np.int32)  # a damaged gap wraps to an id out of range: caught by the reader
    return np.take(ids, flat).reshape(shape), np.take(logprobs_by_id, flat).reshape(shape)


def decode_draws(gaps: np.ndarray, counts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One block's packed [L·m] gaps and counts → [L, m] ids and counts, most drawn first, ties by ascending
    id, −1 / 0 padded. m is the draws (every position's counts add up to it). A DecodeError's message starts
    with the stored dataset's name less its prefix (`counts_by_id: …`), which the caller adds."""
    draws = counts.shape[0] // length
    used = int(np.count_nonzero(counts))
    entries = counts[:used]
    if used == 0 or not entries.all():
        raise DecodeError("counts_by_id: a zero count among the used entries")
    ends = np.cumsum(entries, dtype=np.int64)
    is_last = ends % draws == 0
    if ends[-1] != length * draws or np.count_nonzero(is_last) != length:
        raise DecodeError(f"counts_by_id: the counts do not add up to {draws} draws at each of {length} positions")
    position = (ends - 1) // draws
    first = np.flatnonzero(np.concatenate(([True], is_last[:-1])))  # each position's first entry
    sizes = np.diff(np.append(first, used))
    steps = gaps[:used].astype(np.int64)
    running = np.cumsum(steps)
    ids = running - np.repeat(running[first] - steps[first], sizes)
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise DecodeError("id_gaps: ids out of the int32 range")
    # most drawn first; ties keep the stored ascending-id order (stable sort), positions stay grouped
    order = np.argsort(position * (draws + 1) + (draws - entries), kind="stable")
    slot = np.arange(used) - np.repeat(first, sizes)
    out_ids = np.full((length, draws), -1, np.int32)
    out_counts = np.zeros((length, draws), counts.dtype)
    out_ids[position, slot] = ids[order]
    out_counts[position, slot] = entries[order]
    return out_ids, out_counts
