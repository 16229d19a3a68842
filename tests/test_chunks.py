"""cache/chunks.py: a chunk read straight from the shard file is the array h5py reads through HDF5's filter
pipeline, its checksum is HDF5's Fletcher-32, and a chunk it cannot read so is left to h5py."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from cache.chunks import ChunkFile, chunk_infos, fletcher32, unshuffle
from cache.manifest import load_manifest
from cache.reader import CacheDataError, CacheReader
from tests.test_encoding import CACHES, cache_arrays, read_error, write_cache_of_mode


def reference_fletcher32(data: bytes) -> int:
    """H5_checksum_fletcher32 of HDF5's H5checksum.c, transcribed word by word (its 360-word reductions)."""
    sum1 = sum2 = 0
    words, at = len(data) // 2, 0
    while words:
        run = min(words, 360)
        words -= run
        for _ in range(run):
            sum1 += (data[at] << 8) | data[at + 1]
            at += 2
            sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[at] << 8
        sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


@pytest.mark.parametrize("size", [1, 2, 3, 719, 720, 721, 4097, 70_001])
def test_fletcher32_is_hdf5s(size):
    rng = np.random.default_rng(size)
    for data in (rng.integers(0, 256, size, dtype=np.uint8).tobytes(), b"\xff" * size, b"\x00" * (size - 1) + b"\x01"):
        assert fletcher32(data) == reference_fletcher32(data)
        assert fletcher32(memoryview(data)) == reference_fletcher32(data)


def test_fletcher32_across_segments():
    """Past 2^16 words the kernel folds its sums between segments of 2^16 words: still HDF5's checksum, for
    random bytes and for the largest sums (all bytes 0xFF), an odd last byte included."""
    random = np.random.default_rng(1).integers(0, 256, 2 * (1 << 18) + 3, dtype=np.uint8).tobytes()
    for data in (random, b"\xff" * (2 * (1 << 17) + 1), b"\xff" * (1 << 17)):
        assert fletcher32(data) == reference_fletcher32(data)


@pytest.mark.parametrize("dtype", ["uint8", "<u2", "<f2", "<i4", "<u4", "<f4", "<i8"])
def test_unshuffle_undoes_hdf5s_byte_shuffle(tmp_path, dtype):
    """HDF5 shuffles (h5py, shuffle=True, no compression); the raw chunk unshuffled is the array."""
    values = np.random.default_rng(0).integers(0, 120, (1, 7, 5)).astype(dtype)
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        h5.create_dataset("x", data=values, chunks=values.shape, shuffle=True)
        _, raw = h5["x"].id.read_direct_chunk((0, 0, 0))
    array = unshuffle(raw, np.dtype(dtype), (7, 5), 35)
    np.testing.assert_array_equal(array, values[0])
    assert array.dtype == np.dtype(dtype) and array.flags.writeable


@pytest.mark.parametrize("case", list(CACHES))
def test_every_chunk_reads_as_hdf5_reads_it(tmp_path, case):
    """Every stored dataset of every block of a cache of each mode: the direct read equals h5py's (same dtype,
    shape, bits), and HDF5's own checksum matched ours on the way; only the unfiltered full log-probs are left
    to h5py."""
    mode, quantize, tail_draws = CACHES[case]
    write_cache_of_mode(tmp_path / "cache", mode, cache_arrays(mode, tail_draws=tail_draws), quantize, tail_draws)
    shard = tmp_path / "cache" / "shard-00000.h5"
    datasets = load_manifest(str(tmp_path / "cache")).datasets
    with h5py.File(shard, "r") as h5:
        chunks = ChunkFile(str(shard), h5, datasets)
        try:
            for name in datasets:
                for row in range(h5[name].shape[0]):
                    direct = chunks.read(name, row)
                    if name == "logprobs":
                        assert direct is None
                        continue
                    expected = h5[name][row]
                    assert direct.dtype == expected.dtype and direct.shape == expected.shape, name
                    assert direct.flags.writeable, name  # as h5py's: consumers may write into a block
                    assert direct.tobytes() == expected.tobytes(), name
        finally:
            chunks.close()


def test_a_chunk_past_the_end_of_the_file_is_one_line(tmp_path):
    """A shard cut short after it was opened (the reader keeps the chunk offsets of the opening): one line."""
    cache_dir = tmp_path / "cache"
    write_cache_of_mode(cache_dir, "topk", cache_arrays("topk"))
    shard = cache_dir / "shard-00000.h5"
    reader = CacheReader(str(cache_dir))
    try:
        reader.block(0)
        with h5py.File(shard, "r") as h5:
            end = h5["topk_logprobs_by_id"].id.get_chunk_info_by_coord((1, 0, 0)).byte_offset + 8
        with open(shard, "r+b") as fh:
            fh.truncate(end)
        with pytest.raises(CacheDataError) as info:
            reader.block(1)
        assert str(info.value) == (f"{cache_dir}: shard-00000.h5 block 1: topk_logprobs_by_id: its chunk ends past the "
                                   "end of the file (truncated?)")
    finally:
        reader.close()
    assert read_error(cache_dir, 1).startswith(f"{cache_dir}: shard-00000.h5")  # and so when it opens so


def test_chunk_infos_without_chunk_iter(tmp_path):
    """h5py built on an HDF5 before 1.14 has no chunk_iter: the chunks listed one by one are the same."""
    write_cache_of_mode(tmp_path / "cache", "topk", cache_arrays("topk"))

    class WithoutChunkIter:  # such an h5py's DatasetID
        def __init__(self, dataset_id) -> None:
            self.get_num_chunks, self.get_chunk_info = dataset_id.get_num_chunks, dataset_id.get_chunk_info

    with h5py.File(tmp_path / "cache" / "shard-00000.h5", "r") as h5:
        for name in h5:
            listed = chunk_infos(WithoutChunkIter(h5[name].id))
            assert len(listed) == h5[name].shape[0] and listed == chunk_infos(h5[name].id), name
