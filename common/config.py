"""One typed configuration for both stages: `pipeline.yaml` plus `section.key=value` overrides.

The schema is the dataclasses below; a key that is not a field, or a value of the wrong type, is a
`UserError` naming it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from common.cli import UserError

DEFAULT_CONFIG = "pipeline.yaml"


@dataclass
class TeacherConfig:
    model: str = "Qwen/Qwen2-7B"
    batch_size: int = 4  # blocks per teacher forward in stage one
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on a CPU
    device: str = "auto"


@dataclass
class StudentConfig:
    model: str = "Qwen/Qwen2-1.5B"
    dtype: str = "float32"  # master weights; autocast decides the compute dtype


@dataclass
class DataConfig:
    dataset: str = "wikitext"
    subset: str = "wikitext-2-raw-v1"
    local_dir: Optional[str] = None  # wiki.{train,valid,test}.raw, no network
    split: str = "train"
    seq_len: int = 256
    max_blocks: Optional[int] = 5000  # the original's quick subset; null = full data


@dataclass
class CacheConfig:
    dir: str = "cache/wikitext"
    mode: str = "topk"  # topk | full | sample
    k: int = 64
    draws: int = 50  # sample mode: draws per position
    sample_temperature: float = 1.0
    seed: int = 0
    shard_blocks: int = 512  # blocks per HDF5 shard
    queue_size: int = 8  # batches waiting for the writer thread
    overwrite: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "distilled_qwen2_1.5B"
    log_dir: str = "logs_qwen2"
    batch_size: int = 2
    gradient_accumulation: int = 8
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; stops early
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    kd_weight: float = 1.0
    hard_weight: float = 0.0
    loss: str = "forward_kl"  # see common.losses.LOSSES
    topk_tail: str = "bucket"  # bucket | renormalize
    loss_beta: float = 0.5  # generalized JSD
    loss_alpha: float = 0.1  # skew KL
    loss_chunk: int = 128  # positions per loss chunk: bounds the student's fp32 log-softmax (docs/benchmarks.md)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False
    seed: int = 42
    device: str = "auto"
    num_workers: int = 0  # DataLoader processes reading the cache ahead of the GPU
    overwrite: bool = False


@dataclass
class EvalConfig:
    split: str = "test"
    stride: Optional[int] = None  # sliding-window stride; null = seq_len // 2
    batch_size: int = 8
    max_windows: Optional[int] = None
    output: Optional[str] = None  # JSON path; default <train.log_dir>/eval_<split>.json


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


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return `value` as the schema type `hint`, or raise UserError naming `name`."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
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
    """YAML typing for numbers, booleans and null; text stays text for str keys (`cache.dir=no`)."""
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    if str in typing.get_args(hint) or hint is str:
        return None if value is None and hint is not str else text
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
    return cfg


def config_arg_parser(description: str) -> argparse.ArgumentParser:
    """The parser every command starts from: --config and trailing key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: pipeline.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, PipelineConfig]:
    """Parse argv; argparse's own usage errors already exit with status 2 and one message."""
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    return args, load_config(args.config, args.overrides)
