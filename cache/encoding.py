"""How the per-block datasets are stored: which HDF5 datasets a shard holds for a mode, and the two
functions between what consumers read (the decoded arrays of cache/format.py's table) and what is stored.

The writer calls `encode` on decoded arrays of n blocks and writes the result into the stored datasets
(`h5_create_kwargs` gives each one's filters); the reader calls `decode` on what it read. Consumers never see
the stored form: `CacheReader.block(i)` returns the decoded names for every format version.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cache.format import CacheMode, counts_dtype
from cache.manifest import DatasetEntry


def stored_datasets(mode: CacheMode, seq_len: int, vocab_size: int, k: int, draws: int) -> dict[str, DatasetEntry]:
    """The datasets a shard of `mode` stores, as this release writes them."""
    entries = {"input_ids": DatasetEntry([seq_len], "int32")}
    if mode == "topk":
        entries["topk_ids"] = DatasetEntry([seq_len, k], "int32")
        entries["topk_logprobs"] = DatasetEntry([seq_len, k], "float16")
    elif mode == "full":
        entries["logprobs"] = DatasetEntry([seq_len, vocab_size], "float16")
    else:
        # Padding (-1 / 0) and small counts compress well: on disk the size follows the unique ids, not
        # the slots. Level 9 saves ~10 % over the default 4 and the writer thread has the time.
        entries["sample_ids"] = DatasetEntry([seq_len, draws], "int32", "gzip", 9)
        entries["sample_counts"] = DatasetEntry([seq_len, draws], counts_dtype(draws), "gzip", 9)
    return entries


def h5_create_kwargs(entry: DatasetEntry) -> dict[str, Any]:
    """Filter arguments for `h5py.File.create_dataset` of a stored dataset."""
    return {"compression": entry.compression, "compression_opts": entry.compression_opts,
            "shuffle": entry.compression is not None}


def encode(datasets: dict[str, DatasetEntry], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded arrays of n blocks → the stored arrays of `datasets`, same leading axis."""
    return {name: arrays[name] for name in datasets}


def decode(datasets: dict[str, DatasetEntry], stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored arrays (one block, or a leading axis of blocks) → the decoded arrays."""
    return dict(stored)
