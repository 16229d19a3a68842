"""Evaluating on conversations (data.rows=chat): the assistant-token loss of a held-out split, and teacher fidelity
from a chat cache on its trained positions, each equal to a computation written out here: every conversation run
alone through a plain forward (no packing, no position ids), its assistant tokens located by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache.reader import CacheReader
from common.cli import UserError
from stage1_teacher.dump import main as dump_main
from stage2_student.evaluate import main as evaluate_main
from tests.chat_world import chat_models, chat_overrides, conversations, write_jsonl

SEQ_LEN = 256  # the longest conversation here is 195 tokens


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat_eval")
    models = chat_models(tiny, root / "models")
    rows = conversations(tiny, 24, seed=7)
    write_jsonl(root / "test.jsonl", rows)
    return {"root": root, "models": models, "rows": rows, "files": root / "{split}.jsonl"}


def overrides(tiny, world, cache: Path, output: Path, **extra) -> list[str]:
    return chat_overrides(tiny, world["models"], world["files"], cache, **{
        "data.seq_len": SEQ_LEN, "eval.split": "test", "eval.output": output, "eval.batch_size": 3, **extra})


def by_hand(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """A conversation's tokens [n] and the positions whose next token is an assistant token [n] (bool): the text
    rendered message by message as the ChatML template does, an assistant token one that starts in an assistant
    message's content or its end of turn."""
    text, spans = "", []
    for message in messages:
        text += f"<|im_start|>{message['role']}\n"
        start = len(text)
        text += f"{message['content']}<|im_end|>\n"
        if message["role"] == "assistant":
            spans.append((start, len(text)))
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    target = torch.tensor([any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]])
    trained = torch.zeros_like(target)
    trained[:-1] = target[1:]
    return torch.tensor(encoded["input_ids"]), trained


@torch.no_grad()
def alone(model_dir: Path, world: dict, dtype=torch.float64) -> torch.Tensor:
    """Each conversation alone through a plain forward: the next-token log-probs at its trained positions, in
    conversation order, [N, V] over the tokenizer's real vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    for messages in world["rows"]:
        ids, trained = by_hand(tokenizer, messages)
        assert len(ids) <= SEQ_LEN  # no conversation is cut into pieces: packed or alone, the same context
        logits = model(input_ids=ids[None]).logits[0, :, : len(tokenizer)]
        out.append(torch.log_softmax(logits.double(), -1)[trained])
    return torch.cat(out)


def test_assistant_loss_equals_each_conversation_alone(tiny, world, tmp_path):
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(world["models"][0]), "--name", "teacher", "--model", str(world["models"][1]),
                   "--name", "student", *overrides(tiny, world, tmp_path / "unused", output,
                                                   **{"eval.protocol": "strided"})])
    report = json.loads(output.read_text())
    assert report["protocol"] == "chat" and report["train_on"] == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(world["models"][0])
    labels = torch.cat([ids[1:][trained[:-1]] for ids, trained in (by_hand(tokenizer, m) for m in world["rows"])])
    for result, model_dir in zip(report["results"], world["models"]):
        logprobs = alone(model_dir, world, dtype=torch.float32)
        nll = -logprobs.gather(1, labels[:, None]).sum().item() / len(labels)
        assert result["tokens"] == len(labels) and result["conversations"] == len(world["rows"])
        assert result["windows"] < len(world["rows"])  # blocks that pack several conversations
        assert result["assistant_loss"] == pytest.approx(nll, rel=1e-5)
        assert result["assistant_perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
        assert result["nll"] == result["assistant_loss"] and result["bits_per_byte"] is None
    assert report["results"][0]["assistant_loss"] < report["results"][1]["assistant_loss"]  # trained vs untrained


def test_the_table_shows_the_assistant_loss(tiny, world, tmp_path, capsys):
    evaluate_main(["--model", str(world["models"][1]),
                   *overrides(tiny, world, tmp_path / "unused", tmp_path / "eval.json", **{"eval.max_windows": 2})])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert "assistant loss" in header and "assistant ppl" in header and "positions" in header
    assert "bits/byte" not in header and "word ppl" not in header
    assert "conversations (data.rows=chat)" in out
    assert json.loads((tmp_path / "eval.json").read_text())["results"][0]["windows"] == 2  # eval.max_windows blocks


def test_a_live_teacher_against_itself_on_the_trained_positions(tiny, world, tmp_path):
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(world["models"][0]), "--model", str(world["models"][1]),
                   "--teacher", str(world["models"][0]), *overrides(tiny, world, tmp_path / "unused", output)])
    teacher, student = json.loads(output.read_text())["results"]
    assert teacher["fidelity_positions"] == teacher["tokens"] == student["fidelity_positions"] > 0
    assert abs(teacher["kl_to_teacher"]) < 1e-6 and teacher["top1_agreement"] == 1.0
    assert student["kl_to_teacher"] > 0.1 and student["top1_agreement"] < 1.0


def test_a_split_with_nothing_trained_is_refused_in_one_line(tiny, world, tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [[{"role": "user", "content": "hello there"}]])
    with pytest.raises(UserError, match="has no trained positions") as err:
        evaluate_main(["--model", str(world["models"][1]),
                       *overrides(tiny, world, tmp_path / "unused", tmp_path / "eval.json",
                                  **{"data.files": tmp_path / "{split}.jsonl"})])
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def full_cache(tiny, world) -> Path:
    """A full cache of the held-out split: the teacher's whole distribution, at the trained positions only."""
    cache = world["root"] / "full"
    dump_main(overrides(tiny, world, cache, world["root"] / "unused.json",
                        **{"data.split": "test", "cache.mode": "full"}))
    return cache


