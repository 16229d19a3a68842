"""Batches for the distiller: blocks from the cache, shaped for TextBrewer's `teacher_cache` route.

A batch is a plain dict {"student": {...}, "teacher": {...}, "teacher_cache": {...}}: TextBrewer then
skips the teacher forward and hands `teacher_cache` to the teacher adaptor.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cache.reader import CacheReader
from common.losses import TeacherTargets


class CachedBlocks(Dataset):
    """Blocks of the cache; `tokens_only` skips the teacher datasets (the live-teacher route)."""

    def __init__(self, reader: CacheReader, tokens_only: bool = False) -> None:
        self.reader = reader
        self.names = ("input_ids",) if tokens_only else None

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.reader.block(index, self.names)


def collate_cached(items: list[dict[str, np.ndarray]]) -> dict[str, dict[str, torch.Tensor]]:
    stacked = {name: torch.from_numpy(np.stack([item[name] for item in items])) for name in items[0]}
    input_ids = stacked.pop("input_ids").long()
    if "sample_counts" in stacked:  # torch has few kernels for uint16/uint32
        stacked["sample_counts"] = stacked["sample_counts"].to(torch.int32)
    return {"student": {"input_ids": input_ids}, "teacher": {"input_ids": input_ids}, "teacher_cache": stacked}


def collate_live(items: list[dict[str, np.ndarray]]) -> dict[str, dict[str, torch.Tensor]]:
    """Same batch without cached targets: TextBrewer runs the live teacher (the original recipe)."""
    batch = collate_cached(items)
    del batch["teacher_cache"]
    return batch


def cached_targets(cache: dict[str, torch.Tensor]) -> TeacherTargets:
    """The teacher adaptor's view of a batch's `teacher_cache`."""
    if "logprobs" in cache:
        return TeacherTargets("full", cache["logprobs"])
    if "topk_ids" in cache:
        return TeacherTargets("topk", cache["topk_logprobs"], cache["topk_ids"])
    return TeacherTargets("sample", cache["sample_counts"], cache["sample_ids"])
