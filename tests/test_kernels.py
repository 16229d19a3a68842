"""cache/kernels.py: each compiled loop gives what a plain numpy statement of it gives (Fletcher-32 and the
byte shuffle are checked against HDF5 in tests/test_chunks.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cache import kernels
from cache.encoding import DecodeError, canonical_topk, running_sums, sqrt_grid_logprobs, vocabulary_ids
from tests.test_cache import canonical_topk as reference_canonical_topk


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int32", "int64"])
def test_running_sums_are_cumsum(dtype):
    values = np.random.default_rng(0).integers(0, 120, (3, 5, 7)).astype(dtype)
    got = running_sums(values)
    np.testing.assert_array_equal(got, np.cumsum(values.astype(np.int64), axis=-1))
    assert got.dtype == np.int64
    assert running_sums(values[:, :, ::2]).tolist() == np.cumsum(values[:, :, ::2], -1).tolist()  # not contiguous
    assert running_sums(np.zeros((2, 0), np.uint16)).shape == (2, 0)
    top = np.full((2, 9), np.iinfo(dtype).max, dtype)  # sums past the dtype's range: exact in int64
    np.testing.assert_array_equal(running_sums(top), np.cumsum(top.astype(np.int64), axis=-1))


def reference_vocabulary_ids(vocab_gaps: np.ndarray, index_gaps: np.ndarray) -> np.ndarray:
    """Per block: the vocabulary's running sums (all of them), indexed by each position's index running sums."""
    vocab = np.cumsum(vocab_gaps.astype(np.int64), axis=-1)
    index = np.cumsum(index_gaps.astype(np.int64), axis=-1)
    return np.stack([vocab[b][index[b]] for b in range(len(vocab))]).astype(np.int32)


def test_vocabulary_ids_index_the_block_vocabulary():
    rng = np.random.default_rng(2)
    blocks, length, k, slots = 3, 9, 5, 45
    vocab_gaps = np.zeros((blocks, slots), np.uint32)
    index_gaps = np.zeros((blocks, length, k), np.uint16)
    for b, used in enumerate((45, 17, 1)):  # every slot used, some, one
        vocab_gaps[b, :used] = rng.integers(1, 4000, used)
        index = np.sort(rng.integers(0, used, (length, k)), axis=-1)
        index_gaps[b] = np.diff(index, axis=-1, prepend=0)
    np.testing.assert_array_equal(vocabulary_ids(vocab_gaps, index_gaps),
                                  reference_vocabulary_ids(vocab_gaps, index_gaps))
    np.testing.assert_array_equal(vocabulary_ids(vocab_gaps[1], index_gaps[1]),  # one block, no leading axis
                                  reference_vocabulary_ids(vocab_gaps[1:2], index_gaps[1:2])[0])
    huge = vocab_gaps.copy()
    huge[0, :3] = 2**31  # a damaged gap: the sums wrap as numpy's astype wraps them, for the range check to see
    np.testing.assert_array_equal(vocabulary_ids(huge, index_gaps), reference_vocabulary_ids(huge, index_gaps))
    past = index_gaps.copy()
    past[2, 4, 0] = slots  # an index past the block's ids
    with pytest.raises(DecodeError, match=f"^index_gaps: an index past the block's {slots} ids$"):
        vocabulary_ids(vocab_gaps, past)


@pytest.mark.parametrize("k", [1, 2, 64, (1 << 17) + 3])  # the last needs 64-bit sort keys
def test_canonical_topk_is_the_formats_order(k):
    rng = np.random.default_rng(k)
    rows = max(1, 4096 // k)
    ids = np.sort(rng.choice(1 << 20, (rows, k)), axis=-1).astype(np.int32)
    logprobs = (-rng.integers(0, 40, (rows, k)) / 4).astype(np.float16)  # many ties
    logprobs[0, : (k + 1) // 2] = -0.0  # -0.0 ties with 0.0
    logprobs[-1, k // 2:] = 0.0
    got_ids, got = canonical_topk(ids, logprobs)
    want_ids, want = reference_canonical_topk(ids, logprobs)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))  # the bits: -0.0 stays -0.0
    assert got.dtype == np.float16 and got_ids.dtype == np.int32


def test_half_bits_round_as_numpy():
    """float32 → float16 bit patterns: every rounding case of every 19-bit prefix (sign, exponent, 10 bits),
    ties to even among them, and random patterns, as numpy's astype gives them; a NaN stays a NaN."""
    rng = np.random.default_rng(3)
    prefixes = np.arange(1 << 19, dtype=np.uint32) << np.uint32(13)
    tails = np.array([0, 1, 0x7FF, 0x800, 0xFFF, 0x1000, 0x1001, 0x1800, 0x1FFF, *rng.integers(0, 1 << 13, 3)],
                     np.uint32)
    bits = np.concatenate([(prefixes[:, None] | tails).ravel(),
                           rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)])
    got = np.array(list(map(kernels.half_bits, bits[:64].astype(np.int64))), np.uint16)  # the scalar kernel
    with np.errstate(over="ignore"):
        want = bits.view(np.float32).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got, want[:64])
    # the array route: sqrt_grid_bits with a table that is the values themselves and a log-scale of -0.0, which
    # adds nothing, -0.0 included (values past [-65504, 0] are clipped there first: only those inside compared)
    values = bits.view(np.float32)
    inside = (values >= -65504) & (values <= 0) | np.isnan(values)
    table = values[inside]
    q = np.arange(table.size, dtype=np.int64)
    out = np.empty((1, table.size), np.uint16)
    kernels.sqrt_grid_bits(q[None], np.full(1, -0.0, np.float32), table, out)
    nan = np.isnan(table)
    np.testing.assert_array_equal(out[0][~nan], want[inside][~nan])
    assert np.isnan(out[0][nan].view(np.float16)).all() and nan.any()


