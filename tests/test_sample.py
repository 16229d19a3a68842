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
from stage1_teacher.targets import sample_targets
from stage2_student.train import main as train_main
from tests.conftest import tiny_overrides


def test_sample_targets_are_unique_ids_with_counts_summing_to_draws():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(3, 7, 40) * 2, dim=-1)
    out = sample_targets(logprobs, draws=50, temperature=1.0, generator=torch.Generator().manual_seed(1))
    ids, counts = out["sample_ids"].long(), out["sample_counts"].long()
    assert ids.shape == counts.shape == (3, 7, 50) and out["sample_counts"].dtype == torch.uint8
    assert (counts.sum(-1) == 50).all()
    assert ((ids == -1) == (counts == 0)).all()  # padding is −1 / 0 together
    assert (counts[..., :-1] >= counts[..., 1:]).all()  # most drawn first
    for row_ids, row_counts in zip(ids.view(-1, 50), counts.view(-1, 50)):
        real = row_ids[row_counts > 0]
        assert len(set(real.tolist())) == len(real)  # unique


def test_sample_frequencies_match_the_tempered_teacher():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logprobs = probs.log().expand(4000, 5).reshape(40, 100, 5)
    for temperature in (1.0, 2.0):
        out = sample_targets(logprobs, 50, temperature, torch.Generator().manual_seed(3))
        freq = torch.zeros(5)
        freq.scatter_add_(0, out["sample_ids"].long().clamp(min=0).view(-1), out["sample_counts"].float().view(-1))
        expected = torch.softmax(probs.log() / temperature, -1)
        torch.testing.assert_close(freq / freq.sum(), expected, atol=3e-3, rtol=0)


def test_sample_targets_reproducible_by_seed():
    logprobs = torch.log_softmax(torch.randn(2, 5, 30), dim=-1)
    a = sample_targets(logprobs, 50, 1.0, torch.Generator().manual_seed(7))
    b = sample_targets(logprobs, 50, 1.0, torch.Generator().manual_seed(7))
    c = sample_targets(logprobs, 50, 1.0, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sample_ids"], c["sample_ids"])


@pytest.fixture(scope="module")
def sample_caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    for name in ("a", "b"):
        dump_main(tiny_overrides(tiny, root / name, **{"cache.mode": "sample", "cache.draws": 50, "cache.seed": 5}))
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
