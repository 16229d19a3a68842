"""The cache of conversations (`data.rows=chat`): two more per-block datasets, and the teacher data only where
a position is trained.

A chat cache adds `loss_mask` (1 = trained) and `position_ids` (each token's position in its conversation) to
the datasets of its mode (cache/format.py's `CHAT_DATASETS`). The teacher datasets keep their shapes, so the
reader and the encodings stay as they are; at the positions that are not trained they hold one constant
placeholder (`blank_untrained`), which the zstd filter stores in next to nothing: a chat cache's bytes grow
with its trained positions, not with its prompts. (The full mode's log-probs are stored unfiltered, for
reading speed, so a full cache of conversations does not shrink.)
"""
from __future__ import annotations

import numpy as np

from cache.format import STORED, STORED_CHAT, stored_shape
from cache.manifest import DatasetEntry


def chat_stored_datasets(seq_len: int) -> dict[str, DatasetEntry]:
    """The datasets a chat cache stores besides its mode's, as this release writes them."""
    from cache.encoding import ZSTD_LEVEL  # (imports hdf5plugin)

    return {name: DatasetEntry(shape_per_block=stored_shape(STORED[name], seq_len, None, 0, None),
                               dtype=STORED[name].dtype, compression="zstd", compression_opts=ZSTD_LEVEL,
                               checksum=True, encoding="raw")
            for name in STORED_CHAT}


def blank_untrained(arrays: dict[str, np.ndarray], mask: np.ndarray) -> None:
    """Replace, in place, the teacher data of decoded `arrays` ([n, L, …]) at the positions where `mask` ([n, L])
    is 0 by the placeholder of cache/format.py's `loss_mask` entry: ids 0 with log-prob 0 (top-k), zeros (full
    log-probs), id 0 drawn every time (sample, tail draws). Every placeholder is a valid block for the reader's
    checks, and the loss weighs those positions 0."""
    untrained = mask == 0
    if not untrained.any():
        return
    for name in ("topk_ids", "topk_logprobs", "logprobs"):
        if name in arrays:
            arrays[name][untrained] = 0
    for prefix in ("sample", "tail"):
        if f"{prefix}_ids" in arrays:
            ids, counts = arrays[f"{prefix}_ids"], arrays[f"{prefix}_counts"]
            draws = int(counts.sum(-1).max())  # every position's counts add up to the draws
            ids[untrained] = -1
            counts[untrained] = 0
            ids[untrained, 0] = 0
            counts[untrained, 0] = draws


def chat_block_problem(decoded: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a decoded block's chat datasets (None: nothing): a mask that is not 0/1, positions that
    are negative or do not count up by one within a conversation."""
    mask, positions = decoded.get("loss_mask"), decoded.get("position_ids")
    if mask is not None and mask.size and mask.max() > 1:
        return f"loss_mask holds {mask.max()}, not 0 or 1"
    if positions is not None and positions.size:
        if positions.min() < 0:
            return f"position_ids below 0 ({positions.min()})"
        steps = np.diff(positions, axis=-1)
        if np.any((steps != 1) & (positions[..., 1:] != 0)):
            return "position_ids do not count up by one within a conversation"
    return None
