"""One typed configuration for both stages: `pipeline.yaml` plus `section.key=value` overrides.

The schema is the dataclasses below: each key's type, default and help text. A key that is not a field,
or a value of the wrong type or outside a closed set of names (`Literal`), is a `UserError` naming it.
`python -m common.config --markdown` prints docs/configuration.md's table of keys from this schema; every command's
`--help` lists them too.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

import yaml

from common.cli import UserError, error_line, run_main

DEFAULT_CONFIG = "pipeline.yaml"

# The closed sets of names, each defined once; the code that acts on them keys its tables by these.
CacheMode = Literal["topk", "full", "sample"]  # what a cache holds per position (cache/format.py's MODES)
LossName = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
TopkTail = Literal["bucket", "renormalize"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]  # autocast's compute mode
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]  # the dtype weights are loaded in
ResumeMode = Literal["auto", "never"]  # what stage two does with the checkpoints of an earlier run
RowKind = Literal["lines", "documents", "chat"]  # how a split's rows become one token stream (common.data)
TrainOn = Literal["assistant", "all"]  # data.rows=chat: which positions are trained (common.chat)
DataRows = Literal["auto", RowKind]
DeviceMapName = Literal["auto"]  # accelerate's big-model dispatch of one model over every visible device
EvalProtocol = Literal["lm-eval", "strided"]  # how stage2_student.evaluate scores a split


UINT32_MAX = 0xFFFFFFFF  # counts stored as uint32 in the cache


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric key, checked when the config loads (a float must also be finite)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself excluded (> low rather than ≥ low)

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def words(self) -> str:
        """As the error message and the docs say it: `positive`, `0 or more`, `at least 2`, `in [0, 1]`."""
        low, high = self.low, self.high
        if high is not None:
            return f"in {'(' if self.low_open else '['}{_number(low)}, {_number(high)}]"
        if (low == 0 and self.low_open) or (low == 1 and not self.low_open):
            return "positive"
        if low == 0:
            return "0 or more"
        return f"{'above' if self.low_open else 'at least'} {_number(low)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(default: Any, doc: str, *, low: float | None = None, high: float | None = None, above: float | None = None,
            changes_result: bool = True) -> Any:
    """A config key: its default, the help text that --help and the docs' key table show, its range (`low`/`high`
    inclusive, `above` exclusive) and whether it changes what is computed. Keys with changes_result=False say how
    a stage runs, not what it produces: a cache or a checkpoint made under other values is still resumed."""
    bounds = Bounds(above if above is not None else low, high, above is not None) \
        if (low, high, above) != (None, None, None) else None
    return field(default=default, metadata={"help": doc, "bounds": bounds, "changes_result": changes_result})


@dataclass
class TeacherConfig:
    model: str = setting("Qwen/Qwen2-7B", "hub id or local directory of the teacher")
    batch_size: int = setting(4, "blocks per teacher forward in stage one", low=1)
    dtype: DTypeName = setting("auto", "teacher weights; `auto` = bfloat16 on a GPU that has it, float32 otherwise")
    device: str = setting("auto", "stage one's device: `auto` = cuda if available, else cpu; or a torch device "
                                  "name (`cpu`, `cuda:1`); with N processes each uses the GPU of its LOCAL_RANK",
                          changes_result=False)
    device_map: Optional[DeviceMapName] = setting(None, "`auto`: spread a teacher too large for one GPU over every "
                                                        "visible GPU (accelerate's big-model dispatch), one process "
                                                        "only; null = the whole teacher on teacher.device",
                                                  changes_result=False)
    sync_timeout: float = setting(1800.0, "N processes: seconds a process waits for the others (at the start, "
                                          "after each round of N shards, at the end) before all stop in one line",
                                  above=0, changes_result=False)


@dataclass
class StudentConfig:
    model: str = setting("Qwen/Qwen2-1.5B", "hub id or local directory of the student (its tokenizer must be "
                                            "the cache's)")
    dtype: DTypeName = setting("float32", "the student's master weights in stage two (`auto` as in teacher.dtype); "
                                          "the compute dtype is train.precision")


@dataclass
class DataConfig:
    dataset: str = setting("wikitext", "hub dataset, `load_dataset(dataset, subset)`; recorded in the cache "
                                       "and checked by stage two")
    subset: str = setting("wikitext-2-raw-v1", "the dataset's configuration")
    local_dir: Optional[str] = setting(None, "folder with `wiki.{train,valid,test}.raw` to read instead of the "
                                             "hub (nothing is fetched); null = the hub")
    files: Optional[list[str]] = setting(None, "local `.txt`, `.jsonl` or `.parquet` files or globs to read instead "
                                               "of the hub, in order; `{split}` in a path stands for the split "
                                               "name; null = the hub (or data.local_dir)")
    text_column: str = setting("text", "the column holding the text (hub datasets, `.jsonl`, `.parquet`)")
    rows: DataRows = setting("auto", "how rows become one token stream: `lines` = lines of one text, joined as "
                                     "they are (WikiText, `.txt`); `documents` = each row tokenized on its own "
                                     "and followed by the tokenizer's EOS token; `auto` = `documents` for "
                                     "`.jsonl`/`.parquet` files, `lines` otherwise; `chat` = each row is a "
                                     "conversation (data.messages_column) rendered with the tokenizer's chat "
                                     "template, conversations packed into blocks without seeing each other")
    messages_column: str = setting("messages", "data.rows=chat: the column holding each conversation, a list of "
                                               "{role, content}")
    train_on: TrainOn = setting("assistant", "data.rows=chat: the positions trained (and cached): `assistant` = "
                                             "those whose next token is in an assistant turn; `all` = every "
                                             "position whose next token is in the same conversation")
    split: str = setting("train", "split that stage one dumps and stage two trains on")
    seq_len: int = setting(256, "tokens per block, and per evaluation window", low=2)
    max_blocks: Optional[int] = setting(5000, "at most this many blocks (the original's quick subset); "
                                              "null = all blocks", low=1)


@dataclass
class CacheConfig:
    dir: str = setting("cache/wikitext", "the cache stage one writes and stage two reads (stage two's "
                                         "`--cache` overrides it)", changes_result=False)
    mode: CacheMode = setting("topk", "what stage one stores per position: the k most likely tokens' "
                                      "log-probs, every log-prob, or sampled tokens and their counts")
    k: int = setting(12, "topk mode: ids per position", low=1)
    draws: int = setting(50, "sample mode: tokens drawn per position, with replacement", low=1, high=UINT32_MAX)
    tail_draws: int = setting(32, "topk mode: tokens drawn per position from the teacher outside its top k, with "
                                 "replacement; stage two's target is then the top-k probabilities plus r·count/t on "
                                 "the drawn ids (r the missing mass), an unbiased estimate of the teacher; 0 = none "
                                 "(the missing mass is one bucket)", low=0, high=UINT32_MAX)
    sample_temperature: Optional[float] = setting(
        None, "sample mode and tail draws: temperature of the teacher distribution drawn from (a tail cache's "
              "top-k log-probs are at it too); stage two must train at it; null = train.temperature of the same config",
        above=0)
    seed: int = setting(0, "sample mode and tail draws: seed of the generator (each block's draws from its own)", low=0)
    quantize: bool = setting(False, "topk mode: store the log-probs on a grid of √(p / p_max), each position's as "
                                    "coarse as cache.max_dp and cache.max_kl allow (the k ids' mass kept), instead "
                                    "of lossless fp16: fewer bytes")
    max_dp: float = setting(4e-3, "cache.quantize: every decoded probability within this of the teacher's",
                            low=5e-4, high=0.1)
    max_kl: float = setting(1e-5, "cache.quantize: at every position, KL of the teacher's renormalised top-k to the "
                                  "decoded one at most this (nats)", low=1e-7, high=0.01)
    shard_blocks: int = setting(512, "blocks per HDF5 shard", low=1)
    queue_size: int = setting(8, "batches waiting for the writer thread", low=1, changes_result=False)
    overwrite: bool = setting(False, "replace an existing cache (never a directory that is not a cache)",
                              changes_result=False)


@dataclass
class TrainConfig:
    output_dir: str = setting("distilled_qwen2_1.5B", "where stage two saves the model, tokenizer, "
                                                      "`metrics.jsonl` and `run.json`", changes_result=False)
    log_dir: str = setting("logs_qwen2", "TensorBoard scalars; evaluation writes its JSON here by default",
                           changes_result=False)
    batch_size: int = setting(2, "blocks per micro-batch", low=1)
    gradient_accumulation: int = setting(8, "micro-batches per optimizer step", low=1)
    epochs: int = setting(1, "passes over the cache", low=1)
    max_steps: Optional[int] = setting(None, "optimizer steps; overrides epochs, as in HF Trainer; "
                                             "null = whole epochs", low=1)
    lr: float = setting(2e-5, "AdamW peak learning rate", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0)
    warmup_ratio: float = setting(0.05, "fraction of the steps warming up linearly; then linear decay to 0",
                                  low=0, high=1)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above=0)
    temperature: float = setting(2.0, "T: divides the teacher's log-probs and the student's logits; the KD "
                                      "loss is scaled by T²", above=0)
    kd_weight: float = setting(1.0, "weight of the KD loss; 0 = not computed, `kd_loss` logged as null, except "
                                    "at T = 1 from a top-k or sample cache (logged, without its gradient)", low=0)
    hard_weight: float = setting(0.0, "weight of the next-token cross-entropy; 0 = not computed, `hard_loss` "
                                      "logged as null, except at T = 1 (logged, without its gradient)", low=0)
    loss: LossName = setting("forward_kl", "KD divergence: soft cross-entropy (the original), reverse KL, "
                                           "generalized JSD, skew KL")
    topk_tail: TopkTail = setting("bucket", "topk caches: keep the teacher's missing mass as one bucket, or "
                                            "renormalize the teacher over its k ids")
    loss_beta: float = setting(0.5, "`jsd`: β, the teacher's weight in the mixture", low=0, high=1)
    loss_alpha: float = setting(0.1, "`skew_kl`: α, the teacher's weight in the skewed student", low=0, high=1)
    loss_chunk: int = setting(128, "positions per loss chunk where the loss needs a temporary of the "
                                   "vocabulary's size (full distributions, bf16 logits): bounds its memory "
                                   "(`docs/performance.md`)", low=1, changes_result=False)
    precision: Precision = setting("auto", "autocast's compute mode, not a weight dtype (that is student.dtype): "
                                           "`auto` = bf16 on a GPU that has it, else off; `fp32` = off",
                                   changes_result=False)
    gradient_checkpointing: bool = setting(False, "recompute the student's activations in the backward pass",
                                           changes_result=False)
    seed: int = setting(42, "data order and initialisation", low=0)
    device: str = setting("auto", "stage two's and evaluation's device, as teacher.device", changes_result=False)
    num_workers: int = setting(0, "DataLoader processes reading the cache ahead of the GPU",
                               low=0, changes_result=False)
    checkpoint_steps: Optional[int] = setting(500, "optimizer steps between checkpoints in "
                                                   "`<output_dir>/checkpoints/step-N/` (one is also written at the "
                                                   "end); null = only at the end", low=1, changes_result=False)
    keep_checkpoints: int = setting(2, "complete checkpoints kept; older ones are deleted once a newer one is "
                                       "complete", low=1, changes_result=False)
    resume: ResumeMode = setting("auto", "`auto`: continue from the newest complete checkpoint in train.output_dir "
                                         "when it was made with the same cache and settings (a mismatch is refused, "
                                         "naming the setting); `never`: always start afresh", changes_result=False)
    verify_cache: bool = setting(True, "check every shard's sha256 (and dataset shapes) against the manifest "
                                       "before training; false skips it", changes_result=False)
    fsdp: bool = setting(False, "shard the student across the processes (accelerate's FSDP plugin) instead of "
                                "replicating it (DDP); GPUs only")
    collective_timeout_s: int = setting(1800, "seconds a process waits for the others (gradient all-reduce, "
                                              "checkpoint barrier) before the run stops", low=1, changes_result=False)
    overwrite: bool = setting(False, "start afresh in a train.output_dir that holds an earlier run (its files, "
                                     "and only those, are deleted; any other file there is refused)",
                              changes_result=False)


@dataclass
class EvalConfig:
    split: str = setting("test", "split to score")
    protocol: EvalProtocol = setting("lm-eval", "`lm-eval`: lm-evaluation-harness's `wikitext` task: each document "
                                                "(WikiText article, or row of `.jsonl`/`.parquet` files) scored on "
                                                "its own with rolling windows of eval.max_length tokens; word and "
                                                "byte perplexity, bits per byte (`docs/evaluation.md`); `strided`: "
                                                "one token stream, windows of data.seq_len every eval.stride tokens. "
                                                "Neither applies to data.rows=chat: conversations are scored on "
                                                "their trained positions (assistant_loss)")
    max_length: Optional[int] = setting(None, "`lm-eval`: tokens per rolling window; null = the model's context "
                                              "length (its config), at most 2048", low=1)
    stride: Optional[int] = setting(None, "`strided`: sliding-window stride in tokens; null = data.seq_len / 2", low=1)
    batch_size: int = setting(8, "windows per forward", low=1, changes_result=False)
    models_per_pass: int = setting(8, "with --teacher: models held in memory at once, each batch's teacher forward "
                                      "shared by them (more: fewer teacher forwards, more memory)", low=1,
                                   changes_result=False)
    max_windows: Optional[int] = setting(None, "score only the first windows (`strided`), documents (`lm-eval`) or "
                                               "blocks (data.rows=chat); null = all", low=1)
    output: Optional[str] = setting(None, "JSON results; null = `<train.log_dir>/eval_<split>.json`",
                                    changes_result=False)
    dtype: DTypeName = setting("auto", "weights of every scored model; `auto` = the dtype each model was saved "
                                       "in (its config.json), as `from_pretrained(dtype=\"auto\")`")


def draw_temperature(cache: "CacheConfig", train: "TrainConfig") -> float:
    """The temperature stage one draws at: cache.sample_temperature, or by default the train.temperature that
    stage two will train at (the draws estimate the teacher at that temperature only)."""
    return train.temperature if cache.sample_temperature is None else cache.sample_temperature


@dataclass
class PipelineConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether null is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _is_text(hint: Any) -> bool:
    return hint is str or typing.get_origin(hint) is Literal


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return `value` as the schema type `hint`, or raise UserError naming `name`."""
    hint, optional = _split_optional(hint)
    if optional and value is None:
        return None
    if hint == list[str]:  # one text is a list of one
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, (bool, dict, list)) or item is None for item in items):
            raise UserError(f"config key {name}: expected text or a list of text, got {value!r}")
        return [str(item) for item in items]
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, str) and value in allowed:
            return value
        raise UserError(f"config key {name}: expected one of {', '.join(allowed)}, got {value!r}")
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads `1e-3` as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a model name that looks like a number
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise UserError(f"config key {name}: expected {hint.__name__}, got {value!r}")
    return value


