"""Top-k head + sampled tail (`cache.tail_draws`): the draws follow the teacher outside its top k, the target
built on them is an unbiased estimate of the teacher (its forward-KL gradient equals the full distribution's in
expectation, which the tail bucket's does not), and the cache round-trips through stage one and stage two."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cache.reader import CacheReader
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from stage1_teacher.targets import block_uniforms, topk_tail_targets, topk_targets
from stage2_student.losses import KDLoss, TeacherTargets, student_losses
from stage2_student.train import main as train_main
from tests.conftest import REPO, run_cli, tiny_overrides


def uniforms_for(shape: tuple[int, ...], draws: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, draws, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_tail_targets_hold_the_topk_and_draws_outside_it():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 300) * 2  # padded: only the first 290 are the vocabulary
    out = topk_tail_targets(logits, 290, 12, 1.0, uniforms_for((3, 7), 32, 1))
    plain = topk_targets(logits, 290, 12)
    assert torch.equal(out["topk_ids"], plain["topk_ids"]) and torch.equal(out["topk_logprobs"], plain["topk_logprobs"])
    ids, counts = out["tail_ids"].long(), out["tail_counts"].long()
    assert ids.shape == counts.shape == (3, 7, 32) and out["tail_counts"].dtype == torch.uint8
    assert (counts.sum(-1) == 32).all() and ((ids == -1) == (counts == 0)).all()
    assert ids.max() < 290 and (counts[..., :-1] >= counts[..., 1:]).all()
    head = set()
    for row_ids, row_counts, top in zip(ids.view(-1, 32), counts.view(-1, 32), out["topk_ids"].view(-1, 12)):
        drawn = row_ids[row_counts > 0].tolist()
        head = set(top.tolist())
        assert len(set(drawn)) == len(drawn) and not head & set(drawn)  # unique, never a top-k id
    # at T ≠ 1 the top-k log-probs are the tempered teacher's (same ids: the order of the logits)
    warm = topk_tail_targets(logits, 290, 12, 2.0, uniforms_for((3, 7), 32, 1))
    assert torch.equal(warm["topk_ids"], plain["topk_ids"])
    expected = torch.log_softmax(logits[..., :290] / 2.0, -1).gather(-1, plain["topk_ids"].long())
    torch.testing.assert_close(warm["topk_logprobs"].float(), expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_frequencies_match_the_teacher_outside_its_topk(temperature):
    """z-test per tail id: over N draws the frequency of id i is binomial with π_i = p_i / r (p at the sample
    temperature, r its mass outside the top k); every |z| < 4.5 (a 1-in-150,000 event per id under the null, 60
    ids), and the bucket's own target, the tail's mass on the head ids, stays 0."""
    vocab, k = 80, 20
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    positions, draws = 400, 50
    out = topk_tail_targets(logits.expand(1, positions, vocab), vocab, k, temperature,
                            uniforms_for((1, positions), draws, 4))
    freq = torch.zeros(vocab, dtype=torch.float64)
    freq.scatter_add_(0, out["tail_ids"].long().clamp(min=0).view(-1), out["tail_counts"].double().view(-1))
    n = positions * draws
    p = torch.softmax(logits.double() / temperature, -1)
    top = torch.topk(p, k).indices
    tail = torch.ones(vocab, dtype=torch.bool)
    tail[top] = False
    pi = torch.where(tail, p, 0.0) / p[tail].sum()
    assert freq[top].sum() == 0
    se = torch.sqrt(pi * (1 - pi) / n)[tail]
    z = (freq[tail] / n - pi[tail]) / se
    assert z.abs().max() < 4.5, z.abs().max()
    # and the test has power: the frequencies are not those of the whole (untruncated) distribution
    z_wrong = (freq[tail] / n - (p / p.sum())[tail]) / se
    assert z_wrong.abs().max() > 10


def _gradient_rows(z: torch.Tensor, targets: TeacherTargets, temperature: float) -> torch.Tensor:
    """Per-row gradient of the forward-KL term (the loss averages rows: times the row count)."""
    loss = KDLoss("forward_kl", z.size(-1), tail="bucket", chunk=64, beta=0.5, alpha=0.1, kd_weight=1.0,
                  hard_weight=0.0)
    z = z.clone().requires_grad_(True)
    kd, _ = student_losses(z, loss._terms(temperature, targets, None))
    kd.backward()
    return z.grad * z.size(0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_gradient_is_unbiased_and_the_bucket_gradient_is_not(temperature):
    """One position, 20,000 independent tail draws of t = 8: the mean gradient of the loss with respect to the
    student's logits equals the full distribution's within 4.5 Monte-Carlo standard errors in every component
    (the standard error from the rows' own spread); the tail bucket's gradient misses it by far more. The full
    distribution is the teacher as the cache holds it: its top k as stored (fp16), the rest the teacher's
    shape scaled to the rest of that mass."""
    vocab, k, draws, rows = 60, 6, 8, 20_000
    gen = torch.Generator().manual_seed(11)
    teacher_logits = torch.randn(vocab, generator=gen) * 2.0
    student_logits = torch.randn(vocab, generator=gen)
    out = topk_tail_targets(teacher_logits.expand(1, rows, vocab), vocab, k, temperature,
                            uniforms_for((1, rows), draws, 12))
    tail = TeacherTargets("topk", out["topk_logprobs"][0], out["topk_ids"][0], out["tail_ids"][0],
                          out["tail_counts"][0].to(torch.int32))
    z = student_logits.expand(rows, vocab).contiguous()
    per_row = _gradient_rows(z, tail, temperature)
    at_t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    head_ids, head = out["topk_ids"][0, 0].long(), out["topk_logprobs"][0, 0].double()
    in_head = torch.zeros(vocab, dtype=torch.bool)
    in_head[head_ids] = True
    rest = 1 - head.exp().sum()
    held = at_t.clone()
    held[in_head] = -math.inf
    held = held + torch.log(rest) - torch.logsumexp(held, -1)
    held[head_ids] = head
    full = TeacherTargets("full", (held * temperature).float()[None])  # the loss divides it by T
    exact = _gradient_rows(student_logits[None].clone(), full, temperature)[0]
    mean, se = per_row.mean(0), per_row.std(0) / math.sqrt(rows)
    assert ((mean - exact).abs() <= 4.5 * se + 1e-7).all(), ((mean - exact).abs() / (se + 1e-12)).max()
    bucket = TeacherTargets("topk", torch.log_softmax(teacher_logits, -1).topk(k).values.half()[None],
                            torch.log_softmax(teacher_logits, -1).topk(k).indices.int()[None])
    biased = _gradient_rows(student_logits[None].clone(), bucket, temperature)[0]
    assert ((biased - exact).abs() > 4.5 * se + 1e-7).any()  # the test has power: the bucket fails it


def test_draws_are_made_at_the_training_temperature_unless_set():
    from common.config import draw_temperature, load_config

    for overrides, expected in (([], 2.0), (["train.temperature=1.0"], 1.0),
                                (["train.temperature=1.0", "cache.sample_temperature=1.5"], 1.5)):
        cfg = load_config(str(REPO / "pipeline.yaml"), overrides)  # the recipe's T = 2 unless overridden
        assert draw_temperature(cfg.cache, cfg.train) == expected, overrides


def test_tail_draws_are_keyed_by_block():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 300) * 2
    whole = topk_tail_targets(logits, 300, 8, 1.0, block_uniforms(7, 10, 4, 6, 16))
    part = topk_tail_targets(logits[2:], 300, 8, 1.0, block_uniforms(7, 12, 2, 6, 16))
    for name in whole:
        assert torch.equal(whole[name][2:], part[name]), name


@pytest.fixture(scope="module")
def tail_caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tail")
    # drawn at train.temperature (cache.sample_temperature null, the default)
    common = {"cache.mode": "topk", "cache.k": 8, "cache.tail_draws": 16, "cache.seed": 5, "train.temperature": 1.0}
    dump_main(tiny_overrides(tiny, root / "a", **common))
    dump_main(tiny_overrides(tiny, root / "b", **common, **{"teacher.batch_size": 3, "cache.shard_blocks": 4}))
    dump_main(tiny_overrides(tiny, root / "q", **common, **{"cache.quantize": "true"}))
    dump_main(tiny_overrides(tiny, root / "plain", **{"cache.mode": "topk", "cache.k": 8}))
    return root


def test_tail_cache_manifest_blocks_and_reproducibility(tail_caches):
    manifest = json.loads((tail_caches / "a" / "manifest.json").read_text())
    assert manifest["tail"] == {"draws": 16, "temperature": 1.0, "slots": 16, "seed": 5}
    assert manifest["datasets"]["tail_counts_by_id"]["dtype"] == "uint8"
    assert json.loads((tail_caches / "plain" / "manifest.json").read_text())["tail"] is None
    a, b, q, plain = (CacheReader(str(tail_caches / name)) for name in ("a", "b", "q", "plain"))
    assert a.dataset_names == ("input_ids", "topk_ids", "topk_logprobs", "tail_ids", "tail_counts")
    block = a.block(0)
    head, drawn, counts = block["topk_ids"], block["tail_ids"], block["tail_counts"].astype(int)
    assert (counts.sum(-1) == 16).all()
    assert not any(set(h) & set(d[c > 0]) for h, d, c in zip(head, drawn, counts))
    for name in a.dataset_names:  # other batches and shards: the same draws (keyed by block)
        np.testing.assert_array_equal(a.read_all(name), b.read_all(name))
    for name in ("topk_ids", "topk_logprobs"):  # the head is the plain top-k cache's
        np.testing.assert_array_equal(a.read_all(name), plain.read_all(name))
    np.testing.assert_array_equal(a.read_all("tail_ids"), q.read_all("tail_ids"))
    verify = run_cli("cache.verify", str(tail_caches / "q"))
    assert verify.returncode == 0, verify.stderr


def test_tail_cache_trains_forward_kl_at_its_temperature_and_refuses_the_rest(tiny, tail_caches, tmp_path):
    cache = tail_caches / "a"

    def train(name: str, **extra):
        return train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **{
            "train.temperature": 1.0, "train.output_dir": tmp_path / name, "train.log_dir": tmp_path / f"{name}-l",
            **extra})])

    with pytest.raises(UserError, match="made with tail draws at temperature 1.0"):
        train("t2", **{"train.temperature": 2.0})
    for loss in ("reverse_kl", "jsd", "skew_kl"):
        with pytest.raises(UserError, match="only forward_kl is unbiased with tail draws"):
            train(loss, **{"train.loss": loss})
    with pytest.raises(UserError, match="topk_tail=renormalize drops the missing mass"):
        train("renorm", **{"train.topk_tail": "renormalize"})
    train("ok", **{"train.max_steps": 2})
    lines = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in lines)
