"""Rows → one token stream → fixed-length blocks, the fingerprint, and the local (no-network) data route."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from cache.manifest import load_manifest
from common.cli import UserError
from common.config import DataConfig
from common.data import data_fingerprint, load_blocks, load_rows, pack_blocks, tokenize_stream
from tests.conftest import REPO, run_cli, tiny_overrides

# --- pack_blocks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, seq_len, max_blocks, expected", [
    (1003, 10, None, 100),     # the short tail is dropped
    (1000, 10, None, 100),     # an exact multiple drops nothing
    (1003, 10, 7, 7),          # capped
    (1003, 10, 100, 100),      # a cap equal to the count
    (1003, 10, 5000, 100),     # a cap above the count changes nothing
    (17, 2, None, 8),
    (256, 256, 1, 1),
])
def test_pack_blocks_count_and_content(length, seq_len, max_blocks, expected):
    stream = np.arange(length, dtype=np.int32)
    blocks = pack_blocks(stream, seq_len, max_blocks)
    assert blocks.shape == (expected, seq_len)
    for i in range(expected):
        np.testing.assert_array_equal(blocks[i], np.arange(i * seq_len, (i + 1) * seq_len))
    # no padding, no gaps: the blocks concatenated are a prefix of the stream
    flat = blocks.reshape(-1)
    np.testing.assert_array_equal(flat, stream[: flat.size])
    assert blocks.dtype == stream.dtype


@pytest.mark.parametrize("seq_len, max_blocks, length", [  # (seq_len < 2 and max_blocks < 1: test_config)
    (10, None, 9),      # shorter than one block
    (10, 3, 0),
])
def test_pack_blocks_errors(seq_len, max_blocks, length):
    with pytest.raises(UserError):
        pack_blocks(np.arange(length, dtype=np.int32), seq_len, max_blocks)


def test_pack_blocks_error_messages_name_the_key():
    with pytest.raises(UserError, match="seq_len=10"):
        pack_blocks(np.arange(9), 10, None)


# --- data_fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_is_stable_for_equal_inputs():
    blocks = np.arange(200, dtype=np.int32).reshape(20, 10)
    first = data_fingerprint(blocks, "tok-a", 10)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert data_fingerprint(blocks.copy(), "tok-a", 10) == first
    assert data_fingerprint(blocks.astype(np.int64), "tok-a", 10) == first  # the tokens, not the dtype
    assert data_fingerprint(np.asfortranarray(blocks), "tok-a", 10) == first  # nor the memory layout


def test_fingerprint_changes_with_one_token_tokenizer_or_seq_len():
    blocks = np.arange(200, dtype=np.int32).reshape(20, 10)
    base = data_fingerprint(blocks, "tok-a", 10)
    changed = blocks.copy()
    changed[13, 7] += 1
    assert data_fingerprint(changed, "tok-a", 10) != base
    assert data_fingerprint(blocks, "tok-b", 10) != base
    # the same token bytes packed at another length must still differ
    stream = np.arange(200, dtype=np.int32)
    by_20 = pack_blocks(stream, 20, None)
    assert by_20.tobytes() == blocks.tobytes()
    assert data_fingerprint(by_20, "tok-a", 20) != base
    # fewer blocks (another max_blocks) differs too
    assert data_fingerprint(blocks[:19], "tok-a", 10) != base


# --- the local-data route -----------------------------------------------------------------------------

# upstream layout: " = Title = " headings, blank lines holding one space, text lines with a leading space
TRAIN_RAW = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n"
    " The game began development in 2010 , carrying over a large portion of the work . \n"
    " \n"
    " = = Gameplay = = \n"
    " \n"
    " As with previous games , the player controls units in battle . \n"
)
TRAIN_ROWS = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
    " The game began development in 2010 , carrying over a large portion of the work . \n",
    "",
    " = = Gameplay = = \n",
    "",
    " As with previous games , the player controls units in battle . \n",
]
VALID_RAW = " \n = Robert Boulter = \n \n Robert Boulter is an English film and television actor . \n"
VALID_ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film and television actor . \n"]
TEST_RAW = " \n = Tower Building = \n \n The tower is tall . \n"
TEST_ROWS = ["", " = Tower Building = \n", "", " The tower is tall . \n"]


@pytest.fixture
def local_dir(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    for stem, text in (("train", TRAIN_RAW), ("valid", VALID_RAW), ("test", TEST_RAW)):
        (folder / f"wiki.{stem}.raw").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub's offline switches, and any attempt to open an internet socket fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    real_connect = socket.socket.connect

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted in an offline test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network access attempted")))


@pytest.mark.parametrize("split, expected", [
    ("train", TRAIN_ROWS), ("validation", VALID_ROWS), ("valid", VALID_ROWS), ("test", TEST_ROWS),
])
def test_load_rows_local(local_dir, offline, split, expected):
    rows = load_rows(DataConfig(local_dir=str(local_dir)), split)
    assert list(rows) == expected


def test_load_rows_local_missing_file(local_dir, offline):
    (local_dir / "wiki.test.raw").unlink()
    with pytest.raises(UserError) as info:
        load_rows(DataConfig(local_dir=str(local_dir)), "test")
    assert str(local_dir / "wiki.test.raw") in str(info.value)


def test_load_rows_local_missing_dir(tmp_path, offline):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        load_rows(DataConfig(local_dir=str(missing)), "train")
    assert str(missing) in str(info.value)


def test_load_rows_unknown_split(local_dir, offline):
    with pytest.raises(UserError, match="dev"):
        load_rows(DataConfig(local_dir=str(local_dir)), "dev")


# --- tokenize_stream ------------------------------------------------------------------------------------

SPECIAL = ["<bos>", "<eos>"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences, with a post-processor that adds <bos>/<eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([TRAIN_RAW, VALID_RAW, TEST_RAW] * 3, trainer)
    raw.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[(t, raw.token_to_id(t)) for t in SPECIAL])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>")
    return raw, wrapped


def test_tokenize_stream_is_the_joined_text_in_one_call(tiny_tokenizer):
    raw, wrapped = tiny_tokenizer
    special_ids = {raw.token_to_id(t) for t in SPECIAL}
    # the tokenizer does add specials by default, so their absence below means something
    assert wrapped("a b")["input_ids"][0] in special_ids

    stream = tokenize_stream(wrapped, TRAIN_ROWS)
    text = "".join(TRAIN_ROWS)
    expected = raw.encode(text, add_special_tokens=False).ids
    assert stream.dtype == np.int32 and stream.ndim == 1
    assert stream.tolist() == expected
    assert not special_ids & set(stream.tolist())
    assert raw.decode(stream.tolist()) == text  # byte-level: lossless, newlines included


def test_tokenize_stream_joins_rows_without_separator(tiny_tokenizer):
    raw, wrapped = tiny_tokenizer
    rows = ["ab", "cd\n", "", "ef"]
    stream = tokenize_stream(wrapped, rows)
    assert raw.decode(stream.tolist()) == "abcd\nef"
    assert stream.tolist() == raw.encode("abcd\nef", add_special_tokens=False).ids


def test_load_blocks_local_end_to_end(local_dir, offline, tiny_tokenizer):
    raw, wrapped = tiny_tokenizer
    data = DataConfig(local_dir=str(local_dir), seq_len=8, max_blocks=None)
    blocks = load_blocks(data, wrapped, "tiny-hash", split="validation")
    expected_stream = raw.encode("".join(VALID_ROWS), add_special_tokens=False).ids
    n = len(expected_stream) // 8
    assert n >= 2
    assert blocks.num_stream_tokens == len(expected_stream)
    assert blocks.input_ids.shape == (n, 8)
    assert blocks.input_ids.reshape(-1).tolist() == expected_stream[: n * 8]
    assert blocks.fingerprint == data_fingerprint(np.asarray(expected_stream[: n * 8], np.int32).reshape(n, 8),
                                                  "tiny-hash", 8)
    capped = load_blocks(DataConfig(local_dir=str(local_dir), seq_len=8, max_blocks=1), wrapped, "tiny-hash",
                         split="validation")
    assert capped.input_ids.shape == (1, 8) and capped.fingerprint != blocks.fingerprint


# --- streaming ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_chars", [1, 40, 10**6])
def test_chunked_tokens_equal_the_joined_text(tiny_tokenizer, chunk_chars):
    """Chunks end after line breaks only; any chunk size gives exactly the tokens of one call on the text."""
    from common.data import iter_token_chunks

    _, wrapped = tiny_tokenizer
    rows = (TRAIN_ROWS + VALID_ROWS) * 3
    chunks = list(iter_token_chunks(wrapped, rows, chunk_chars=chunk_chars))
    assert len(chunks) > 1 or chunk_chars == 10**6
    assert np.concatenate(chunks).tolist() == tokenize_stream(wrapped, rows).tolist()


def test_text_the_tokenizer_never_splits_at_line_breaks_is_one_chunk_then_refused(tiny_tokenizer):
    """A tokenizer that adds a prefix space to every call would tokenize a chunk's first word differently:
    no chunk boundary is taken, and text without one for 64 chunks' worth is refused, not held in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from common.data import iter_token_chunks

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    raw.train_from_iterator([TRAIN_RAW] * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    prefixing = PreTrainedTokenizerFast(tokenizer_object=raw)
    rows = ["alpha beta\n", "gamma delta\n"]
    assert raw.encode("".join(rows)).ids != raw.encode(rows[0]).ids + raw.encode(rows[1]).ids
    chunks = list(iter_token_chunks(prefixing, rows, chunk_chars=1))
    assert len(chunks) == 1 and chunks[0].tolist() == raw.encode("".join(rows)).ids
    with pytest.raises(UserError, match=r"no line break in \d+ characters where the tokenizer .* data.rows=documents"):
        list(iter_token_chunks(prefixing, ["alpha beta\n", "gamma delta\n"] * 40, chunk_chars=1))


def test_an_added_token_across_a_line_break_is_refused(tiny_tokenizer):
    """Pre-tokens split at the line break, but an added token (matched before pre-tokenizing) spans it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from common.data import iter_token_chunks

    raw, _ = tiny_tokenizer
    spanning = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw.to_str()))  # a copy to change
    spanning.add_tokens([".\nThe"])
    with pytest.raises(UserError, match="merges tokens across a line break"):
        list(iter_token_chunks(spanning, ["A line .\n", "The next line .\n"], chunk_chars=1))


def test_block_stream_stops_reading_at_max_blocks(local_dir, offline, tiny_tokenizer):
    from common.data import BlockStream

    _, wrapped = tiny_tokenizer
    stream = BlockStream(DataConfig(local_dir=str(local_dir), seq_len=4, max_blocks=2), wrapped, "h", "train")
    blocks = list(stream)
    whole = tokenize_stream(wrapped, TRAIN_ROWS)
    assert np.stack(blocks).reshape(-1).tolist() == whole[:8].tolist()
    assert stream.num_blocks == 2 and stream.fingerprint == data_fingerprint(np.stack(blocks), "h", 4)


# --- data.files: .txt lines, .jsonl/.parquet documents ------------------------------------------------------

# Text that puts every kind of line break in the way of chunking: blank lines ("\n\n" is one pre-token),
# indented lines (newline + spaces), a tab, CRLF line ends, non-ASCII, and files that end mid-line.
TXT_FILES = {
    "a.txt": " = Valkyria Chronicles III = \n\n\n Senjō no Valkyria 3 is a tactical game .\n"
             "    indented = code ( 1 )\n\tA tabbed line .\n  two spaces lead this line .\n\n"
             "The game began development in 2010 .\nno newline at the end of a",
    "b.txt": " file joins the next line .\r\nCRLF lines read as LF .\r\n\r\n= Heading =\n   \n\n"
             "As with previous games , the player controls units .\n",
}
DOCUMENTS = [
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 is a tactical game .",
    "The game began development in 2010 .\n",  # a trailing newline stays part of the document
    "",  # an empty document adds nothing, not even EOS
    "    indented = code ( 1 )\n\tA tabbed line .",
    "As with previous games , the player controls units .",
    " = Robert Boulter = \n Robert Boulter is an English film and television actor .",
]


@pytest.fixture(scope="module")
def files_tokenizer():
    """A byte-level BPE (GPT-2's pre-tokenizer) that has learned merges across line breaks and spaces, with
    an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([*TXT_FILES.values(), *DOCUMENTS, TRAIN_RAW] * 5 + ["a\n\nb\n\n\nc\n   d\n"] * 50, trainer)
    for merged in ("\n\n", "\n "):  # what a chunk boundary after any line break would split
        assert len(raw.encode(merged, add_special_tokens=False).ids) == 1, merged
    return raw, PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def independent_fingerprint(tokens: list[int], tokenizer_hash: str, seq_len: int) -> str:
    """The manifest's fingerprint written out: sha256 over the settings and the kept tokens as int32 LE."""
    kept = len(tokens) // seq_len * seq_len
    payload = f"seq_len={seq_len};tokenizer={tokenizer_hash};".encode() + np.asarray(tokens[:kept], "<i4").tobytes()
    return hashlib.sha256(payload).hexdigest()


def write_documents(path, documents, column="text"):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(documents))), column: documents}), path, row_group_size=2)
    else:
        path.write_text("".join(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(documents)),
                        encoding="utf-8")
    return path


