"""The encodings of formats 3 (written) and 2 (still read): every one round-trips (lossless ones bit-exact,
the quantized ones within their bound with the mass kept) on random and adversarial data; the numpy decoder of
docs/cache-format.md agrees with the reader; the reader hands out no damaged block (one line naming the shard
and block), and stage one prints the bytes per token."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.encoding import GRID_LADDER, DecodeError, decode, decode_draws, encode, stored_datasets
from cache.format import FORMAT_VERSION, SCALED_GRID, SQRT_GRID, STORED_SCHEMES
from cache.manifest import SampleEntry
from cache.reader import CacheDataError, CacheReader, block_problem, verify_cache
from cache.writer import CacheLayout, CacheWriter
from common.cli import UserError
from tests.conftest import run_cli
from tests.test_cache import call_with_timeout, canonical_topk, manifest_for

REPO = Path(__file__).resolve().parents[1]
QWEN2_VOCAB = 151_646  # ids ≥ 131,072 need 18 bits: the ones a 17-bit format corrupts
FP16_MIN = np.float16(-65504.0)


# --- data: random and adversarial --------------------------------------------------------------------------

def topk_case(rng, n: int, length: int, k: int, vocab: int, kind: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """[n, L, k] distinct ids and fp16 log-probs, in the canonical order."""
    ids = np.argsort(rng.random((n, length, vocab)), axis=-1)[..., :k] if vocab <= 4096 else \
        np.stack([rng.choice(vocab, k, replace=False) for _ in range(n * length)]).reshape(n, length, k)
    ids = ids.astype(np.int32)
    if kind == "random":  # log-softmax of Zipf-like logits
        logits = rng.standard_normal((n, length, k)) * 2 - np.log1p(np.arange(k)) * rng.uniform(0.2, 3, (n, length, 1))
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True) * rng.uniform(1, 3, (n, length, 1)))
    elif kind == "flat":  # an unsure teacher: the k ids hold a tiny share of the mass
        logprobs = -np.log(QWEN2_VOCAB) + rng.standard_normal((n, length, k)) * 0.5
    elif kind == "adversarial":
        logprobs = -rng.exponential(4, (n, length, k))
        logprobs[:, 0] = np.where(np.arange(k) == 0, 0.0, FP16_MIN)  # one-hot, the rest underflowed in fp16
        logprobs[:, 1] = -np.log(k)  # uniform: every id ties
        logprobs[:, 2, :2] = [-0.0, 0.0]  # -0.0 and 0.0 are the same value: they tie
        logprobs[:, 3] = -(1e4 + rng.random(k))  # very negative, distinct in fp32, ties in fp16
        ids[:, 4] = np.r_[0, rng.choice(np.arange(1, vocab - 1), k - 2, replace=False), vocab - 1]  # first, last
        ids[:, 5] = vocab - 1 - np.arange(k)  # the top of the vocabulary
    else:
        raise ValueError(kind)
    return canonical_topk(ids, np.maximum(logprobs, FP16_MIN).astype(np.float16))


def sample_case(rng, n: int, length: int, draws: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, L, m=draws] unique drawn ids, most drawn first (ties by id), −1/0 padded: computed without the
    project's code, from draws out of small id pools (many ties), one id only, or every draw distinct."""
    ids = np.full((n, length, draws), -1, np.int32)
    counts = np.zeros((n, length, draws), np.uint8 if draws < 256 else np.uint16)
    for b in range(n):
        for t in range(length):
            kind = (b * length + t) % 4
            if kind == 0:
                drawn = np.full(draws, rng.integers(vocab))  # one-hot
            elif kind == 1:
                drawn = rng.choice(vocab, draws, replace=False)  # all distinct
            else:
                pool = np.concatenate([rng.choice(vocab, 8, replace=False), [0, vocab - 1]])
                drawn = rng.choice(pool, draws)
            unique, count = np.unique(drawn, return_counts=True)
            order = np.lexsort((unique, -count))
            ids[b, t, :len(unique)], counts[b, t, :len(unique)] = unique[order], count[order]
    return ids, counts


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == np.float16 else a


def assert_identical(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert got[name].dtype == values.dtype and got[name].shape == values.shape, name
        np.testing.assert_array_equal(bits(got[name]), bits(values), err_msg=name)


# --- round trips --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("kind, vocab, k", [("random", QWEN2_VOCAB, 64), ("adversarial", QWEN2_VOCAB, 64),
                                           ("random", 50, 50), ("adversarial", 50, 50), ("random", 3, 1)])
