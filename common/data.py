"""Text → one token stream → fixed-length blocks, and the fingerprint of the result.

Where a split's text comes from (`TextSource`):
- the hub: `load_dataset(data.dataset, data.subset)`, column `data.text_column`;
- `data.local_dir`: WikiText in the upstream layout (`wiki.{train,valid,test}.raw`), read as the hub has
  it: one row per line keeping its newline, a blank line (" ") as "";
- `data.files`: local `.txt`, `.jsonl` or `.parquet` files (paths or globs; `{split}` stands for the split
  name), in the order given (a glob's matches sorted): `.txt` and `.jsonl` read here a line at a time,
  `.parquet` streamed through `load_dataset`'s `parquet` builder.

How rows become one token stream (`data.rows`, `auto` by default):
- `lines` (WikiText, `.txt` files, hub datasets): rows are the lines of one text and are joined with
  nothing between — for `.txt` files, the files' text itself (newlines as Python's universal newlines
  read them); the tokens are those of that whole text tokenized in one call.
- `documents` (`.jsonl`, `.parquet`): each row is a document, tokenized on its own and followed by the
  tokenizer's EOS token, as pretraining packers do; an empty document adds nothing.

`BlockStream` reads a split lazily, so memory does not grow with the corpus: rows are read in order,
tokenized a chunk at a time, and packed into blocks as they fill. Documents are independent, so any
chunk of them is exact. A chunk of lines ends only at a line break where the tokenizer's own
pre-tokenizer splits the text (no token spans a pre-token boundary): the text from the last line that
holds a non-space character, followed by the next line, pre-tokenizes as the two parts do apart. For the
byte-level BPE tokenizers of Qwen2, GPT-2 and Llama 3 that is most line breaks (not, for GPT-2, those
next to a blank line or before an indented one). The tokens are checked across each boundary too, and a
tokenizer that merges across one is refused in one line; text with no such line break in 64 chunks'
worth is refused rather than held in memory.

No row (a line, or a document) may be longer than `MAX_ROW_CHARS` (4 Mi characters): the limit is enforced
while reading, so a file with no line break is refused after reading that much of it, not once it is all in
memory (`.txt` and WikiText lines are read at most that many characters at a time, a `.jsonl` line at most
`MAX_JSON_LINE_BYTES`; Parquet and hub rows, stored in Arrow, are checked as they come).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from common.cli import UserError, error_line
from common.config import DataConfig, RowKind

# Hugging Face split name → upstream file stem.
LOCAL_SPLIT_FILES = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}  # data.files suffix → load_dataset builder
DOCUMENT_FILES = (".jsonl", ".parquet")  # data.rows=auto reads these as documents
SPLIT_PLACEHOLDER = "{split}"
ROW_BATCH = 1024  # rows taken from the dataset per call, and read from a Parquet file at a time
READ_BYTES = 1 << 20  # text read per batch of rows (the text builder's 10 MB default spiked 70 MiB)
MAX_ROW_CHARS = 1 << 22  # 4 Mi characters: a longer line or document is refused while it is read
# a .jsonl line holding a document of MAX_ROW_CHARS characters, each written as a \uXXXX escape (json.dumps)
MAX_JSON_LINE_BYTES = 6 * MAX_ROW_CHARS


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


# --- which text: the settings a cache records, and the files of a split --------------------------------

def configured_files(data: DataConfig) -> list[str] | None:
    """data.files as a cache records it: each path absolute, `{split}` kept; None when not set."""
    if data.files is None:
        return None
    if data.local_dir is not None:
        raise UserError("data.files and data.local_dir are both set; set one of them")
    if not data.files or not all(data.files):
        raise UserError(f"data.files must name files or globs, got {data.files!r}")
    return [os.path.abspath(os.path.expanduser(path)) for path in data.files]


def file_suffix(path: str) -> str:
    """The data.files type of `path` (a key of FILE_BUILDERS)."""
    name = os.path.basename(path).lower()
    suffix = next((s for s in FILE_BUILDERS if name.endswith(s)), None)
    if suffix is None:
        raise UserError(f"data.files: {path} is not a {', '.join(FILE_BUILDERS)} file (the types this tool reads)")
    return suffix


def files_suffix(paths: list[str]) -> str:
    """The one file type of `paths`: each split is read by one builder."""
    suffixes = sorted({file_suffix(path) for path in paths})
    if len(suffixes) > 1:
        raise UserError(f"data.files mixes {' and '.join(suffixes)} files; give files of one type")
    return suffixes[0]


def row_kind(data: DataConfig) -> RowKind:
    """data.rows with `auto` resolved: documents for .jsonl/.parquet files, lines otherwise."""
    if data.rows != "auto":
        return data.rows
    files = configured_files(data)
    return "documents" if files is not None and files_suffix(files) in DOCUMENT_FILES else "lines"


def source_settings(data: DataConfig) -> dict:
    """The data settings beyond dataset/subset/split that decide which tokens are read; a cache manifest
    records them (cache.manifest.DataEntry) and its consumers compare them (cache.compat). Conversations
    (data.rows=chat) add their column and which positions are trained."""
    settings = {"files": configured_files(data), "text_column": data.text_column, "rows": row_kind(data)}
    if settings["rows"] == "chat":
        settings.update(messages_column=data.messages_column, train_on=data.train_on)
    return settings


@dataclass(frozen=True)
class DataFile:
    """A file a split was read from."""
    path: str  # absolute
    bytes: int


def split_files(data: DataConfig, split: str) -> list[DataFile]:
    """The files data.files names for `split`, in order: `{split}` replaced, each glob's matches sorted."""
    patterns = configured_files(data)
    assert patterns is not None
    if split != data.split and not any(SPLIT_PLACEHOLDER in p for p in patterns):
        raise UserError(f"data.files names the files of split {data.split!r} (data.split) only; to read split "
                        f"{split!r} too, put {SPLIT_PLACEHOLDER} in the paths (e.g. corpus/{SPLIT_PLACEHOLDER}.jsonl)")
    paths: list[str] = []
    for pattern in (p.replace(SPLIT_PLACEHOLDER, split) for p in patterns):
        matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not matches:
            raise UserError(f"data.files: no file matches {pattern}")
        paths += matches
    repeated = sorted(path for path, count in Counter(paths).items() if count > 1)
    if repeated:
        raise UserError(f"data.files names {repeated[0]} more than once")
    files_suffix(paths)
    return [DataFile(path, os.path.getsize(path)) for path in paths]


