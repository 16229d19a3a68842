"""A block's chunk of a filtered stored dataset, read straight from the shard file: its bytes in one `pread` at
the offset HDF5 gives when the shard opens, their Fletcher-32 checked, zstd-decompressed, un-shuffled. The same
array as h5py's read through HDF5's filter pipeline (byte shuffle, zstd, fletcher32; tests compare them on
every chunk), without HDF5's fixed cost per chunk (docs/performance.md, "Cache size", times both). The checksum
and the unshuffle are compiled loops (cache/kernels.py). A chunk this cannot read so (another pipeline, a filter
HDF5 skipped, an unwritten chunk) is left to h5py."""
from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import zstandard

from cache import kernels
from cache.manifest import DatasetEntry


class ChunkError(ValueError):
    """A chunk whose bytes are not what was written (a damaged shard); the reader names the shard and block."""


def fletcher32(data: bytes | memoryview) -> int:
    """HDF5's Fletcher-32 (H5_checksum_fletcher32) of `data` (cache/kernels.py computes it)."""
    return int(kernels.fletcher32(np.frombuffer(data, np.uint8)))


_LOCAL = threading.local()  # one zstd decompression context per thread (a context is not thread-safe)


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "dctx"):
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    return _LOCAL.dctx


def unshuffle(data: bytes, dtype: np.dtype, shape: tuple[int, ...], size: int) -> np.ndarray:
    """HDF5's byte shuffle undone: the first bytes of all `size` elements, then their second bytes, … → the
    elements, as a new (writable) array of `shape`."""
    if len(data) != size * dtype.itemsize:  # the kernel reads size · itemsize bytes, unchecked
        raise ValueError(f"{len(data)} shuffled bytes for {size} elements of {dtype.itemsize} bytes")
    out = np.empty(size, f"u{dtype.itemsize}")
    return kernels.unshuffle(np.frombuffer(data, np.uint8), out).view(dtype).reshape(shape)


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
