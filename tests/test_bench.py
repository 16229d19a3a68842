"""Smoke tests of the two bench scripts, each end to end at a scale far below what they are for."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Far below --quick: the cost is almost all interpreter start-up (one process per cache and per run), so
# one run per kind of row: hard labels, full cache, live teacher, top-k, sample. The teacher is trained and
# the lr high enough that two student steps move the student far more than the cache/live tolerance.
SMOKE_RUNS = ["hard labels (CE)", "full KD (cache)", "full KD (live teacher)", "top-12, tail bucket",
              "sample, 50 draws"]
SMOKE_SCALE = {"vocab": 320, "seq_len": 32, "teacher_steps": 30, "max_blocks": 16, "student_steps": 2, "lr": 0.05,
               "eval_stride": 32, "data_lines": 300, "eval_lines": 60, "runs": SMOKE_RUNS,
               "teacher": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
                           "tie_word_embeddings": False},
               "student": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32,
                           "tie_word_embeddings": True}}


@pytest.fixture
def wiki_dir(tmp_path) -> Path:
    """WikiText-style files made from the tiny world's corpus: tests never depend on ../shared."""
    from tiny_world.corpus import build_corpus

    corpus = build_corpus()
    data = tmp_path / "wiki"
    data.mkdir()
    for name, split, lines in (("wiki.valid.raw", "valid", 400), ("wiki.test.raw", "test", 100)):
        (data / name).write_text("".join(corpus[split].splitlines(keepends=True)[:lines]), encoding="utf-8")
    return data


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the results table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # [0] is the header


def test_quality_study_end_to_end(wiki_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: on a busy machine threads make steps 100x slower
    out = tmp_path / "out"
    result = run_cli("bench.quality", "--out", out, "--data-dir", wiki_dir, "--scale-json", json.dumps(SMOKE_SCALE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows((out / "results.md").read_text(encoding="utf-8"))
    assert [row[0] for row in rows] == ["teacher", "untrained student", *SMOKE_RUNS]
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["full", "sample50", "topk12"]  # only those used
    perplexities = [float(row[4]) for row in rows]
    assert all(math.isfinite(p) and p > 1 for p in perplexities), perplexities
    scores = json.loads((out / "summary.json").read_text())["scores"]
    cached, live = scores["full KD (cache)"], scores["full KD (live teacher)"]
    assert cached["perplexity"] == pytest.approx(live["perplexity"], rel=1e-3)
    assert cached["accuracy"] == pytest.approx(live["accuracy"], abs=1e-3)
    # not trivially equal: distillation moved the student well beyond that tolerance
    assert cached["perplexity"] != pytest.approx(scores["untrained student"]["perplexity"], rel=2e-2)


def test_quality_refuses_a_missing_data_dir_an_unknown_run_and_two_scales(wiki_dir, tmp_path):
    missing = run_cli("bench.quality", "--out", tmp_path / "out", "--data-dir", tmp_path / "nowhere")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} has no wiki.valid.raw or "
                                                   "wiki.test.raw; pass --data-dir with the WikiText-2 raw files"]
    unknown = run_cli("bench.quality", "--out", tmp_path / "out", "--data-dir", wiki_dir,
                      "--scale-json", json.dumps({"runs": ["full KD (cache)", "top-13"]}))
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == ["error: no student run is labelled 'top-13'"]
    assert not (tmp_path / "out").exists()  # refused before anything was written
    both = run_cli("bench.quality", "--quick", "--large", "--out", tmp_path / "out")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_loss_memory_chunked_loss_equals_unchunked():
    result = run_cli("bench.loss_memory", "--batch", "1", "--seq-len", "8", "--chunk", "3", "--vocab", "500")
    assert result.returncode == 0, result.stderr[-3000:]
    losses: dict[str, dict[str, float]] = {}
    for kind, chunk, *_, loss in table_rows(result.stdout):
        if loss:  # the ratio rows have no loss
            losses.setdefault(kind, {})[chunk] = float(loss)
    assert losses.keys() == {"topk", "full"}
    for kind, by_chunk in losses.items():
        assert by_chunk.keys() == {"8 (unchunked)", "3"}, kind
        assert by_chunk["3"] == pytest.approx(by_chunk["8 (unchunked)"], rel=1e-4), kind