def test_topk_lossless_is_bit_exact(kind, vocab, k, version):
    rng = np.random.default_rng(k)
    ids, logprobs = topk_case(rng, 3, 8, k, vocab, kind)
    arrays = {"input_ids": rng.integers(0, vocab, (3, 8), dtype=np.int32), "topk_ids": ids, "topk_logprobs": logprobs}
    datasets = stored_datasets("topk", 8, vocab, k, 1, version=version)
    stored = encode(datasets, arrays)
    if version == 2:
        assert stored["topk_id_gaps"].dtype == np.uint32 and (stored["topk_id_gaps"][..., 1:] > 0).all()  # ascending
    else:  # each block's distinct ids once, ascending; each position's indices into them ascending
        for b in range(3):
            distinct = np.unique(ids[b])
            np.testing.assert_array_equal(np.cumsum(stored["topk_vocab_gaps"][b][:distinct.size]), distinct)
            assert not stored["topk_vocab_gaps"][b][distinct.size:].any()
            np.testing.assert_array_equal(np.cumsum(stored["topk_index_gaps"][b], -1),
                                          np.sort(np.searchsorted(distinct, ids[b]), -1))
        assert stored["topk_index_gaps"].dtype == np.uint16
    assert_identical(decode(datasets, stored), arrays)  # n blocks at once
    assert_identical(decode(datasets, {name: a[1] for name, a in stored.items()}),
                     {name: a[1] for name, a in arrays.items()})  # one block
    # any order of the k ids in, the canonical order out
    shuffle = rng.permuted(np.broadcast_to(np.arange(k), ids.shape), axis=-1)
    scrambled = dict(arrays, topk_ids=np.take_along_axis(ids, shuffle, -1),
                     topk_logprobs=np.take_along_axis(logprobs, shuffle, -1))
    assert_identical(decode(datasets, encode(datasets, scrambled)), arrays)


def test_topk_ids_near_the_top_of_the_vocabulary_survive():
    """The 17-bit bug: every id ≥ 131,072 must come back as itself."""
    rng = np.random.default_rng(1)
    ids = (QWEN2_VOCAB - 1 - np.arange(64 * 16)).reshape(1, 16, 64).astype(np.int32)  # 150,622 … 151,645
    logprobs = -np.sort(rng.exponential(3, (1, 16, 64)), -1).astype(np.float16)
    ids, logprobs = canonical_topk(ids, logprobs)
    datasets = stored_datasets("topk", 16, QWEN2_VOCAB, 64, 1)
    decoded = decode(datasets, encode(datasets, {"input_ids": ids[..., 0], "topk_ids": ids, "topk_logprobs": logprobs}))
    np.testing.assert_array_equal(decoded["topk_ids"], ids)
    assert decoded["topk_ids"].max() == QWEN2_VOCAB - 1 and decoded["topk_ids"].min() >= 131_072


def test_topk_with_k_equal_to_the_vocabulary():
    rng = np.random.default_rng(2)
    vocab = 300
    logits = rng.standard_normal((2, 4, vocab)) * 3
    logprobs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float16)
    ids, logprobs = canonical_topk(np.broadcast_to(np.arange(vocab, dtype=np.int32), logprobs.shape).copy(), logprobs)
    for quantize, version in ((False, 3), (True, 3), (False, 2), (True, 2)):
        datasets = stored_datasets("topk", 4, vocab, vocab, 1, quantize, version=version)
        stored = encode(datasets, {"input_ids": ids[..., 0], "topk_ids": ids, "topk_logprobs": logprobs})
        if version == 2:
            np.testing.assert_array_equal(stored["topk_id_gaps"][..., 1:], 1)  # every id: gaps of one
        else:  # the block's ids are the whole vocabulary, and so are each position's indices
            np.testing.assert_array_equal(stored["topk_vocab_gaps"][:, 1:vocab], 1)
            np.testing.assert_array_equal(stored["topk_index_gaps"][..., 1:], 1)
        decoded = decode(datasets, stored)
        if not quantize:
            np.testing.assert_array_equal(bits(decoded["topk_logprobs"]), bits(logprobs))
        np.testing.assert_array_equal(np.sort(decoded["topk_ids"], -1), np.sort(ids, -1))


def quantized(ids: np.ndarray, logprobs: np.ndarray, version: int = FORMAT_VERSION,
              **budget: float) -> dict[str, np.ndarray]:
    datasets = stored_datasets("topk", ids.shape[1], QWEN2_VOCAB, ids.shape[2], 1, quantize=True, version=version,
                               **budget)
    assert datasets["topk_sqrtp_by_id"].grid == (SQRT_GRID if version == 2 else SCALED_GRID)
    return decode(datasets, encode(datasets, {"input_ids": ids[..., 0], "topk_ids": ids, "topk_logprobs": logprobs}))


def matched(ids, logprobs, decoded) -> tuple[np.ndarray, np.ndarray]:
    """The given and the decoded probabilities [..., k] (float64), each position's ids in ascending order."""
    p = np.take_along_axis(np.exp(logprobs.astype(np.float64)), np.argsort(ids, -1), -1)
    got_ids, got = decoded["topk_ids"], decoded["topk_logprobs"]
    return p, np.take_along_axis(np.exp(got.astype(np.float64)), np.argsort(got_ids, -1), -1)


