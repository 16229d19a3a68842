"""The manifest as a typed, validated record: hand-edited, truncated and foreign manifests are one line naming
the field, for the library and for every command that reads a cache."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cache.format import FORMAT_NAME, dataset_table_markdown, stored_table_markdown
from cache.manifest import Manifest, load_manifest
from common.cli import UserError
from tests.test_cache import make_arrays, write_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def manifest_text(tmp_path) -> tuple[Path, dict]:
    cache_dir = tmp_path / "cache"
    write_cache(cache_dir, make_arrays())
    return cache_dir, json.loads((cache_dir / "manifest.json").read_text())


def edit(cache_dir: Path, data: dict) -> None:
    (cache_dir / "manifest.json").write_text(json.dumps(data))


def test_round_trip(manifest_text):
    cache_dir, data = manifest_text
    manifest = load_manifest(str(cache_dir))
    assert json.loads(manifest.to_json()) == data
    assert Manifest.from_json(manifest.to_json()) == manifest


# each case: an edit of the parsed manifest, and what the one-line error must name
CASES = {
    "removed top-level field": (lambda d: d.pop("seq_len"), "missing field 'seq_len'"),
    "removed nested field": (lambda d: d["tokenizer"].pop("hash"), "field.tokenizer: missing field 'hash'"),
    "removed shards": (lambda d: d.pop("shards"), "shards"),
    "wrong type": (lambda d: d.update(num_blocks="10"), "field.num_blocks: expected int, got '10'"),
    "wrong nested type": (lambda d: d["shards"][1].update(sha256=12), "field.shards[1].sha256: expected str"),
    "bool for int": (lambda d: d.update(seq_len=True), "field.seq_len"),
    "unknown mode": (lambda d: d.update(mode="dense"), "field.mode: expected one of 'topk' | 'full' | 'sample'"),
    "unknown field": (lambda d: d.update(extra=1), "unknown field 'extra'"),
    "unknown format version": (lambda d: d.update(format_version=99),
                               "format_version 99 is not supported by this release (it reads 2 and 3)"),
    "foreign format": (lambda d: d.update(format="other"), f"not a {FORMAT_NAME} manifest"),
    "shards miss blocks": (lambda d: d.update(num_blocks=1000), "num_blocks: 1000, but the shards cover 10"),
    "shard gap": (lambda d: d["shards"][1].update(first_block=5), "shards[1].first_block: expected 4, got 5"),
    "shard outside the cache": (lambda d: d["shards"][0].update(file="../x.h5"), "shards[0].file"),
    "datasets of another mode": (lambda d: d["datasets"].pop("topk_index_gaps"), "field datasets"),
    "decoded datasets stored as they are": (lambda d: d.update(datasets={
        "input_ids": d["datasets"]["input_ids"], "topk_ids": {"shape_per_block": [6, 4], "dtype": "int32"},
        "topk_logprobs": {"shape_per_block": [6, 4], "dtype": "float16"}}),
        "field datasets: a format-3 topk cache holds"),
    "unknown encoding": (lambda d: d["datasets"]["topk_index_gaps"].update(encoding="zip"),
                         "field.datasets.topk_index_gaps.encoding: expected one of 'raw'"),
    "another dataset's encoding": (lambda d: d["datasets"]["topk_index_gaps"].update(encoding="raw"),
                                   "field datasets.topk_index_gaps.encoding: expected 'index-gaps', got 'raw'"),
    "format 2's datasets in a format-3 manifest": (lambda d: d["datasets"].update(
        topk_id_gaps=d["datasets"].pop("topk_index_gaps")), "field datasets: a format-3 topk cache holds"),
    "unknown compression": (lambda d: d["datasets"]["input_ids"].update(compression="lz5"),
                            "field.datasets.input_ids.compression: expected one of 'zstd'"),
    "stored shape": (lambda d: d["datasets"]["topk_logprobs_by_id"].update(shape_per_block=[6, 5]),
                     "field datasets.topk_logprobs_by_id.shape_per_block: expected [6, 4], got [6, 5]"),
    "stored dtype": (lambda d: d["datasets"]["topk_index_gaps"].update(dtype="int32"),
                     "field datasets.topk_index_gaps.dtype: expected uint16, got int32"),
    "grid on a lossless dataset": (lambda d: d["datasets"]["topk_logprobs_by_id"].update(grid=64),
                                   "field datasets.topk_logprobs_by_id.grid"),
    "error budget on a lossless dataset": (lambda d: d["datasets"]["topk_logprobs_by_id"].update(max_dp=0.004),
                                           "field datasets.topk_logprobs_by_id.max_dp: a number in (0, 1) for format "
                                           "3's sqrt-grid only, got 0.004"),
    "topk without k": (lambda d: d.update(k=None), "field k"),
    "not an object": (lambda d: d.update(teacher=[]), "field.teacher: expected an object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hand_edited_manifest_is_one_line_naming_the_field(manifest_text, case):
    cache_dir, data = manifest_text
    change, named = CASES[case]
    change(data)
    edit(cache_dir, data)
    with pytest.raises(UserError) as info:
        load_manifest(str(cache_dir))
    message = str(info.value)
    assert named in message and "\n" not in message, message
    assert str(cache_dir / "manifest.json") in message


def test_a_format_1_cache_is_one_line_saying_to_rebuild_it(manifest_text):
    """Format 1 never left this repository: its caches are refused before any other field is looked at, by
    the library and by a command (cache.verify), in one line saying how to get a cache this release reads."""
    from tests.conftest import run_cli

    cache_dir, data = manifest_text
    data.update(format_version=1, datasets={"input_ids": {"shape_per_block": [6], "dtype": "int32"}})
    edit(cache_dir, data)
    line = (f"{cache_dir / 'manifest.json'}: a format-1 cache, which this release does not read; rebuild it with "
            "this release's stage one (python -m stage1_teacher.dump)")
    with pytest.raises(UserError) as info:
        load_manifest(str(cache_dir))
    assert str(info.value) == line
    result = run_cli("cache.verify", cache_dir)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {line}\n")


@pytest.mark.parametrize("table, generate", [("dataset table", dataset_table_markdown),
                                             ("stored table", stored_table_markdown)])
def test_the_docs_tables_are_the_format_definition(table, generate):
    page = (REPO / "docs" / "cache-format.md").read_text()
    match = re.search(rf"<!-- BEGIN {table} -->\n(.*?)\n<!-- END {table} -->", page, re.S)
    assert match, f"docs/cache-format.md lacks the {table} markers"
    assert match.group(1).strip() == generate()


@pytest.mark.parametrize("case", ["removed top-level field", "wrong nested type", "unknown format version"])
@pytest.mark.parametrize("command", ["cache.verify", pytest.param("stage2_student.train", marks=pytest.mark.slow),
                                     pytest.param("stage2_student.evaluate", marks=pytest.mark.slow)])
def test_commands_refuse_a_bad_manifest_in_one_line(manifest_text, tmp_path, case, command):
    from tests.conftest import run_cli

    cache_dir, data = manifest_text
    CASES[case][0](data)
    edit(cache_dir, data)
    args = {"cache.verify": [cache_dir],
            "stage2_student.train": ["--cache", cache_dir, f"train.output_dir={tmp_path / 'out'}"],
            "stage2_student.evaluate": ["--cache", cache_dir, "--model", tmp_path / "no-model"]}[command]
    result = run_cli(command, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and CASES[case][1] in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
