"""A block's chunk of a filtered stored dataset, read straight from the shard file: its bytes in one `pread` at
the offset HDF5 gives when the shard opens, their Fletcher-32 checked, zstd-decompressed, un-shuffled. The same
array as h5py's read through HDF5's filter pipeline (byte shuffle, zstd, fletcher32; tests compare them on
every chunk), without HDF5's fixed cost per chunk: blocks of 128 top-64 positions decode 1.45x faster than
through h5py, blocks of 256 1.25x (docs/performance.md, "Cache size"). A chunk this cannot read so (another
pipeline, a filter HDF5 skipped, an unwritten chunk) is left to h5py."""
from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import zstandard

from cache.manifest import DatasetEntry


class ChunkError(ValueError):
    """A chunk whose bytes are not what was written (a damaged shard); the reader names the shard and block."""


# [1, m], [1, m-1], …, [1, 1] for the largest chunk seen, as float64: both of Fletcher-32's sums in one
# matrix-vector product, exact while m · m · 65535 < 2^53 (m ≤ 2^18 words); beyond, int64
_WEIGHTS = np.zeros((0, 2))
_EXACT_WORDS = 1 << 18


def fletcher32(data: bytes | memoryview) -> int:
    """HDF5's Fletcher-32 (H5_checksum_fletcher32) of `data`: over big-endian 16-bit words (an odd last byte is
    the high byte of a last word), sum1 = Σ words and sum2 = Σ of the running sum1, each reduced to
    [1, 65535] by end-around carry (0 only for a sum of 0), returned as sum2 << 16 | sum1."""
    global _WEIGHTS
    words = np.frombuffer(data, ">u2", count=len(data) // 2)
    m = words.size
    if m <= _EXACT_WORDS:
        if m > len(_WEIGHTS):
            size = min(max(m, 2 * len(_WEIGHTS)), _EXACT_WORDS)
            _WEIGHTS = np.stack([np.ones(size), np.arange(size, 0, -1, dtype=np.float64)], axis=1)
        sums = words.astype(np.float64) @ _WEIGHTS[len(_WEIGHTS) - m:]
        sum1, sum2 = int(sums[0]), int(sums[1])
    else:
        wide = words.astype(np.int64)
        sum1, sum2 = int(wide.sum()), int(np.dot(wide, np.arange(m, 0, -1, dtype=np.int64)))
    if len(data) & 1:
        sum1 += data[-1] << 8
        sum2 += sum1
    return (_fold(sum2) << 16) | _fold(sum1)


def _fold(total: int) -> int:
    return 0 if total == 0 else (total - 1) % 65535 + 1


_LOCAL = threading.local()  # one zstd decompression context per thread (a context is not thread-safe)


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "dctx"):
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    return _LOCAL.dctx


def unshuffle(data: bytes, dtype: np.dtype, shape: tuple[int, ...], size: int) -> np.ndarray:
    """HDF5's byte shuffle undone: the first bytes of all `size` elements, then their second bytes, … → the
    elements, as an array of `shape`."""
    planes = np.frombuffer(data, np.uint8)
    if dtype.itemsize == 1 or size <= 1:  # HDF5 leaves these as they are; a copy, writable as h5py's arrays are
        return planes.view(dtype).reshape(shape).copy()
    if dtype.itemsize == 2:  # low bytes | high bytes << 8: faster than two strided copies
        out = planes[size:].astype(np.uint16)
        out <<= np.uint16(8)
        out |= planes[:size]
        return out.view(dtype).reshape(shape)
    out = np.empty((size, dtype.itemsize), np.uint8)
    for byte in range(dtype.itemsize):  # strided copies: 5x faster than a transposed copy
        out[:, byte] = planes[byte * size:(byte + 1) * size]
    return out.view(dtype).reshape(shape)


def chunk_infos(dataset_id) -> list:
    """HDF5's StoreInfo (chunk_offset, filter_mask, byte_offset, size) of every written chunk of a dataset."""
    if hasattr(dataset_id, "chunk_iter"):  # h5py on HDF5 1.14+: one call
        infos: list = []
        dataset_id.chunk_iter(infos.append)
        return infos
    return [dataset_id.get_chunk_info(i) for i in range(dataset_id.get_num_chunks())]


class ChunkFile:
    """The chunks of an open shard's stored datasets that can be read directly: byte offset and size per block."""

    def __init__(self, path: str, handle: h5py.File, datasets: dict[str, DatasetEntry]) -> None:
        """`handle`: the shard, its datasets already found as `datasets` say (cache.reader.layout_problem), so
        those the manifest records as zstd-filtered with a checksum have the pipeline read here."""
        self._chunks: dict[str, tuple[np.ndarray, np.ndarray, np.dtype, tuple[int, ...], int]] = {}
        for name, entry in datasets.items():
            dataset = handle[name]
            if entry.compression != "zstd" or not entry.checksum or dataset.chunks != (1, *entry.shape_per_block):
                continue
            offsets = np.full(dataset.shape[0], -1, np.int64)  # -1: left to h5py
            sizes = np.zeros(dataset.shape[0], np.int64)
            for info in chunk_infos(dataset.id):
                if info.filter_mask == 0 and info.byte_offset is not None:
                    offsets[info.chunk_offset[0]], sizes[info.chunk_offset[0]] = info.byte_offset, info.size
            shape = tuple(entry.shape_per_block)
            self._chunks[name] = (offsets, sizes, np.dtype(entry.dtype), shape, int(np.prod(shape)))
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, name: str, row: int) -> np.ndarray | None:
        """Row `row` of dataset `name`, or None where h5py must read it. Raises ChunkError on damage."""
        if name not in self._chunks:
            return None
        offsets, sizes, dtype, shape, elements = self._chunks[name]
        offset, size = int(offsets[row]), int(sizes[row])
        if offset < 0:
            return None
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ChunkError(f"{name}: its chunk ends past the end of the file (truncated?)")
        body = memoryview(data)[:-4]
        if fletcher32(body) != int.from_bytes(data[-4:], "little"):
            raise ChunkError(f"{name}: chunk checksum mismatch (Fletcher-32)")
        expected = elements * dtype.itemsize
        try:
            raw = _decompressor().decompress(body, max_output_size=expected)
        except zstandard.ZstdError as err:
            raise ChunkError(f"{name}: chunk not decompressible ({err})") from None
        if len(raw) != expected:
            raise ChunkError(f"{name}: chunk decompresses to {len(raw)} bytes, not {expected}")
        return unshuffle(raw, dtype, shape, elements)

    def close(self) -> None:
        os.close(self._fd)
