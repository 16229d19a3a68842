"""`manifest.json` as a typed record: every field of the cache contract is spelled here and nowhere else.

`Manifest.from_json` validates a whole manifest on load — every field's presence and type, the format
name and version, and the invariants between fields (the datasets a mode needs, shards covering every
block in order, shard files inside the cache directory) — so a hand-edited, truncated or foreign
manifest is one `UserError` naming what is wrong, before anything is read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from cache.format import (
    FORMAT_NAME,
    MANIFEST,
    READ_VERSIONS,
    SCALED_GRID,
    STAGING_SUFFIX,
    STORED,
    STORED_CHAT,
    STORED_SCHEMES,
    STORED_TAILS,
    TAIL_DATASETS,
    Compression,
    Encoding,
    counts_dtype,
    index_dtype,
    stored_shape,
)
from common.cli import UserError, error_line
from common.config import CacheMode, RowKind
from common.data import DataFile
from common.schema import SchemaError, from_dict

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DatasetEntry:
    """How one per-block dataset is stored in every shard. The defaults: no filter, stored as read."""
    shape_per_block: list[int]
    dtype: str
    compression: Optional[Compression] = None  # the HDF5 filter pipeline (cache.format.Compression), None = none
    compression_opts: Optional[int] = None  # its level
    checksum: bool = False  # HDF5's Fletcher-32 checksum of every chunk, verified by HDF5 on each read
    encoding: Encoding = "raw"  # how it holds the decoded data (cache/encoding.py)
    grid: Optional[int] = None  # sqrt-grid only: the decoder's steps per unit of √p (format 3: 1, see cache/format.py)
    # sqrt-grid of format 3 only: the error budget every position was quantised to (cache.max_dp, cache.max_kl)
    max_dp: Optional[float] = None
    max_kl: Optional[float] = None


@dataclass(frozen=True)
class ShardEntry:
    file: str  # a file name inside the cache directory
    first_block: int
    num_blocks: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TeacherEntry:
    model: str
    config_hash: str  # sha256 of the teacher's config (its diff from the defaults)
    padded_vocab_size: int  # logits the teacher computes; only the first `vocab_size` are real tokens
    dtype: str


@dataclass(frozen=True)
class TokenizerEntry:
    name: str
    hash: str  # sha256 of the vocabulary (token → id): equal hashes, equal token ids
    size: int


@dataclass(frozen=True)
class DataEntry:
    """Which text the blocks are, and the fingerprint of the exact tokens (common.data.data_fingerprint)."""
    name: str
    subset: Optional[str]
    split: str
    local_dir: Optional[str]
    max_blocks: Optional[int]
    stream_tokens: int
    fingerprint: str
    # common.data.source_settings (caches made before these fields read the hub or local_dir, lines, `text`)
    files: Optional[list[str]] = None  # data.files, absolute, `{split}` kept
    text_column: str = "text"
    rows: RowKind = "lines"
    read_files: list[DataFile] = field(default_factory=list)  # the files read, in order (none for the hub)
    # data.rows=chat only (common.chat): the conversations' column, the positions trained, and the teacher
    # tokenizer's chat template that rendered them (its text and sha256)
    messages_column: Optional[str] = None
    train_on: Optional[str] = None
    chat_template: Optional[str] = None
    chat_template_sha256: Optional[str] = None


@dataclass(frozen=True)
class SampleEntry:
    """How draws were made: sample mode's from the whole distribution, a top-k cache's tail draws from outside
    the top k (cache.tail_draws)."""
    draws: int
    temperature: float  # the draws estimate the teacher at this temperature only
    slots: int
    seed: int


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    mode: CacheMode
    num_blocks: int
    seq_len: int
    vocab_size: int  # V: the tokenizer's real tokens; distributions live on [0, V)
    value_dtype: str
    values: str  # what the stored numbers are, in words
    k: Optional[int]  # top-k mode only
    datasets: dict[str, DatasetEntry]
    teacher: TeacherEntry
    tokenizer: TokenizerEntry
    dataset: DataEntry
    settings: dict[str, Any]  # how it was made; informational
    sample: Optional[SampleEntry] = None  # sample mode only
    shards: list[ShardEntry] = field(default_factory=list)
    # top-k mode with cache.tail_draws > 0 only: the tail draws; the top-k log-probs are then at tail.temperature
    tail: Optional[SampleEntry] = None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.seq_len

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        """Parse and validate a manifest; any problem is a one-line UserError naming `where` and the field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{where} is not valid JSON: {error_line(err)}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise UserError(f"{where}: not a {FORMAT_NAME} manifest")
        version = data.get("format_version")
        if version == 1 and not isinstance(version, bool):
            raise UserError(f"{where}: a format-1 cache, which this release does not read; rebuild it with this "
                            "release's stage one (python -m stage1_teacher.dump)")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise UserError(f"{where}: {FORMAT_NAME} format_version {version!r} is not supported by this release "
                            f"(it reads {' and '.join(map(str, READ_VERSIONS))})")
        try:
            manifest = from_dict(cls, data, "field")
            manifest.check()
        except SchemaError as err:
            raise UserError(f"{where}: {err}") from None
        return manifest

    def check(self) -> None:
        """The invariants between fields; raises SchemaError naming the field."""
        for name in ("num_blocks", "seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise SchemaError(f"field {name}: must be positive, got {getattr(self, name)}")
        if self.mode == "topk" and (self.k is None or not 1 <= self.k <= self.vocab_size):
            raise SchemaError(f"field k: a topk cache needs 1 <= k <= vocab_size, got {self.k!r}")
        if self.mode == "sample" and self.sample is None:
            raise SchemaError("field sample: missing for a sample cache")
        if self.tail is not None and self.mode != "topk":
            raise SchemaError("field tail: tail draws belong to topk caches only")
        self._check_stored_datasets()
        if not self.shards:
            raise SchemaError("field shards: empty")
        first = 0
        for i, shard in enumerate(self.shards):
            where = f"field shards[{i}]"
            if os.path.basename(shard.file) != shard.file or shard.file in ("", ".", ".."):
                raise SchemaError(f"{where}.file: must be a file name inside the cache, got {shard.file!r}")
            if shard.first_block != first:
                raise SchemaError(f"{where}.first_block: expected {first}, got {shard.first_block}")
            if shard.num_blocks < 1 or shard.bytes < 0:
                raise SchemaError(f"{where}: num_blocks must be positive and bytes non-negative")
            if not _SHA256.fullmatch(shard.sha256):
                raise SchemaError(f"{where}.sha256: not a sha256 hex digest")
            first += shard.num_blocks
        if first != self.num_blocks:
            raise SchemaError(f"field num_blocks: {self.num_blocks}, but the shards cover {first} blocks")

    def _check_stored_datasets(self) -> None:
        """One of the mode's stored schemes, each dataset with its table's encoding, shape and dtype."""
        schemes, stored_tail = STORED_SCHEMES[self.format_version][self.mode], STORED_TAILS[self.format_version]
        chat = self.dataset.rows == "chat"
        if chat != (set(STORED_CHAT) <= set(self.datasets)):
            raise SchemaError(f"field datasets: {', '.join(STORED_CHAT)} are present exactly when dataset.rows is "
                              f"chat (it is {self.dataset.rows!r})")
        if chat and None in (self.dataset.train_on, self.dataset.chat_template, self.dataset.chat_template_sha256):
            raise SchemaError("field dataset: a chat cache records train_on, chat_template and chat_template_sha256")
        if set(self.datasets) - set(STORED_CHAT if chat else ()) not in [set(scheme) for scheme in schemes]:
            options = " or ".join(str(list(s)) for s in schemes)
            raise SchemaError(f"field datasets: a format-{self.format_version} {self.mode} cache holds {options}, "
                              f"the manifest lists {list(self.datasets)}")
        if (self.tail is not None) != (set(stored_tail) <= set(self.datasets)):
            raise SchemaError("field tail: present exactly when the datasets hold the tail draws "
                              f"({', '.join(stored_tail)})")
        for key, entry in (("sample", self.sample), ("tail", self.tail)):
            # the packed counts end positions at the draws
            if entry is not None and entry.draws < 1:
                raise SchemaError(f"field {key}.draws: must be positive, got {entry.draws}")
            if entry is not None and entry.slots != entry.draws:
                raise SchemaError(f"field {key}.slots: format {self.format_version} stores as many slots as draws "
                                  f"({entry.draws}), got {entry.slots}")
        slots = self.sample.slots if self.sample is not None else None
        tail_draws = self.tail.draws if self.tail is not None else None
        for name, entry in self.datasets.items():
            where, d = f"field datasets.{name}", STORED[name]
            draws = tail_draws if d.decodes in TAIL_DATASETS else slots
            shape = stored_shape(d, self.seq_len, self.k, self.vocab_size, slots, tail_draws)
            dtype = {"counts": counts_dtype(draws) if draws else d.dtype, "index": index_dtype(math.prod(shape))}.get(
                d.dtype, d.dtype)
            if entry.encoding != d.encoding:
                raise SchemaError(f"{where}.encoding: expected {d.encoding!r}, got {entry.encoding!r}")
            if entry.dtype != dtype:
                raise SchemaError(f"{where}.dtype: expected {dtype}, got {entry.dtype}")
            if entry.shape_per_block != shape:
                raise SchemaError(f"{where}.shape_per_block: expected {shape}, got {entry.shape_per_block}")
            if (entry.grid is not None and entry.grid < 1) or (entry.grid is None) == (d.encoding == "sqrt-grid"):
                raise SchemaError(f"{where}.grid: a positive grid for the sqrt-grid encoding only, got {entry.grid!r}")
            budget = d.encoding == "sqrt-grid" and self.format_version >= 3
            for key in ("max_dp", "max_kl"):
                value = getattr(entry, key)
                if (value is None) == budget or (value is not None and not 0 < value < 1):
                    raise SchemaError(f"{where}.{key}: a number in (0, 1) for format 3's sqrt-grid only, got {value!r}")
            if budget and entry.grid != SCALED_GRID:
                raise SchemaError(f"{where}.grid: format 3 folds each position's grid into its scale, so the grid is "
                                  f"{SCALED_GRID}, got {entry.grid}")


def manifest_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, MANIFEST)


def check_published(cache_dir: str) -> None:
    """Refuse stage one's staging directory as a cache to train from: even with its manifest written it is not
    published (the swap was refused or has not happened yet), and a rerun of stage one resumes, restarts or
    replaces it."""
    path = os.path.normpath(cache_dir)
    if path.endswith(STAGING_SUFFIX):
        raise UserError(f"{cache_dir} is stage one's staging directory, not a published cache; rerun stage one's "
                        f"command to finish and publish it as {path.removesuffix(STAGING_SUFFIX)}, and read that")


def load_manifest(cache_dir: str) -> Manifest:
    """The validated manifest of a complete cache; a missing directory or manifest is a UserError."""
    if not os.path.isdir(cache_dir):
        raise UserError(f"cache directory not found: {cache_dir}")
    path = manifest_path(cache_dir)
    if not os.path.isfile(path):
        raise UserError(f"{cache_dir} is not a complete cache: it has no {MANIFEST} (stage one did not finish)")
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {error_line(err)}") from None
    return Manifest.from_json(text, path)

