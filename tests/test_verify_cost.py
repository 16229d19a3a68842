"""Smoke test of bench.verify_cost at a size far below what it is for: one table, its section rewritten."""
from __future__ import annotations

from tests.conftest import run_cli


def test_verify_cost_prints_its_table_and_rewrites_its_section(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n## Other\n\nkept\n")
    for _ in range(2):  # the second run replaces the first run's table
        result = run_cli("bench.verify_cost", "--mb", "2", "--repeats", "1", "--doc", doc)
        assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]  # after the header
    assert [row.split(" | ")[0] for row in rows] == ["| read the file", "| sha256 (file_sha256, as verify_cache)"]
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)  # MB/s
    text = doc.read_text()
    assert text.startswith("# Performance\n\n## Other\n\nkept\n") and text.count("| sha256") == 1