def kl_renormalised(p: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    """Per position; 0 where every given probability underflowed (nothing to keep)."""
    s, s_hat = np.maximum(p.sum(-1, keepdims=True), 1e-300), np.maximum(p_hat.sum(-1, keepdims=True), 1e-300)
    log_ratio = np.log(np.maximum(p, 1e-300) / s) - np.log(np.maximum(p_hat, 1e-300) / s_hat)
    return (p / s * log_ratio).sum(-1)


@pytest.mark.parametrize("max_dp, max_kl", [(4e-3, 1e-5), (1e-3, 1e-6), (2e-2, 1e-3)])
@pytest.mark.parametrize("kind", ["random", "flat", "adversarial"])
def test_topk_quantized_spends_its_budget_and_no_more(kind, max_dp, max_kl):
    """Format 3: every position within cache.max_dp and cache.max_kl, on the coarsest grid of the ladder that is:
    the next coarser grid, quantised here without the project's code, misses the budget."""
    rng = np.random.default_rng(4)
    ids, logprobs = topk_case(rng, 2, 32, 64, QWEN2_VOCAB, kind)
    decoded = quantized(ids, logprobs, max_dp=max_dp, max_kl=max_kl)
    np.testing.assert_array_equal(np.sort(decoded["topk_ids"], -1), np.sort(ids, -1))
    p, p_hat = matched(ids, logprobs, decoded)
    assert np.abs(p_hat - p).max() <= max_dp and kl_renormalised(p, p_hat).max() <= max_kl
    mass = p.sum(-1)  # kept, to fp16's rounding of each log p̂ (adversarial rows hold up to 17, not 1)
    assert (np.abs(p_hat.sum(-1) - mass) <= 2e-3 * np.maximum(mass, 1)).all()
    # the grid each position used: its most likely id has q = round(grid)
    datasets = stored_datasets("topk", 32, QWEN2_VOCAB, 64, 1, quantize=True, max_dp=max_dp, max_kl=max_kl)
    stored = encode(datasets, {"input_ids": ids[..., 0], "topk_ids": ids, "topk_logprobs": logprobs})
    rung = np.searchsorted(np.rint(GRID_LADDER), stored["topk_sqrtp_by_id"].max(-1))
    assert (np.rint(GRID_LADDER)[np.minimum(rung, len(GRID_LADDER) - 1)] == stored["topk_sqrtp_by_id"].max(-1)).all()
    coarser = rung > 0
    assert coarser.any()
    lp = np.take_along_axis(logprobs.astype(np.float64), np.argsort(ids, -1), -1)[coarser]
    grid = GRID_LADDER[rung[coarser] - 1][:, None]
    q = np.rint(np.exp((lp - lp.max(-1, keepdims=True)) / 2) * grid)
    approx = np.maximum(q, 0.25) ** 2
    c = np.log(np.exp(lp).sum(-1)) - np.log(approx.sum(-1))
    p_coarse = np.exp(np.clip(np.log(approx) + c[:, None], -65504, 0).astype(np.float32).astype(np.float16)
                      .astype(np.float64))
    p_fine = np.exp(lp)
    misses = (np.abs(p_coarse - p_fine).max(-1) > max_dp) | (kl_renormalised(p_fine, p_coarse) > max_kl)
    assert misses.mean() > 0.97, misses.mean()  # (fp32 rounding may decide a position at the very edge)


@pytest.mark.parametrize("kind", ["random", "flat", "adversarial"])
def test_topk_quantized_within_its_bound_mass_kept(kind):
    """Format 2's fixed grid of 1/1024, still read."""
    rng = np.random.default_rng(3)
    ids, logprobs = topk_case(rng, 4, 32, 64, QWEN2_VOCAB, kind)
    decoded = quantized(ids, logprobs, version=2)
    got_ids, got = decoded["topk_ids"], decoded["topk_logprobs"]
    assert got.dtype == np.float16 and got_ids.dtype == np.int32
    assert np.isfinite(got.astype(np.float32)).all() and (got <= 0).all()
    # the canonical order of the decoded values, and the same ids per position
    np.testing.assert_array_equal(canonical_topk(got_ids, got)[0], got_ids)
    np.testing.assert_array_equal(np.sort(got_ids, -1), np.sort(ids, -1))
    # each id's probability, matched by id
    p = np.exp(logprobs.astype(np.float64))
    order = np.argsort(got_ids, -1)
    p_hat = np.take_along_axis(np.exp(got.astype(np.float64)), order, -1)
    p = np.take_along_axis(p, np.argsort(ids, -1), -1)
    # √(p/p_max) on a grid of 1/1024: |Δp| ≤ p_max (2√(p/p_max)·½ + ¼/1024)/1024; the mass correction scales
    # every p̂ by at most 1 + Σ those / Σp; the fp16 rounding of log p̂ adds |log p̂|·2^-11 relative
    top = p.max(-1, keepdims=True)
    grid = (np.sqrt(p * top) + top / 4 / SQRT_GRID) / SQRT_GRID
    mass = p.sum(-1, keepdims=True)  # 0 where every log-prob underflowed: then every p̂ must be 0 too
    scale = np.divide(grid.sum(-1, keepdims=True), mass, out=np.zeros_like(mass), where=mass > 0)
    grid = np.where(mass > 0, grid, 0)
    fp16 = p_hat * np.abs(np.log(np.maximum(p_hat, 1e-300))) * 2.0 ** -11
    bound = grid * (1 + scale) + p * scale + fp16 + 1e-9
    assert (np.abs(p_hat - p) <= bound).all(), np.abs(p_hat - p).max()
    assert np.abs(p_hat - p).max() <= 1 / SQRT_GRID + 5e-4
    # the mass of the k ids (1 − the tail bucket) is the teacher's, to the fp16 rounding of each log p̂
    mass_error = np.abs(p_hat.sum(-1) - p.sum(-1))
    assert (mass_error <= fp16.sum(-1) + 1e-6).all(), mass_error.max()
    if kind != "adversarial":  # KL of the renormalised top-k ≈ Σ 2 p_max E[(Δ√(p/p_max))²] / Σp ≤ k / (6 grid²)
        s, s_hat = p.sum(-1, keepdims=True), p_hat.sum(-1, keepdims=True)
        kl = (p / s * (np.log(p / s) - np.log(p_hat / s_hat))).sum(-1)
        expected = 64 / (6 * SQRT_GRID**2) * (top / s)[..., 0]
        assert kl.mean() <= 1.2 * expected.mean() <= 1.2e-5, (kl.mean(), expected.mean())


@pytest.mark.parametrize("version", [3, 2])
def test_quantized_one_hot_and_underflow(version):
    ids = np.array([[[7, 3, 151_645, 0]]], np.int32)
    logprobs = np.array([[[0.0, FP16_MIN, FP16_MIN, -30.0]]], np.float16)
    decoded = quantized(*canonical_topk(ids, logprobs), version=version)
    top = -1e-6 if version == 2 else np.log1p(-4e-3)  # format 3: within cache.max_dp's default
    assert decoded["topk_ids"][0, 0, 0] == 7 and top < decoded["topk_logprobs"][0, 0, 0] <= 0
    rest = decoded["topk_logprobs"][0, 0, 1:].astype(np.float64)  # below half a grid step: (¼/grid)² each
    assert np.isfinite(rest).all() and (np.exp(rest) < 1e-4).all() and len(set(rest)) == 1
    np.testing.assert_array_equal(decoded["topk_ids"][0, 0, 1:], [0, 3, 151_645])  # equal values: ascending ids


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("draws", [50, 300])
def test_sample_round_trip_is_bit_exact(draws, version):
    rng = np.random.default_rng(draws)
    ids, counts = sample_case(rng, 3, 12, draws, QWEN2_VOCAB)
    arrays = {"input_ids": rng.integers(0, QWEN2_VOCAB, (3, 12), dtype=np.int32), "sample_ids": ids,
              "sample_counts": counts}
    datasets = stored_datasets("sample", 12, QWEN2_VOCAB, 64, draws, version=version)
    stored = encode(datasets, arrays)
    used = int((counts[0] > 0).sum())
    assert (stored["sample_counts_by_id"][0, :used] > 0).all() and (stored["sample_counts_by_id"][0, used:] == 0).all()
    assert_identical(decode(datasets, stored), arrays)
    assert_identical(decode(datasets, {name: a[2] for name, a in stored.items()}), {n: a[2] for n, a in arrays.items()})


def test_encode_refuses_what_it_cannot_store():
    datasets = stored_datasets("topk", 2, 10, 3, 1)
    good = {"input_ids": np.zeros((1, 2), np.int32), "topk_ids": np.tile(np.arange(3, dtype=np.int32), (1, 2, 1)),
            "topk_logprobs": np.full((1, 2, 3), -1.1, np.float16)}
    with pytest.raises(ValueError, match="below 0"):
        encode(datasets, dict(good, topk_ids=good["topk_ids"] - 1))
    with pytest.raises(ValueError, match="differ in shape"):
        encode(datasets, dict(good, topk_logprobs=np.zeros((1, 2, 4), np.float16)))
    sample = stored_datasets("sample", 1, 10, 3, 4)
    with pytest.raises(ValueError, match="add up to the 4 draws"):
        encode(sample, {"input_ids": np.zeros((1, 1), np.int32), "sample_ids": np.array([[[1, 2, -1, -1]]], np.int32),
                        "sample_counts": np.array([[[2, 1, 0, 0]]], np.uint8)})
    with pytest.raises(UserError, match="cache.quantize applies to topk"):
        stored_datasets("sample", 1, 10, 3, 4, quantize=True)


def test_decode_refuses_packed_counts_no_encoder_writes():
    counts = np.array([2, 2, 1, 3, 0, 0, 0, 0], np.uint8)  # 2 positions × 4 draws: 2+2 | 1+3
    gaps = np.array([5, 1, 9, 2, 0, 0, 0, 0], np.uint32)
    ids, got = decode_draws(gaps, counts, 2)
    np.testing.assert_array_equal(ids, [[5, 6, -1, -1], [11, 9, -1, -1]])
    np.testing.assert_array_equal(got, [[2, 2, 0, 0], [3, 1, 0, 0]])
    vocab_gaps = np.array([2, 1, 2, 7, 0, 0, 0, 0], np.uint32)  # format 3: the block's ids 2, 3, 5, 12
    ids, _ = decode_draws(np.array([1, 1, 0, 3, 0, 0, 0, 0], np.uint16), counts, 2, vocab_gaps)
    np.testing.assert_array_equal(ids, [[3, 5, -1, -1], [12, 2, -1, -1]])
    with pytest.raises(DecodeError, match="index_gaps: an index past the block's 8 ids"):
        decode_draws(np.array([1, 1, 9, 0, 0, 0, 0, 0], np.uint16), counts, 2, vocab_gaps)
    for bad in ([2, 3, 1, 2, 0, 0, 0, 0],  # a position straddles the boundary
                [2, 0, 2, 4, 0, 0, 0, 0],  # a zero among the used entries
                [2, 2, 1, 0, 0, 0, 0, 0],  # too few draws
                [0] * 8):
        with pytest.raises(DecodeError):
            decode_draws(gaps, np.array(bad, np.uint8), 2)


def test_block_problem_names_what_is_wrong():
    ok = {"input_ids": np.array([0, 9], np.int32), "topk_ids": np.array([[9, 0]], np.int32),
          "topk_logprobs": np.array([[-0.0, -3.0]], np.float16)}
    assert block_problem(ok, 10, None) is None
    assert block_problem(dict(ok, topk_ids=np.array([[10, 0]], np.int32)), 10, None) == \
        "topk_ids outside [0, 10) (max 10)"
    assert block_problem(dict(ok, input_ids=np.array([-16776892, 1], np.int32)), 10, None) == \
        "input_ids outside [0, 10) (min -16776892)"
    for bad in (np.inf, -np.inf, np.nan, 0.001, 6e-8):
        values = np.array([[-1.0, bad]], np.float16)
        assert "topk_logprobs not finite and ≤ 0" in block_problem(dict(ok, topk_logprobs=values), 10, None), bad
    sample = {"sample_ids": np.array([[3, 4, -1]], np.int32), "sample_counts": np.array([[2, 1, 0]], np.uint8)}
    assert block_problem(sample, 10, 3) is None
    assert "not -1" in block_problem(dict(sample, sample_ids=np.array([[3, 4, 5]], np.int32)), 10, 3)
    assert "outside" in block_problem(dict(sample, sample_ids=np.array([[3, -1, -1]], np.int32)), 10, 3)
    assert "add up to 4" in block_problem(dict(sample, sample_counts=np.array([[2, 2, 0]], np.uint8)), 10, 3)
    tail = {**ok, "tail_ids": np.array([[3, 4, -1]], np.int32), "tail_counts": np.array([[2, 1, 0]], np.uint8)}
    assert block_problem(tail, 10, None, 3) is None
    assert block_problem(dict(tail, tail_ids=np.array([[3, 12, -1]], np.int32)), 10, None, 3) == \
        "tail_ids outside [0, 10) (max 12)"
    assert block_problem(dict(tail, tail_counts=np.array([[2, 2, 0]], np.uint8)), 10, None, 3) == \
        "tail_counts add up to 4, not the 3 draws"


# --- caches through the writer and the reader ----------------------------------------------------------------

L = 16
FULL_VOCAB = 500  # a full cache stores every log-prob: keep its vocabulary small


def cache_arrays(mode: str, n: int = 5, seed: int = 0, tail_draws: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = FULL_VOCAB if mode == "full" else QWEN2_VOCAB
    arrays = {"input_ids": rng.integers(0, vocab, (n, L), dtype=np.int32)}
    if mode == "topk":
        arrays["topk_ids"], arrays["topk_logprobs"] = topk_case(rng, n, L, 64, vocab, "adversarial")
        if tail_draws:
            arrays["tail_ids"], arrays["tail_counts"] = sample_case(rng, n, L, tail_draws, vocab)
    elif mode == "sample":
        arrays["sample_ids"], arrays["sample_counts"] = sample_case(rng, n, L, 50, vocab)
    else:
        logits = rng.standard_normal((n, L, vocab)) * 4
        arrays["logprobs"] = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float16)
    return arrays


def write_cache_of_mode(cache_dir: Path, mode: str, arrays: dict[str, np.ndarray], quantize: bool = False,
                        tail_draws: int = 0, version: int = FORMAT_VERSION) -> None:
    """A cache of `arrays` in format `version` through the project's writer (2 blocks per shard)."""
    vocab = FULL_VOCAB if mode == "full" else QWEN2_VOCAB
    datasets = stored_datasets(mode, L, vocab, 64, 50, quantize, tail_draws, version=version)
    layout = CacheLayout(mode, len(arrays["input_ids"]), L, datasets, 2)
    manifest = dataclasses.replace(manifest_for(layout), format_version=version, mode=mode, seq_len=L,
                                   vocab_size=vocab,
                                   k=64 if mode == "topk" else None,
                                   sample=SampleEntry(50, 1.0, 50, 0) if mode == "sample" else None,
                                   tail=SampleEntry(tail_draws, 1.0, tail_draws, 0) if tail_draws else None)

    def run():
        writer = CacheWriter(str(cache_dir), layout, queue_size=2)
        writer.put(arrays)
        return writer.finish(manifest)
    call_with_timeout(run)


def readme_decoder():
    """The numpy decoder of docs/cache-format.md, executed as written."""
    readme = (REPO / "docs" / "cache-format.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- BEGIN decode example -->\n```python\n(.*?)```\n<!-- END decode example -->", readme, re.S)
    assert code, "docs/cache-format.md lacks the decode example"
    namespace: dict = {}
    exec(compile(code.group(1), "docs/cache-format.md", "exec"), namespace)
    return namespace["read_block"]


CACHES = {"topk": ("topk", False, 0), "topk quantized": ("topk", True, 0), "sample": ("sample", False, 0),
          "full": ("full", False, 0), "topk + tail": ("topk", False, 32), "topk quantized + tail": ("topk", True, 300)}


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("case", list(CACHES))
def test_cache_round_trip_and_the_readme_decoder(tmp_path, case, version):
    mode, quantize, tail_draws = CACHES[case]
    arrays = cache_arrays(mode, tail_draws=tail_draws)
    cache_dir = tmp_path / "cache"
    write_cache_of_mode(cache_dir, mode, arrays, quantize, tail_draws, version)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    scheme = STORED_SCHEMES[version][mode][int(quantize) + 2 * bool(tail_draws)]
    assert manifest["format_version"] == version and list(manifest["datasets"]) == list(scheme)
    if tail_draws:  # counts in the smallest type that holds the draws
        assert manifest["datasets"]["tail_counts_by_id"]["dtype"] == ("uint8" if tail_draws < 256 else "uint16")
    reader, read_block = CacheReader(str(cache_dir)), readme_decoder()
    try:
        for b in range(len(arrays["input_ids"])):
            block = reader.block(b)
            assert_identical(read_block(str(cache_dir), b), block)  # a third party decodes what we decode
            if not quantize:
                assert_identical(block, {name: a[b] for name, a in arrays.items()})
                continue
            assert_identical({"input_ids": block["input_ids"]}, {"input_ids": arrays["input_ids"][b]})
            np.testing.assert_array_equal(np.sort(block["topk_ids"], -1), np.sort(arrays["topk_ids"][b], -1))
            mass, mass_hat = (np.exp(a.astype(np.float64)).sum(-1) for a in (arrays["topk_logprobs"][b],
                                                                             block["topk_logprobs"]))
            assert np.abs(mass_hat - mass).max() < 2e-3
    finally:
        reader.close()
    assert verify_cache(str(cache_dir), every_block=True) == []


# --- the reader hands out no damaged block ------------------------------------------------------------------

def reseal(cache_dir: Path) -> None:
    """Re-checksum every shard into the manifest: damage the checksums cannot see (made before they were
    taken), so that what is tested is the reader's own checks."""
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = hashlib.sha256((cache_dir / shard["file"]).read_bytes()).hexdigest()
        shard["bytes"] = (cache_dir / shard["file"]).stat().st_size
    path.write_text(json.dumps(manifest))


def read_error(cache_dir: Path, block: int) -> str:
    reader = CacheReader(str(cache_dir))
    try:
        with pytest.raises(CacheDataError) as info:
            reader.block(block)
    finally:
        reader.close()
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def topk_cache(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = cache_arrays("topk")
    write_cache_of_mode(tmp_path / "cache", "topk", arrays)
    return tmp_path / "cache", arrays


def test_a_shard_truncated_to_half_is_one_line(topk_cache):
    cache_dir, arrays = topk_cache
    shard = cache_dir / "shard-00001.h5"  # blocks 2 and 3
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])
    message = read_error(cache_dir, 3)
    assert message.startswith(f"{cache_dir}: shard-00001.h5") and "HDF5" in message, message
    reader = CacheReader(str(cache_dir))  # the other shards still read
    assert_identical(reader.block(4), {name: a[4] for name, a in arrays.items()})
    reader.close()
    problems = verify_cache(str(cache_dir))
    assert problems == [f"shard-00001.h5: truncated ({full // 2} of the {full} bytes the manifest records)"]
    result = run_cli("cache.verify", cache_dir)  # the command says so too
    assert result.returncode == 1 and result.stdout.splitlines() == [f"FAIL {problems[0]}"]
    reseal(cache_dir)
    assert [p.split(":")[0] for p in verify_cache(str(cache_dir))] == ["shard-00001.h5"]


