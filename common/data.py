"""WikiText-style data: rows → one token stream → fixed-length blocks, and the fingerprint of the result.

Both routes give the same rows: the hub dataset (`load_dataset(name, subset)`) and local files in the
upstream layout (`wiki.{train,valid,test}.raw`, one row per line, read with the `text` builder). Rows
keep their trailing newline, blank rows are "" (as in the hub dataset), and the stream is the rows
joined with nothing in between — the upstream text itself.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

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


def load_rows(data: DataConfig, split: str) -> list[str]:
    """The split's rows as the hub dataset has them."""
    from datasets import load_dataset

    if data.local_dir is not None:
        if not os.path.isdir(data.local_dir):
            raise UserError(f"data.local_dir not found: {data.local_dir}")
        path = local_split_path(data.local_dir, split)
        return hub_rows(load_dataset("text", data_files={"rows": path}, split="rows", keep_linebreaks=True)["text"])
    try:
        return load_dataset(data.dataset, data.subset, split=split)["text"]
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(f"cannot load dataset {data.dataset}/{data.subset} split {split}: {err}") from None


def tokenize_stream(tokenizer, rows: list[str]) -> np.ndarray:
    """Tokenize the joined rows as one text: no special tokens, no padding."""
    text = "".join(rows)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


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


def data_fingerprint(blocks: np.ndarray, tokenizer_hash: str, seq_len: int) -> str:
    """sha256 over the exact tokens trained on, the tokenizer and the block length."""
    digest = hashlib.sha256()
    digest.update(f"seq_len={seq_len};tokenizer={tokenizer_hash};".encode())
    digest.update(np.ascontiguousarray(blocks, dtype="<i4").tobytes())
    return digest.hexdigest()


@dataclass
class Blocks:
    input_ids: np.ndarray  # [num_blocks, seq_len] int32
    fingerprint: str
    num_stream_tokens: int


def load_blocks(data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None) -> Blocks:
    """Rows → stream → blocks for `split` (default `data.split`), capped by `data.max_blocks`."""
    stream = tokenize_stream(tokenizer, load_rows(data, split or data.split))
    blocks = pack_blocks(stream, data.seq_len, data.max_blocks)
    return Blocks(blocks, data_fingerprint(blocks, tokenizer_hash, data.seq_len), len(stream))
