"""One typed configuration for both stages: `pipeline.yaml` plus `section.key=value` overrides.

The schema is the dataclasses below: each key's type, default and help text. A key that is not a field,
or a value of the wrong type or outside a closed set of names (`Literal`), is a `UserError` naming it.
`python -m common.config --markdown` prints docs/configuration.md's table of keys from this schema; every command's
`--help` lists them too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

import yaml

from common.cli import UserError, run_main

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


def setting(default: Any, doc: str) -> Any:
    """A config key: its default and the help text that --help and the docs' key table show."""
    return field(default=default, metadata={"help": doc})


@dataclass
class TeacherConfig:
    model: str = setting("Qwen/Qwen2-7B", "hub id or local directory of the teacher")
    batch_size: int = setting(4, "blocks per teacher forward in stage one")
    dtype: DTypeName = setting("auto", "teacher weights; `auto` = bfloat16 on a GPU that has it, float32 otherwise")
    device: str = setting("auto", "stage one's device: `auto` = cuda if available, else cpu; or a torch device "
                                  "name (`cpu`, `cuda:1`); with N processes each uses the GPU of its LOCAL_RANK")
    device_map: Optional[DeviceMapName] = setting(None, "`auto`: spread a teacher too large for one GPU over every "
                                                        "visible GPU (accelerate's big-model dispatch), one process "
                                                        "only; null = the whole teacher on teacher.device")
    sync_timeout: float = setting(1800.0, "N processes: seconds a process waits for the others (at the start, "
                                          "after each round of N shards, at the end) before all stop in one line")


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
    seq_len: int = setting(256, "tokens per block, and per evaluation window")
    max_blocks: Optional[int] = setting(5000, "at most this many blocks (the original's quick subset); "
                                              "null = all blocks")


@dataclass
class CacheConfig:
    dir: str = setting("cache/wikitext", "the cache stage one writes and stage two reads (stage two's "
                                         "`--cache` overrides it)")
    mode: CacheMode = setting("topk", "what stage one stores per position: the k most likely tokens' "
                                      "log-probs, every log-prob, or sampled tokens and their counts")
    k: int = setting(12, "topk mode: ids per position")
    draws: int = setting(50, "sample mode: tokens drawn per position, with replacement")
    tail_draws: int = setting(32, "topk mode: tokens drawn per position from the teacher outside its top k, with "
                                 "replacement; stage two's target is then the top-k probabilities plus r·count/t on "
                                 "the drawn ids (r the missing mass), an unbiased estimate of the teacher; 0 = none "
                                 "(the missing mass is one bucket)")
    sample_temperature: Optional[float] = setting(
        None, "sample mode and tail draws: temperature of the teacher distribution drawn from (a tail cache's "
              "top-k log-probs are at it too); stage two must train at it; null = train.temperature of the same config")
    seed: int = setting(0, "sample mode and tail draws: seed of the generator (each block's draws from its own)")
    quantize: bool = setting(False, "topk mode: store the log-probs on a grid of √(p / p_max) (each probability "
                                    "within 1/1024, the k ids' mass kept) instead of lossless fp16: fewer bytes")
    shard_blocks: int = setting(512, "blocks per HDF5 shard")
    queue_size: int = setting(8, "batches waiting for the writer thread")
    overwrite: bool = setting(False, "replace an existing cache (never a directory that is not a cache)")