@pytest.mark.parametrize("dataset", ["topk_vocab_gaps", "topk_index_gaps", "topk_logprobs_by_id"])
def test_flipped_bytes_in_a_compressed_chunk_are_one_line(topk_cache, dataset):
    """Every chunk carries a Fletcher-32 checksum, so a flip anywhere in it is a checksum mismatch (without one, a
    flip in a gap's low byte decodes to other ids in range: nothing else could see it): one line naming the shard,
    block and dataset, never a traceback or a block."""
    cache_dir, _ = topk_cache
    shard = cache_dir / "shard-00000.h5"
    with h5py.File(shard, "r") as h5:
        chunk = h5[dataset].id.get_chunk_info_by_coord((1,) + (0,) * (h5[dataset].ndim - 1))  # block 1
    original = shard.read_bytes()
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
        data = bytearray(original)
        for offset in range(4):  # a few bytes, so that the numbers surely change
            data[chunk.byte_offset + int(chunk.size * fraction) + offset] ^= 0xA5
        shard.write_bytes(bytes(data))
        message = read_error(cache_dir, 1)
        assert message == f"{cache_dir}: shard-00000.h5 block 1: {dataset}: chunk checksum mismatch (Fletcher-32)"


@pytest.mark.parametrize("change, named", [
    (lambda h5: h5["topk_vocab_gaps"].__setitem__((1, 5), 0xFF000000), "topk_ids outside [0, 151646) (min "),
    (lambda h5: h5["topk_vocab_gaps"].__setitem__((1, 5), 151_646), "topk_ids outside [0, 151646) (max "),
    (lambda h5: h5["topk_index_gaps"].__setitem__((1, 3, 5), 60_000),
     f"topk_index_gaps: an index past the block's {L * 64} ids"),
    (lambda h5: h5["topk_logprobs_by_id"].__setitem__((1, 2, 7), np.inf), "topk_logprobs not finite and ≤ 0"),
    (lambda h5: h5["topk_logprobs_by_id"].__setitem__((1, 2, 7), np.nan), "topk_logprobs not finite and ≤ 0"),
    (lambda h5: h5["topk_logprobs_by_id"].__setitem__((1, 2, 7), 0.5), "topk_logprobs not finite and ≤ 0"),
    (lambda h5: h5["input_ids"].__setitem__((1, 0), -16776892), "input_ids outside [0, 151646) (min -16776892)"),
])
def test_decoded_values_no_teacher_writes_are_one_line(topk_cache, change, named):
    cache_dir, _ = topk_cache
    with h5py.File(cache_dir / "shard-00000.h5", "r+") as h5:
        change(h5)
    reseal(cache_dir)
    assert read_error(cache_dir, 1).startswith(f"{cache_dir}: shard-00000.h5 block 1: {named}")
    assert verify_cache(str(cache_dir)) == []  # stage two's start-up check: checksums and layout, no decoding
    assert verify_cache(str(cache_dir), every_block=True)[0].startswith(f"shard-00000.h5 block 1: {named}")


