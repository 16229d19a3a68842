"""The on-disk cache format: names, the per-block datasets and their meaning. Readable with `json` and
`h5py` alone. This module is the one definition of the dataset table (the README's copy is checked
against it by tests/test_cache.py); the manifest's fields are defined in `cache/manifest.py`.

<dir>/manifest.json        written last; a directory without it is an incomplete cache
<dir>/shard-00000.h5 …     contiguous ranges of blocks, each renamed from `*.tmp` once complete

Values are log_softmax over the first V logits (the tokenizer's real tokens), computed in fp32;
position t holds the distribution of token t+1. Chunks hold one block each.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

FORMAT_NAME = "kd-logit-cache"
FORMAT_VERSION = 1  # written by this release
SUPPORTED_VERSIONS = (1,)  # readable by this release
MANIFEST = "manifest.json"
CacheMode = Literal["topk", "full", "sample"]  # what a cache holds per position; the one set of mode names
MODES: tuple[str, ...] = get_args(CacheMode)


@dataclass(frozen=True)
class DatasetDef:
    """One per-block dataset of a shard: its name, the modes that store it, its shape and dtype as read."""
    name: str
    modes: tuple[str, ...]
    shape: str  # with [n] blocks, [L] seq_len, [k] top-k ids, [V] truncated vocab, [m] sample slots
    dtype: str
    meaning: str


DATASETS = (
    DatasetDef("input_ids", MODES, "[n, L]", "int32", "the tokens"),
    DatasetDef("topk_ids", ("topk",), "[n, L, k]", "int32", "the k most likely next tokens, most likely first"),
    DatasetDef("topk_logprobs", ("topk",), "[n, L, k]", "float16", "their log-probabilities"),
    DatasetDef("logprobs", ("full",), "[n, L, V]", "float16", "every log-probability over the truncated vocabulary"),
    DatasetDef("sample_ids", ("sample",), "[n, L, m]", "int32", "unique drawn ids, most drawn first, padded with −1"),
    DatasetDef("sample_counts", ("sample",), "[n, L, m]", "uint8/16/32",
               "how often each was drawn (the smallest unsigned type that holds the draws), padded with 0"),
)

# mode → every dataset a shard of that mode holds, input_ids first
MODE_DATASETS: dict[str, tuple[str, ...]] = {mode: tuple(d.name for d in DATASETS if mode in d.modes) for mode in MODES}


def dataset_table_markdown() -> str:
    """The dataset table as the README shows it."""
    rows = ["| dataset | shape | dtype | mode | meaning |", "| --- | --- | --- | --- | --- |"]
    for d in DATASETS:
        modes = "all" if d.modes == MODES else ", ".join(d.modes)
        rows.append(f"| `{d.name}` | {d.shape} | {d.dtype} | {modes} | {d.meaning} |")
    return "\n".join(rows)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def counts_dtype(draws: int) -> str:
    """The smallest unsigned type that holds a count of `draws`."""
    for name, top in (("uint8", 0xFF), ("uint16", 0xFFFF), ("uint32", 0xFFFFFFFF)):
        if draws <= top:
            return name
    raise ValueError(f"draws={draws} is too large")