def _schema(section: str) -> type:
    """The dataclass of a config section, or a UserError naming the known ones."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(PipelineConfig)}
    if section not in sections:
        raise UserError(f"unknown config section: {section!r} (known: {', '.join(sections)})")
    return sections[section]


def _field(section: str, key: str) -> tuple[dataclasses.Field, Any]:
    """A key's field in the schema (its metadata: help, bounds, changes_result) and its type."""
    schema = _schema(section)
    hints = typing.get_type_hints(schema)
    if key not in hints:
        raise UserError(f"unknown config key: {section}.{key}")
    return next(f for f in dataclasses.fields(schema) if f.name == key), hints[key]


def _apply(cfg: PipelineConfig, section: str, key: str, value: Any) -> None:
    key_field, hint = _field(section, key)
    name = f"{section}.{key}"
    value = _check_type(name, value, hint)
    _check_bounds(name, value, key_field.metadata["bounds"], _split_optional(hint)[1])
    setattr(getattr(cfg, section), key, value)


def _check_bounds(name: str, value: Any, bounds: Bounds | None, optional: bool) -> None:
    """The one range check of every numeric key (its Bounds in the schema)."""
    if bounds is None or value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if not bounds.holds(value):
        raise UserError(f"{name} must be {bounds.words()}{' or null' if optional else ''}, got {value}")