def test_damaged_sample_blocks_are_one_line(tmp_path):
    cache_dir = tmp_path / "cache"
    write_cache_of_mode(cache_dir, "sample", cache_arrays("sample"))
    with h5py.File(cache_dir / "shard-00001.h5", "r+") as h5:
        counts = h5["sample_counts_by_id"][0]
        counts[3] += 1  # one draw too many: the positions no longer end at multiples of 50
        h5["sample_counts_by_id"][0] = counts
        h5["sample_vocab_gaps"][1, 0] = QWEN2_VOCAB + 5  # the block's smallest id, which some position drew
    reseal(cache_dir)
    assert "sample_counts_by_id: the counts do not add up to 50 draws" in read_error(cache_dir, 2)
    assert "block 3: sample_ids outside [0, 151646) (max " in read_error(cache_dir, 3)


def test_a_stored_dataset_unlike_the_manifest_is_one_line(topk_cache):
    cache_dir, arrays = topk_cache
    with h5py.File(cache_dir / "shard-00002.h5", "r+") as h5:  # block 4: rewritten without its filters
        values = h5["topk_index_gaps"][:]
        del h5["topk_index_gaps"]
        h5.create_dataset("topk_index_gaps", data=values, chunks=(1, L, 64))
    reseal(cache_dir)
    message = read_error(cache_dir, 4)
    assert message.startswith(f"{cache_dir}: shard-00002.h5: topk_index_gaps has filters []"), message
    assert verify_cache(str(cache_dir)) == [message.removeprefix(f"{cache_dir}: ")]