def stream_of(data: DataConfig, tokenizer, chunk_chars: int, split: str | None = None):
    from common.data import BlockStream

    stream = BlockStream(data, tokenizer, "h", split, chunk_chars=chunk_chars)
    blocks = list(stream)
    return stream, np.stack(blocks).reshape(-1).tolist()


@pytest.mark.parametrize("chunk_chars", [1, 20, 10**6])
def test_txt_files_are_their_text_tokenized_in_one_call(tmp_path, offline, files_tokenizer, chunk_chars):
    from common.data import TextSource, iter_token_chunks

    raw, tokenizer = files_tokenizer
    for name, text in TXT_FILES.items():
        (tmp_path / name).write_bytes(text.encode("utf-8"))  # bytes: CRLF stays in the file
    data = DataConfig(files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], seq_len=4, max_blocks=None)
    # the files as `cat` joins them, newlines read as Python's universal newlines
    expected = raw.encode("".join(TXT_FILES.values()).replace("\r\n", "\n"), add_special_tokens=False).ids
    stream, flat = stream_of(data, tokenizer, chunk_chars)
    assert stream.source.rows == "lines"
    assert stream.stream_tokens == len(expected) and flat == expected[: len(expected) // 4 * 4]
    assert stream.fingerprint == independent_fingerprint(expected, "h", 4)
    chunks = list(iter_token_chunks(tokenizer, TextSource(data, "train"), "lines", chunk_chars))
    assert len(chunks) >= (5 if chunk_chars < 100 else 1)  # boundaries were crossed, not only at the easy lines


@pytest.mark.parametrize("suffix, column", [(".jsonl", "text"), (".parquet", "body")])
@pytest.mark.parametrize("chunk_chars", [1, 10**6])
def test_document_files_are_each_document_then_eos(tmp_path, offline, files_tokenizer, suffix, column, chunk_chars):
    raw, tokenizer = files_tokenizer
    eos = raw.token_to_id("<eos>")
    path = write_documents(tmp_path / f"docs{suffix}", DOCUMENTS, column)
    data = DataConfig(files=[str(path)], text_column=column, seq_len=4, max_blocks=None)
    expected = [t for d in DOCUMENTS if d for t in raw.encode(d, add_special_tokens=False).ids + [eos]]
    assert expected.count(eos) == len(DOCUMENTS) - 1
    stream, flat = stream_of(data, tokenizer, chunk_chars)
    assert stream.source.rows == "documents"
    assert stream.stream_tokens == len(expected) and flat == expected[: len(expected) // 4 * 4]
    assert stream.fingerprint == independent_fingerprint(expected, "h", 4)
    assert stream.source.files[0].path == str(path) and stream.source.files[0].bytes == path.stat().st_size


def test_data_rows_overrides_what_the_file_type_implies(tmp_path, offline, files_tokenizer):
    raw, tokenizer = files_tokenizer
    eos = raw.token_to_id("<eos>")
    path = write_documents(tmp_path / "lines.jsonl", ["first line\n", "second line\n", " third\n"])
    _, flat = stream_of(DataConfig(files=[str(path)], rows="lines", seq_len=2, max_blocks=None), tokenizer, 1)
    whole = raw.encode("first line\nsecond line\n third\n", add_special_tokens=False).ids
    assert flat == whole[: len(whole) // 2 * 2]
    txt = tmp_path / "docs.txt"
    txt.write_text("one\ntwo\n", encoding="utf-8")
    _, flat = stream_of(DataConfig(files=[str(txt)], rows="documents", seq_len=2, max_blocks=None), tokenizer, 1)
    per_line = [t for line in ("one\n", "two\n") for t in raw.encode(line, add_special_tokens=False).ids + [eos]]
    assert flat == per_line[: len(per_line) // 2 * 2]


def test_files_are_read_in_the_order_given_globs_sorted_and_split_placeholder(tmp_path, offline):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for part in (1, 0, 2):
            write_documents(tmp_path / split / f"part-{part}.jsonl", [f"{split} {part} {i}" for i in range(2)])
    glob_rows = load_rows(DataConfig(files=[str(tmp_path / "train" / "part-*.jsonl")]), "train")
    assert glob_rows == [f"train {p} {i}" for p in (0, 1, 2) for i in range(2)]
    listed = [str(tmp_path / "train" / f"part-{p}.jsonl") for p in (2, 0)]
    assert load_rows(DataConfig(files=listed), "train") == [f"train {p} {i}" for p in (2, 0) for i in range(2)]
    placeholder = DataConfig(files=[str(tmp_path / "{split}" / "part-[01].jsonl")])
    assert load_rows(placeholder, "test") == [f"test {p} {i}" for p in (0, 1) for i in range(2)]
    with pytest.raises(UserError, match=r"names the files of split 'train' \(data.split\) only; .* put \{split\}"):
        load_rows(DataConfig(files=listed), "test")


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch):
    from common.data import source_settings

    monkeypatch.chdir(tmp_path)
    settings = source_settings(DataConfig(files=["corpus/{split}.jsonl", "~/more.jsonl"], text_column="body"))
    assert settings == {"files": [str(tmp_path / "corpus" / "{split}.jsonl"), os.path.expanduser("~/more.jsonl")],
                        "text_column": "body", "rows": "documents"}
    assert source_settings(DataConfig()) == {"files": None, "text_column": "text", "rows": "lines"}


@pytest.mark.parametrize("override, expected", [
    ("data.files=corpus.jsonl", ["corpus.jsonl"]),
    ("data.files=data/{split}-*.txt", ["data/{split}-*.txt"]),
    ("data.files={split}.parquet", ["{split}.parquet"]),  # not YAML's flow mapping
    ("data.files=[a.jsonl, b/*.jsonl]", ["a.jsonl", "b/*.jsonl"]),
    ("data.files=null", None),
])
def test_data_files_on_the_command_line(override, expected):
    from common.config import load_config

    assert load_config(None, [override]).data.files == expected


def test_data_files_in_a_yaml_file(tmp_path):
    from common.config import load_config

    path = tmp_path / "p.yaml"
    path.write_text("data:\n  files:\n    - a.txt\n    - 'b/{split}.txt'\n")
    assert load_config(str(path)).data.files == ["a.txt", "b/{split}.txt"]
    path.write_text("data:\n  files: {a: 1}\n")
    with pytest.raises(UserError, match="^config key data.files: expected text or a list of text, got"):
        load_config(str(path))


# --- one-line errors -----------------------------------------------------------------------------------

def _error_case(tmp_path, case):
    """(DataConfig, split) that `case` describes, its files written under tmp_path."""
    docs = tmp_path / "docs.jsonl"
    write_documents(docs, ["one document", "another one"])
    if case == "no file matches":
        return DataConfig(files=[str(tmp_path / "missing" / "*.jsonl")]), None
    if case == "unknown type":
        (tmp_path / "table.csv").write_text("text\nhello\n")
        return DataConfig(files=[str(tmp_path / "table.csv")]), None
    if case == "mixed types":
        (tmp_path / "a.txt").write_text("a line\n")
        return DataConfig(files=[str(tmp_path / "a.txt"), str(docs)]), None
    if case == "missing column jsonl":
        return DataConfig(files=[str(docs)], text_column="body"), None
    if case == "missing column parquet":
        return DataConfig(files=[str(write_documents(tmp_path / "d.parquet", ["x"], column="content"))]), None
    if case == "null text":
        (tmp_path / "null.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": null}\n')
        return DataConfig(files=[str(tmp_path / "null.jsonl")]), None
    if case == "number text":
        return DataConfig(files=[str(write_documents(tmp_path / "num.parquet", [1, 2]))]), None
    if case == "empty files":
        (tmp_path / "e1.jsonl").write_text("")
        (tmp_path / "e2.jsonl").write_text("")
        return DataConfig(files=[str(tmp_path / "e*.jsonl")]), None
    if case == "empty txt":
        (tmp_path / "empty.txt").write_text("")
        return DataConfig(files=[str(tmp_path / "empty.txt")]), None
    if case == "shorter than a block":
        return DataConfig(files=[str(docs)], seq_len=4096), None
    if case == "broken json":
        (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
        return DataConfig(files=[str(tmp_path / "broken.jsonl")]), None
    if case == "not utf-8":
        (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
        return DataConfig(files=[str(tmp_path / "latin1.txt")]), None
    if case == "broken parquet":
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
        return DataConfig(files=[str(tmp_path / "broken.parquet")]), None
    if case == "files and local_dir":
        return DataConfig(files=[str(docs)], local_dir=str(tmp_path)), None
    if case == "other split, no placeholder":
        return DataConfig(files=[str(docs)]), "test"
    if case == "a file twice":
        return DataConfig(files=[str(docs), str(tmp_path / "*.jsonl")]), None
    if case == "empty list":
        return DataConfig(files=[]), None
    raise AssertionError(case)


ERRORS = {
    "no file matches": "data.files: no file matches {tmp}/missing/*.jsonl",
    "unknown type": "data.files: {tmp}/table.csv is not a .txt, .jsonl, .parquet file (the types this tool reads)",
    "mixed types": "data.files mixes .jsonl and .txt files; give files of one type",
    "missing column jsonl": "data.text_column 'body' is not a column of {tmp}/docs.jsonl (columns: id, text)",
    "missing column parquet": "data.text_column 'text' is not a column of {tmp}/d.parquet (columns: id, content)",
    "null text": "split train of data.files ({tmp}/null.jsonl): row 2 has null in column 'text', not text",
    "number text": "split train of data.files ({tmp}/num.parquet): row 0 has int in column 'text', not text",
    "empty files": "split train of data.files (2 files from {tmp}/e1.jsonl) has no rows",
    "empty txt": "split train of data.files ({tmp}/empty.txt) has no rows",
    "shorter than a block": "split train of data.files ({tmp}/docs.jsonl) has {tokens} tokens, fewer than one "
                            "block of data.seq_len=4096",
    "broken json": "cannot read split train of data.files ({tmp}/broken.jsonl): line 2 of {tmp}/broken.jsonl is not "
                   "JSON: Expecting value (column 10)",
    "not utf-8": "cannot read split train of data.files ({tmp}/latin1.txt): 'utf-8' codec can't decode byte 0xe9 in "
                 "position 3: invalid continuation byte",
    "broken parquet": "cannot read {tmp}/broken.parquet: Parquet magic bytes not found in footer. Either the file "
                      "is corrupted or this is not a parquet file.",
    "files and local_dir": "data.files and data.local_dir are both set; set one of them",
    "other split, no placeholder": "data.files names the files of split 'train' (data.split) only; to read split "
                                   "'test' too, put {{split}} in the paths (e.g. corpus/{{split}}.jsonl)",
    "a file twice": "data.files names {tmp}/docs.jsonl more than once",
    "empty list": "data.files must name files or globs, got []",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_data_errors_are_one_line_naming_the_problem(tmp_path, offline, files_tokenizer, case):
    from common.data import BlockStream

    raw, tokenizer = files_tokenizer
    data, split = _error_case(tmp_path, case)
    with pytest.raises(UserError) as info:
        list(BlockStream(data, tokenizer, "h", split))
    tokens = sum(len(raw.encode(d, add_special_tokens=False).ids) + 1 for d in ("one document", "another one"))
    assert str(info.value) == ERRORS[case].format(tmp=tmp_path, tokens=tokens)


# --- a row longer than MAX_ROW_CHARS: refused while it is read, memory bounded ------------------------------

@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_row_past_the_limit_is_refused_even_before_a_short_one(tmp_path, offline, files_tokenizer, suffix):
    """5 M characters with no line break, then a short row: refused (the chunking check alone would have let a
    row with a line break at its end through); a row of exactly the limit is read."""
    from common.data import MAX_ROW_CHARS, BlockStream, TextSource

    path = tmp_path / f"big{suffix}"
    if suffix == ".txt":
        path.write_text("a short line\n" + "x" * 5_000_000 + "\nthe next line\n")
        limit = "x" * (MAX_ROW_CHARS - 1) + "\n"
    else:
        write_documents(path, ["a document", "x" * (MAX_ROW_CHARS + 1), "the next one"])
        limit = "x" * MAX_ROW_CHARS
    data = DataConfig(files=[str(path)], seq_len=4, max_blocks=None)
    with pytest.raises(UserError) as info:
        list(BlockStream(data, files_tokenizer[1], "h"))
    kind = "line" if suffix == ".txt" else "document"
    assert str(info.value) == (f"split train of data.files ({path}): row 1 ({kind}) is longer than {MAX_ROW_CHARS} "
                               "characters, the limit per row that keeps memory bounded; split it")
    ok = tmp_path / f"ok{suffix}"
    if suffix == ".txt":
        ok.write_text(limit)
    else:
        write_documents(ok, [limit])
    assert [len(row) for row in TextSource(DataConfig(files=[str(ok)]), "train")] == [MAX_ROW_CHARS]


HUGE_ROW_CHARS = 33_000_000
HUGE_ROW_RSS_LIMIT = 1500 * 2**20  # a normal dump peaks near 0.6 GB; the 33 M-character row took 6.3 GB before


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_stage_one_refuses_a_33m_character_row_in_bounded_memory(tiny, tmp_path, suffix):
    """One line (or document) of 33 M characters with no line break: one line, status 2, no cache, and the
    process's peak RSS (its own rusage, from wait4) far below what reading the row whole would take."""
    path = tmp_path / f"huge{suffix}"
    with open(path, "w") as fh:
        fh.write('{"text": "' if suffix == ".jsonl" else "")
        for _ in range(HUGE_ROW_CHARS // 1_000_000):
            fh.write("word " * 200_000)
        fh.write('"}\n' if suffix == ".jsonl" else "")
    cache = tmp_path / "cache"
    args = tiny_overrides(tiny, cache, **{"data.local_dir": None, "data.files": path, "data.max_blocks": 50})
    proc = subprocess.Popen([sys.executable, "-m", "stage1_teacher.dump", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.splitlines()[-1].startswith(f"error: split train of data.files "
                                                                            f"({path}): ")
    assert "characters, the limit per row" in stderr or "bytes, more than a document" in stderr, stderr[-3000:]
    assert usage.ru_maxrss * 1024 < HUGE_ROW_RSS_LIMIT, f"peak RSS {usage.ru_maxrss / 2**10:.0f} MiB"
    assert not cache.exists()


def test_documents_need_an_eos_token(tmp_path, offline):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from common.data import BlockStream

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(DOCUMENTS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    data = DataConfig(files=[str(write_documents(tmp_path / "d.jsonl", DOCUMENTS))], seq_len=2)
    with pytest.raises(UserError, match=r"^tokenizer '' has no EOS token, which ends each document \(data.rows"):
        BlockStream(data, PreTrainedTokenizerFast(tokenizer_object=raw), "h")


# --- end to end on the tiny build: stage one from each file type, stage two and evaluate from those caches ------

def articles(text: str) -> list[str]:
    """WikiText-style text cut into documents at its top-level headings, without trailing newlines."""
    docs: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") or not docs:
            docs.append("")
        docs[-1] += line
    return [d.rstrip() for d in docs if d.strip()]


@pytest.fixture(scope="module")
def corpus_files(tiny, tmp_path_factory) -> dict:
    """Small local files of each type made from the tiny build's text, and the tokens each should give."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("files")
    tok = AutoTokenizer.from_pretrained(tiny / "teacher")
    lines = {split: (tiny / "data" / f"wiki.{split}.raw").read_text(encoding="utf-8").splitlines(keepends=True)
             for split in ("valid", "test")}
    text = "".join(lines["valid"][:120])

    def documents_tokens(docs):
        return [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]

    (root / "jsonl").mkdir()
    docs = {"train": articles(text), "test": articles("".join(lines["test"][:40]))}
    for split, split_docs in docs.items():
        write_documents(root / "jsonl" / f"{split}.jsonl", split_docs)
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    write_documents(root / "docs.parquet", docs["train"], column="body")
    return {
        "txt": {"files": root / "corpus.txt", "read": [root / "corpus.txt"], "column": "text", "rows": "lines",
                "tokens": tok(text, add_special_tokens=False)["input_ids"]},
        "jsonl": {"files": root / "jsonl" / "{split}.jsonl", "read": [root / "jsonl" / "train.jsonl"],
                  "column": "text", "rows": "documents", "tokens": documents_tokens(docs["train"]),
                  "test_tokens": documents_tokens(docs["test"])},
        "parquet": {"files": root / "docs.parquet", "read": [root / "docs.parquet"], "column": "body",
                    "rows": "documents", "tokens": documents_tokens(docs["train"])},
    }


def files_overrides(tiny, cache, kind: dict, **extra) -> list[str]:
    return tiny_overrides(tiny, cache, **{"data.local_dir": None, "data.files": kind["files"],
                                          "data.text_column": kind["column"], "data.seq_len": 64,
                                          "data.max_blocks": None, **extra})


@pytest.fixture(scope="module")
def file_caches(tiny, corpus_files, tmp_path_factory) -> dict:
    from stage1_teacher.dump import main as dump_main

    root = tmp_path_factory.mktemp("file-caches")
    for name, kind in corpus_files.items():
        dump_main(files_overrides(tiny, root / name, kind))
    return {name: root / name for name in corpus_files}


@pytest.mark.parametrize("name", ["txt", "jsonl", "parquet"])
def test_dump_from_each_file_type_caches_exactly_its_tokens(tiny, corpus_files, file_caches, name):
    from cache.manifest import load_manifest
    from cache.reader import CacheReader
    from common.data import DataFile

    kind, manifest = corpus_files[name], load_manifest(str(file_caches[name]))
    expected, data = kind["tokens"], manifest.dataset
    n = len(expected) // 64
    assert n >= 10 and data.stream_tokens == len(expected) and manifest.num_blocks == n  # read to the end
    cached = CacheReader(str(file_caches[name])).read_all("input_ids")
    assert cached.shape == (n, 64) and cached.reshape(-1).tolist() == expected[: n * 64]
    assert data.fingerprint == independent_fingerprint(expected, manifest.tokenizer.hash, 64)
    assert data.files == [str(kind["files"])] and data.text_column == kind["column"] and data.rows == kind["rows"]
    assert data.read_files == [DataFile(str(p), p.stat().st_size) for p in kind["read"]]


def test_stage_two_refuses_a_cache_read_from_other_files_and_trains_from_the_same(tiny, corpus_files, file_caches,
                                                                                   tmp_path):
    from stage2_student.train import main as train_main

    cache, kind = file_caches["jsonl"], corpus_files["jsonl"]
    other = {**kind, "files": corpus_files["parquet"]["files"]}  # the same documents, in another file
    result = run_cli("stage2_student.train", "--cache", cache,
                     *files_overrides(tiny, cache, other, **{"train.output_dir": tmp_path / "refused"}))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"error: cache {cache} was read with data.files={[str(kind['files'])]!r}, "
                                          f"the config has {[str(other['files'])]!r}"]
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "trained"
    train_main(["--cache", str(cache), *files_overrides(tiny, cache, kind, **{
        "train.output_dir": out, "train.log_dir": tmp_path / "logs", "train.max_steps": 1})])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_evaluate_from_a_documents_cache_reads_the_same_files_for_its_split(tiny, corpus_files, file_caches, tmp_path):
    """--cache replaces data.files/text_column/rows by the manifest's; `{split}` then names the test file."""
    from stage2_student.evaluate import main as evaluate_main

    output, documents = tmp_path / "eval.json", tmp_path / "documents.json"
    for protocol, path in (("strided", output), ("lm-eval", documents)):
        evaluate_main(["--model", str(tiny / "teacher"), "--cache", str(file_caches["jsonl"]),
                       *tiny_overrides(tiny, file_caches["jsonl"], **{
                           "data.local_dir": None, "data.files": tmp_path / "elsewhere.txt", "data.rows": "lines",
                           "eval.split": "test", "eval.protocol": protocol, "eval.output": path})])
    result = json.loads(output.read_text())
    assert result["seq_len"] == 64
    assert result["results"][0]["tokens"] == len(corpus_files["jsonl"]["test_tokens"]) - 1  # all but the first
    # lm-eval: each row a document, scored on its own without the EOS that packing adds, its first token from EOS
    result = json.loads(documents.read_text())["results"][0]
    test_tokens = corpus_files["jsonl"]["test_tokens"]
    eos = test_tokens[-1]
    assert result["documents"] == test_tokens.count(eos) and result["tokens"] == len(test_tokens) - result["documents"]


def test_the_tiny_qwen2_tokenizer_chunks_exactly(tiny, tmp_path, offline):
    """Qwen2's pre-tokenizer (the tiny build's) at many chunk boundaries, blank and indented lines included."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "teacher")
    text = (tiny / "data" / "wiki.test.raw").read_text(encoding="utf-8")[:6000] + "".join(TXT_FILES.values())
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")  # CRLF written as is, read back as LF
    expected = tok(text.replace("\r\n", "\n"), add_special_tokens=False)["input_ids"]
    for chunk_chars in (5, 300):  # a boundary every few lines; 5 × 64 characters without one are refused
        stream, flat = stream_of(DataConfig(files=[str(tmp_path / "t.txt")], seq_len=8, max_blocks=None), tok,
                                 chunk_chars)
        assert stream.stream_tokens == len(expected) and flat == expected[: len(expected) // 8 * 8]


DUMP_ERRORS = {
    "missing file": ({"data.files": "{root}/nowhere/*.txt"}, "error: data.files: no file matches {root}/nowhere/*.txt"),
    "missing column": ({"data.files": "{root}/docs.jsonl", "data.text_column": "body"},
                       "error: data.text_column 'body' is not a column of {root}/docs.jsonl (columns: id, text)"),
    "null in a late row": ({"data.files": "{root}/late.jsonl"},
                           "error: split train of data.files ({root}/late.jsonl): row 3000 has null in column 'text', "
                           "not text"),
}


def test_dump_data_errors_are_one_line_status_2_and_no_cache(tiny, tmp_path):
    write_documents(tmp_path / "docs.jsonl", ["a document"] * 3)
    write_documents(tmp_path / "late.jsonl", [f"document {i} of many" for i in range(3000)] + [None])
    procs = {}
    for case, (settings, _) in DUMP_ERRORS.items():
        cache = tmp_path / case.replace(" ", "-")
        args = tiny_overrides(tiny, cache, **{"data.local_dir": None, "data.max_blocks": None,
                                              **{k: v.format(root=tmp_path) for k, v in settings.items()}})
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs[case] = (subprocess.Popen([sys.executable, "-m", "stage1_teacher.dump", *args], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cache)
    for case, (proc, cache) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (case, stderr[-2000:])
        # a late row is met while the teacher runs (the data streams): progress bars may precede the one line
        lines = stderr.splitlines()
        assert lines[-1] == DUMP_ERRORS[case][1].format(root=tmp_path), case
        assert "Traceback" not in stderr and sum(line.startswith("error:") for line in lines) == 1, case
        assert not cache.exists(), case
        with pytest.raises(UserError):  # a staging directory left for a rerun is never taken for a cache
            load_manifest(f"{cache}.partial")


# --- bench.stream_memory, far below its sizes -----------------------------------------------------------

def test_stream_memory_bench_smoke(tiny, tmp_path):
    """Both routes on two tiny corpora and the chunking check; the doc's section is rewritten, nothing else."""
    doc = tmp_path / "performance.md"
    original = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    doc.write_text(original, encoding="utf-8")
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "wiki.test.raw").write_text((tiny / "data" / "wiki.test.raw").read_text(encoding="utf-8")[:20000])
    result = run_cli("bench.stream_memory", "--out", tmp_path / "out", "--tiny", tiny, "--tokens", "3000", "9000",
                     "--repeats", "1", "--doc", doc, "--check-tokenizer", tiny / "teacher", "--check-data", wiki,
                     "--check-chunks", "100000", "2000")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = doc.read_text(encoding="utf-8")
    begin, end = "<!-- BEGIN streaming memory -->", "<!-- END streaming memory -->"
    assert text.split(begin)[0] == original.split(begin)[0] and text.split(end)[1] == original.split(end)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.split(begin)[1].split(end)[0].splitlines()
            if line.startswith("| ") and not line.startswith("| corpus") and not line.startswith("| file")]
    measured = {(r[0], r[1]): r for r in rows if r[0] in ("0.003 M", "0.009 M")}
    assert set(measured) == {(size, route) for size in ("0.003 M", "0.009 M") for route in ("dump", "tokenize")}
    for size, target in (("0.003 M", 3000), ("0.009 M", 9000)):
        tokens = int(measured[size, "dump"][2].replace(",", ""))
        assert tokens == int(measured[size, "tokenize"][2].replace(",", "")) and abs(tokens - target) < 0.1 * target
        assert all(float(measured[size, route][3]) > 100 for route in ("dump", "tokenize"))  # MiB of a real process
    checks = [r for r in rows if r[0] == "wiki.test.raw"]
    assert [(r[1], r[2]) for r in checks] == [(route, chunk) for route in ("hub rows (data.local_dir)",
                                                                           "file text (.txt)")
                                              for chunk in ("100000", "2000")]
    assert all(r[5] == "yes" for r in checks) and int(checks[-1][3]) > 5  # many chunks at 2000 characters
    assert not (tmp_path / "out" / "stream-cache").exists()  # each dump's cache is deleted after measuring
