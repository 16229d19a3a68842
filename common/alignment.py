"""Aligning teacher and student outputs, as the original recipe did: truncate the vocabulary and the
sequence length to what both sides share, and say so once per run.

Qwen2 models pad their embeddings (152,064 rows for Qwen2-7B, 151,936 for Qwen2-1.5B) past the
tokenizer's real size (151,646); the rows past it are never real tokens, so every distribution in this
project lives on the truncated vocabulary `len(tokenizer)`.
"""
from __future__ import annotations

import torch
from tqdm import tqdm


class AlignmentLog:
    """The `[ALIGN] …` lines of one run: each is printed the first time it applies, once per run (a
    second run in the same process prints its own)."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            tqdm.write(message)  # keeps a running progress bar intact


def truncate_vocab(logits: torch.Tensor, vocab_size: int, who: str, log: AlignmentLog) -> torch.Tensor:
    """The first `vocab_size` logits; `log` prints one `[ALIGN] …` line the first time for `who`."""
    if logits.size(-1) < vocab_size:
        raise ValueError(f"{who} has {logits.size(-1)} logits, fewer than the vocabulary's {vocab_size}")
    log.once(f"vocab:{who}", f"[ALIGN] {who} {logits.shape} → cache vocab {vocab_size}")
    return logits[..., :vocab_size]


def vocab_logprobs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The next-token distribution as this project defines it everywhere (stage one's cache, the live
    teacher, evaluation): log_softmax in fp32 over the first `vocab_size` logits, the tokenizer's real tokens."""
    # contiguous first: log_softmax over a strided view of wider logits takes about twice as long (CPU, measured)
    return torch.log_softmax(logits[..., :vocab_size].float().contiguous(), dim=-1)
