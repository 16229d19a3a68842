"""Perplexity: the sliding windows score every token once, and the number equals a direct computation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage2_student.evaluate import Scorer, main as evaluate_main, sliding_windows
from stage2_student.fidelity import Fidelity, FullTeacher
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("num_tokens, length, stride",
                         [(1000, 128, 128), (1000, 128, 64), (257, 128, 50), (10, 128, 64)])
def test_windows_score_every_token_once(num_tokens, length, stride):
    windows = sliding_windows(num_tokens, length, stride)
    scored = np.zeros(num_tokens, dtype=int)
    for w in windows:
        assert w.end - w.begin <= length and w.scored <= w.end - w.begin
        scored[w.end - w.scored:w.end] += 1
    assert scored.tolist() == [1] * num_tokens  # each token is new in exactly one window (token 0 has no prediction)
    assert windows[-1].end == num_tokens


def ece_reference(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Textbook ECE: Σ_b (n_b / N)·|accuracy_b − mean confidence_b| over equal-width bins [b/bins, (b+1)/bins)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for b in range(bins):
        in_bin = (confidence >= edges[b]) & ((confidence < edges[b + 1]) | (b == bins - 1))
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def test_scorer_against_a_hand_computed_case():
    """Five tokens, top probability (confidence) and whether the top token is the label:
      0.90 right (bin 13)   0.62 wrong, 0.64 right (bin 9)   0.68 right (bin 10)   0.40 wrong (bin 6)
    with 15 bins of width 1/15. ECE = Σ_bins |#right − Σ confidence| / N
      = (|1 − 0.90| + |1 − (0.62 + 0.64)| + |1 − 0.68| + |0 − 0.40|) / 5 = (0.10 + 0.26 + 0.32 + 0.40) / 5 = 0.216.
    (Per-token |right − confidence| would give 0.36; 10 bins, where 0.62, 0.64 and 0.68 share a bin, 0.112.)"""
    probs = torch.tensor([[0.90, 0.04, 0.03, 0.03],
                          [0.62, 0.20, 0.10, 0.08],
                          [0.10, 0.64, 0.16, 0.10],
                          [0.10, 0.10, 0.68, 0.12],
                          [0.40, 0.30, 0.20, 0.10]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 3])
    scorer = Scorer()
    logprobs = probs.log().float()
    scorer.add(logprobs[:2], labels[:2])  # statistics accumulate over calls
    scorer.add(logprobs[2:], labels[2:])
    score = scorer.result("hand", windows=1, text_bytes=12)
    nll = -(math.log(0.90) + math.log(0.20) + math.log(0.64) + math.log(0.68) + math.log(0.10)) / 5
    assert score.ece == pytest.approx(0.216, abs=1e-6)
    assert score.accuracy == pytest.approx(3 / 5)
    assert score.nll == pytest.approx(nll, rel=1e-6)
    assert score.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert (score.tokens, score.windows) == (5, 1)
    assert score.bits_per_byte == pytest.approx(5 * nll / math.log(2) / 12, rel=1e-6)  # 5 tokens over 12 bytes
    assert score.kl_to_teacher is None and score.top1_agreement is None and score.word_perplexity is None


def test_scorer_fidelity_to_a_teacher_against_a_hand_computed_case():
    """Two tokens; the teacher's argmax agrees on the first only. KL(p ‖ q) = Σ p log(p / q), by hand; the top-2
    mass share: the student's mass on the teacher's two likeliest ids over the teacher's there."""
    student = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], dtype=torch.float64)
    teacher = torch.tensor([[0.6, 0.3, 0.1], [0.7, 0.2, 0.1]], dtype=torch.float64)
    fidelity = Fidelity()
    fidelity.add_full(student.log().float(), FullTeacher.of(teacher.log().float(), k=2))
    score = fidelity.result()
    kl = sum(p * math.log(p / q) for pt, qt in zip(teacher.tolist(), student.tolist()) for p, q in zip(pt, qt)) / 2
    assert score.kl_to_teacher == pytest.approx(kl, rel=1e-5)
    assert score.top1_agreement == pytest.approx(0.5)
    assert score.topk_mass_share == pytest.approx((0.5 + 0.3 + 0.2 + 0.5) / (0.6 + 0.3 + 0.7 + 0.2), rel=1e-6)
    assert score.kl_lower_bound is None  # exact


