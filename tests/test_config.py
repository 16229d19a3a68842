"""The typed configuration: the repo's recipe, typed overrides, and one-line user errors (also via the CLI)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from common.cli import UserError
from common.config import PipelineConfig, config_keys_markdown, load_config, main as config_main

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
    "cache.k": 12,  # the quality study's default cache (docs/results.md): the top 12 and 32 tail draws
    "cache.tail_draws": 32,
    "cache.sample_temperature": None,  # the draws at train.temperature
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


def schema_keys() -> list[tuple[str, dataclasses.Field, typing.Any]]:
    """(section.key, field, type hint) of every key, read from the dataclasses."""
    keys = []
    for section in dataclasses.fields(PipelineConfig):
        hints = typing.get_type_hints(section.default_factory)
        keys += [(f"{section.name}.{f.name}", f, hints[f.name]) for f in dataclasses.fields(section.default_factory)]
    return keys


def non_default(dotted: str, default, hint):
    """A valid value other than the default, chosen from the key's type."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]: a non-null X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return next(name for name in typing.get_args(hint) if name != default)
    if hint is bool:
        return not default
    if hint is int:
        return 7 if default is None else default + 3
    if hint is float:  # small defaults (error budgets) doubled: within their ranges
        return 1.25 if default is None else default * 2 if 0 < default < 0.01 else default + 0.25
    return f"{dotted}-set"


def test_to_dict_round_trips_every_key(tmp_path):
    """Overrides → to_dict() → a YAML file → parse: the same config, every key set to a non-default value."""
    overrides = []
    for dotted, f, hint in schema_keys():
        value = non_default(dotted, f.default, hint)
        overrides.append(f"{dotted}={str(value).lower() if isinstance(value, bool) else value}")
    first = load_config(None, overrides)
    path = tmp_path / "round_trip.yaml"
    path.write_text(yaml.safe_dump(first.to_dict()))
    second = load_config(str(path))
    for dotted, f, _ in schema_keys():
        a, b = get(first, dotted), get(second, dotted)
        assert a != f.default, dotted
        assert a == b and type(a) is type(b), f"{dotted}: {a!r} became {b!r}"
    assert second == first


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
    ("train.precision=fp16", "train.precision", "fp16"),
    ("teacher.dtype=bfloat16", "teacher.dtype", "bfloat16"),
    ("eval.dtype=float32", "eval.dtype", "float32"),
    ("train.loss=skew_kl", "train.loss", "skew_kl"),
    ("train.topk_tail=renormalize", "train.topk_tail", "renormalize"),
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


@pytest.mark.parametrize("override, allowed", [
    ("train.precision=bf61", "auto, bf16, fp16, fp32"),
    ("train.precision=bfloat16", "auto, bf16, fp16, fp32"),         # a dtype name is not a precision
    ("teacher.dtype=bf16", "auto, float32, bfloat16, float16"),     # one spelling per dtype
    ("student.dtype=fp32", "auto, float32, bfloat16, float16"),
    ("eval.dtype=half", "auto, float32, bfloat16, float16"),
    ("train.loss=kl", "forward_kl, reverse_kl, jsd, skew_kl"),
    ("train.topk_tail=chop", "bucket, renormalize"),
    ("cache.mode=dense", "topk, full, sample"),
    ("cache.mode=null", "topk, full, sample"),                      # a name key keeps the text: 'null'
    ("cache.mode=1", "topk, full, sample"),
])
def test_closed_set_is_checked_at_parse_time(override, allowed):
    key, _, value = override.partition("=")
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert str(info.value) == f"config key {key}: expected one of {allowed}, got '{value}'"


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=jsd", "train.loss_beta=0"], "train.loss=jsd with train.loss_beta=0 is identically 0 (the mixture "
                                              "is the student itself) and trains nothing: use a β strictly between "
                                              "0 and 1"),
    (["train.loss=jsd", "train.loss_beta=1"], "train.loss=jsd with train.loss_beta=1 is identically 0 (the mixture "
                                              "is the teacher itself) and trains nothing: use a β strictly between "
                                              "0 and 1"),
    (["train.loss=skew_kl", "train.loss_alpha=1.0"], "train.loss=skew_kl with train.loss_alpha=1 is identically 0 "
                                                     "(the skewed student is the teacher itself) and trains nothing: "
                                                     "use an α below 1"),
])
def test_a_kd_loss_that_is_identically_zero_is_refused_when_the_config_loads(tmp_path, overrides, message):
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    assert str(info.value) == message
    path = tmp_path / "p.yaml"  # from a file too
    path.write_text(yaml.safe_dump({"train": {k.split(".")[1]: yaml.safe_load(v) for k, v in
                                              (o.split("=") for o in overrides)}}))
    with pytest.raises(UserError, match="is identically 0"):
        load_config(str(path))
    # the same divergence left out (train.kd_weight=0: a hard-label run), or at another β / α, is fine
    load_config(None, [*overrides, "train.kd_weight=0", "train.hard_weight=1"])
    load_config(None, [*overrides, "train.loss_beta=0.5", "train.loss_alpha=0.5"])


