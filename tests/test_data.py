"""Rows → one token stream → fixed-length blocks, the fingerprint, and the local (no-network) data route."""
from __future__ import annotations

import re
import socket

import numpy as np
import pytest

from common.cli import UserError
from common.config import DataConfig
from common.data import data_fingerprint, load_blocks, load_rows, pack_blocks, tokenize_stream

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


@pytest.mark.parametrize("seq_len, max_blocks, length", [
    (1, None, 100),     # seq_len < 2
    (0, None, 100),
    (-3, None, 100),
    (10, 0, 100),       # max_blocks 0
    (10, -1, 100),
    (10, None, 9),      # shorter than one block
    (10, 3, 0),
])
def test_pack_blocks_errors(seq_len, max_blocks, length):
    with pytest.raises(UserError):
        pack_blocks(np.arange(length, dtype=np.int32), seq_len, max_blocks)


def test_pack_blocks_error_messages_name_the_key():
    with pytest.raises(UserError, match="seq_len"):
        pack_blocks(np.arange(100), 1, None)
    with pytest.raises(UserError, match="max_blocks"):
        pack_blocks(np.arange(100), 10, 0)
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


def test_a_tokenizer_that_merges_across_line_breaks_is_refused(tiny_tokenizer):
    """A tokenizer that adds a prefix space to every call would tokenize a chunk's first word differently."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from common.data import iter_token_chunks

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    raw.train_from_iterator([TRAIN_RAW] * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    prefixing = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(UserError, match="merges tokens across a line break"):
        list(iter_token_chunks(prefixing, ["alpha beta\n", "gamma delta\n"], chunk_chars=1))


def test_block_stream_stops_reading_at_max_blocks(local_dir, offline, tiny_tokenizer):
    from common.data import BlockStream

    _, wrapped = tiny_tokenizer
    stream = BlockStream(DataConfig(local_dir=str(local_dir), seq_len=4, max_blocks=2), wrapped, "h", "train")
    blocks = list(stream)
    whole = tokenize_stream(wrapped, TRAIN_ROWS)
    assert np.stack(blocks).reshape(-1).tolist() == whole[:8].tolist()
    assert stream.num_blocks == 2 and stream.fingerprint == data_fingerprint(np.stack(blocks), "h", 4)
