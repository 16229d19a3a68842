"""Batches for the distiller: blocks from the cache, shaped for TextBrewer's `teacher_cache` route, in an
order that any process can derive from `train.seed` and the epoch alone (so a resumed run reads the same).

A batch is a plain dict {"student": {...}, "teacher": {...}, "teacher_cache": {...}}: TextBrewer then
skips the teacher forward and hands `teacher_cache` to the teacher adaptor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cache.format import CHAT_DATASETS
from cache.reader import CacheReader
from common.cli import UserError, error_line
from stage2_student.losses import TeacherTargets


@dataclass(frozen=True)
class UnreadableBlock:
    """A block the reader refused (damaged values, an unreadable shard), carried to the training loop as data:
    an exception raised inside a DataLoader worker would reach the loop re-raised with the worker's traceback
    in its message, not as the reader's one line."""
    message: str

    def error(self) -> UserError:
        return UserError(self.message)


class CachedBlocks(Dataset):
    """Blocks of the cache; `tokens_only` skips the teacher datasets (the live-teacher route)."""

    def __init__(self, reader: CacheReader, tokens_only: bool = False) -> None:
        self.reader = reader
        self.names = (("input_ids",) + (CHAT_DATASETS if reader.chat else ())) if tokens_only else None

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, np.ndarray] | UnreadableBlock:
        try:
            return self.reader.block(index, self.names)
        except UserError as err:  # the reader's own checks name the shard and the block
            return UnreadableBlock(str(err))
        except OSError as err:  # h5py: a shard truncated or replaced after the start
            shard = next(s for s in reversed(self.reader.shards) if s.first_block <= index)
            return UnreadableBlock(f"cache {self.reader.dir}: cannot read block {index} from {shard.file}: "
                                   f"{error_line(err)}")


class CheckedCollate:
    """`collate` over the items, or the first unreadable block as the whole batch (picklable for workers)."""

    def __init__(self, collate: Callable[[list], dict]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> dict | UnreadableBlock:
        bad = next((item for item in items if isinstance(item, UnreadableBlock)), None)
        return bad if bad is not None else self.collate(items)


def epoch_order(num_blocks: int, epoch: int, seed: int, processes: int, rank: int) -> list[int]:
    """The blocks process `rank` reads in `epoch`, in order: one permutation of all blocks per epoch, drawn
    from `seed` + epoch alone, split among the processes by a DistributedSampler (rank r takes every N-th,
    padded by repeating the first ones when N does not divide the count, so that every process takes as many
    steps)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    permutation = torch.randperm(num_blocks, generator=generator).tolist()
    share = DistributedSampler(permutation, num_replicas=processes, rank=rank, shuffle=False)
    return [permutation[i] for i in share]


def batches_per_epoch(num_blocks: int, processes: int, batch_size: int) -> int:
    """Micro-batches each process reads per epoch (the last one may be short)."""
    return math.ceil(math.ceil(num_blocks / processes) / batch_size)


def epoch_loader(dataset: CachedBlocks, collate: Callable[[list], dict], *, epoch: int, skip_batches: int,
                 seed: int, processes: int, rank: int, batch_size: int, num_workers: int,
                 pin_memory: bool) -> DataLoader:
    """This process's micro-batches of `epoch`, from micro-batch `skip_batches` on (a resumed run starts
    mid-epoch without reading the blocks before). The loader's own generator seeds its workers, so building
    one never draws from the global RNG, whose state a checkpoint restores."""
    order = epoch_order(len(dataset), epoch, seed, processes, rank)[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=CheckedCollate(collate),
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed + epoch))


def collate_cached(items: list[dict[str, np.ndarray]]) -> dict[str, dict[str, torch.Tensor]]:
    """Blocks as TextBrewer's batch. A chat cache's blocks give both models their `position_ids` (each packed
    conversation attends only to itself) and the batch its `loss_mask` (which TextBrewer ignores; the training
    loop turns it into the loss's weights, stage2_student/masking.py)."""
    stacked = {name: torch.from_numpy(np.stack([item[name] for item in items])) for name in items[0]}
    input_ids = stacked.pop("input_ids").long()
    for name in ("sample_counts", "tail_counts"):  # torch has few kernels for uint16/uint32
        if name in stacked:
            stacked[name] = stacked[name].to(torch.int32)
    if "loss_mask" not in stacked:
        return {"student": {"input_ids": input_ids}, "teacher": {"input_ids": input_ids}, "teacher_cache": stacked}
    # no KV cache: transformers takes the packed-sequence route (restarting positions → a block-diagonal mask)
    # only without one
    model_inputs = {"input_ids": input_ids, "position_ids": stacked.pop("position_ids").long(), "use_cache": False}
    return {"student": model_inputs, "teacher": dict(model_inputs), "teacher_cache": stacked,
            "loss_mask": stacked.pop("loss_mask").bool()}


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
        return TeacherTargets("topk", cache["topk_logprobs"], cache["topk_ids"], cache.get("tail_ids"),
                              cache.get("tail_counts"))
    return TeacherTargets("sample", cache["sample_counts"], cache["sample_ids"])