# Each key's range, from its Bounds in the schema: a value just outside is refused in one line when the config
# loads (from an override or a file), the value on the bound loads.
@pytest.mark.parametrize("key, outside, message, on_bound", [
    ("train.lr", "0", "train.lr must be positive, got 0.0", "1e-9"),
    ("train.lr", "nan", "train.lr must be a finite number, got nan", None),
    ("train.temperature", "-inf", "train.temperature must be a finite number, got -inf", None),
    ("train.warmup_ratio", "1.01", "train.warmup_ratio must be in [0, 1], got 1.01", "1"),
    ("train.hard_weight", "-0.1", "train.hard_weight must be 0 or more, got -0.1", "0"),
    ("train.num_workers", "-1", "train.num_workers must be 0 or more, got -1", "0"),
    ("train.seed", "-1", "train.seed must be 0 or more, got -1", "0"),
    ("train.max_steps", "0", "train.max_steps must be positive or null, got 0", "1"),
    ("data.seq_len", "1", "data.seq_len must be at least 2, got 1", "2"),
    ("cache.draws", "4294967296", "cache.draws must be in [1, 4294967295], got 4294967296", "4294967295"),
    ("cache.tail_draws", "-1", "cache.tail_draws must be in [0, 4294967295], got -1", "0"),
    ("cache.sample_temperature", "0", "cache.sample_temperature must be positive or null, got 0.0", "0.01"),
    ("teacher.sync_timeout", "0", "teacher.sync_timeout must be positive, got 0.0", "0.5"),
    ("eval.stride", "0", "eval.stride must be positive or null, got 0", "1"),
    ("eval.max_length", "-5", "eval.max_length must be positive or null, got -5", "1"),
])
def test_a_value_outside_its_range_is_refused_when_the_config_loads(tmp_path, key, outside, message, on_bound):
    section, name = key.split(".")
    path = tmp_path / "p.yaml"
    path.write_text(f"{section}:\n  {name}: {outside}\n")
    for file, overrides in ((None, [f"{key}={outside}"]), (str(path), [])):  # an override, then a file
        with pytest.raises(UserError) as info:
            load_config(file, overrides)
        assert str(info.value) == message
    if on_bound is not None:
        assert getattr(getattr(load_config(None, [f"{key}={on_bound}"]), section), name) == float(on_bound)


def test_every_default_is_inside_its_range_and_the_table_says_the_range():
    rows = markdown_rows(config_keys_markdown())
    for dotted, f, _ in schema_keys():
        bounds = f.metadata["bounds"]
        if bounds is not None and f.default is not None:
            assert bounds.holds(f.default), dotted
            assert bounds.words() in rows[dotted][2], dotted
        assert rows[dotted][3] == ("yes" if f.metadata["changes_result"] else "no"), dotted


def test_the_keys_that_change_the_result():
    """The keys a cache or a checkpoint is resumed under only when equal (the others say how, not what)."""
    from common.config import result_keys

    assert result_keys("train") == ["batch_size", "gradient_accumulation", "epochs", "max_steps", "lr", "weight_decay",
                                    "warmup_ratio", "max_grad_norm", "temperature", "kd_weight", "hard_weight", "loss",
                                    "topk_tail", "loss_beta", "loss_alpha", "seed", "fsdp"]
    assert result_keys("cache") == ["mode", "k", "draws", "tail_draws", "sample_temperature", "seed", "quantize",
                                    "max_dp", "max_kl", "shard_blocks"]
    assert result_keys("student") == ["model", "dtype"]
    assert result_keys("teacher") == ["model", "batch_size", "dtype"]


