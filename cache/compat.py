"""Can this cache serve this consumer? The checks any consumer of a cache runs before reading it
(stage two, benchmarks, other tools): same tokens (tokenizer hash and the data fingerprint over the
exact cached tokens), block length, dataset, a model with at least the cache's vocabulary, and a loss
that the cached teacher data can compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cache.format import CacheMode
from cache.manifest import Manifest
from common.cli import UserError
from common.config import DataConfig, LossName, TopkTail
from common.data import data_fingerprint, source_settings


@dataclass(frozen=True)
class Consumer:
    """What a consumer expects of a cache."""
    name: str  # in messages, e.g. "the student Qwen/Qwen2-1.5B"
    tokenizer_hash: str
    vocab_size: int  # logits the consumer's model computes (≥ the cache's vocabulary)
    seq_len: int
    dataset: str
    subset: Optional[str]
    split: str
    loss: LossName
    topk_tail: TopkTail
    temperature: float
    source: dict = field(default_factory=lambda: source_settings(DataConfig()))  # common.data.source_settings


def unsupported_reason(loss: LossName, mode: CacheMode, tail: TopkTail) -> str | None:
    """Why `loss` cannot be computed from this kind of cached teacher data (None: it can)."""
    if mode == "sample" and loss != "forward_kl":
        return (f"loss {loss} needs the teacher's probabilities, which a sample cache does not hold; "
                f"only forward_kl (an unbiased estimate from the draws) is computable")
    if mode == "topk" and tail == "renormalize" and loss == "reverse_kl":
        return ("reverse_kl is infinite with a renormalized top-k teacher (zero mass outside the k ids); "
                "use train.topk_tail=bucket")
    return None


def check_compatible(manifest: Manifest, cache_dir: str, consumer: Consumer, input_ids: np.ndarray) -> None:
    """Refuse, with one line, a cache made for other tokens, another block length, another dataset, a
    model with fewer logits, or a loss it cannot serve. `input_ids` are the cached blocks, re-hashed
    against the manifest's fingerprint."""
    if manifest.tokenizer.hash != consumer.tokenizer_hash:
        raise UserError(f"cache {cache_dir} was made with tokenizer {manifest.tokenizer.name} "
                        f"(hash {manifest.tokenizer.hash[:12]}), which differs from the tokenizer of {consumer.name} "
                        f"(hash {consumer.tokenizer_hash[:12]})")
    if manifest.seq_len != consumer.seq_len:
        raise UserError(f"cache {cache_dir} has seq_len {manifest.seq_len}, the config data.seq_len {consumer.seq_len}")
    for key in ("name", "subset", "split"):
        cached, wanted = getattr(manifest.dataset, key), getattr(consumer, "dataset" if key == "name" else key)
        if cached != wanted:
            raise UserError(f"cache {cache_dir} holds dataset {key} {cached!r}, the config expects {wanted!r}")
    for key, wanted in consumer.source.items():
        if getattr(manifest.dataset, key) != wanted:
            raise UserError(f"cache {cache_dir} was read with data.{key}={getattr(manifest.dataset, key)!r}, "
                            f"the config has {wanted!r}")
    if consumer.vocab_size < manifest.vocab_size:
        raise UserError(f"{consumer.name} has {consumer.vocab_size} logits, fewer than the cache "
                        f"vocabulary {manifest.vocab_size}")
    if data_fingerprint(input_ids, consumer.tokenizer_hash, manifest.seq_len) != manifest.dataset.fingerprint:
        raise UserError(f"cache {cache_dir}: its tokens do not match the fingerprint in its manifest")
    if (reason := unsupported_reason(consumer.loss, manifest.mode, consumer.topk_tail)):
        raise UserError(f"cache mode {manifest.mode}: {reason}")
    if manifest.sample is not None and consumer.temperature != manifest.sample.temperature:
        raise UserError(f"cache {cache_dir} was sampled at temperature {manifest.sample.temperature}; "
                        f"its draws estimate the teacher at that temperature only: set "
                        f"train.temperature={manifest.sample.temperature}")
