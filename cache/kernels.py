"""The reader's inner loops, compiled by numba: a chunk's checksum and byte shuffle, a block's running sums,
vocabulary lookup, canonical order, quantized log-probs and value checks. In numpy each of them is several
passes over a block, each pass a call of its own; here each is one loop (docs/performance.md, "Cache size",
gives the decoding speeds). The tests compare every kernel with an independent statement of what it computes
(numpy, or HDF5's C routine transcribed). numba compiles them on their first call (~5 s on 2 cores) and keeps
the machine code on disk, so that cost is paid once per installation, not once per process."""
from __future__ import annotations

import numba
import numpy as np


def compiled(function):
    """`function` compiled by numba, its machine code kept on disk; where numba finds no writable place for it
    (a read-only install and home directory; NUMBA_CACHE_DIR names one), compiled in each process instead."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:
        return numba.njit(nogil=True)(function)


_SEGMENT = 1 << 16  # Fletcher-32's words between two folds: the int64 sums cannot overflow within one


@compiled
def _fold(total):
    """A sum reduced to [1, 65535] by end-around carry, as HDF5 reduces it (0 stays 0)."""
    return 0 if total == 0 else (total - 1) % 65535 + 1


@compiled
def fletcher32(data):
    """HDF5's Fletcher-32 (H5_checksum_fletcher32) of the uint8 array `data`: over big-endian 16-bit words (an
    odd last byte is the high byte of a last word), sum1 = Σ words and sum2 = Σ of the running sum1, each
    reduced to [1, 65535] by end-around carry (0 only for a sum of 0), returned as sum2 << 16 | sum1. A segment
    of n words adds Σw to sum1 and n·sum1 + Σ (n − j)·w_j to sum2, which vectorises (a running sum does not);
    folding between segments keeps each sum's residue mod 65535 and whether it is 0, all the end result needs."""
    words = data.size // 2
    native = data[:2 * words].view(np.uint16)  # loads of whole words vectorise, bytes one at a time do not
    sum1 = np.int64(0)
    sum2 = np.int64(0)
    start = 0
    while start < words:
        n = min(_SEGMENT, words - start)
        segment = native[start:start + n]
        plain = np.int64(0)
        weighted = np.int64(0)
        for j in range(n):
            swapped = np.int64(segment[j])  # a little-endian load of a big-endian word: swap its bytes
            word = ((swapped & 0xFF) << 8) | (swapped >> 8)
            plain += word
            weighted += (n - j) * word
        sum2 = _fold(sum2 + n * sum1 + weighted)
        sum1 = _fold(sum1 + plain)
        start += n
    if data.size & 1:
        sum1 += np.int64(data[data.size - 1]) << 8
        sum2 += sum1
    return (_fold(sum2) << 16) | _fold(sum1)


@compiled
def unshuffle(planes, out):
    """HDF5's byte shuffle undone into `out` (a contiguous uint8/16/32/64 array of `size` elements): `planes`
    holds the first bytes of all elements, then their second bytes, …; little-endian, as HDF5 writes them here.
    One branch per width, so that each loop vectorises."""
    size = out.size
    flat = out.reshape(-1)
    width = out.itemsize
    if width == 1:
        flat[:] = planes[:size]
    elif width == 2:
        b0, b1 = planes[:size], planes[size:2 * size]
        for i in range(size):
            flat[i] = np.uint16(b0[i]) | (np.uint16(b1[i]) << np.uint16(8))
    elif width == 4:
        b0, b1, b2, b3 = planes[:size], planes[size:2 * size], planes[2 * size:3 * size], planes[3 * size:4 * size]
        for i in range(size):
            flat[i] = (np.uint32(b0[i]) | (np.uint32(b1[i]) << np.uint32(8)) | (np.uint32(b2[i]) << np.uint32(16))
                       | (np.uint32(b3[i]) << np.uint32(24)))
    else:
        for i in range(size):
            value = np.uint64(0)
            for byte in range(width):
                value |= np.uint64(planes[byte * size + i]) << np.uint64(8 * byte)
            flat[i] = value
    return out


@compiled
def running_sums(rows):
    """The running sums of each row of the 2-D integer array `rows`, int64."""
    out = np.empty(rows.shape, np.int64)
    for r in range(rows.shape[0]):
        total = np.int64(0)
        for j in range(rows.shape[1]):
            total += np.int64(rows[r, j])
            out[r, j] = total
    return out


@compiled
def vocabulary_ids(vocab_gaps, index_gaps, ids):
    """Format 3's top-k ids into `ids` ([B, L·k] int32): each block b's ids are vocab[index], where index is
    the running sum of `index_gaps` [B, L, k] within each position and vocab the running sum of `vocab_gaps`
    [B, V] (only up to the largest index: the rest is padding). Sums past int32 wrap, as numpy's astype does.
    Returns -1, or the first block with an index past its V ids (a damaged block)."""
    blocks, length, k = index_gaps.shape
    index = np.empty(length * k, np.int64)
    for b in range(blocks):
        largest = np.int64(-1)
        for t in range(length):
            total = np.int64(0)
            for j in range(k):
                total += np.int64(index_gaps[b, t, j])
                index[t * k + j] = total
            if k > 0:
                largest = max(largest, total)  # gaps are unsigned: a position's last index is its largest
        if largest >= vocab_gaps.shape[1]:
            return b
        vocab = np.empty(largest + 1, np.int64)
        total = np.int64(0)
        for v in range(largest + 1):
            total += np.int64(vocab_gaps[b, v])
            vocab[v] = total
        for i in range(length * k):
            ids[b, i] = vocab[index[i]]
    return -1