@pytest.mark.parametrize("overrides, scored_dtype", [
    # eval.dtype=auto: the model's saved float32, whatever dtypes the stages load their models in
    ({"teacher.dtype": "bfloat16", "student.dtype": "bfloat16"}, torch.float32),
    ({"eval.dtype": "bfloat16"}, torch.bfloat16),
])
@torch.no_grad()
def test_scores_equal_direct_computation(tiny, tmp_path, overrides, scored_dtype):
    assert json.loads((tiny / "teacher" / "config.json").read_text())["dtype"] == "float32"  # as saved
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(tiny / "teacher"), "--name", "teacher",
                   *tiny_overrides(tiny, tmp_path / "unused", **{"eval.split": "test", "eval.protocol": "strided",
                                                                  "eval.stride": 128,
                                                                  "eval.max_windows": 5, "eval.output": output,
                                                                  **overrides})])
    result = json.loads(output.read_text())["results"][0]
    # independent: the test file's first 5·128 tokens in 5 disjoint windows; each predicts its last 127 tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    lines = (tiny / "data" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    ids = tokenizer("".join(line if line.strip() else "" for line in lines), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: 5 * 128]).view(5, 128)
    model = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=scored_dtype).eval()
    logits = model(input_ids=blocks).logits[:, :-1, : len(tokenizer)].float()
    logprobs = torch.log_softmax(logits, -1)
    nll = -logprobs.gather(-1, blocks[:, 1:, None]).mean().item()
    assert result["tokens"] == 5 * 127
    # bfloat16 weights move the perplexity by ~5e-4 relative on this model: 1e-5 tells the dtypes apart
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    confidence, prediction = logprobs.exp().max(-1)
    correct = (prediction == blocks[:, 1:]).numpy().ravel().astype(float)
    assert result["accuracy"] == pytest.approx(correct.mean(), abs=1e-6)
    assert result["ece"] == pytest.approx(ece_reference(confidence.numpy().ravel(), correct), abs=1e-6)


def test_evaluate_on_the_data_a_cache_was_made_from(tiny, tmp_path):
    """--cache takes the data source and block length from the cache's manifest, not from the config."""
    from stage1_teacher.dump import main as dump_main

    cache = tmp_path / "cache"
    dump_main(tiny_overrides(tiny, cache, **{"data.seq_len": 64, "data.max_blocks": 2}))
    direct, from_cache = tmp_path / "direct.json", tmp_path / "from_cache.json"
    common = {"eval.split": "test", "eval.protocol": "strided", "eval.stride": 64, "eval.max_windows": 3}
    evaluate_main(["--model", str(tiny / "teacher"),
                   *tiny_overrides(tiny, cache, **common, **{"data.seq_len": 64, "eval.output": direct})])
    evaluate_main(["--model", str(tiny / "teacher"), "--cache", str(cache),
                   *tiny_overrides(tiny, cache, **common, **{"data.seq_len": 128, "data.local_dir": tmp_path / "none",
                                                             "eval.output": from_cache})])
    a, b = (json.loads(p.read_text()) for p in (direct, from_cache))
    assert b["seq_len"] == 64 and a["results"][0]["perplexity"] == b["results"][0]["perplexity"]
    # a cache of another split than eval.split gives the data settings only, no teacher fidelity
    assert b["fidelity"] is None and b["results"][0]["kl_to_teacher"] is None


