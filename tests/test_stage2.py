"""Stage two end to end on the tiny build: losses from the cache equal the live teacher's, training writes
what it promises, the teacher is never needed, bad caches are refused, the cache is never written."""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.cli import UserError
from common.config import load_config
from stage1_teacher.dump import main as dump_main
from stage2_student.train import DistillRecipe, main as train_main
from tests.conftest import run_cli, tiny_overrides


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage2")
    out = {}
    for mode in ("full", "topk"):
        out[mode] = root / mode
        dump_main(tiny_overrides(tiny, out[mode], **{"cache.mode": mode}))
    return out


@contextmanager
def recipe(tiny: Path, cache: Path, tmp: Path, live: bool = False, **extra) -> Iterator[DistillRecipe]:
    cfg = load_config(None, tiny_overrides(tiny, cache, **{"train.output_dir": tmp / "out",
                                                          "train.log_dir": tmp / "logs",
                                                          **extra}))
    with DistillRecipe(cfg, str(cache), live_teacher=live) as r:
        r.setup()
        yield r


def files_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@torch.no_grad()
def test_full_cache_loss_equals_live_teacher_and_original_formula(tiny, caches, tmp_path, temperature):
    with (recipe(tiny, caches["full"], tmp_path / "a", **{"train.temperature": temperature}) as cached,
          recipe(tiny, caches["full"], tmp_path / "b", live=True, **{"train.temperature": temperature}) as live):
        batch_cached, batch_live = next(iter(cached.loader(0))), next(iter(live.loader(0)))
        assert torch.equal(batch_cached["student"]["input_ids"], batch_live["student"]["input_ids"])  # same seed
        loss_cached, _ = cached.distiller.train_on_batch(batch_cached, {})
        loss_live, _ = live.distiller.train_on_batch(batch_live, {})
        # the original recipe, by hand: live logits, both truncated to the tokenizer's size, mean over positions
        ids = batch_live["student"]["input_ids"]
        vocab = len(AutoTokenizer.from_pretrained(tiny / "teacher"))
        teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval()
        t = teacher(input_ids=ids).logits[..., :vocab] / temperature
        s = cached.student(input_ids=ids).logits[..., :vocab] / temperature
        original = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean() * temperature**2
    torch.testing.assert_close(loss_live, original, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_cached, loss_live, rtol=2e-3, atol=2e-3)  # float16 cache


