"""Sample mode: draws from the teacher's distribution, stored as unique ids and counts, reproducible; the
loss built on them is the unbiased estimate (tests/test_losses.py) and refuses what it cannot estimate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache.reader import CacheReader
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from stage1_teacher.targets import block_uniforms, full_targets, inverse_transform, sample_targets, topk_targets
from stage2_student.train import main as train_main
from tests.conftest import tiny_overrides


def uniforms_for(shape: tuple[int, ...], draws: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, draws, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sample_targets_are_unique_ids_with_counts_summing_to_draws():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 46) * 2  # padded: only the first 40 are the vocabulary
    out = sample_targets(logits, 40, temperature=1.0, uniforms=uniforms_for((3, 7), 50, 1))
    ids, counts = out["sample_ids"].long(), out["sample_counts"].long()
    assert ids.shape == counts.shape == (3, 7, 50) and out["sample_counts"].dtype == torch.uint8
    assert (counts.sum(-1) == 50).all()
    assert ((ids == -1) == (counts == 0)).all()  # padding is −1 / 0 together
    assert ids.max() < 40  # never a padded logit
    assert (counts[..., :-1] >= counts[..., 1:]).all()  # most drawn first
    for row_ids, row_counts in zip(ids.view(-1, 50), counts.view(-1, 50)):
        real = row_ids[row_counts > 0]
        assert len(set(real.tolist())) == len(real)  # unique


def frequencies(out: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    freq = torch.zeros(vocab, dtype=torch.float64)
    freq.scatter_add_(0, out["sample_ids"].long().clamp(min=0).view(-1), out["sample_counts"].double().view(-1))
    return freq / freq.sum()


@pytest.mark.slow
def test_sample_frequencies_match_the_tempered_teacher():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(4000, 5).reshape(40, 100, 5)
    for temperature in (1.0, 2.0, 0.5):
        out = sample_targets(logits, 5, temperature, uniforms_for((40, 100), 50, 3))
        expected = torch.softmax(probs.log().double() / temperature, -1)
        torch.testing.assert_close(frequencies(out, 5), expected, atol=3e-3, rtol=0)


@pytest.mark.slow
def test_sampling_covers_the_whole_real_sized_vocabulary_exactly():
    """Qwen2's 151,646 tokens, a flat-tailed distribution: 600 k draws match softmax(logits / T) both on the
    likely ids and on the tail far outside any top-k (nothing is cut), and at a very low temperature the
    draws do not underflow (the row's maximum is subtracted first)."""
    vocab = 151_646
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2.5
    logits[:8] += torch.tensor([9.0, 8.5, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    for temperature in (1.0, 1.5):
        out = sample_targets(logits.expand(1, 120, vocab), vocab, temperature, uniforms_for((1, 120), 5000, 4))
        freq = frequencies(out, vocab)
        expected = torch.softmax(logits.double() / temperature, -1)
        torch.testing.assert_close(freq[:8], expected[:8], atol=2e-3, rtol=0)
        tail = expected.argsort(descending=True)[1000:]  # outside the top 1000 ids
        assert expected[tail].sum() > 0.05  # a real tail to estimate
        assert abs(freq[tail].sum() - expected[tail].sum()) < 2e-3
    cold = sample_targets(logits.view(1, 1, vocab) - 500, vocab, 0.01, uniforms_for((1, 1), 50, 5))
    assert cold["sample_ids"][0, 0, 0] == logits.argmax() and cold["sample_counts"][0, 0, 0] == 50  # always the mode


def test_inverse_transform_agrees_with_one_cumulative_sum_over_everything():
    """The two-level search draws, for every uniform, the id that a search in the cumulative sum over the whole
    row gives: at group boundaries, in the partial last group, with zero weights, and below one group."""
    generator = torch.Generator().manual_seed(6)
    for n in (5, 128, 300, 1000):
        weights = torch.rand(3, n, generator=generator) ** 8
        weights[:, ::7] = 0  # never drawn
        uniforms = torch.rand(3, 2000, generator=generator, dtype=torch.float64)
        cumulative = weights.double().cumsum(-1)
        expected = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)
        drawn = inverse_transform(weights, uniforms)
        assert torch.equal(drawn, expected), n
        assert (weights.gather(-1, drawn) > 0).all()


def test_targets_do_not_depend_on_threads_or_chunking(monkeypatch):
    """Every mode gives the same arrays computed by 1 or 2 threads (a range of positions per thread) and in
    chunks of any size: what a 2-process dump and a 1-process dump compare on."""
    import stage1_teacher.targets as targets

    logits = torch.randn(3, 16, 20_100, generator=torch.Generator().manual_seed(9)) * 3  # 20,000 real ids
    uniforms = block_uniforms(1, 0, 3, 16, 50)

    def all_modes() -> dict[str, torch.Tensor]:
        return {**topk_targets(logits, 20_000, 64), **full_targets(logits, 20_000),
                **sample_targets(logits, 20_000, 1.3, uniforms)}

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        reference = all_modes()
        torch.set_num_threads(1)
        for rows in (1, 5, 48):
            monkeypatch.setattr(targets, "rows_per_chunk", lambda device, vocab, rows=rows: rows)
            assert all(torch.equal(reference[name], value) for name, value in all_modes().items()), rows
    finally:
        torch.set_num_threads(threads)


def test_draws_are_keyed_by_block_not_by_batch_or_stream():
    """A block's draws depend only on cache.seed and its index: the same block in another batch, at another
    position in it (another process, a resumed run) gets the same draws; another seed, other draws."""
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 30) * 2
    whole = sample_targets(logits, 30, 1.0, block_uniforms(7, 10, 4, 6, 50))
    tail = sample_targets(logits[2:], 30, 1.0, block_uniforms(7, 12, 2, 6, 50))
    for name in whole:
        assert torch.equal(whole[name][2:], tail[name])
    other = sample_targets(logits, 30, 1.0, block_uniforms(8, 10, 4, 6, 50))
    assert not torch.equal(whole["sample_ids"], other["sample_ids"])
    assert not torch.equal(block_uniforms(7, 10, 1, 6, 50), block_uniforms(7, 11, 1, 6, 50))


@pytest.fixture(scope="module")
def sample_caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    for name in ("a", "b"):
        dump_main(tiny_overrides(tiny, root / name, **{"cache.mode": "sample", "cache.draws": 50, "cache.seed": 5,
                                                        "train.temperature": 1.0}))  # drawn at train.temperature
    return root


def test_sample_dump_manifest_and_reproducibility(tiny, sample_caches):
    manifest = json.loads((sample_caches / "a" / "manifest.json").read_text())
    assert manifest["mode"] == "sample"
    assert manifest["sample"] == {"draws": 50, "temperature": 1.0, "slots": 50, "seed": 5}
    assert manifest["datasets"]["sample_counts_by_id"]["dtype"] == "uint8"  # format 2's stored counts
    a, b = CacheReader(str(sample_caches / "a")), CacheReader(str(sample_caches / "b"))
    counts = a.read_all("sample_counts").astype(int)
    assert (counts.sum(-1) == 50).all()
    np.testing.assert_array_equal(a.read_all("sample_ids"), b.read_all("sample_ids"))
    np.testing.assert_array_equal(a.read_all("sample_counts"), b.read_all("sample_counts"))


def test_sample_cache_trains_at_its_temperature_and_refuses_others(tiny, sample_caches, tmp_path):
    cache = sample_caches / "a"
    with pytest.raises(UserError, match="sampled at temperature 1.0"):
        train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **{"train.temperature": 2.0,
                                                                            "train.output_dir": tmp_path / "x"})])
    with pytest.raises(UserError, match="only forward_kl"):
        train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **{"train.temperature": 1.0,
                                                                            "train.loss": "jsd",
                                                                            "train.output_dir": tmp_path / "y"})])
    out = tmp_path / "ok"
    train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **{
        "train.temperature": 1.0, "train.max_steps": 2, "train.output_dir": out, "train.log_dir": tmp_path / "l"})])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in lines)
