"""Smoke test of `bench.step_cost` on the tiny build: every route runs, the tables and the plot are written."""
from __future__ import annotations

import json
import statistics

import pytest

from tests.conftest import run_cli
from tests.test_bench import table_rows

SMOKE_SCALE = {"seq_len": 32, "batch": 2, "blocks": 4, "student_vocab": None, "teacher_vocab": None, "k": 8,
               "draws": 10, "warmup": 1, "repeats": 2, "memory_steps": 1, "data_repeats": 1,
               "student": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32,
                           "tie_word_embeddings": True},
               "teacher": {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
                           "tie_word_embeddings": False}}


def test_step_cost_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add overhead on a busy machine
    docs = tmp_path / "performance.md"
    docs.write_text("# Performance\n\n## Stage two: step cost\n\n<!-- BEGIN step cost -->\nold\n"
                    "<!-- END step cost -->\n\n## Next\n\nkept\n", encoding="utf-8")
    result = run_cli("bench.step_cost", "--scale-json", json.dumps(SMOKE_SCALE), "--out", tmp_path / "out",
                     "--data-dir", tiny / "data", "--tokenizer", tiny / "teacher", "--docs", docs,
                     "--plot", tmp_path / "step_cost.png")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = docs.read_text(encoding="utf-8")
    assert "old" not in text and text.endswith("## Next\n\nkept\n")  # only the marked section is replaced
    assert "Measured with `python -m bench.step_cost --scale-json" in text
    routes, data = [], []
    for row in table_rows(text):
        (routes if row[0].startswith("(") else data).append(row)
    assert [row[0][:3] for row in routes] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)"]
    recorded = json.loads((tmp_path / "out" / "step_cost.json").read_text())
    base = recorded["routes"][0]["times"]
    for row, route in zip(routes, recorded["routes"]):
        assert len(route["times"]) == SMOKE_SCALE["repeats"]
        assert float(row[1]) == pytest.approx(statistics.median(route["times"]), abs=6e-4)  # s / micro-batch
        paired = statistics.median(t / b for t, b in zip(route["times"], base))  # × plain CE, round by round
        assert float(row[2]) == pytest.approx(paired, abs=0.006)
        assert float(row[3]) > 0 and float(row[4]) == pytest.approx(float(row[3]) / float(routes[0][3]), abs=0.01)
    assert routes[0][2] == "1.00" and [row[0] for row in data[1:]] == ["topk", "sample", "full"]
    assert (tmp_path / "step_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_cost_refuses_bad_arguments_before_building_anything(tmp_path):
    from bench.step_cost import main
    from common.cli import UserError

    with pytest.raises(UserError) as info:
        main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert str(info.value) == (f"{tmp_path / 'nowhere'} has no wiki.valid.raw; pass --data-dir with WikiText-2 raw's "
                               "files")
    with pytest.raises(UserError) as info:
        main(["--threads", "0", "--out", str(tmp_path / "out")])
    assert str(info.value) == "--threads must be positive, got 0"
    assert not (tmp_path / "out").exists()