def result_keys(section: str) -> list[str]:
    """The keys of a section that change what a stage computes (changes_result in the schema): the settings a
    cache or a checkpoint is resumed under only when equal."""
    return [f.name for f in dataclasses.fields(_schema(section)) if f.metadata["changes_result"]]


def _parse_override_value(text: str, hint: Any) -> Any:
    """YAML typing for numbers, booleans and null; text stays text for text keys (`cache.dir=no`)."""
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    base, optional = _split_optional(hint)
    if _is_text(base):
        return None if value is None and optional else text
    if base == list[str] and not isinstance(value, list):  # a flow list `[a, b]`, else one text as written
        return None if value is None and optional else text
    return value


def load_config(path: str | None = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read the YAML file (if any), then apply `section.key=value` overrides, all type-checked."""
    cfg = PipelineConfig()
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        try:
            with open(path) as fh:
                raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {error_line(err)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path}: expected a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise UserError(f"config file {path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, str(section), str(key), value)
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise UserError(f"override must look like section.key=value, got {item!r}")
        _apply(cfg, section, key, _parse_override_value(text, _field(section, key)[1]))
    check_loss(cfg.train)
    return cfg


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting (in `current`'s order) whose value differs: (name, saved value, current value). The one
    comparison behind "resumed only under the same settings" (a cache's staging directory, a checkpoint)."""
    missing = "(not recorded)"
    for key in [*current, *(k for k in saved if k not in current)]:
        if saved.get(key, missing) != current.get(key, missing):
            return key, saved.get(key, missing), current.get(key, missing)
    return None


def check_loss(train: TrainConfig) -> None:
    """The rules between keys, checked when the config loads: a loss that is identically 0 trains nothing.
    (With train.kd_weight=0 the KD term is left out: its β or α do not matter.)"""
    if train.kd_weight == 0 and train.hard_weight == 0:
        raise UserError("train.kd_weight and train.hard_weight are both 0: the loss would be 0 and train nothing")
    if train.kd_weight == 0:
        return
    if train.loss == "jsd" and train.loss_beta in (0, 1):
        mixture = "student" if train.loss_beta == 0 else "teacher"
        raise UserError(f"train.loss=jsd with train.loss_beta={train.loss_beta:g} is identically 0 (the mixture is the "
                        f"{mixture} itself) and trains nothing: use a β strictly between 0 and 1")
    if train.loss == "skew_kl" and train.loss_alpha == 1:
        raise UserError("train.loss=skew_kl with train.loss_alpha=1 is identically 0 (the skewed student is the "
                        "teacher itself) and trains nothing: use an α below 1")


# --- the keys' documentation, from the schema ------------------------------------------------------------

@dataclass
class KeyDoc:
    key: str  # section.key
    default: str  # as YAML writes it
    allowed: list[str]  # the closed set of names, or a one-word type and its range, then `null` if allowed
    help: str
    changes_result: bool


_TYPE_WORDS = {int: "integer", float: "number", str: "text", list[str]: "list of text"}


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def key_docs() -> Iterator[KeyDoc]:
    """Every config key in schema order."""
    for section in dataclasses.fields(PipelineConfig):
        schema = section.default_factory
        hints = typing.get_type_hints(schema)
        for key in dataclasses.fields(schema):
            hint, optional = _split_optional(hints[key.name])
            if typing.get_origin(hint) is Literal:
                allowed = list(typing.get_args(hint))
            elif hint is bool:
                allowed = ["true", "false"]
            else:
                bounds = key.metadata["bounds"]
                allowed = [_TYPE_WORDS[hint] + (f", {bounds.words()}" if bounds else "")]
            yield KeyDoc(f"{section.name}.{key.name}", _yaml_scalar(key.default),
                         allowed + ["null"] * optional, key.metadata["help"], key.metadata["changes_result"])


def config_keys_markdown() -> str:
    """docs/configuration.md's table of keys."""
    def code(words: list[str]) -> str:
        return ", ".join(w if w.split(",")[0] in _TYPE_WORDS.values() else f"`{w}`" for w in words)

    lines = ["| key | default | allowed values | changes the result | meaning |", "| --- | --- | --- | --- | --- |"]
    for doc in key_docs():
        cells = [f"`{doc.key}`", f"`{doc.default}`", code(doc.allowed), "yes" if doc.changes_result else "no",
                 doc.help]
        lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def config_keys_text() -> str:
    """The same keys as plain text, for --help."""
    lines = ["config keys (section.key=value; shown with the schema's default, which --config's file may change):"]
    for doc in key_docs():
        result = "" if doc.changes_result else "; does not change the result"
        lines.append(f"  {doc.key}={doc.default}  ({' | '.join(doc.allowed)}{result})")
        lines += textwrap.wrap(doc.help.replace("`", ""), width=100, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def config_arg_parser(description: str) -> argparse.ArgumentParser:
    """The parser every command starts from: --config and trailing key=value overrides; --help lists the keys."""
    parser = argparse.ArgumentParser(description=description, epilog=config_keys_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: pipeline.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (keys below)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, PipelineConfig]:
    """Parse argv; argparse's own usage errors already exit with status 2 and one message."""
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    return args, load_config(args.config, args.overrides)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.config",
                                     description="Print every config key: default, allowed values, help.")
    parser.add_argument("--markdown", action="store_true", help="as docs/configuration.md's table")
    args = parser.parse_args(argv)
    sys.stdout.write(config_keys_markdown() if args.markdown else config_keys_text())
    return 0


if __name__ == "__main__":
    run_main(main)