def test_closed_set_is_checked_in_yaml_files(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  precision: bf61\n")
    with pytest.raises(UserError,
                       match=r"^config key train.precision: expected one of auto, bf16, fp16, fp32, got 'bf61'$"):
        load_config(str(path))
    path.write_text("cache:\n  mode: 3\n")
    with pytest.raises(UserError, match=r"^config key cache.mode: expected one of topk, full, sample, got 3$"):
        load_config(str(path))


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
    "outside a closed set": (["train.precision=bf61"], "train.precision: expected one of auto, bf16, fp16, fp32"),
    # hub ids reach from_pretrained, which fails offline with the hub's own error (not "directory not found")
    "bare hub id": (["teacher.model=gpt2"], "cannot load teacher tokenizer gpt2: "),
    "org/name hub id": (["teacher.model=no-such-org/no-such-model"],
                        "cannot load teacher tokenizer no-such-org/no-such-model: "),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run the commands concurrently (each is mostly interpreter start-up)."""
    hf_home = tmp_path_factory.mktemp("hf_home")  # empty: no cached hub model
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"))
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


@pytest.mark.slow  # the commands start concurrently, each loading torch: a minute on 2 cores
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


# --- the keys' documentation: one source, the schema ----------------------------------------------------

KEYS_PAGE = REPO_ROOT / "docs" / "configuration.md"
TABLE_BEGIN, TABLE_END = "<!-- BEGIN config keys -->\n", "<!-- END config keys -->"


def markdown_rows(table: str) -> dict[str, list[str]]:
    """section.key → its row's cells, from a markdown table (header and rule skipped)."""
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_every_key_has_help():
    for dotted, f, _ in schema_keys():
        assert f.metadata.get("help", "").strip(), f"{dotted} has no help text"


def test_key_table_lists_every_key():
    rows = markdown_rows(config_keys_markdown())
    assert list(rows) == [dotted for dotted, _, _ in schema_keys()]
    for dotted, f, _ in schema_keys():
        assert len(rows[dotted]) == 5 and rows[dotted][4] == f.metadata["help"], dotted
    assert rows["train.precision"][1:4] == ["`auto`", "`auto`, `bf16`, `fp16`, `fp32`", "no"]
    assert rows["teacher.dtype"][2] == "`auto`, `float32`, `bfloat16`, `float16`"
    assert rows["data.max_blocks"][1:4] == ["`5000`", "integer, positive, `null`", "yes"]
    assert rows["cache.overwrite"][1:3] == ["`false`", "`true`, `false`"]
    assert rows["train.lr"][1:3] == ["`2e-05`", "number, positive"]


def test_the_docs_key_table_is_generated_from_the_schema():
    readme = KEYS_PAGE.read_text(encoding="utf-8")
    assert readme.count(TABLE_BEGIN) == 1 and readme.count(TABLE_END) == 1
    table = readme[readme.index(TABLE_BEGIN) + len(TABLE_BEGIN): readme.index(TABLE_END)]
    assert table == config_keys_markdown(), \
        "docs/configuration.md's key table differs from the schema: paste `python -m common.config --markdown` " \
        "between the markers"


def test_markdown_command_prints_the_table(capsys):
    assert config_main(["--markdown"]) == 0
    assert capsys.readouterr().out == config_keys_markdown()


@pytest.mark.parametrize("module", ["stage1_teacher.dump", "stage2_student.train", "stage2_student.evaluate"])
def test_help_lists_every_key_with_its_default_and_help(module, capsys):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    for dotted, f, _ in schema_keys():
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        assert any(line.startswith(f"{dotted}={default}  (") for line in lines), f"{module} --help lacks {dotted}"
        first_words = " ".join(f.metadata["help"].replace("`", "").split()[:4])
        assert first_words in " ".join(out.split()), f"{module} --help lacks the help of {dotted}"
    precision = next(line for line in lines if line.startswith("train.precision="))
    assert precision == "train.precision=auto  (auto | bf16 | fp16 | fp32; does not change the result)"
    assert "train.lr=2e-05  (number, positive)" in lines


def test_common_imports_no_layer_above_it():
    """common/ is the bottom layer: cache/ and the stages import it, never the other way round (imports inside
    functions too)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    upward = []
    for path in sorted((root / "common").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            upward += [f"{path.name}: {m}" for m in modules
                       if m.split(".")[0] in ("cache", "stage1_teacher", "stage2_student", "bench", "tiny_world")]
    assert upward == []
