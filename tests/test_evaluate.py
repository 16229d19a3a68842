"""Perplexity: the sliding windows score every token once, and the number equals a direct computation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage2_student.evaluate import main as evaluate_main, sliding_windows
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("num_tokens, length, stride", [(1000, 128, 128), (1000, 128, 64), (257, 128, 50), (10, 128, 64)])
def test_windows_score_every_token_once(num_tokens, length, stride):
    windows = sliding_windows(num_tokens, length, stride)
    scored = np.zeros(num_tokens, dtype=int)
    for w in windows:
        assert w.end - w.begin <= length and w.scored <= w.end - w.begin
        scored[w.end - w.scored:w.end] += 1
    assert scored.tolist() == [1] * num_tokens  # each token is new in exactly one window (token 0 has no prediction)
    assert windows[-1].end == num_tokens


@torch.no_grad()
def test_perplexity_equals_direct_computation(tiny, tmp_path):
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(tiny / "teacher"), "--name", "teacher",
                   *tiny_overrides(tiny, tmp_path / "unused", **{"eval.split": "test", "eval.stride": 128,
                                                                  "eval.max_windows": 5, "eval.output": output})])
    result = json.loads(output.read_text())["results"][0]
    # independent: the test file's first 5·128 tokens in 5 disjoint windows; each predicts its last 127 tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    lines = (tiny / "data" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    ids = tokenizer("".join(l if l.strip() else "" for l in lines), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: 5 * 128]).view(5, 128)
    model = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval()
    logprobs = torch.log_softmax(model(input_ids=blocks).logits[:, :-1, : len(tokenizer)], -1)
    nll = -logprobs.gather(-1, blocks[:, 1:, None]).mean().item()
    assert result["tokens"] == 5 * 127
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    confidence, prediction = logprobs.exp().max(-1)
    assert result["accuracy"] == pytest.approx((prediction == blocks[:, 1:]).float().mean().item(), abs=1e-6)
    assert 0.0 <= result["ece"] <= 1.0
