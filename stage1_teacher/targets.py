"""What stage one stores per position, computed on the teacher's device from its logits.

Each position's targets depend on its own logits alone (and, for draws, on its block's seed), so they are
computed a few rows at a time: on a CPU a chunk of rows stays in the core's cache through every pass over it
(log-softmax, then top-k, the fp16 copy or the cumulative sum) instead of streaming the whole [positions,
vocabulary] tensor from memory once per pass, which is what keeps the dump close to the bare teacher forward
(`docs/performance.md`, "Dump cost"). Row by row, the values are bit-identical to computing all rows at once.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cache.format import counts_dtype
from common.alignment import vocab_logprobs

CPU_BYTES_PER_THREAD = 1 << 20  # fp32 log-probs per thread and chunk: half a core's L2 (one Qwen2 row is 0.6 MB)
GPU_ROWS = 1024  # elsewhere: big chunks (memory stays bounded at ~1024 × vocabulary × 12 bytes)


def rows_per_chunk(device: torch.device, vocab_size: int) -> int:
    if device.type != "cpu":
        return GPU_ROWS
    return torch.get_num_threads() * max(1, CPU_BYTES_PER_THREAD // (4 * vocab_size))


def _logprob_chunks(logits: torch.Tensor, vocab_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, their log-probs) over the positions of `logits` [..., padded vocab], a chunk at a time."""
    rows = logits.reshape(-1, logits.size(-1))
    step = rows_per_chunk(logits.device, vocab_size)
    for start in range(0, rows.size(0), step):
        chunk = slice(start, min(start + step, rows.size(0)))
        yield chunk, vocab_logprobs(rows[chunk], vocab_size)


def topk_targets(logits: torch.Tensor, vocab_size: int, k: int) -> dict[str, torch.Tensor]:
    """The k most likely ids per position, most likely first, and their log-probs in fp16."""
    positions = logits.shape[:-1]
    ids = torch.empty(positions.numel(), k, dtype=torch.int32, device=logits.device)
    values = torch.empty(positions.numel(), k, dtype=torch.float16, device=logits.device)
    for rows, logprobs in _logprob_chunks(logits, vocab_size):
        values[rows], ids[rows] = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    return {"topk_ids": ids.view(*positions, k), "topk_logprobs": values.view(*positions, k)}


def full_targets(logits: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """Every log-prob over the truncated vocabulary, in fp16."""
    positions = logits.shape[:-1]
    out = torch.empty(positions.numel(), vocab_size, dtype=torch.float16, device=logits.device)
    for rows, logprobs in _logprob_chunks(logits, vocab_size):
        out[rows] = logprobs
    return {"logprobs": out.view(*positions, vocab_size)}


def block_seed(seed: int, block: int) -> int:
    """The seed of block `block`'s generator: a hash of (cache.seed, block), so neighbouring blocks get
    unrelated streams."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, np.uint64)[0])


def block_uniforms(seed: int, first_block: int, num_blocks: int, seq_len: int, draws: int) -> torch.Tensor:
    """[num_blocks, seq_len, draws] uniforms in [0, 1), float64, on the CPU: each block's from its own generator
    (`block_seed`), so a block's draws do not depend on the batch, process or run that computes it."""
    out = torch.empty(num_blocks, seq_len, draws, dtype=torch.float64)
    for i in range(num_blocks):
        generator = torch.Generator().manual_seed(block_seed(seed, first_block + i))
        torch.rand(seq_len, draws, generator=generator, dtype=torch.float64, out=out[i])
    return out


def sample_targets(logits: torch.Tensor, vocab_size: int, temperature: float,
                   uniforms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Draws with replacement from softmax(log-probs / T) at every position, one per uniform in `uniforms`
    [..., draws] (positions as `logits`), stored as unique ids and their counts.

    Inverse-transform sampling over the whole vocabulary, exactly: the i-th id is drawn when u · Σw falls in
    [Σ_{j<i} w_j, Σ_{j≤i} w_j) of the cumulative weights (float64), found by binary search. No id is left out
    (there is no top-p cut), and it costs one cumulative sum per position instead of a multinomial.
    Slots are as many as draws; unused slots hold id -1 and count 0, and ids come most drawn first, ties in
    ascending id order.
    """
    draws = uniforms.size(-1)
    flat_uniforms = uniforms.reshape(-1, draws).to(logits.device)
    drawn = torch.empty(flat_uniforms.size(0), draws, dtype=torch.int64, device=logits.device)
    for rows, logprobs in _logprob_chunks(logits, vocab_size):
        if temperature != 1.0:  # at T = 1 the log-probs are already normalised: exp cannot underflow them all
            logprobs = logprobs.sub_(logprobs.amax(-1, keepdim=True)).div_(temperature)
        cumulative = torch.cumsum(logprobs.exp_(), dim=-1, dtype=torch.float64)
        targets = flat_uniforms[rows] * cumulative[:, -1:]
        drawn[rows] = torch.searchsorted(cumulative, targets, right=True).clamp_(max=vocab_size - 1)
    ids, counts = unique_counts(drawn)
    shape = (*logits.shape[:-1], draws)
    return {"sample_ids": ids.to(torch.int32).reshape(shape),
            "sample_counts": counts.to(getattr(torch, counts_dtype(draws))).reshape(shape)}


def unique_counts(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `drawn` [P, m]: the unique ids, most drawn first (ties by id), padded with -1, and their
    counts, padded with 0."""
    drawn, _ = torch.sort(drawn, dim=-1)
    is_new = torch.ones_like(drawn, dtype=torch.bool)
    is_new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    run_id = torch.cumsum(is_new.to(torch.int64), dim=-1) - 1  # which unique id each draw belongs to
    counts = torch.zeros_like(drawn).scatter_add_(1, run_id, torch.ones_like(drawn))
    ids = torch.full_like(drawn, -1).scatter_(1, run_id, drawn)
    counts, order = torch.sort(counts, dim=-1, descending=True, stable=True)
    return torch.gather(ids, 1, order), counts
