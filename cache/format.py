"""The on-disk cache format: names, the per-block datasets and their meaning. Readable with `json`, `h5py`
and `hdf5plugin` (for the zstd filter). This module is the one definition of the dataset tables (the
copies in docs/cache-format.md are checked against them by tests/test_manifest.py); the manifest's fields are defined in
`cache/manifest.py`, the encodings in `cache/encoding.py`.

<dir>/manifest.json        written last; a directory without it is an incomplete cache
<dir>/shard-00000.h5 …     contiguous ranges of blocks, each renamed from `*.tmp` once complete

Values are log_softmax over the first V logits (the tokenizer's real tokens), computed in fp32;
position t holds the distribution of token t+1. Chunks hold one block each.

`DATASETS` are the decoded arrays every reader hands out. A shard stores the `STORED_DATASETS` of one of
its mode's `STORED_SCHEMES` and a reader decodes them (`cache.encoding.decode`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

from common.config import CacheMode

FORMAT_NAME = "kd-logit-cache"
FORMAT_VERSION = 3  # the version this release writes
READ_VERSIONS = (2, 3)  # the versions it reads (format 1 never left the repository)
MANIFEST = "manifest.json"
STAGING_SUFFIX = ".partial"  # stage one writes `<cache.dir>.partial` and renames it to `<cache.dir>` when complete
MODES: tuple[str, ...] = get_args(CacheMode)


@dataclass(frozen=True)
class DatasetDef:
    """One per-block dataset of a shard: its name, the modes that store it, its shape and dtype as read."""
    name: str
    modes: tuple[str, ...]
    shape: str  # with [n] blocks, [L] seq_len, [k] top-k ids, [V] truncated vocab, [m] sample slots, [t] tail draws
    dtype: str
    meaning: str


DATASETS = (
    DatasetDef("input_ids", MODES, "[n, L]", "int32", "the tokens"),
    DatasetDef("topk_ids", ("topk",), "[n, L, k]", "int32",
               "the k most likely next tokens, most likely first (descending log-prob, ties by ascending id)"),
    DatasetDef("topk_logprobs", ("topk",), "[n, L, k]", "float16", "their log-probabilities"),
    DatasetDef("logprobs", ("full",), "[n, L, V]", "float16", "every log-probability over the truncated vocabulary"),
    DatasetDef("sample_ids", ("sample",), "[n, L, m]", "int32",
               "unique drawn ids, most drawn first (ties by ascending id), padded with −1"),
    DatasetDef("sample_counts", ("sample",), "[n, L, m]", "uint8/16/32",
               "how often each was drawn (the smallest unsigned type that holds the draws), padded with 0"),
    DatasetDef("tail_ids", ("topk",), "[n, L, t]", "int32",
               "`cache.tail_draws` = t > 0: unique ids drawn from the teacher outside the position's top k, most "
               "drawn first (ties by ascending id), padded with −1"),
    DatasetDef("tail_counts", ("topk",), "[n, L, t]", "uint8/16/32",
               "`cache.tail_draws` > 0: how often each was drawn, padded with 0; they add up to t"),
    DatasetDef("loss_mask", MODES, "[n, L]", "uint8",
               "`data.rows=chat`: 1 where the position is trained (`data.train_on`: its next token is in an assistant "
               "turn, or any next token of the same conversation), else 0; the teacher datasets hold placeholders "
               "there (top-k: ids 0 with log-prob 0; draws: id 0 drawn every time; full: zeros)"),
    DatasetDef("position_ids", MODES, "[n, L]", "int32",
               "`data.rows=chat`: each token's position in its conversation, 0 where one begins (padding at a "
               "block's end counts as one more): the packed conversations attend only to themselves"),
)
TAIL_DATASETS = ("tail_ids", "tail_counts")  # top-k mode with cache.tail_draws > 0 only
CHAT_DATASETS = ("loss_mask", "position_ids")  # data.rows=chat only (decoded and stored alike, cache/chat.py)

# mode → every dataset a shard of that mode holds, input_ids first (a top-k cache with tail draws adds TAIL_DATASETS)
MODE_DATASETS: dict[str, tuple[str, ...]] = {
    mode: tuple(d.name for d in DATASETS if mode in d.modes and d.name not in TAIL_DATASETS + CHAT_DATASETS)
    for mode in MODES}


def decoded_datasets(mode: str, tail: bool, chat: bool = False) -> tuple[str, ...]:
    """The decoded datasets a cache of `mode` hands out (`tail`: a top-k cache with tail draws; `chat`: a cache
    of conversations, with its CHAT_DATASETS)."""
    return MODE_DATASETS[mode] + (TAIL_DATASETS if tail else ()) + (CHAT_DATASETS if chat else ())


def dataset_table_markdown() -> str:
    """The dataset table as docs/cache-format.md shows it."""
    rows = ["| dataset | shape | dtype | mode | meaning |", "| --- | --- | --- | --- | --- |"]
    for d in DATASETS:
        modes = "all" if d.modes == MODES else ", ".join(d.modes) + (" + tail" if d.name in TAIL_DATASETS else "")
        modes += " + chat" if d.name in CHAT_DATASETS else ""
        rows.append(f"| `{d.name}` | {d.shape} | {d.dtype} | {modes} | {d.meaning} |")
    return "\n".join(rows)


# --- format 2: what is stored -------------------------------------------------------------------------------

# How a stored dataset holds (part of) a decoded one; the one set of encoding names (cache/encoding.py
# implements them, the manifest records one per stored dataset).
Encoding = Literal["raw", "id-gaps", "by-id", "sqrt-grid", "log-scale", "packed-id-gaps", "packed-counts",
                   "vocab-gaps", "index-gaps", "packed-index-gaps"]
# HDF5 compression filters, after a byte shuffle: "zstd" = hdf5plugin's Zstd filter (HDF5 filter id 32015)
Compression = Literal["zstd"]
SQRT_GRID = 1024  # format 2's cache.quantize: steps per unit of √(p / p_max) (max |Δp| ≤ 1/1024, cache/encoding.py)
# format 3's: the decoder's grid is 1 and each position's own grid is folded into its log-scale (cache/encoding.py)
SCALED_GRID = 1


@dataclass(frozen=True)
class StoredDef:
    """One dataset a format-2 shard stores: its encoding, the decoded dataset it gives, its shape per block
    (symbols: L seq_len, k top-k ids, V vocabulary, m sample slots, t tail draws) and dtype."""
    name: str
    encoding: Encoding
    decodes: str
    shape: tuple[str, ...]
    dtype: str  # "counts": counts_dtype(draws) (tail: of the tail draws); "index": index_dtype(slots per block)
    meaning: str


STORED_DATASETS = (
    StoredDef("input_ids", "raw", "input_ids", ("L",), "int32", "the tokens"),
    StoredDef("topk_vocab_gaps", "vocab-gaps", "topk_ids", ("L*k",), "uint32",
              "format 3: the block's distinct top-k ids, ascending, as gaps (the first id, then each id minus the one "
              "before); zeros after the last"),
    StoredDef("topk_index_gaps", "index-gaps", "topk_ids", ("L", "k"), "index",
              "format 3: each position's k ids as indices into `topk_vocab_gaps`'s ids, ascending, as gaps; the "
              "block's ids are as many as the largest index + 1"),
    StoredDef("topk_id_gaps", "id-gaps", "topk_ids", ("L", "k"), "uint32",
              "format 2: each position's k ids in ascending order as gaps: the first id, then each id minus the one "
              "before"),
    StoredDef("topk_logprobs_by_id", "by-id", "topk_logprobs", ("L", "k"), "float16",
              "their log-probabilities, in the same ascending-id order"),
    StoredDef("topk_sqrtp_by_id", "sqrt-grid", "topk_logprobs", ("L", "k"), "uint16",
              "`cache.quantize`: their q = round(√(p / p_max) · g), p_max the position's largest, same order; g is "
              "the position's own grid (format 3) or the manifest's (format 2)"),
    StoredDef("topk_log_scale", "log-scale", "topk_logprobs", ("L",), "float32",
              "`cache.quantize`: per position, c = log(Σp / Σp̂) of the k ids, so their mass stays the teacher's"),
    StoredDef("logprobs", "raw", "logprobs", ("L", "V"), "float16",
              "every log-probability over the truncated vocabulary"),
    StoredDef("sample_vocab_gaps", "vocab-gaps", "sample_ids", ("L*m",), "uint32",
              "format 3: the block's distinct drawn ids, ascending, as gaps; zeros after the last"),
    StoredDef("sample_index_gaps", "packed-index-gaps", "sample_ids", ("L*m",), "index",
              "format 3: every position's unique drawn ids as indices into `sample_vocab_gaps`'s ids, ascending, "
              "one position after another, as gaps within the position (its first index as is); zeros after the "
              "last"),
    StoredDef("sample_id_gaps", "packed-id-gaps", "sample_ids", ("L*m",), "uint32",
              "format 2: every position's unique drawn ids, ascending, one position after another, as gaps within "
              "the position (its first id as is); zeros after the last"),
    StoredDef("sample_counts_by_id", "packed-counts", "sample_counts", ("L*m",), "counts",
              "how often each was drawn, aligned with the ids; each position's counts add up to the draws, "
              "which is where one position ends; zeros after the last"),
    StoredDef("tail_vocab_gaps", "vocab-gaps", "tail_ids", ("L*t",), "uint32",
              "format 3, `cache.tail_draws`: the block's distinct tail ids, as `sample_vocab_gaps`"),
    StoredDef("tail_index_gaps", "packed-index-gaps", "tail_ids", ("L*t",), "index",
              "format 3, `cache.tail_draws`: the tail's unique drawn ids, packed as `sample_index_gaps`"),
    StoredDef("tail_id_gaps", "packed-id-gaps", "tail_ids", ("L*t",), "uint32",
              "format 2, `cache.tail_draws`: the tail's unique drawn ids, packed as `sample_id_gaps`"),
    StoredDef("tail_counts_by_id", "packed-counts", "tail_counts", ("L*t",), "counts",
              "`cache.tail_draws`: their counts, packed as `sample_counts_by_id` (each position's add up to t)"),
    StoredDef("loss_mask", "raw", "loss_mask", ("L",), "uint8", "`data.rows=chat`: the trained positions (1)"),
    StoredDef("position_ids", "raw", "position_ids", ("L",), "int32",
              "`data.rows=chat`: each token's position in its conversation"),
)
STORED: dict[str, StoredDef] = {d.name: d for d in STORED_DATASETS}


def _schemes(ids: tuple[str, ...], sample_ids: tuple[str, ...], tail_ids: tuple[str, ...]):
    topk = (("input_ids", *ids, "topk_logprobs_by_id"), ("input_ids", *ids, "topk_sqrtp_by_id", "topk_log_scale"))
    tail = (*tail_ids, "tail_counts_by_id")
    return {"topk": topk + tuple(scheme + tail for scheme in topk), "full": (("input_ids", "logprobs"),),
            "sample": (("input_ids", *sample_ids, "sample_counts_by_id"),)}, tail


# version → mode → the sets of stored datasets a shard of that mode may hold (lossless first; top-k: then with a tail)
STORED_SCHEMES: dict[int, dict[str, tuple[tuple[str, ...], ...]]] = {}
STORED_TAILS: dict[int, tuple[str, ...]] = {}  # version → what cache.tail_draws > 0 adds to a top-k scheme
STORED_SCHEMES[2], STORED_TAILS[2] = _schemes(("topk_id_gaps",), ("sample_id_gaps",), ("tail_id_gaps",))
STORED_SCHEMES[3], STORED_TAILS[3] = _schemes(("topk_vocab_gaps", "topk_index_gaps"),
                                              ("sample_vocab_gaps", "sample_index_gaps"),
                                              ("tail_vocab_gaps", "tail_index_gaps"))
STORED_CHAT = CHAT_DATASETS  # added to any scheme by data.rows=chat (stored as they are, `raw`)


def stored_shape(d: StoredDef, seq_len: int, k: int | None, vocab_size: int, slots: int | None,
                 tail_draws: int | None = None) -> list[int]:
    """The shape per block of stored dataset `d` for these sizes."""
    dims = {"L": seq_len, "k": k, "V": vocab_size, "L*m": seq_len * (slots or 0), "L*t": seq_len * (tail_draws or 0),
            "L*k": seq_len * (k or 0)}
    return [dims[s] for s in d.shape]


def index_dtype(slots: int) -> str:
    """The type of a block's indices into its own distinct ids (fewer than `slots`, the ids it stores)."""
    return "uint16" if slots <= 0x10000 else "uint32"


def stored_table_markdown() -> str:
    """The format-2 stored datasets as docs/cache-format.md shows them."""
    rows = ["| stored dataset | shape | dtype | encoding | gives | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for d in STORED_DATASETS:
        shape = "[n, " + ", ".join(s.replace("*", "·") for s in d.shape) + "]"
        dtype = {"counts": f"uint8/16/32 as `{d.decodes}`", "index": "uint16 (uint32 past 65,536 slots)"}.get(
            d.dtype, d.dtype)
        rows.append(f"| `{d.name}` | {shape} | {dtype} | `{d.encoding}` | `{d.decodes}` | {d.meaning} |")
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