def test_training_run_writes_metrics_model_and_record(tiny, caches, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    before = AutoModelForCausalLM.from_pretrained(tiny / "student").state_dict()
    train_main(["--cache", str(caches["topk"]), *tiny_overrides(tiny, caches["topk"], **{
        "train.output_dir": out, "train.log_dir": logs, "train.max_steps": 3, "train.hard_weight": 0.5})])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert {"step", "loss", "kd_loss", "hard_loss", "lr"} <= r.keys()
        assert r["loss"] == pytest.approx(r["kd_loss"] + 0.5 * r["hard_loss"], rel=1e-5)
    after_model = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for n, p in after_model.state_dict().items() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every tensor moved
    assert (out / "model.safetensors").exists()
    sentence = "The river flows for 120 kilometres into the Sea ."
    saved, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny / "student")
    assert saved(sentence)["input_ids"] == original(sentence)["input_ids"] and len(saved) == len(original)
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == 3 and record["final"]["step"] == 3
    manifest_bytes = (caches["topk"] / "manifest.json").read_bytes()
    assert record["cache_manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())


def test_training_works_with_the_teacher_deleted(tiny, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny / "teacher", teacher)
    cache = tmp_path / "cache"
    dump_main(tiny_overrides(tiny, cache, **{"teacher.model": teacher, "data.max_blocks": 4}))
    shutil.rmtree(teacher)
    out = tmp_path / "out"
    result = run_cli("stage2_student.train", "--cache", cache, *tiny_overrides(tiny, cache, **{
        "teacher.model": teacher, "data.max_blocks": 4, "train.output_dir": out, "train.log_dir": tmp_path / "logs",
        "train.max_steps": 1}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[ALIGN] Student torch.Size([2, 128, 1024]) → cache vocab 1000" in result.stdout + result.stderr
    assert (out / "model.safetensors").exists()


def _student_with(tiny: Path, target: Path, vocab_size: int | None = None, tokenizer_vocab: int | None = None) -> Path:
    from tiny_world.corpus import build_corpus
    from tiny_world.models import train_tokenizer

    shutil.copytree(tiny / "student", target)
    if vocab_size is not None:
        config = json.loads((target / "config.json").read_text())
        config["vocab_size"] = vocab_size
        (target / "config.json").write_text(json.dumps(config))
        resized = AutoModelForCausalLM.from_pretrained(target, ignore_mismatched_sizes=True).config
        model = AutoModelForCausalLM.from_config(resized)
        model.save_pretrained(target)
    if tokenizer_vocab is not None:
        train_tokenizer(build_corpus()["train"][:20000], vocab_size=tokenizer_vocab).save_pretrained(target)
    return target


@pytest.mark.parametrize("case, message", [
    ("seq_len", "seq_len 128, the config data.seq_len 64"),
    ("split", "dataset split 'train', the config expects 'validation'"),
    ("tokenizer", "differs from the tokenizer of the student"),
    ("small_student", "has 900 logits, fewer than the cache vocabulary 1000"),
    ("unsupported_loss", "reverse_kl is infinite with a renormalized top-k teacher"),
])
def test_refusals(tiny, caches, tmp_path, case, message):
    cache = caches["topk"]
    extra: dict[str, object] = {"train.output_dir": tmp_path / "out"}
    if case == "seq_len":
        extra["data.seq_len"] = 64
    elif case == "split":
        extra["data.split"] = "validation"
    elif case == "tokenizer":
        extra["student.model"] = _student_with(tiny, tmp_path / "s", tokenizer_vocab=700)
    elif case == "small_student":
        extra["student.model"] = _student_with(tiny, tmp_path / "s", vocab_size=900)
    elif case == "unsupported_loss":
        extra.update({"train.loss": "reverse_kl", "train.topk_tail": "renormalize"})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **extra)])
    assert not (tmp_path / "out").exists()


def test_refusal_on_the_command_line_is_one_line_exit_2(tiny, caches, tmp_path):
    result = run_cli("stage2_student.train", "--cache", caches["topk"],
                     *tiny_overrides(tiny, caches["topk"], **{"data.seq_len": 64, "train.output_dir": tmp_path / "o"}))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "seq_len" in result.stderr and "Traceback" not in result.stderr


@torch.no_grad()
def first_step_kd_loss(tiny: Path, cache: Path, temperature: float) -> float:
    """The KD loss of a run's first optimizer step, by hand: its blocks (the first 2 × 2 of torch.randperm
    seeded train.seed = 42), the live teacher and the untrained student, the original recipe's formula."""
    from cache.reader import CacheReader

    reader = CacheReader(str(cache))
    blocks = torch.randperm(len(reader), generator=torch.Generator().manual_seed(42))[:4].tolist()
    ids = torch.from_numpy(reader.read_all("input_ids")[blocks]).long()
    reader.close()
    vocab = len(AutoTokenizer.from_pretrained(tiny / "teacher"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(tiny / "student").eval()
    t = teacher(input_ids=ids).logits[..., :vocab] / temperature
    s = student(input_ids=ids).logits[..., :vocab] / temperature
    return float(-(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean() * temperature**2)


def test_two_runs_with_different_temperatures_leave_the_cache_untouched(tiny, caches, tmp_path):
    """Each run's first KD loss is the original formula at its temperature (a float16 cache: within 2e-3)."""
    cache = caches["full"]
    before = files_digest(cache)
    for temperature in (1.0, 4.0):
        train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **{
            "train.temperature": temperature, "train.max_steps": 1,
            "train.output_dir": tmp_path / f"out{temperature}", "train.log_dir": tmp_path / "logs"})])
    assert files_digest(cache) == before
    for temperature in (1.0, 4.0):
        record = json.loads((tmp_path / f"out{temperature}" / "metrics.jsonl").read_text().splitlines()[0])
        assert record["kd_loss"] == pytest.approx(first_step_kd_loss(tiny, cache, temperature), rel=2e-3), temperature