def _first_columns(path: str) -> list[str] | None:
    """The columns of a .jsonl/.parquet file as its first record shows them (None: not known cheaply)."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        with open(path, "rb") as fh:
            while line := fh.readline(MAX_JSON_LINE_BYTES + 1):
                if len(line) > MAX_JSON_LINE_BYTES:
                    return None  # the reader refuses it
                if line.strip():
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {error_line(err)}") from None
    return None


class TextSource:
    """One split's text: what it is read from (checked and resolved on construction, before anything is
    read) and, iterated, its rows in order, read lazily. `files` are the files read (none for the hub)."""

    def __init__(self, data: DataConfig, split: str) -> None:
        self.data, self.split, self.rows = data, split, row_kind(data)
        # the column read: the text, or (data.rows=chat) the conversations, each checked by common.chat
        self.column = data.messages_column if self.rows == "chat" else data.text_column
        self.files: list[DataFile] = []
        if data.files is not None:
            self.files = split_files(data, split)
            named = self.files[0].path if len(self.files) == 1 else f"{len(self.files)} files from {self.files[0].path}"
            self.description = f"split {split} of data.files ({named})"
            builder = FILE_BUILDERS[files_suffix([f.path for f in self.files])]
            if builder != "text":
                first = next((f.path for f in self.files if f.bytes > 0), None)
                columns = _first_columns(first) if first else None
                if columns is not None and self.column not in columns:
                    raise UserError(f"{self.column_key} {self.column!r} is not a column of {first} "
                                    f"(columns: {', '.join(columns)})")
        elif data.local_dir is not None:
            if not os.path.isdir(data.local_dir):
                raise UserError(f"data.local_dir not found: {data.local_dir}")
            path = local_split_path(data.local_dir, split)
            self.files = [DataFile(os.path.abspath(path), os.path.getsize(path))]
            self.description = path
        else:
            self.description = f"split {split} of dataset {data.dataset}/{data.subset}"

    @property
    def column_key(self) -> str:
        return "data.messages_column" if self.rows == "chat" else "data.text_column"

    def __iter__(self) -> Iterator[str]:
        column, count = self.column, 0
        try:
            for batch in self._batches():
                if column not in batch:
                    raise UserError(f"{self.column_key} {column!r} is not a column of {self.description} "
                                    f"(columns: {', '.join(batch)})")
                for text in batch[column]:
                    if self.rows == "chat":
                        from common.chat import check_conversation  # a list of {role, content}: its own checks

                        check_conversation(text, f"{self.description}: row {count}", column, MAX_ROW_CHARS)
                        count += 1
                        yield text
                        continue
                    if not isinstance(text, str):
                        kind = "null" if text is None else type(text).__name__
                        raise UserError(f"{self.description}: row {count} has {kind} in column {column!r}, not text")
                    if len(text) > MAX_ROW_CHARS:
                        raise UserError(f"{self.description}: row {count} ({self.rows[:-1]}) is longer than "
                                        f"{MAX_ROW_CHARS} characters, the limit per row that keeps memory bounded; "
                                        "split it")
                    count += 1
                    yield text
        except (OSError, ValueError) as err:  # unreadable files: bad encoding, broken JSON/Parquet (Arrow errors)
            raise UserError(f"cannot read {self.description}: {error_line(err)}") from None
        if count == 0:
            raise UserError(f"{self.description} has no rows")

    def _batches(self) -> Iterator[dict[str, list]]:
        from datasets import load_dataset

        if self.data.files is not None:
            suffix = files_suffix([f.path for f in self.files])
            paths = [f.path for f in self.files if f.bytes > 0]  # an empty file has no rows (the parquet builder fails)
            if not paths:
                return
            if suffix == ".txt":
                yield from text_lines(paths)
                return
            if suffix == ".jsonl":
                yield from self._json_documents(paths)
                return
            # the builder logs a bad file before raising; the error is reported once
            logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
            rows = load_dataset("parquet", data_files={"rows": paths}, split="rows", streaming=True,
                                batch_size=ROW_BATCH, columns=[self.column])
            yield from rows.iter(batch_size=ROW_BATCH)
        elif self.data.local_dir is not None:
            for batch in text_lines([self.files[0].path]):
                yield {"text": hub_rows(batch["text"])}
        else:
            try:
                # the hub's files are downloaded once and memory-mapped (Arrow), so rows do not fill memory either
                rows = load_dataset(self.data.dataset, self.data.subset, split=self.split)
            except (FileNotFoundError, ValueError, ConnectionError) as err:
                raise UserError(f"cannot load dataset {self.data.dataset}/{self.data.subset} split {self.split}: "
                                f"{error_line(err)}") from None
            yield from rows.iter(batch_size=ROW_BATCH)

    def _json_documents(self, paths: list[str]) -> Iterator[dict[str, list]]:
        """The text column of JSON Lines files, a batch of rows at a time; a line is read at most
        MAX_JSON_LINE_BYTES at a time (a longer one is refused), blank lines are skipped, a missing column is
        null."""
        column = self.column
        for path in paths:
            with open(path, "rb") as fh:
                batch: list = []
                size = number = 0
                while line := fh.readline(MAX_JSON_LINE_BYTES + 1):
                    number += 1
                    if len(line) > MAX_JSON_LINE_BYTES:
                        raise UserError(f"{self.description}: line {number} of {path} is longer than "
                                        f"{MAX_JSON_LINE_BYTES} bytes, more than a document of the {MAX_ROW_CHARS} "
                                        "characters per row that keep memory bounded; split it")
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n"))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"line {number} of {path} is not JSON: {err.msg} (column {err.colno})") \
                            from None
                    if not isinstance(record, dict):
                        raise ValueError(f"line {number} of {path} is not a JSON object")
                    batch.append(record.get(column))
                    size += len(line)
                    if len(batch) == ROW_BATCH or size >= READ_BYTES:
                        yield {column: batch}
                        batch, size = [], 0
                if batch:
                    yield {column: batch}


def text_lines(paths: list[str]) -> Iterator[dict[str, list]]:
    """The lines of text files in the `text` column, as `load_dataset("text", keep_linebreaks=True)` reads
    them (Python's universal newlines; a file's last line without a line break is a row of its own), a
    batch at a time. A line is read at most MAX_ROW_CHARS + 1 characters at a time: a longer one reaches
    the row check after that much, however long it is."""
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            batch: list[str] = []
            size = 0
            while line := fh.readline(MAX_ROW_CHARS + 1):
                batch.append(line)
                size += len(line)
                if len(batch) == ROW_BATCH or size >= READ_BYTES:
                    yield {"text": batch}
                    batch, size = [], 0
            if batch:
                yield {"text": batch}


def iter_rows(data: DataConfig, split: str) -> Iterator[str]:
    """The split's rows, in order, read lazily (the settings are checked at once)."""
    return iter(TextSource(data, split))


