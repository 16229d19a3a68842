"""WikiText-style data: rows → one token stream → fixed-length blocks, and the fingerprint of the result.

Both routes give the same rows: the hub dataset (`load_dataset(name, subset)`) and local files in the
upstream layout (`wiki.{train,valid,test}.raw`, one row per line, read with the `text` builder). Rows
keep their trailing newline, blank rows are "" (as in the hub dataset), and the stream is the rows
joined with nothing in between — the upstream text itself.

`BlockStream` reads a split lazily, so memory does not grow with the corpus: rows are read in order,
tokenized a chunk of rows at a time, and packed into blocks as they fill. The tokens are the ones the
joined text would give in one call: a chunk ends only after a row that ends a line, where a byte-level
BPE tokenizer with Qwen2's or GPT-2's pre-tokenizer always splits (no pre-token spans a newline that is
followed by another character); every chunk boundary is checked, and a tokenizer that merges across
one is refused in one line.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from common.cli import UserError
from common.config import DataConfig

# Hugging Face split name → upstream file stem.
LOCAL_SPLIT_FILES = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}


def local_split_path(local_dir: str, split: str) -> str:
    if split not in LOCAL_SPLIT_FILES:
        raise UserError(f"unknown split {split!r} (known: {', '.join(LOCAL_SPLIT_FILES)})")
    path = os.path.join(local_dir, f"wiki.{LOCAL_SPLIT_FILES[split]}.raw")
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    return path


def hub_rows(lines: list[str]) -> list[str]:
    """Upstream file lines as hub rows: text keeps its newline, a blank line (" ") is ""."""
    return [line if line.strip() else "" for line in lines]


def iter_rows(data: DataConfig, split: str) -> Iterator[str]:
    """The split's rows, in order, as the hub dataset has them; read lazily."""
    from datasets import load_dataset

    if data.local_dir is not None:
        if not os.path.isdir(data.local_dir):
            raise UserError(f"data.local_dir not found: {data.local_dir}")
        path = local_split_path(data.local_dir, split)
        rows = load_dataset("text", data_files={"rows": path}, split="rows", keep_linebreaks=True, streaming=True)
        return (row["text"] if row["text"].strip() else "" for row in rows)
    try:
        # the hub's files are downloaded once and memory-mapped (Arrow), so rows do not fill memory either
        rows = load_dataset(data.dataset, data.subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(f"cannot load dataset {data.dataset}/{data.subset} split {split}: {err}") from None
    return (row["text"] for row in rows)


def load_rows(data: DataConfig, split: str) -> list[str]:
    """The split's rows as the hub dataset has them, all in memory (for small splits: evaluation, tests)."""
    return list(iter_rows(data, split))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_stream(tokenizer, rows: list[str]) -> np.ndarray:
    """Tokenize the joined rows as one text: no special tokens, no padding."""
    return np.asarray(_encode(tokenizer, "".join(rows)), dtype=np.int32)


CHUNK_CHARS = 1 << 20  # characters tokenized per call: bounds memory, big enough for the fast tokenizer


def iter_token_chunks(tokenizer, rows: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[np.ndarray]:
    """The tokens of the joined rows, a chunk of rows at a time; equal to `tokenize_stream` of all rows."""
    pending: list[str] = []
    size = 0
    previous_tail = ""  # the last row of the previous chunk, to check the boundary
    for row in rows:
        if not row:
            continue
        if previous_tail and not pending:
            _check_boundary(tokenizer, previous_tail, row)
        pending.append(row)
        size += len(row)
        if size >= chunk_chars and row.endswith("\n"):
            yield np.asarray(_encode(tokenizer, "".join(pending)), dtype=np.int32)
            previous_tail, pending, size = row, [], 0
    if pending:
        yield np.asarray(_encode(tokenizer, "".join(pending)), dtype=np.int32)


def _check_boundary(tokenizer, before: str, after: str) -> None:
    if _encode(tokenizer, before + after) != _encode(tokenizer, before) + _encode(tokenizer, after):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} merges tokens across a line break, "
                        "so the corpus cannot be tokenized in chunks; this tool supports byte-level BPE "
                        "tokenizers that split at line breaks (Qwen2, GPT-2, Llama 3)")