def test_a_live_teacher_against_itself(tiny, tmp_path):
    """eval.protocol=lm-eval with --teacher: KL 0, full agreement, the teacher's whole top-k mass, on every token
    the documents' rolling windows score."""
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(tiny / "teacher"), "--model", str(tiny / "student"),
                   "--teacher", str(tiny / "teacher"),
                   *tiny_overrides(tiny, tmp_path / "unused", **{"eval.split": "test", "eval.max_windows": 3,
                                                                  "eval.max_length": 64, "eval.output": output})])
    report = json.loads(output.read_text())
    teacher, student = report["results"]
    assert report["protocol"] == "lm-eval" and report["fidelity"]["source"] == "teacher"
    assert teacher["fidelity_positions"] == teacher["tokens"] and teacher["windows"] > 3
    assert abs(teacher["kl_to_teacher"]) < 1e-6 and teacher["top1_agreement"] == 1.0
    assert teacher["topk_mass_share"] == pytest.approx(1.0)
    assert student["kl_to_teacher"] > 0.1 and student["top1_agreement"] < 1.0
    assert teacher["word_perplexity"] > teacher["byte_perplexity"] > 1.0


def evaluate_with_teacher(tiny, tmp_path, models: list[str], per_pass: int, protocol: str) -> list[dict]:
    output = tmp_path / f"eval_{per_pass}.json"
    evaluate_main([*(item for model in models for item in ("--model", str(tiny / model))),
                   "--teacher", str(tiny / "teacher"),
                   *tiny_overrides(tiny, tmp_path / "unused", **{"eval.split": "test", "eval.protocol": protocol,
                                                                  "eval.stride": 128, "eval.max_windows": 2,
                                                                  "eval.max_length": 64, "eval.batch_size": 3,
                                                                  "eval.models_per_pass": per_pass,
                                                                  "eval.output": output})])
    return json.loads(output.read_text())["results"]


@pytest.mark.parametrize("protocol", ["strided", "lm-eval"])
def test_models_sharing_the_teachers_forward_score_as_alone(tiny, tmp_path, protocol):
    """eval.models_per_pass: three models in one pass (one teacher forward per batch) score as each alone."""
    models = ["student", "teacher", "student"]
    together = evaluate_with_teacher(tiny, tmp_path, models, 3, protocol)
    alone = evaluate_with_teacher(tiny, tmp_path, models, 1, protocol)
    for a, b in zip(together, alone):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if isinstance(v, (int, float))} == \
            pytest.approx({k: v for k, v in b.items() if isinstance(v, (int, float))}, rel=1e-9)
    assert together[0] == together[2] and together[0]["kl_to_teacher"] > 0.1
    assert abs(together[1]["kl_to_teacher"]) < 1e-6


@torch.no_grad()
def test_a_students_kl_to_a_live_teacher_equals_a_float64_recomputation(tiny, tmp_path):
    """The strided windows' KL(teacher ‖ student), top-1 agreement and top-16 mass share, recomputed here in
    float64 from the two models on the same two windows of 128 tokens."""
    student = evaluate_with_teacher(tiny, tmp_path, ["student"], 1, "strided")[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    lines = (tiny / "data" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    ids = tokenizer("".join(line if line.strip() else "" for line in lines), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: 2 * 128]).view(2, 128)
    log = {}
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(tiny / name, dtype=torch.float64).eval()
        logits = model(input_ids=blocks).logits[:, :-1, : len(tokenizer)]
        log[name] = torch.log_softmax(logits, -1).reshape(-1, len(tokenizer))
    p = log["teacher"].exp()
    kl = (p * (log["teacher"] - log["student"])).sum(-1).mean().item()
    top16 = log["teacher"].topk(16, dim=-1).indices  # cache.k of tiny_overrides
    mass = log["student"].exp().gather(-1, top16).sum() / p.gather(-1, top16).sum()
    assert student["fidelity_positions"] == 2 * 127
    assert student["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert student["top1_agreement"] == pytest.approx(
        (log["student"].argmax(-1) == log["teacher"].argmax(-1)).double().mean().item())
    assert student["topk_mass_share"] == pytest.approx(mass.item(), rel=1e-4)
