"""The sharded HDF5 cache: layout, manifest, reading back, integrity. (Encodings, format 1 and reading with
h5py + numpy alone: tests/test_encoding.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.encoding import stored_datasets
from cache.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from cache.lock import LOCK_FILE
from cache.manifest import DataEntry, Manifest, TeacherEntry, TokenizerEntry, load_manifest
from cache.reader import CacheReader, verify_cache
from cache.writer import CacheLayout, CacheWriter, check_destination
from common.cli import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]

N, L, K, V = 10, 6, 4, 50
SHARD_BLOCKS = 4
PUT_SIZES = (3, 5, 2)


def canonical_topk(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The format's order, computed independently: descending log-prob, ties by ascending id."""
    order = np.lexsort((ids, -logprobs.astype(np.float64)), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)


def make_arrays(seed: int = 0, n: int = N) -> dict[str, np.ndarray]:
    """Top-k blocks as a teacher gives them: k distinct ids per position, in the canonical order."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n, L, V)), axis=-1)[..., :K].astype(np.int32)
    logprobs = (-rng.random((n, L, K)) * 8).astype(np.float16)
    logprobs[..., 1] = logprobs[..., 0]  # ties
    ids, logprobs = canonical_topk(ids, logprobs)
    return {"input_ids": rng.integers(0, V, size=(n, L), dtype=np.int32), "topk_ids": ids, "topk_logprobs": logprobs}


def make_layout(n: int = N) -> CacheLayout:
    return CacheLayout("topk", n, L, stored_datasets("topk", L, V, K, 1), SHARD_BLOCKS)


def manifest_for(layout: CacheLayout) -> Manifest:
    """A manifest without shards for `layout`, as stage one hands it to the writer."""
    return Manifest(format=FORMAT_NAME, format_version=FORMAT_VERSION, mode="topk", num_blocks=layout.num_blocks,
                    seq_len=L, vocab_size=V, value_dtype="float16", values="test values", k=K,
                    datasets=layout.datasets, teacher=TeacherEntry("teacher", "0" * 64, V + 6, "float32"),
                    tokenizer=TokenizerEntry("tok", "1" * 64, V),
                    dataset=DataEntry("data", None, "train", None, None, layout.num_blocks * L, "2" * 64),
                    settings={"note": "test"})


def call_with_timeout(fn, timeout: float = 60.0):
    """Run fn in a thread: a hang fails the test instead of blocking the suite. Returns fn's result or raises."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} did not return within {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def write_cache(final_dir: Path, arrays: dict[str, np.ndarray], sizes=PUT_SIZES, overwrite: bool = False) -> dict:
    def run():
        layout = make_layout(sum(sizes))
        writer = CacheWriter(str(final_dir), layout, overwrite=overwrite, queue_size=2)
        start = 0
        for size in sizes:
            writer.put({name: a[start:start + size] for name, a in arrays.items()})
            start += size
        return writer.finish(manifest_for(layout))
    return call_with_timeout(run)


@pytest.fixture
def written(tmp_path):
    arrays = make_arrays()
    cache_dir = tmp_path / "cache"
    returned = write_cache(cache_dir, arrays)
    return cache_dir, arrays, returned


# --- layout and manifest ------------------------------------------------------------------------------

def test_layout_shard_ranges():
    assert make_layout(10).shard_ranges() == [(0, 4), (4, 4), (8, 2)]
    assert make_layout(8).shard_ranges() == [(0, 4), (4, 4)]
    assert make_layout(3).shard_ranges() == [(0, 3)]