def pack_blocks(stream: np.ndarray, seq_len: int, max_blocks: int | None) -> np.ndarray:
    """Consecutive, non-overlapping slices of `seq_len` tokens; the tail shorter than a block is dropped."""
    if seq_len < 2:
        raise UserError(f"data.seq_len must be at least 2, got {seq_len}")
    num_blocks = len(stream) // seq_len
    if max_blocks is not None:
        if max_blocks < 1:
            raise UserError(f"data.max_blocks must be positive or null, got {max_blocks}")
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise UserError(f"the data has {len(stream)} tokens, fewer than one block of data.seq_len={seq_len}")
    return stream[: num_blocks * seq_len].reshape(num_blocks, seq_len)


class Fingerprint:
    """sha256 over the exact tokens trained on, the tokenizer and the block length, fed block by block."""

    def __init__(self, tokenizer_hash: str, seq_len: int) -> None:
        self._digest = hashlib.sha256(f"seq_len={seq_len};tokenizer={tokenizer_hash};".encode())

    def update(self, blocks: np.ndarray) -> None:
        self._digest.update(np.ascontiguousarray(blocks, dtype="<i4").tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def data_fingerprint(blocks: np.ndarray, tokenizer_hash: str, seq_len: int) -> str:
    """The fingerprint of all `blocks` at once."""
    fingerprint = Fingerprint(tokenizer_hash, seq_len)
    fingerprint.update(blocks)
    return fingerprint.hexdigest()


class BlockStream:
    """The blocks of a split, read lazily: rows → token chunks → consecutive blocks of `data.seq_len`
    tokens (the tail shorter than a block is dropped), at most `data.max_blocks` of them (reading stops
    there). Iterate once; then `num_blocks`, `stream_tokens` (tokens read) and `fingerprint` are set."""

    def __init__(self, data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None) -> None:
        if data.seq_len < 2:
            raise UserError(f"data.seq_len must be at least 2, got {data.seq_len}")
        if data.max_blocks is not None and data.max_blocks < 1:
            raise UserError(f"data.max_blocks must be positive or null, got {data.max_blocks}")
        self.data, self.tokenizer, self.split = data, tokenizer, split or data.split
        self._fingerprint = Fingerprint(tokenizer_hash, data.seq_len)
        self.num_blocks = self.stream_tokens = 0
        self.fingerprint: str | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        seq_len, cap = self.data.seq_len, self.data.max_blocks
        carry = np.zeros(0, dtype=np.int32)
        for chunk in iter_token_chunks(self.tokenizer, iter_rows(self.data, self.split)):
            self.stream_tokens += len(chunk)
            carry = np.concatenate([carry, chunk])
            full = len(carry) // seq_len
            if cap is not None:
                full = min(full, cap - self.num_blocks)
            for block in carry[: full * seq_len].reshape(full, seq_len):
                self._fingerprint.update(block)
                self.num_blocks += 1
                yield block
            carry = carry[full * seq_len:]
            if cap is not None and self.num_blocks >= cap:
                break
        if self.num_blocks == 0:
            raise UserError(f"the data has {self.stream_tokens} tokens, fewer than one block of "
                            f"data.seq_len={seq_len}")
        self.fingerprint = self._fingerprint.hexdigest()


@dataclass
class Blocks:
    input_ids: np.ndarray  # [num_blocks, seq_len] int32
    fingerprint: str
    num_stream_tokens: int


def load_blocks(data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None) -> Blocks:
    """All blocks of `split` (default `data.split`) in memory, capped by `data.max_blocks`."""
    stream = BlockStream(data, tokenizer, tokenizer_hash, split)
    blocks = np.stack(list(stream))
    return Blocks(blocks, stream.fingerprint, stream.stream_tokens)
