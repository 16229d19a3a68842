"""Stage one end to end on the tiny build: what the cache holds is checked against the teacher recomputed
independently with plain torch on the same blocks."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.gpu_check import parse_stage1
from cache.reader import CacheReader
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from tests.conftest import TEST_BLOCKS, run_cli, tiny_overrides


def independent_blocks(tiny: Path, seq_len: int, count: int) -> np.ndarray:
    """Rows as the hub dataset has them (blank lines → ""), joined, tokenized once, cut into blocks."""
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    lines = (tiny / "data" / "wiki.train.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    text = "".join(line if line.strip() else "" for line in lines)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids[: count * seq_len], dtype=np.int64).reshape(count, seq_len)


@torch.no_grad()
def teacher_logprobs(tiny: Path, blocks: np.ndarray) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32).eval()
    logits = model(input_ids=torch.from_numpy(blocks)).logits
    assert logits.shape[-1] > len(tokenizer)  # the padded rows exist and must be cut
    return torch.log_softmax(logits[..., : len(tokenizer)].float(), dim=-1)


@pytest.fixture(scope="module")
def topk_cache(tiny, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("stage1") / "topk"
    dump_main(tiny_overrides(tiny, cache, **{"cache.mode": "topk"}))
    return cache


@pytest.fixture(scope="module")
def full_cache(tiny, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("stage1") / "full"
    dump_main(tiny_overrides(tiny, cache, **{"cache.mode": "full"}))
    return cache


def test_topk_equals_independent_recompute(tiny, topk_cache):
    reader = CacheReader(str(topk_cache))
    blocks = independent_blocks(tiny, 128, TEST_BLOCKS)
    np.testing.assert_array_equal(reader.read_all("input_ids"), blocks)
    expected_values, expected_ids = torch.topk(teacher_logprobs(tiny, blocks), 16, dim=-1)
    # the cache's order is canonical: descending float16 log-prob, ties (equal in float16) by ascending id
    order = np.lexsort((expected_ids.numpy(), -expected_values.half().float().numpy()), axis=-1)
    expected_ids = torch.from_numpy(np.take_along_axis(expected_ids.numpy(), order, -1))
    expected_values = torch.from_numpy(np.take_along_axis(expected_values.numpy(), order, -1))
    ids = torch.from_numpy(reader.read_all("topk_ids")).long()
    values = torch.from_numpy(reader.read_all("topk_logprobs")).float()
    assert ids.shape == (TEST_BLOCKS, 128, 16) and values.dtype == torch.float32
    assert (ids == expected_ids).float().mean() > 0.999  # only exact ties may swap places
    torch.testing.assert_close(values, expected_values, rtol=1e-3, atol=1e-3)  # float16 storage
    assert (values[..., :-1] >= values[..., 1:]).all()  # largest first


def test_topk_selection_in_the_best_groups_is_torch_topk():
    """At Qwen2's vocabulary size the top-k is searched in the groups with the largest maxima: the values are
    torch.topk's exactly, and so are the ids wherever values are not tied (ties are made on purpose here, in the
    top-k and across group boundaries)."""
    from stage1_teacher.targets import GROUP, select_topk

    logprobs = torch.log_softmax(torch.randn(6, 151_646, generator=torch.Generator().manual_seed(2)) * 3, dim=-1)
    logprobs[0, :200] = logprobs[0].max() + 1  # 200 equal maxima, over two groups: only the values are fixed
    logprobs[1, GROUP - 1], logprobs[1, GROUP] = 5.0, 4.0  # the best two at a group boundary
    logprobs[2, -3:] = 6.0  # in the partial last group
    values, ids = select_topk(logprobs, 64)
    expected_values, expected_ids = torch.topk(logprobs, 64, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(logprobs.gather(-1, ids), values)  # each id holds its value
    assert torch.equal(ids[1:], expected_ids[1:])
    assert set(ids[0].tolist()) <= set(range(200)) and len(set(ids[0].tolist())) == 64


def test_full_mode_round_trips_within_float16(tiny, full_cache):
    reader = CacheReader(str(full_cache))
    expected = teacher_logprobs(tiny, independent_blocks(tiny, 128, TEST_BLOCKS))
    stored = torch.from_numpy(reader.read_all("logprobs"))
    assert stored.dtype == torch.float16 and stored.shape == expected.shape
    torch.testing.assert_close(stored.float(), expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(stored.float().exp().sum(-1), torch.ones(expected.shape[:-1]), rtol=0, atol=5e-3)


def test_manifest_and_checksums(tiny, topk_cache):
    from common.data import data_fingerprint
    from common.models import tokenizer_hash

    manifest = json.loads((topk_cache / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    teacher_config = json.loads((tiny / "teacher" / "config.json").read_text())
    assert manifest["format_version"] == 3 and manifest["mode"] == "topk" and manifest["k"] == 16
    assert manifest["vocab_size"] == len(tokenizer) < teacher_config["vocab_size"]
    assert manifest["teacher"]["padded_vocab_size"] == teacher_config["vocab_size"]
    assert manifest["seq_len"] == 128 and manifest["num_blocks"] == TEST_BLOCKS
    assert manifest["value_dtype"] == "float16"
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tokenizer)
    assert manifest["dataset"]["fingerprint"] == data_fingerprint(
        independent_blocks(tiny, 128, TEST_BLOCKS), tokenizer_hash(tokenizer), 128)
    assert [(s["file"], s["first_block"], s["num_blocks"]) for s in manifest["shards"]] == [
        ("shard-00000.h5", 0, 5), ("shard-00001.h5", 5, 5), ("shard-00002.h5", 10, 2)]
    for shard in manifest["shards"]:
        path = topk_cache / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        with h5py.File(path, "r") as handle:
            assert handle["topk_index_gaps"].chunks == (1, 128, 16)  # format 3 (tests/test_encoding.py)
            assert handle["topk_logprobs_by_id"].dtype == np.float16
    listed = ["kd-cache.lock", "manifest.json"] + [s["file"] for s in manifest["shards"]]
    assert sorted(p.name for p in topk_cache.iterdir()) == listed  # the lock file travels with the cache


def test_cli_prints_align_and_summary_and_refuses_to_overwrite(tiny, tmp_path):
    cache = tmp_path / "cache"
    args = tiny_overrides(tiny, cache, **{"data.max_blocks": 2})
    first = run_cli("stage1_teacher.dump", *args)
    assert first.returncode == 0, first.stderr
    align = [line for line in first.stdout.splitlines() + first.stderr.splitlines() if line.startswith("[ALIGN]")]
    assert align == ["[ALIGN] Teacher torch.Size([2, 128, 1088]) → cache vocab 1000"]
    assert "[stage1] 2 blocks, 256 tokens" in first.stdout
    summary = parse_stage1(first.stdout)  # the line bench/gpu_check.py reads
    assert (summary["tokens"], summary["processes"]) == (256, 1) and summary["tokens_per_s"] > 0
    before = (cache / "manifest.json").read_bytes()
    again = run_cli("stage1_teacher.dump", *args)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [again.stderr.strip()] and "already holds a cache" in again.stderr
    assert "Traceback" not in again.stderr
    assert (cache / "manifest.json").read_bytes() == before


def test_incomplete_cache_is_refused(tiny, topk_cache, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(topk_cache, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        CacheReader(str(partial))
    result = run_cli("stage2_student.train", "--cache", partial, *tiny_overrides(tiny, partial))
    assert result.returncode == 2 and "no manifest.json" in result.stderr and "Traceback" not in result.stderr


def test_a_failed_dump_leaves_no_cache(tiny, tmp_path, monkeypatch):
    """The dump dies at its second teacher batch, after the writer has taken the first: nothing a reader
    accepts is left behind, and the staging directory is not taken for a cache."""
    from stage1_teacher.dump import TeacherDump

    calls = []
    real_targets = TeacherDump.targets

    def failing_targets(self, logits, first_block):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in the second batch")
        return real_targets(self, logits, first_block)

    monkeypatch.setattr(TeacherDump, "targets", failing_targets)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="second batch"):
        dump_main(tiny_overrides(tiny, cache, **{"cache.shard_blocks": 4}))
    assert len(calls) == 2
    assert not cache.exists()
    staging = tmp_path / "cache.partial"
    assert staging.is_dir() and "manifest.json" not in os.listdir(staging)
    for directory in (cache, staging):
        with pytest.raises(UserError, match="not found|no manifest.json"):
            CacheReader(str(directory))


def test_the_teacher_running_out_of_memory_is_one_line_naming_the_settings(tiny, tmp_path, monkeypatch):
    """The teacher's forward raises torch.OutOfMemoryError (as on a GPU): one line with the device, the batch
    size and the block length filled in, and no cache."""
    import stage1_teacher.dump as dump

    load = dump.load_causal_lm

    def teacher_out_of_memory(*args, **kwargs):
        model = load(*args, **kwargs)

        def forward(*_, **__):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        model.forward = forward
        return model

    monkeypatch.setattr(dump, "load_causal_lm", teacher_out_of_memory)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        dump_main(tiny_overrides(tiny, cache, **{"teacher.batch_size": 3, "data.seq_len": 64}))
    assert str(info.value) == ("the teacher ran out of memory on cpu with teacher.batch_size=3 blocks of "
                               "data.seq_len=64 tokens: lower teacher.batch_size (or use teacher.device_map=auto)")
    assert not cache.exists()