def test_shard_files_and_manifest(written):
    cache_dir, _, returned = written
    files = sorted(os.listdir(cache_dir))
    assert files == [LOCK_FILE, MANIFEST, "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert not os.path.exists(f"{cache_dir}.partial")  # staging moved into place

    with open(cache_dir / MANIFEST) as fh:
        manifest = json.load(fh)
    assert Manifest.from_json(json.dumps(manifest)) == returned
    assert manifest["format"] == FORMAT_NAME == "kd-logit-cache"
    assert manifest["format_version"] == FORMAT_VERSION == 3
    assert manifest["mode"] == "topk"
    assert manifest["num_blocks"] == N
    assert manifest["seq_len"] == L
    assert manifest["vocab_size"] == V and manifest["settings"] == {"note": "test"}  # caller's fields kept
    stored = manifest["datasets"]
    assert list(stored) == ["input_ids", "topk_vocab_gaps", "topk_index_gaps", "topk_logprobs_by_id"]
    assert [(stored[n]["shape_per_block"], stored[n]["dtype"], stored[n]["encoding"]) for n in stored] == [
        ([L], "int32", "raw"), ([L * K], "uint32", "vocab-gaps"), ([L, K], "uint16", "index-gaps"),
        ([L, K], "float16", "by-id")]
    assert all(entry["compression"] == "zstd" for entry in stored.values())

    expected = [("shard-00000.h5", 0, 4), ("shard-00001.h5", 4, 4), ("shard-00002.h5", 8, 2)]
    assert [(s["file"], s["first_block"], s["num_blocks"]) for s in manifest["shards"]] == expected
    for shard in manifest["shards"]:
        data = (cache_dir / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)


def test_reader_returns_what_was_written(written):
    cache_dir, arrays, _ = written
    reader = CacheReader(str(cache_dir))
    try:
        assert len(reader) == N and reader.mode == "topk" and reader.seq_len == L and reader.vocab_size == V
        assert reader.dataset_names == ("input_ids", "topk_ids", "topk_logprobs")
        for i in range(N):
            block = reader.block(i)
            assert set(block) == set(arrays)
            for name, values in arrays.items():
                assert block[name].dtype == values.dtype
                np.testing.assert_array_equal(block[name], values[i])
        np.testing.assert_array_equal(reader.read_all("input_ids"), arrays["input_ids"])
        np.testing.assert_array_equal(reader.read_all("topk_logprobs"), arrays["topk_logprobs"])
        for bad in (-1, N):
            with pytest.raises(IndexError):
                reader.block(bad)
    finally:
        reader.close()


def test_shards_hold_the_manifest_datasets_one_block_per_chunk(written):
    cache_dir, arrays, manifest = written
    for shard in manifest.shards:
        with h5py.File(cache_dir / shard.file, "r") as h5:
            assert int(h5.attrs["first_block"]) == shard.first_block
            assert sorted(h5) == sorted(manifest.datasets)
            for name, entry in manifest.datasets.items():
                dset = h5[name]
                assert dset.shape == (shard.num_blocks, *entry.shape_per_block) and dset.dtype == entry.dtype
                assert dset.chunks == (1, *entry.shape_per_block)  # random access by block
                assert dset.shuffle and "32015" in dset._filters  # byte shuffle, then zstd (hdf5plugin)


@pytest.mark.parametrize("sizes", [(10,), (1,) * 10, (4, 4, 2), (2, 7, 1)])
def test_any_put_sizes_give_the_same_data(tmp_path, sizes):
    arrays = make_arrays(seed=1)
    cache_dir = tmp_path / "c"
    manifest = write_cache(cache_dir, arrays, sizes=sizes)
    assert [s.num_blocks for s in manifest.shards] == [4, 4, 2]
    reader = CacheReader(str(cache_dir))
    for name in arrays:
        np.testing.assert_array_equal(reader.read_all(name), arrays[name])
    reader.close()


# --- verification -------------------------------------------------------------------------------------

def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    position = len(data) - 17  # inside the data, past the superblock
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_cache_whole_then_corrupt(written):
    cache_dir, _, _ = written
    assert verify_cache(str(cache_dir)) == []
    flip_byte(cache_dir / "shard-00001.h5")
    problems = verify_cache(str(cache_dir))
    assert len(problems) == 1 and "shard-00001.h5" in problems[0]


def test_verify_cache_reports_a_missing_shard(written):
    cache_dir, _, _ = written
    (cache_dir / "shard-00002.h5").unlink()
    problems = verify_cache(str(cache_dir))
    assert any("shard-00002.h5" in p for p in problems)


def test_verify_command_exit_status(written):
    cache_dir, _, _ = written
    cmd = [sys.executable, "-m", "cache.verify", str(cache_dir)]
    ok = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    flip_byte(cache_dir / "shard-00000.h5")
    bad = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert "shard-00000.h5" in bad.stdout and "Traceback" not in bad.stderr


# --- integrity: incomplete caches, destinations, failures ---------------------------------------------

def test_directory_without_manifest_is_refused(written):
    cache_dir, _, _ = written
    (cache_dir / MANIFEST).unlink()
    for fn in (CacheReader, load_manifest, verify_cache):
        with pytest.raises(UserError, match="manifest"):
            fn(str(cache_dir))


def test_missing_cache_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="not found"):
        CacheReader(str(tmp_path / "nothing"))


def test_staging_directory_is_refused(tmp_path):
    arrays = make_arrays()
    final = tmp_path / "cache"

    def run():
        writer = CacheWriter(str(final), make_layout(), queue_size=2)
        writer.put({name: a[:5] for name, a in arrays.items()})
        writer.abort()
    call_with_timeout(run)
    staging = Path(f"{final}.partial")
    assert staging.is_dir() and not final.exists()
    assert MANIFEST not in os.listdir(staging)
    with pytest.raises(UserError, match="manifest"):
        CacheReader(str(staging))
    with pytest.raises(UserError, match="manifest"):
        load_manifest(str(staging))