def load_rows(data: DataConfig, split: str) -> list[str]:
    """The split's rows, all in memory (for small splits: evaluation, tests)."""
    return list(iter_rows(data, split))


# --- rows → tokens ----------------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def eos_id(tokenizer) -> int:
    """The token that ends each document."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, which ends each "
                        "document (data.rows=documents)")
    return tokenizer.eos_token_id


def _encode_documents(tokenizer, documents: list[str], eos: int) -> np.ndarray:
    ids: list[int] = []
    for doc in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
        if doc:
            ids += doc
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def tokenize_stream(tokenizer, rows: list[str], rows_kind: RowKind = "lines") -> np.ndarray:
    """The token stream of `rows`, all at once: lines joined into one text and tokenized in one call, or
    each document tokenized on its own followed by EOS. No other special tokens, no padding."""
    if rows_kind == "documents":
        return _encode_documents(tokenizer, list(rows), eos_id(tokenizer))
    return np.asarray(_encode(tokenizer, "".join(rows)), dtype=np.int32)


# Characters tokenized per call. A call's working memory is a few hundred bytes per token: on the tiny
# build's 2 M-token corpus the data path peaked 365 MiB above its imports with 1 MiB chunks, 147 MiB with
# 64 KiB (94 MiB of it the `datasets` import) and 140 MiB with 16 KiB, at the same speed.
CHUNK_CHARS = 1 << 16
MAX_CHUNK_FACTOR = 64  # lines with no chunk boundary for this many chunks' worth of text (4 Mi characters) are refused
assert MAX_ROW_CHARS == MAX_CHUNK_FACTOR * CHUNK_CHARS, "one row is at most what a chunk of lines may grow to"


def iter_token_chunks(tokenizer, rows: Iterable[str], rows_kind: RowKind = "lines",
                      chunk_chars: int = CHUNK_CHARS) -> Iterator[np.ndarray]:
    """The tokens of `rows` a chunk at a time; concatenated, exactly `tokenize_stream` of all rows."""
    if rows_kind == "documents":
        eos = eos_id(tokenizer)
        documents: list[str] = []
        size = 0
        for document in rows:
            documents.append(document)
            size += len(document)
            if size >= chunk_chars:
                yield _encode_documents(tokenizer, documents, eos)
                documents, size = [], 0
        if documents:
            yield _encode_documents(tokenizer, documents, eos)
        return
    pending: list[str] = []
    size = tail = 0  # pending[tail:]: from the last row that holds a non-space character
    for row in rows:
        if not row:
            continue
        if size >= chunk_chars and pending[-1].endswith("\n"):
            before = "".join(pending[tail:])
            if before.strip() and _pre_tokens(tokenizer, before + row) == (_pre_tokens(tokenizer, before)
                                                                          + _pre_tokens(tokenizer, row)):
                _check_boundary(tokenizer, before, row)
                yield np.asarray(_encode(tokenizer, "".join(pending)), dtype=np.int32)
                pending, size, tail = [], 0, 0
        if size >= MAX_CHUNK_FACTOR * chunk_chars:
            raise UserError(f"no line break in {size} characters where the tokenizer "
                            f"{getattr(tokenizer, 'name_or_path', '')!r} splits, so the text cannot be tokenized in "
                            "chunks; if the rows are documents, set data.rows=documents")
        if row.strip():
            tail = len(pending)
        pending.append(row)
        size += len(row)
    if pending:
        yield np.asarray(_encode(tokenizer, "".join(pending)), dtype=np.int32)


def _pre_tokens(tokenizer, text: str) -> list[str]:
    """The tokenizer's pre-tokens of `text` (no token ever spans two); without a pre-tokenizer, one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return [text]
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def _check_boundary(tokenizer, before: str, after: str) -> None:
    """Tokens, not only pre-tokens, split there (an added token could span it)."""
    if _encode(tokenizer, before + after) != _encode(tokenizer, before) + _encode(tokenizer, after):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} merges tokens across a line break, "
                        "so the corpus cannot be tokenized in chunks; this tool supports byte-level BPE "
                        "tokenizers that split at line breaks (Qwen2, GPT-2, Llama 3)")


