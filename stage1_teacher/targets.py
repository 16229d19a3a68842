"""What stage one stores per position, computed on the device from the teacher's fp32 log-probs."""
from __future__ import annotations

import torch

from cache.format import counts_dtype


def topk_targets(logprobs: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    values, ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    return {"topk_ids": ids.to(torch.int32), "topk_logprobs": values.to(torch.float16)}


def full_targets(logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logprobs": logprobs.to(torch.float16)}


def sample_targets(logprobs: torch.Tensor, draws: int, temperature: float,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`draws` ids per position drawn with replacement from softmax(logprobs / T); unique ids + counts.

    Slots are as many as draws; unused slots hold id -1 and count 0, and ids come most drawn first.
    """
    flat = logprobs.reshape(-1, logprobs.size(-1))
    probs = torch.softmax(flat / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)  # [P, draws]
    drawn, _ = torch.sort(drawn, dim=-1)
    is_new = torch.ones_like(drawn, dtype=torch.bool)
    is_new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    run_id = torch.cumsum(is_new.to(torch.int64), dim=-1) - 1  # which unique id each draw belongs to
    counts = torch.zeros_like(drawn).scatter_add_(1, run_id, torch.ones_like(drawn))
    ids = torch.full_like(drawn, -1).scatter_(1, run_id, drawn)
    counts, order = torch.sort(counts, dim=-1, descending=True, stable=True)
    ids = torch.gather(ids, 1, order)
    shape = (*logprobs.shape[:-1], draws)
    return {"sample_ids": ids.to(torch.int32).reshape(shape),
            "sample_counts": counts.reshape(shape).to(getattr(torch, counts_dtype(draws)))}