def test_corrupt_manifest_is_a_user_error(written):
    cache_dir, _, _ = written
    (cache_dir / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        load_manifest(str(cache_dir))
    (cache_dir / MANIFEST).write_text(json.dumps({"format": "something-else", "format_version": 1}))
    with pytest.raises(UserError, match=FORMAT_NAME):
        load_manifest(str(cache_dir))


def test_check_destination(written, tmp_path):
    cache_dir, _, _ = written
    with pytest.raises(UserError, match="overwrite"):
        check_destination(str(cache_dir), overwrite=False)
    check_destination(str(cache_dir), overwrite=True)  # a complete cache may be replaced

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a cache"):
            check_destination(str(other), overwrite=overwrite)
    assert (other / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    check_destination(str(empty), overwrite=False)
    check_destination(str(tmp_path / "absent"), overwrite=False)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError):
        check_destination(str(a_file), overwrite=True)


def test_writer_refuses_existing_cache_without_overwrite(written):
    cache_dir, arrays, _ = written
    before = (cache_dir / MANIFEST).read_text()
    with pytest.raises(UserError):
        CacheWriter(str(cache_dir), make_layout())
    assert (cache_dir / MANIFEST).read_text() == before
    assert not os.path.exists(f"{cache_dir}.partial")


def test_writer_into_an_empty_directory(tmp_path):
    arrays = make_arrays(seed=4)
    cache_dir = tmp_path / "empty"
    cache_dir.mkdir()
    write_cache(cache_dir, arrays)
    assert verify_cache(str(cache_dir)) == []


def test_overwrite_replaces_an_existing_cache(written):
    cache_dir, old_arrays, _ = written
    new_arrays = make_arrays(seed=7, n=5)
    manifest = write_cache(cache_dir, new_arrays, sizes=(5,), overwrite=True)
    assert manifest.num_blocks == 5
    assert sorted(os.listdir(cache_dir)) == [LOCK_FILE, MANIFEST, "shard-00000.h5", "shard-00001.h5"]
    reader = CacheReader(str(cache_dir))
    np.testing.assert_array_equal(reader.read_all("input_ids"), new_arrays["input_ids"])
    reader.close()
    assert verify_cache(str(cache_dir)) == []
    leftovers = [p for p in os.listdir(cache_dir.parent) if p.startswith("cache.")]
    assert leftovers == []  # neither the staging nor the old copy remains


def test_finish_with_too_few_blocks_raises_and_writes_no_manifest(tmp_path):
    arrays = make_arrays()
    final = tmp_path / "cache"

    def run():
        writer = CacheWriter(str(final), make_layout(), queue_size=2)
        writer.put({name: a[:7] for name, a in arrays.items()})
        writer.finish(manifest_for(make_layout()))
    with pytest.raises(ValueError, match="7 of 10"):
        call_with_timeout(run)
    assert not (final / MANIFEST).exists()
    assert not final.exists()
    assert not (Path(f"{final}.partial") / MANIFEST).exists()


def test_put_more_blocks_than_the_layout_raises(tmp_path):
    arrays = make_arrays(n=12)

    def run():
        writer = CacheWriter(str(tmp_path / "c"), make_layout(), queue_size=2)
        try:
            writer.put({name: a[:12] for name, a in arrays.items()})
        finally:
            writer.abort()
    with pytest.raises(ValueError):
        call_with_timeout(run)


def test_put_with_missing_dataset_raises(tmp_path):
    arrays = make_arrays()

    def run():
        writer = CacheWriter(str(tmp_path / "c"), make_layout(), queue_size=2)
        try:
            writer.put({"input_ids": arrays["input_ids"]})
        finally:
            writer.abort()
    with pytest.raises(ValueError):
        call_with_timeout(run)


def test_writer_thread_error_surfaces_in_finish(tmp_path):
    arrays = make_arrays()
    bad = dict(arrays, topk_ids=np.zeros((N, L, K + 3), np.int32))  # wrong shape for the dataset
    final = tmp_path / "cache"

    def run():
        writer = CacheWriter(str(final), make_layout(), queue_size=1)
        writer.put({name: a[:3] for name, a in bad.items()})
        writer.finish(manifest_for(make_layout()))
    with pytest.raises(RuntimeError, match="cache writer failed"):
        call_with_timeout(run, timeout=60)
    assert not final.exists()


def test_writer_thread_error_surfaces_in_put(tmp_path):
    """Keep putting after the thread died: put raises (no hang on the full queue)."""
    arrays = make_arrays(n=40)
    bad = dict(arrays, topk_logprobs=np.zeros((40, L, K + 1), np.float16))

    def run():
        layout = make_layout(40)
        writer = CacheWriter(str(tmp_path / "c"), layout, queue_size=1)
        for start in range(0, 40):
            writer.put({name: a[start:start + 1] for name, a in bad.items()})
        writer.finish(manifest_for(layout))
    with pytest.raises(RuntimeError, match="cache writer failed"):
        call_with_timeout(run, timeout=60)