def test_verify_command_names_files_the_manifest_does_not_list(topk_cache):
    cache_dir, _ = topk_cache
    (cache_dir / "notes.txt").write_text("mine")
    (cache_dir / "shard-00009.h5").write_bytes(b"")
    result = run_cli("cache.verify", cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "EXTRA notes.txt: not listed in the manifest", "EXTRA shard-00009.h5: not listed in the manifest",
        f"OK {cache_dir}: topk cache, 5 blocks in 3 shards, checksums match; 2 files the manifest does not list "
        "(EXTRA)"]


def test_verify_command_reports_a_damaged_block(topk_cache):
    cache_dir, _ = topk_cache
    with h5py.File(cache_dir / "shard-00001.h5", "r+") as h5:
        h5["topk_vocab_gaps"][0, 0] = 0xFFFFFFF0  # the block's smallest id, which some position holds
    reseal(cache_dir)
    result = run_cli("cache.verify", cache_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines() == ["FAIL shard-00001.h5 block 2: topk_ids outside [0, 151646) (min -16)"]


# --- through the real entry points on the tiny build -------------------------------------------------------------

def test_stage_one_prints_the_bytes_per_token_of_a_top64_cache(tiny, tmp_path):
    from tests.conftest import run_cli, tiny_overrides

    cache = tmp_path / "cache"
    result = run_cli("stage1_teacher.dump", *tiny_overrides(tiny, cache, **{"cache.k": 64}))
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("[stage1]"))
    printed = float(re.search(r", ([0-9.]+) B/token", line).group(1))
    manifest = json.loads((cache / "manifest.json").read_text())
    on_disk = sum((cache / s["file"]).stat().st_size for s in manifest["shards"])
    assert printed == round(on_disk / (manifest["num_blocks"] * manifest["seq_len"]), 1)
    raw = 4 + 64 * (4 + 2)  # unencoded, per token: an int32 token, k int32 ids and k fp16 log-probs
    assert printed < raw / 2, line