def test_bf16_autocast_and_gradient_checkpointing_run(tiny, caches, tmp_path):
    """The first KD loss under bf16 autocast is the original formula's in fp32, within bf16's precision."""
    out = tmp_path / "out"
    train_main(["--cache", str(caches["full"]), *tiny_overrides(tiny, caches["full"], **{
        "train.precision": "bf16", "train.gradient_checkpointing": True, "train.max_steps": 1,
        "train.output_dir": out, "train.log_dir": tmp_path / "logs"})])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1 and record["grad_norm"] > 0
    temperature = load_config(None, []).train.temperature  # the default
    assert record["kd_loss"] == pytest.approx(first_step_kd_loss(tiny, caches["full"], temperature), rel=2e-2)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # saved for generation


def test_max_steps_overrides_epochs_and_last_short_group_is_a_step(tiny, caches, tmp_path):
    # 12 blocks, batch 2 → 6 micro-batches, accumulation 4 → steps of 4 and 2 micro-batches per epoch
    out = tmp_path / "out"
    train_main(["--cache", str(caches["topk"]), *tiny_overrides(tiny, caches["topk"], **{
        "train.gradient_accumulation": 4, "train.max_steps": 5,
        "train.output_dir": out, "train.log_dir": tmp_path / "logs"})])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["tokens"]) for r in records] == [
        (1, 0, 4 * 256), (2, 0, 6 * 256), (3, 1, 10 * 256), (4, 1, 12 * 256), (5, 2, 16 * 256)]


def test_worker_processes_read_the_same_batches(tiny, caches, tmp_path):
    losses = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train_main(["--cache", str(caches["topk"]), *tiny_overrides(tiny, caches["topk"], **{
            "train.num_workers": workers, "train.max_steps": 2, "train.output_dir": out,
            "train.log_dir": tmp_path / "l"})])
        losses.append([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# The first three optimizer steps of one tiny run (topk cache, k=16, T=2, hard weight 0.5), as this release
# computes them on the CPU. Independent recomputations above check the formulas; these pin the whole chain
# (data order, cache contents, loss, optimizer, schedule) so that an unintended change to any of it shows.
GOLDEN_STEPS = [
    {"loss": 23.012951, "kd_loss": 19.573347, "hard_loss": 6.879207},
    {"loss": 22.970217, "kd_loss": 19.533791, "hard_loss": 6.872851},
    {"loss": 22.682631, "kd_loss": 19.286888, "hard_loss": 6.791487},
]


def test_first_steps_match_golden_values(tiny, caches, tmp_path):
    out = tmp_path / "out"
    train_main(["--cache", str(caches["topk"]), *tiny_overrides(tiny, caches["topk"], **{
        "train.output_dir": out, "train.log_dir": tmp_path / "logs", "train.max_steps": 3, "train.hard_weight": 0.5})])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record, golden in zip(records, GOLDEN_STEPS, strict=True):
        for key, value in golden.items():
            assert record[key] == pytest.approx(value, rel=1e-5), (record["step"], key)


def test_a_staging_directory_is_refused_as_a_cache(tmp_path):
    """Stage one's `.partial` directory is not a cache, even with its manifest written: one line, nothing made."""
    staging = tmp_path / "cache.partial"
    staging.mkdir()
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        train_main(["--cache", str(staging), f"train.output_dir={out}", f"train.log_dir={tmp_path / 'logs'}",
                    f"student.model={tmp_path / 'no-student'}"])
    assert str(info.value) == (f"{staging} is stage one's staging directory, not a published cache; rerun stage "
                               f"one's command to finish and publish it as {tmp_path / 'cache'}, and read that")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.partial"]
