"""Aligning teacher and student outputs, as the original recipe did: truncate the vocabulary and the
sequence length to what both sides share, and say so once.

Qwen2 models pad their embeddings (152,064 rows for Qwen2-7B, 151,936 for Qwen2-1.5B) past the
tokenizer's real size (151,646); the rows past it are never real tokens, so every distribution in this
project lives on the truncated vocabulary `len(tokenizer)`.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

_announced: set[str] = set()


def announce_once(key: str, message: str) -> None:
    if key not in _announced:
        _announced.add(key)
        tqdm.write(message)  # keeps a running progress bar intact


def truncate_vocab(logits: torch.Tensor, vocab_size: int, who: str) -> torch.Tensor:
    """The first `vocab_size` logits; prints one `[ALIGN] …` line the first time for `who`."""
    if logits.size(-1) < vocab_size:
        raise ValueError(f"{who} has {logits.size(-1)} logits, fewer than the vocabulary's {vocab_size}")
    announce_once(f"vocab:{who}", f"[ALIGN] {who} {logits.shape} → cache vocab {vocab_size}")
    return logits[..., :vocab_size]


def vocab_logprobs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The next-token distribution as this project defines it everywhere (stage one's cache, the live
    teacher, evaluation): log_softmax in fp32 over the first `vocab_size` logits, the tokenizer's real tokens."""
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