def pack_blocks(stream: np.ndarray, seq_len: int, max_blocks: int | None) -> np.ndarray:
    """Consecutive, non-overlapping slices of `seq_len` tokens; the tail shorter than a block is dropped.
    (data.seq_len ≥ 2 and data.max_blocks ≥ 1 are the schema's ranges, checked when the config loads.)"""
    num_blocks = len(stream) // seq_len
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise UserError(f"the data has {len(stream)} tokens, fewer than one block of data.seq_len={seq_len}")
    return stream[: num_blocks * seq_len].reshape(num_blocks, seq_len)


def tokens_sha256(blocks: np.ndarray, digest: Any = None) -> Any:
    """The one token hasher: sha256 over blocks of token ids as little-endian int32. Pass `digest` to continue
    one: consecutive batches then hash to what all of them at once do."""
    digest = digest or hashlib.sha256()
    digest.update(np.ascontiguousarray(blocks, dtype="<i4").tobytes())
    return digest


class Fingerprint:
    """sha256 over the exact tokens trained on, the tokenizer and the block length, fed block by block."""

    def __init__(self, tokenizer_hash: str, seq_len: int) -> None:
        self._digest = hashlib.sha256(f"seq_len={seq_len};tokenizer={tokenizer_hash};".encode())

    def update(self, blocks: np.ndarray) -> None:
        tokens_sha256(blocks, self._digest)

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
    there). The settings and files are checked on construction. Iterate once; then `num_blocks`,
    `stream_tokens` (tokens read) and `fingerprint` are set; `source.files` are the files read."""

    def __init__(self, data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None, *,
                 chunk_chars: int = CHUNK_CHARS) -> None:
        self.data, self.tokenizer, self.split, self.chunk_chars = data, tokenizer, split or data.split, chunk_chars
        self.source = TextSource(data, self.split)
        if self.source.rows == "documents":
            eos_id(tokenizer)
        self._fingerprint = Fingerprint(tokenizer_hash, data.seq_len)
        self.num_blocks = self.stream_tokens = 0
        self.fingerprint: str | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        seq_len, cap = self.data.seq_len, self.data.max_blocks
        carry = np.zeros(0, dtype=np.int32)
        for chunk in iter_token_chunks(self.tokenizer, self.source, self.source.rows, self.chunk_chars):
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
            raise UserError(f"{self.source.description} has {self.stream_tokens} tokens, fewer than one block of "
                            f"data.seq_len={seq_len}")
        self.fingerprint = self._fingerprint.hexdigest()


@dataclass
class Blocks:
    input_ids: np.ndarray  # [num_blocks, seq_len] int32
    fingerprint: str
    num_stream_tokens: int
    source: TextSource


def load_blocks(data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None) -> Blocks:
    """All blocks of `split` (default `data.split`) in memory, capped by `data.max_blocks`."""
    stream = BlockStream(data, tokenizer, tokenizer_hash, split)
    blocks = np.stack(list(stream))
    return Blocks(blocks, stream.fingerprint, stream.stream_tokens, stream.source)