def test_stage_two_stops_at_a_damaged_block_in_one_line(tiny, tmp_path):
    from stage1_teacher.dump import main as dump_main
    from tests.conftest import run_cli, tiny_overrides

    cache = tmp_path / "cache"
    dump_main(tiny_overrides(tiny, cache, **{"cache.mode": "topk"}))
    with h5py.File(cache / "shard-00001.h5", "r+") as h5:  # blocks 5..9
        h5["topk_vocab_gaps"][2, 0] = 0xFF000144  # the block's smallest id
    reseal(cache)
    out = tmp_path / "out"
    result = run_cli("stage2_student.train", "--cache", cache, *tiny_overrides(tiny, cache, **{
        "train.output_dir": out, "train.log_dir": tmp_path / "logs", "train.epochs": 1}))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = re.findall(r"error: .*", result.stderr)  # (tqdm may leave its bar unterminated before it)
    assert errors == [f"error: {cache}: shard-00001.h5 block 7: topk_ids outside [0, 1000) (min -16776892)"], errors


def test_bench_cache_size_smoke(tiny, tmp_path, monkeypatch):
    """bench.cache_size end to end far below --quick: generated text and the tiny tokenizer (never ../shared)."""
    from tests.conftest import run_cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "wiki"
    data.mkdir()
    lines = (tiny / "data" / "wiki.train.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "wiki.valid.raw").write_text("".join(lines[:400]), encoding="utf-8")
    scale = {"teacher": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32,
                         "tie_word_embeddings": True},
             "teacher_steps": 2, "seq_len": 32, "blocks": 6, "full_blocks": 2, "repeats": 1, "unique_ids": 6.0}
    out = tmp_path / "out"
    args = ["--out", out, "--data-dir", data, "--tokenizer", tiny / "teacher", "--scale-json", json.dumps(scale)]
    result = run_cli("bench.cache_size", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    caches = {(c["mode"], c["encoding"]): c for c in summary["caches"]}
    for cache in caches.values():  # bytes per token: the shard files over the manifest's tokens
        manifest = json.loads((Path(cache["dir"]) / "manifest.json").read_text())
        on_disk = sum((Path(cache["dir"]) / s["file"]).stat().st_size for s in manifest["shards"])
        tokens = manifest["num_blocks"] * manifest["seq_len"]
        assert cache["stats"]["bytes_per_token"] == pytest.approx(on_disk / tokens)
        assert cache["stats"]["decode_tok_s"] > 0
    lossless, quantized = caches["top-64", "format 3, lossless"], caches["top-64", "format 3, cache.quantize=true"]
    assert lossless["stats"]["bytes_per_token"] < caches["top-64", "format 1 (reference)"]["stats"]["bytes_per_token"]
    assert 0 < quantized["stats"]["max_dp"] <= 4e-3 and quantized["stats"]["mean_kl"] <= 1e-5  # the default budget
    format_2 = caches["top-64", "format 2 (reference), cache.quantize=true"]
    assert 0 < format_2["stats"]["max_dp"] <= 1 / SQRT_GRID + 5e-4 and format_2["stats"]["mean_kl"] < 1e-4
    assert summary["unique_ids"] == pytest.approx(6.0, abs=2.5)  # the teacher was sharpened to 6 unique ids
    doc = (out / "performance.md").read_text()
    assert "<!-- generated by `python -m bench.cache_size --scale-json" in doc
    assert "| top-64 | format 3, cache.quantize=true |" in doc and "full: alternatives tried" in doc
    assert (out / "cache_size.png").read_bytes()[:4] == b"\x89PNG"
    from bench.cache_size import Scale, build_teacher
    from bench.report import scale_from_json

    smoke = scale_from_json(Scale, json.dumps(scale))
    teacher, info = build_teacher(str(out), str(tiny / "teacher"), str(data), smoke)
    assert Path(teacher).parent == out and info == summary["teacher"]  # reused: its key is the same, not trained again


def test_the_bench_teacher_widened_from_the_ids_the_text_uses():
    """bench.cache_size's teacher: at the ids the text uses it computes the compact model's logits; every other id
    of the tokenizer gets a·(a used id's logit) with a in twin_scale, the same used id at every position."""
    import torch
    from transformers import Qwen2ForCausalLM

    from bench.cache_size import Scale, widen
    from tiny_world.models import ModelShape, model_config

    scale = Scale(teacher=ModelShape(hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                     tie_word_embeddings=True), twin_scale=(0.5, 0.9))
    used = np.array([3, 5, 6, 11, 17, 40])
    torch.manual_seed(0)
    compact = Qwen2ForCausalLM(model_config(scale.teacher, 64, 63)).eval()  # its pad row: past the used ids
    wide = widen(compact, used, tokens=50, padded=64, scale=scale, eos=0).eval()
    inputs = torch.from_numpy(used[[0, 2, 1, 5, 4, 3, 0, 1]])[None]
    with torch.no_grad():
        small = compact(input_ids=torch.from_numpy(np.searchsorted(used, inputs.numpy()))).logits[0, :, : len(used)]
        logits = wide(input_ids=inputs).logits[0]
    assert torch.allclose(logits[:, used], small, atol=1e-5)
    assert torch.equal(logits[:, 50:], torch.zeros(len(inputs[0]), 14))  # padding rows beyond the tokenizer
    for token in sorted(set(range(50)) - set(used.tolist())):
        ratios = logits[:, token, None] / small  # [positions, used]: constant down one column, its twin's
        spread = ratios.max(0).values - ratios.min(0).values
        twin = int(spread.argmin())
        assert spread[twin] < 1e-4 and 0.5 <= ratios[0, twin] <= 0.9


def test_a_sample_manifest_needs_as_many_slots_as_draws(tmp_path):
    from cache.manifest import load_manifest

    cache_dir = tmp_path / "cache"
    write_cache_of_mode(cache_dir, "sample", cache_arrays("sample", n=2))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["sample"]["slots"] = 40
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"field sample.slots: format 3 stores as many slots as draws \(50\), got 40"):
        load_manifest(str(cache_dir))