@compiled
def order_keys(bits, keys, slot_bits):
    """Sort keys of each row of fp16 log-probs (`bits`: their uint16 bit patterns, [rows, k]) into `keys`:
    |log p|'s 15 bits, then the slot. Sorted ascending, a row's keys give descending log-probs, ties (-0.0 and
    0.0 alike) in slot order."""
    for r in range(bits.shape[0]):
        for j in range(bits.shape[1]):
            keys[r, j] = (np.int64(bits[r, j] & 0x7FFF) << slot_bits) | j


@compiled
def gather_sorted(keys, slot_bits, ids, bits, ids_out, bits_out):
    """Each row of `ids` and `bits` in the order of its sorted `keys` (whose low `slot_bits` are the slots)."""
    mask = (1 << slot_bits) - 1
    for r in range(keys.shape[0]):
        for j in range(keys.shape[1]):
            slot = np.int64(keys[r, j]) & mask
            ids_out[r, j] = ids[r, slot]
            bits_out[r, j] = bits[r, slot]


@compiled
def half_bits(f):
    """The float16 bit pattern of the float32 whose bit pattern is `f`, rounded to nearest, ties to even, as
    numpy's astype rounds (numba has no float16 type): numpy's npy_floatbits_to_halfbits, transcribed. A NaN
    stays a NaN (quiet, as x86's conversion makes it)."""
    sign = (f >> 16) & 0x8000
    exponent = f & 0x7F800000
    significand = f & 0x007FFFFF
    if exponent >= 0x47800000:  # overflow, inf, NaN
        if exponent == 0x7F800000 and significand != 0:
            return sign | 0x7E00 | (significand >> 13)
        return sign | 0x7C00
    if exponent <= 0x38000000:  # a subnormal half, or zero
        if exponent < 0x33000000:
            return sign
        significand = (0x00800000 | significand) >> (113 - (exponent >> 23))
        if (significand & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:  # round up unless a tie to an even result
            significand += 0x1000
        return sign + (significand >> 13)  # a carry into the exponent is right
    return normal_half(f)


@compiled
def normal_half(f):
    """`half_bits` of a float32 whose magnitude is in float16's normal range ([2^-14, 65536): `is_normal_half`):
    the exponent rebased, the rounding added (ties to even: the kept part's lowest bit breaks them), 10 bits of
    the significand kept; a carry into the exponent is right, up to inf. No branch: a loop of these vectorises."""
    magnitude = f & 0x7FFFFFFF
    return ((f >> 16) & 0x8000) | ((magnitude - 0x38000000 + 0xFFF + ((magnitude >> 13) & 1)) >> 13)


@compiled
def is_normal_half(f):
    """Whether the float32 whose bit pattern is `f` rounds to a normal float16 by `normal_half`."""
    return 0x38800000 <= (f & 0x7FFFFFFF) < 0x47800000


@compiled
def sqrt_grid_bits(q, log_scale, table, out):
    """Quantized top-k log-probs as fp16 bit patterns into `out` ([rows, k] uint16): table[q] + c in float32
    (c: the row's `log_scale`), clipped to [-65504, 0] (NaN stays NaN), rounded to fp16. A row's values are
    rounded as normal halves first, branch-free (nearly all are); the rare others are redone by `half_bits`."""
    k = q.shape[1]
    values = np.empty(k, np.float32)
    bits = values.view(np.uint32)
    low, high = np.float32(-65504), np.float32(0)
    for r in range(q.shape[0]):
        scale = log_scale[r]
        for j in range(k):
            value = table[q[r, j]] + scale
            values[j] = low if value < low else (high if value > high else value)
        rare = 0
        for j in range(k):
            f = np.int64(bits[j])
            out[r, j] = normal_half(f)
            rare += not is_normal_half(f)
        if rare:  # subnormal halves, zeros, NaN
            for j in range(k):
                if not is_normal_half(np.int64(bits[j])):
                    out[r, j] = half_bits(np.int64(bits[j]))


@compiled
def value_range(values):
    """(min, max) of a non-empty integer array, in one pass."""
    flat = values.reshape(-1)
    low = high = flat[0]
    for i in range(flat.size):  # index loops and selects: they vectorise (an iterator loop does not)
        value = flat[i]
        low = value if value < low else low
        high = value if value > high else high
    return low, high


@compiled
def positive_or_not_finite(bits):
    """How many of the fp16 values whose bit patterns (as int16) are `bits` are positive, inf or NaN: all but
    +0.0 (0) and the negative finite values ([-32768, -1025])."""
    flat = bits.reshape(-1)
    count = 0
    for i in range(flat.size):  # two counts, not `and`: a branch-free loop vectorises
        count += np.int64(flat[i] > -1025) - np.int64(flat[i] == 0)
    return count
