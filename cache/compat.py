"""Can this cache serve this consumer? The checks any consumer of a cache runs before reading it
(stage two, benchmarks, other tools): same tokens (tokenizer hash and the data fingerprint over the
exact cached tokens), block length, dataset, a model with at least the cache's vocabulary, and a loss
that the cached teacher data can compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cache.manifest import Manifest
from common.cli import UserError
from common.config import CacheMode, DataConfig, LossName, TopkTail
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


def unsupported_reason(loss: LossName, mode: CacheMode, tail: TopkTail, tail_draws: bool = False) -> str | None:
    """Why `loss` cannot be computed from this kind of cached teacher data (None: it can). From draws only the
    forward KL is unbiased: it is linear in the teacher's probabilities, so its expectation over the draws is
    its value on the teacher; reverse KL, JSD and skew KL take the log of the estimate (and the student's
    mass outside the drawn ids), whose expectation is not theirs."""
    if mode == "sample" and loss != "forward_kl":
        return (f"loss {loss} needs the teacher's probabilities, which a sample cache does not hold; "
                f"only forward_kl (an unbiased estimate from the draws) is computable")
    if tail_draws and loss != "forward_kl":
        return (f"loss {loss} is not linear in the teacher's probabilities, so the tail draws would bias it; "
                f"only forward_kl is unbiased with tail draws (or use a cache without them)")
    if tail_draws and tail == "renormalize":
        return ("train.topk_tail=renormalize drops the missing mass, which the tail draws estimate; "
                "use train.topk_tail=bucket (with tail draws the bucket is spread over the drawn ids)")
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
    if (reason := unsupported_reason(consumer.loss, manifest.mode, consumer.topk_tail, manifest.tail is not None)):
        raise UserError(f"cache mode {manifest.mode}: {reason}")
    for what, draws in (("sampled", manifest.sample), ("made with tail draws", manifest.tail)):
        if draws is not None and consumer.temperature != draws.temperature:
            raise UserError(f"cache {cache_dir} was {what} at temperature {draws.temperature}; "
                            f"its draws estimate the teacher at that temperature only: set "
                            f"train.temperature={draws.temperature} (or dump with "
                            f"cache.sample_temperature={consumer.temperature})")
