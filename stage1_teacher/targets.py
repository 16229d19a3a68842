"""What stage one stores per position, computed on the device from the teacher's fp32 log-probs."""
from __future__ import annotations

import torch

from cache.format import counts_dtype
from cache.writer import DatasetSpec


def dataset_specs(mode: str, seq_len: int, vocab_size: int, k: int, draws: int) -> dict[str, DatasetSpec]:
    """The shard datasets for a mode (see cache/format.py)."""
    specs = {"input_ids": DatasetSpec((seq_len,), "int32")}
    if mode == "topk":
        specs["topk_ids"] = DatasetSpec((seq_len, k), "int32")
        specs["topk_logprobs"] = DatasetSpec((seq_len, k), "float16")
    elif mode == "full":
        specs["logprobs"] = DatasetSpec((seq_len, vocab_size), "float16")
    elif mode == "sample":
        # Padding (-1 / 0) and small counts compress well: on disk the size follows the unique ids, not
        # the slots. Level 9 saves ~10 % over the default 4 and the writer thread has the time.
        specs["sample_ids"] = DatasetSpec((seq_len, draws), "int32", "gzip", 9)
        specs["sample_counts"] = DatasetSpec((seq_len, draws), counts_dtype(draws), "gzip", 9)
    return specs


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