def test_sqrt_grid_logprobs_as_numpy_computes_them():
    """table[q] + c in float32, clipped to [-65504, 0], as fp16: numpy's steps, for every grid and for
    log-scales past fp16's range, infinite or NaN."""
    rng = np.random.default_rng(4)
    q = rng.integers(0, 1 << 16, (300, 64)).astype(np.uint16)
    c = np.concatenate([rng.normal(0, 30, 288), [np.inf, -np.inf, np.nan, 1e30, -1e30, 0, -0.0, 7e4, -7e4, 5, -5,
                                                 1e-40]]).astype(np.float32)
    for grid in (1, 255, 4096):
        table = 2 * np.log(np.maximum(np.arange(1 << 16, dtype=np.float32), np.float32(0.25)) / np.float32(grid))
        value = table[q] + c[:, None]
        want = np.clip(value, np.float32(-65504), np.float32(0)).astype(np.float16)
        got = sqrt_grid_logprobs(q, c, grid)
        nan = np.isnan(want)
        np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
        assert np.isnan(got[nan]).all() and nan.any()


@pytest.mark.parametrize("dtype", ["int16", "int32", "uint16", "int64"])
def test_value_range_is_min_and_max(dtype):
    values = np.random.default_rng(5).integers(-300 if dtype[0] == "i" else 0, 300, (7, 11)).astype(dtype)
    assert kernels.value_range(values) == (values.min(), values.max())
    assert kernels.value_range(values[3:4, 5:6].copy()) == (values[3, 5], values[3, 5])


def test_positive_or_not_finite_counts_what_no_log_prob_is():
    every = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)  # every fp16 bit pattern
    values = every.view(np.float16).astype(np.float32)
    assert kernels.positive_or_not_finite(every) == np.count_nonzero(~(np.isfinite(values) & (values <= 0)))
    assert kernels.positive_or_not_finite(np.array([0, -1025, -32768], np.int16)) == 0  # +0.0, -inf's neighbour