def test_fidelity_from_a_chat_cache_is_on_its_trained_positions(tiny, world, full_cache, tmp_path):
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(world["models"][0]), "--name", "teacher", "--model", str(world["models"][1]),
                   "--name", "student", "--cache", str(full_cache),
                   *overrides(tiny, world, full_cache, output, **{"data.files": tmp_path / "none.jsonl"})])
    report = json.loads(output.read_text())
    teacher, student = report["results"]
    assert report["protocol"] == "chat" and report["fidelity"]["positions"].startswith("the trained positions")
    # independent: the cache's teacher distributions at its trained positions (in block order) against the
    # student's, each conversation run alone, at the positions located by hand (in conversation order)
    reader = CacheReader(str(full_cache))
    blocks = [reader.block(i) for i in range(reader.num_blocks)]
    cached = np.concatenate([b["logprobs"][b["loss_mask"].astype(bool)] for b in blocks]).astype(np.float64)
    log_p = torch.log_softmax(torch.from_numpy(cached), -1)
    log_q = alone(world["models"][1], world)
    assert log_p.shape == log_q.shape and teacher["fidelity_positions"] == student["fidelity_positions"] == len(log_p)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert student["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert student["top1_agreement"] == pytest.approx(
        (log_p.argmax(-1) == log_q.argmax(-1)).double().mean().item(), abs=1e-2)  # fp16 may tie two ids
    assert abs(teacher["kl_to_teacher"]) < 1e-5 and teacher["top1_agreement"] >= 0.99
    assert student["kl_to_teacher"] > 0.1
    # a full chat cache stores every position's log-probs (docs/data.md): it is no smaller than them in fp16
    assert reader.manifest.bytes_on_disk >= len(blocks) * SEQ_LEN * reader.vocab_size * 2


def test_models_sharing_the_teachers_forward_score_as_alone(tiny, world, tmp_path):
    """eval.models_per_pass on conversations: two models in one pass score as each alone."""
    results = {}
    for per_pass in (2, 1):
        output = tmp_path / f"eval_{per_pass}.json"
        evaluate_main(["--model", str(world["models"][1]), "--model", str(world["models"][0]),
                       "--teacher", str(world["models"][0]),
                       *overrides(tiny, world, tmp_path / "unused", output, **{"eval.models_per_pass": per_pass})])
        results[per_pass] = json.loads(output.read_text())["results"]
    for a, b in zip(results[2], results[1]):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if isinstance(v, (int, float))} == \
            pytest.approx({k: v for k, v in b.items() if isinstance(v, (int, float))}, rel=1e-9)
    assert results[2][0]["kl_to_teacher"] > 0.1 and abs(results[2][1]["kl_to_teacher"]) < 1e-6
