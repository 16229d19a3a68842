"""Smoke tests of the two bench scripts, each end to end at a scale far below what they are for."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Far below --quick: the cost is almost all interpreter start-up (one process per cache and per run), so
# one row per kind: hard labels, full cache, top-k bucket, top-k + tail draws, sample; two seeds (an interval).
# The teacher is trained and the lr high enough that two student steps move the student.
SMOKE_RUNS = ["hard labels (CE)", "full KD", "top-12, tail bucket", "top-12 + 8 tail draws", "sample, 12 draws"]
SMOKE_SCALE = {"vocab": 320, "seq_len": 32, "teacher_steps": 30, "max_blocks": 16, "student_steps": 2, "lr": 0.05,
               "seeds": 2, "eval_stride": 32, "data_lines": 300, "eval_lines": 60, "runs": SMOKE_RUNS,
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


def table_rows(markdown: str, first_only: bool = False) -> list[list[str]]:
    """The cells of every line after the first that starts with "| " (the first is the header; separators start
    with "|-"), or of the first table's only."""
    lines: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("| "):
            lines.append(line)
        elif lines and first_only and not line.startswith("|"):
            break  # the first table ended
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # [0] is the header


@pytest.mark.slow
def test_quality_study_end_to_end(wiki_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: on a busy machine threads make steps 100x slower
    out = tmp_path / "out"
    result = run_cli("bench.quality", "--out", out, "--data-dir", wiki_dir, "--scale-json", json.dumps(SMOKE_SCALE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = (out / "results.md").read_text(encoding="utf-8")
    rows = table_rows(results, first_only=True)
    assert [row[0] for row in rows] == ["teacher", "untrained student", *SMOKE_RUNS]
    assert sorted(p.name for p in (out / "cache").iterdir()) == [  # only those used; draws: one cache per seed
        "full", "sample12_s0", "sample12_s1", "topk12", "topk12_tail8_s0", "topk12_tail8_s1"]
    assert (out / "quality_vs_bytes.png").stat().st_size > 1000
    info = json.loads((out / "summary.json").read_text())
    scores = info["scores"]
    assert scores["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-5)  # the teacher against itself
    assert scores["teacher"]["top1_agreement"] == 1.0
    for record in info["summary"]:  # mean ± t-interval of the two seeds' scores, recomputed here
        seeds = [scores[r["name"]]["nll"] for r in info["runs"] if r["label"] == record["label"]]
        assert len(seeds) == 2 and all(math.isfinite(v) for v in seeds)
        mean, half = sum(seeds) / 2, 12.706 * abs(seeds[0] - seeds[1]) / 2  # s = |a − b|/√2, /√2 again, t(1 df)
        assert record["nats"] == pytest.approx([mean, half], rel=1e-9, abs=1e-12)
    full = {r["seed"]: scores[r["name"]]["nll"] for r in info["runs"] if r["label"] == "full KD"}
    tail = {r["seed"]: scores[r["name"]]["nll"] for r in info["runs"] if r["label"] == "top-12 + 8 tail draws"}
    paired = next(r for r in info["summary"] if r["label"] == "top-12 + 8 tail draws")["vs full KD"]
    assert paired[0] == pytest.approx((tail[0] - full[0] + tail[1] - full[1]) / 2, rel=1e-9)
    hard = [scores[r["name"]]["nll"] for r in info["runs"] if r["label"] == "hard labels (CE)"]
    assert all(nll < scores["untrained student"]["nll"] - 0.05 for nll in hard)  # the students were trained
    assert "paired difference to full KD" in results and "**Which cache?**" in results
    again = run_cli("bench.quality", "--render", out / "summary.json", "--results", tmp_path / "again.md")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again.md").read_text(encoding="utf-8") == results  # the same block from the record alone
    assert (tmp_path / "quality_vs_bytes.png").is_file()


@pytest.mark.slow
def test_quality_refuses_a_missing_data_dir_an_unknown_run_one_seed_and_two_scales(wiki_dir, tmp_path):
    missing = run_cli("bench.quality", "--out", tmp_path / "out", "--data-dir", tmp_path / "nowhere")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} has no wiki.valid.raw or "
                                                   "wiki.test.raw; pass --data-dir with the WikiText-2 raw files"]
    unknown = run_cli("bench.quality", "--out", tmp_path / "out", "--data-dir", wiki_dir,
                      "--scale-json", json.dumps({"runs": ["full KD", "top-13"]}))
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == ["error: no student run is labelled 'top-13'"]
    one = run_cli("bench.quality", "--out", tmp_path / "out", "--data-dir", wiki_dir,
                  "--scale-json", json.dumps({"seeds": 1}))
    assert one.returncode == 2 and one.stderr.strip().splitlines() == ["error: an interval needs at least 2 seeds, "
                                                                       "got seeds=1"]
    assert not (tmp_path / "out").exists()  # refused before anything was written
    both = run_cli("bench.quality", "--quick", "--scale-json", "{}", "--out", tmp_path / "out")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.slow
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


def test_quality_refuses_a_missing_data_dir_before_writing(tmp_path):
    from bench.quality import main
    from common.cli import UserError

    with pytest.raises(UserError) as info:
        main(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "nowhere")])
    assert str(info.value) == (f"{tmp_path / 'nowhere'} has no wiki.valid.raw or wiki.test.raw; pass --data-dir with "
                               "the WikiText-2 raw files")
    assert not (tmp_path / "out").exists()
