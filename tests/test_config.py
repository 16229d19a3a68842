"""The typed configuration: the repo's recipe, typed overrides, and one-line user errors (also via the CLI)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import UserError
from common.config import PipelineConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_YAML = REPO_ROOT / "pipeline.yaml"

# The original recipe, as documented (Qwen2-7B → Qwen2-1.5B on WikiText-2 raw).
RECIPE = {
    "teacher.model": "Qwen/Qwen2-7B",
    "student.model": "Qwen/Qwen2-1.5B",
    "data.dataset": "wikitext",
    "data.subset": "wikitext-2-raw-v1",
    "data.split": "train",
    "data.seq_len": 256,
    "data.max_blocks": 5000,
    "cache.dir": "cache/wikitext",
    "cache.mode": "topk",
    "cache.k": 64,
    "train.batch_size": 2,
    "train.gradient_accumulation": 8,
    "train.temperature": 2.0,
    "train.kd_weight": 1.0,
    "train.hard_weight": 0.0,
    "train.lr": 2e-5,
    "train.epochs": 1,
    "train.log_dir": "logs_qwen2",
    "train.output_dir": "distilled_qwen2_1.5B",
}

REQUIRED_KEYS = (
    "teacher.model", "student.model", "data.dataset", "data.subset", "data.local_dir", "data.split",
    "data.seq_len", "data.max_blocks", "cache.dir", "cache.mode", "cache.k", "train.output_dir",
    "train.max_steps",
)


def get(cfg: PipelineConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


# --- the recipe ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["pipeline.yaml", "dataclass defaults"])
def test_defaults_are_the_documented_recipe(source):
    cfg = load_config(str(PIPELINE_YAML)) if source == "pipeline.yaml" else load_config(None)
    for dotted, expected in RECIPE.items():
        value = get(cfg, dotted)
        assert value == expected, f"{source}: {dotted} = {value!r}, expected {expected!r}"
        assert type(value) is type(expected), f"{source}: {dotted} has type {type(value).__name__}"
    assert cfg.data.local_dir is None  # the hub route unless a local folder is given


def test_required_keys_exist():
    cfg = load_config(str(PIPELINE_YAML))
    for dotted in REQUIRED_KEYS:
        section, key = dotted.split(".")
        assert section in {f.name for f in dataclasses.fields(PipelineConfig)}, dotted
        assert key in {f.name for f in dataclasses.fields(getattr(cfg, section))}, dotted
    assert cfg.train.max_steps is None


def test_to_dict_round_trips_sections():
    data = load_config(str(PIPELINE_YAML)).to_dict()
    assert set(data) == {"teacher", "student", "data", "cache", "train", "eval"}
    assert data["cache"]["k"] == 64 and data["data"]["seq_len"] == 256


# --- typed overrides ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, dotted, expected", [
    ("train.lr=1e-3", "train.lr", 0.001),          # YAML 1.1 reads 1e-3 as a string: still a float
    ("train.lr=0.5", "train.lr", 0.5),
    ("train.lr=3", "train.lr", 3.0),               # an int where a float is expected is widened
    ("data.max_blocks=null", "data.max_blocks", None),
    ("data.max_blocks=7", "data.max_blocks", 7),
    ("cache.k=12", "cache.k", 12),
    ("train.max_steps=5", "train.max_steps", 5),
    ("train.gradient_checkpointing=true", "train.gradient_checkpointing", True),
    ("cache.overwrite=false", "cache.overwrite", False),
    ("teacher.model=/some/dir", "teacher.model", "/some/dir"),
    ("cache.mode=sample", "cache.mode", "sample"),
])
def test_overrides_are_typed(override, dotted, expected):
    cfg = load_config(str(PIPELINE_YAML), [override])
    value = get(cfg, dotted)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_after_the_file_and_leave_other_keys(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("cache:\n  k: 8\n  mode: full\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(str(path), ["cache.k=16"])
    assert cfg.cache.k == 16            # the override wins
    assert cfg.cache.mode == "full"     # the file's value stays
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.seq_len == 256      # untouched keys keep the defaults


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path)) == PipelineConfig()


# --- user errors name the key -------------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("nope.x=1", "nope"),                                   # unknown section
    ("data.nope=1", "data.nope"),                           # unknown key
    ("data.seq_len=1.5", "data.seq_len"),                   # float for an int
    ("data.seq_len=true", "data.seq_len"),                  # bool is not an int
    ("data.seq_len=abc", "data.seq_len"),
    ("train.lr=abc", "train.lr"),                           # not a number
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing"),
    ("cache.k=[1, 2]", "cache.k"),
    ("data.seq_len", "data.seq_len"),                       # malformed: no '='
    ("seq_len=3", "seq_len=3"),                             # malformed: no section
    ("data.=3", "data.=3"),                                 # malformed: no key
])
def test_bad_override_is_a_user_error_naming_it(override, named):
    with pytest.raises(UserError) as info:
        load_config(str(PIPELINE_YAML), [override])
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_override_message_says_how_it_should_look():
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["justaword"])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(UserError) as info:
        load_config(str(missing))
    assert str(missing) in str(info.value)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("teacher:\n  model: [unclosed\n  batch_size: 4\n")
    with pytest.raises(UserError) as info:
        load_config(str(path))
    message = str(info.value)
    assert str(path) in message and "YAML" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, named", [
    ("data:\n  nope: 1\n", "data.nope"),
    ("bogus:\n  x: 1\n", "bogus"),
    ("data:\n  seq_len: 1.5\n", "data.seq_len"),
    ("train:\n  lr: abc\n", "train.lr"),
    ("data: 3\n", "data"),                      # a section that is not a mapping
    ("- a\n- b\n", "mapping"),                  # a file that is not a mapping
])
def test_bad_yaml_content_is_a_user_error_naming_it(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(str(path))
    assert named in str(info.value)


# --- end to end: `python -m stage1_teacher.dump` turns each into one line and exit status 2 -------------

CLI_CASES = {
    "unknown key": (["data.nope=1"], "data.nope"),
    "wrong type": (["data.seq_len=abc"], "data.seq_len"),
    "missing config": (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    "missing model": (["teacher.model=/nonexistent/model"], "/nonexistent/model"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run the four commands concurrently (each is mostly interpreter start-up)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = {}
    for name, (args, _) in CLI_CASES.items():
        cache_dir = tmp_path_factory.mktemp("cli") / "cache"
        cmd = [sys.executable, "-m", "stage1_teacher.dump", *args, f"cache.dir={cache_dir}"]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), cache_dir)
    results = {}
    for name, (proc, cache_dir) in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out, err, cache_dir)
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_user_error_is_one_line_and_status_2(cli_results, case):
    status, _, stderr, cache_dir = cli_results[case]
    named = CLI_CASES[case][1]
    assert "Traceback" not in stderr, stderr
    assert status == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr: {stderr!r}"
    assert named in lines[0]
    assert not os.path.exists(cache_dir)  # refused before touching the cache directory
    assert not os.path.exists(f"{cache_dir}.partial")
