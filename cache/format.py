"""The on-disk cache format: names, dtypes and the manifest. Readable with `json` and `h5py` alone.

<dir>/manifest.json        written last; a directory without it is an incomplete cache
<dir>/shard-00000.h5 …     contiguous ranges of blocks, each renamed from `*.tmp` once complete

Datasets per shard ([n] blocks, [L] seq_len, [V] truncated vocab):
  input_ids       [n, L]     int32     the tokens
  topk_ids        [n, L, k]  int32     mode topk: the k most likely next tokens, most likely first
  topk_logprobs   [n, L, k]  float16   mode topk: their teacher log-probabilities
  logprobs        [n, L, V]  float16   mode full: every log-probability over the truncated vocab
  sample_ids      [n, L, m]  int32     mode sample: unique sampled ids, padded with -1
  sample_counts   [n, L, m]  uint8/16  mode sample: how often each was drawn, padded with 0
Values are log_softmax over the first V logits, computed in fp32. Chunks hold one block each.
"""
from __future__ import annotations

import hashlib
from typing import Literal, get_args

FORMAT_NAME = "kd-logit-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CacheMode = Literal["topk", "full", "sample"]  # what a cache holds per position; the one set of mode names
MODES: tuple[str, ...] = get_args(CacheMode)

# mode → datasets besides input_ids
MODE_DATASETS = {
    "topk": ("topk_ids", "topk_logprobs"),
    "full": ("logprobs",),
    "sample": ("sample_ids", "sample_counts"),
}


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
