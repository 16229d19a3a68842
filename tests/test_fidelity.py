"""Teacher fidelity from a cache (`evaluate --cache` of the evaluated split): zero for the teacher against its
own full cache, and each estimator equal to a float64 recomputation written out here for a student."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cache.reader import CacheReader
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from stage2_student.evaluate import main as evaluate_main
from tests.conftest import tiny_overrides

BLOCKS = 3
CACHES = {"full": {"cache.mode": "full"},
          "tail": {"cache.mode": "topk", "cache.tail_draws": 8, "cache.sample_temperature": 1.0},
          "sample": {"cache.mode": "sample", "cache.draws": 20, "cache.sample_temperature": 1.0}}


@pytest.fixture(scope="module")
def test_caches(tiny, tmp_path_factory):
    """Caches of the first blocks of the tiny test split, one per kind of teacher distribution."""
    root = tmp_path_factory.mktemp("fidelity")
    caches = {}
    for name, settings in CACHES.items():
        caches[name] = root / name
        dump_main(tiny_overrides(tiny, caches[name], **{"data.split": "test", "data.max_blocks": BLOCKS, **settings}))
    return caches


def evaluate(tiny, cache, tmp_path, models=("teacher", "student")) -> dict:
    output = tmp_path / "eval.json"
    args = [item for model in models for item in ("--model", str(tiny / model), "--name", model)]
    # one short strided window: the fidelity is on the cache's blocks, whatever the protocol scores
    evaluate_main([*args, "--cache", str(cache),
                   *tiny_overrides(tiny, cache, **{"eval.split": "test", "eval.protocol": "strided",
                                                   "eval.max_windows": 1, "eval.output": output})])
    report = json.loads(output.read_text())
    return {"fidelity": report["fidelity"], **{r["name"]: r for r in report["results"]}}


def test_the_teacher_against_its_own_full_cache_is_zero(tiny, test_caches, tmp_path):
    report = evaluate(tiny, test_caches["full"], tmp_path, models=("teacher",))
    teacher = report["teacher"]
    assert report["fidelity"]["source"] == "cache" and report["fidelity"]["estimator"].startswith("exact")
    assert teacher["fidelity_positions"] == BLOCKS * 128
    assert abs(teacher["kl_to_teacher"]) < 1e-5  # fp16 log-probs, renormalized: ~1e-7 here
    assert teacher["top1_agreement"] >= 0.99  # fp16 rounding may tie two candidates
    assert teacher["topk_mass_share"] == pytest.approx(1.0, abs=1e-3)
    assert teacher["kl_lower_bound"] is None


def student_logprobs(tiny, ids: np.ndarray, vocab: int) -> torch.Tensor:
    """The student's next-token log-probs in float64, [positions, vocab]."""
    model = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids).long()).logits[..., :vocab]
    return torch.log_softmax(logits.double(), dim=-1).reshape(-1, vocab)


def kl_terms(p: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> float:
    """Σ p (log p − log q) over entries with p > 0."""
    keep = p > 0
    return float(np.sum(p[keep] * (log_p[keep] - log_q[keep])))


@pytest.mark.parametrize("kind", list(CACHES))
def test_a_students_fidelity_equals_a_float64_recomputation(tiny, test_caches, tmp_path, kind):
    student = evaluate(tiny, test_caches[kind], tmp_path, models=("student",))["student"]
    reader = CacheReader(str(test_caches[kind]))
    vocab = reader.vocab_size
    blocks = [reader.block(i) for i in range(BLOCKS)]
    log_q = student_logprobs(tiny, np.stack([b["input_ids"] for b in blocks]), vocab).numpy()
    kl = lower = agree = student_mass = teacher_mass = 0.0
    for position in range(log_q.shape[0]):
        block, t = blocks[position // 128], position % 128
        q = log_q[position]
        if kind == "full":  # exact, the stored fp16 log-probs renormalized
            raw = block["logprobs"][t].astype(np.float64)
            log_p = raw - np.log(np.sum(np.exp(raw)))
            p = np.exp(log_p)
            kl += kl_terms(p, log_p, q)
            agree += int(np.argmax(q) == np.argmax(log_p))
            top = np.argsort(-log_p, kind="stable")[:16]  # cache.k of tiny_overrides
            student_mass += np.exp(q[top]).sum()
            teacher_mass += p[top].sum()
        elif kind == "tail":  # bucket lower bound, and the plug-in KL of the top-k + r·c/t estimate
            ids, log_p = block["topk_ids"][t], block["topk_logprobs"][t].astype(np.float64)
            p = np.exp(log_p)
            rest = max(1.0 - p.sum(), 0.0)
            rest_q = 1.0 - np.exp(q[ids]).sum()
            head = kl_terms(p, log_p, q[ids])
            lower += head + (rest * (math.log(rest) - math.log(rest_q)) if rest > 0 else 0.0)
            drawn = block["tail_counts"][t] > 0
            tail_ids, counts = block["tail_ids"][t][drawn], block["tail_counts"][t][drawn].astype(np.float64)
            p_tail = rest * counts / counts.sum()
            kl += head + (kl_terms(p_tail, np.log(p_tail), q[tail_ids]) if rest > 0 else 0.0)
            agree += int(np.argmax(q) == ids[0])
            student_mass += np.exp(q[ids]).sum()
            teacher_mass += p.sum()
        else:  # the plug-in KL of the draws' empirical distribution
            drawn = block["sample_counts"][t] > 0
            ids, counts = block["sample_ids"][t][drawn], block["sample_counts"][t][drawn].astype(np.float64)
            p = counts / counts.sum()
            kl += kl_terms(p, np.log(p), q[ids])
            agree += int(np.argmax(q) == block["sample_ids"][t][0])
    n = log_q.shape[0]
    assert student["fidelity_positions"] == n
    assert student["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-5)
    assert student["kl_to_teacher"] > 0.1  # a student far from the teacher: the comparison is not 0 ≈ 0
    assert student["top1_agreement"] == pytest.approx(agree / n, abs=1.5 / n)  # fp32 vs fp64: a near-tie may flip
    if kind == "tail":
        assert student["kl_lower_bound"] == pytest.approx(lower / n, rel=1e-5)
    else:
        assert student["kl_lower_bound"] is None
    if kind == "sample":
        assert student["topk_mass_share"] is None
    else:
        assert student["topk_mass_share"] == pytest.approx(student_mass / teacher_mass, rel=1e-5)


def test_the_bucket_bound_is_below_the_exact_kl(tiny, test_caches, tmp_path):
    """The same positions: the tail cache's k+1-bucket KL ≤ the full cache's exact KL (coarsening lowers KL)."""
    exact = evaluate(tiny, test_caches["full"], tmp_path / "full", models=("student",))["student"]
    tail = evaluate(tiny, test_caches["tail"], tmp_path / "tail", models=("student",))["student"]
    assert tail["kl_lower_bound"] < exact["kl_to_teacher"]


def test_teacher_and_cache_are_one_or_the_other(tiny, test_caches, tmp_path):
    with pytest.raises(UserError, match="--teacher and --cache"):
        evaluate_main(["--model", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                       "--cache", str(test_caches["full"]), *tiny_overrides(tiny, tmp_path)])