@dataclass
class TrainConfig:
    output_dir: str = setting("distilled_qwen2_1.5B", "where stage two saves the model, tokenizer, "
                                                      "`metrics.jsonl` and `run.json`")
    log_dir: str = setting("logs_qwen2", "TensorBoard scalars; evaluation writes its JSON here by default")
    batch_size: int = setting(2, "blocks per micro-batch")
    gradient_accumulation: int = setting(8, "micro-batches per optimizer step")
    epochs: int = setting(1, "passes over the cache")
    max_steps: Optional[int] = setting(None, "optimizer steps; overrides epochs, as in HF Trainer; "
                                             "null = whole epochs")
    lr: float = setting(2e-5, "AdamW peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float = setting(0.05, "fraction of the steps warming up linearly; then linear decay to 0")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    temperature: float = setting(2.0, "T: divides the teacher's log-probs and the student's logits; the KD "
                                      "loss is scaled by T²")
    kd_weight: float = setting(1.0, "weight of the KD loss; 0 = not computed, `kd_loss` logged as null, except "
                                    "at T = 1 from a top-k or sample cache (logged, without its gradient)")
    hard_weight: float = setting(0.0, "weight of the next-token cross-entropy; 0 = not computed, `hard_loss` "
                                      "logged as null, except at T = 1 (logged, without its gradient)")
    loss: LossName = setting("forward_kl", "KD divergence: soft cross-entropy (the original), reverse KL, "
                                           "generalized JSD, skew KL")
    topk_tail: TopkTail = setting("bucket", "topk caches: keep the teacher's missing mass as one bucket, or "
                                            "renormalize the teacher over its k ids")
    loss_beta: float = setting(0.5, "`jsd`: β, the teacher's weight in the mixture")
    loss_alpha: float = setting(0.1, "`skew_kl`: α, the teacher's weight in the skewed student")
    loss_chunk: int = setting(128, "positions per loss chunk where the loss needs a temporary of the "
                                   "vocabulary's size (full distributions, bf16 logits): bounds its memory "
                                   "(`docs/performance.md`)")
    precision: Precision = setting("auto", "autocast's compute mode, not a weight dtype (that is student.dtype): "
                                           "`auto` = bf16 on a GPU that has it, else off; `fp32` = off")
    gradient_checkpointing: bool = setting(False, "recompute the student's activations in the backward pass")
    seed: int = setting(42, "data order and initialisation")
    device: str = setting("auto", "stage two's and evaluation's device, as teacher.device")
    num_workers: int = setting(0, "DataLoader processes reading the cache ahead of the GPU")
    checkpoint_steps: Optional[int] = setting(500, "optimizer steps between checkpoints in "
                                                   "`<output_dir>/checkpoints/step-N/` (one is also written at the "
                                                   "end); null = only at the end")
    keep_checkpoints: int = setting(2, "complete checkpoints kept; older ones are deleted once a newer one is "
                                       "complete")
    resume: ResumeMode = setting("auto", "`auto`: continue from the newest complete checkpoint in train.output_dir "
                                         "when it was made with the same cache and settings (a mismatch is refused, "
                                         "naming the setting); `never`: always start afresh")
    verify_cache: bool = setting(True, "check every shard's sha256 (and dataset shapes) against the manifest "
                                       "before training; false skips it")
    fsdp: bool = setting(False, "shard the student across the processes (accelerate's FSDP plugin) instead of "
                                "replicating it (DDP); GPUs only")
    collective_timeout_s: int = setting(1800, "seconds a process waits for the others (gradient all-reduce, "
                                              "checkpoint barrier) before the run stops")
    overwrite: bool = setting(False, "start afresh in a train.output_dir that holds an earlier run (its files, "
                                     "and only those, are deleted; any other file there is refused)")


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
                                              "length (its config), at most 2048")
    stride: Optional[int] = setting(None, "`strided`: sliding-window stride in tokens; null = data.seq_len / 2")
    batch_size: int = setting(8, "windows per forward")
    max_windows: Optional[int] = setting(None, "score only the first windows (`strided`), documents (`lm-eval`) or "
                                               "blocks (data.rows=chat); null = all")
    output: Optional[str] = setting(None, "JSON results; null = `<train.log_dir>/eval_<split>.json`")
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


def _field_type(cfg: PipelineConfig, section: str, key: str) -> Any:
    sections = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    if section not in sections:
        raise UserError(f"unknown config section: {section!r} (known: {', '.join(sections)})")
    hints = typing.get_type_hints(type(getattr(cfg, section)))
    if key not in hints:
        raise UserError(f"unknown config key: {section}.{key}")
    return hints[key]


def _apply(cfg: PipelineConfig, section: str, key: str, value: Any) -> None:
    hint = _field_type(cfg, section, key)
    setattr(getattr(cfg, section), key, _check_type(f"{section}.{key}", value, hint))


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
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
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
        _apply(cfg, section, key, _parse_override_value(text, _field_type(cfg, section, key)))
    check_loss(cfg.train)
    return cfg


def check_loss(train: TrainConfig) -> None:
    """A KD divergence that is identically 0 at its β or α cannot train, as kd_weight=0 with hard_weight=0
    cannot: refused when the config loads. (With train.kd_weight=0 the KD term is left out: nothing to refuse.)"""
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
    allowed: list[str]  # the closed set of names, or a one-word type, then `null` if allowed
    help: str


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
                allowed = [_TYPE_WORDS[hint]]
            yield KeyDoc(f"{section.name}.{key.name}", _yaml_scalar(key.default),
                         allowed + ["null"] * optional, key.metadata["help"])


def config_keys_markdown() -> str:
    """docs/configuration.md's table of keys."""
    def code(words: list[str]) -> str:
        return ", ".join(w if w in _TYPE_WORDS.values() else f"`{w}`" for w in words)

    lines = ["| key | default | allowed values | meaning |", "| --- | --- | --- | --- |"]
    for doc in key_docs():
        cells = [f"`{doc.key}`", f"`{doc.default}`", code(doc.allowed), doc.help]
        lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def config_keys_text() -> str:
    """The same keys as plain text, for --help."""
    lines = ["config keys (section.key=value; shown with the schema's default, which --config's file may change):"]
    for doc in key_docs():
        lines.append(f"  {doc.key}={doc.default}  ({' | '.join(doc.allowed)})")
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
