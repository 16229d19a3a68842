"""What stage one stores per position, computed on the teacher's device from its logits.

Each position's targets depend on its own logits alone (and, for draws, on its block's seed), so they are
computed a few rows at a time: on a CPU a chunk of rows stays in cache through every pass over it instead of
streaming the whole [positions, vocabulary] tensor from memory once per pass. What remains costs about as much
as one fused softmax pass per position plus a selection among a small fraction of the vocabulary (top-k in the
best groups of ids, draws inside the drawn group), which is what keeps the dump close to the bare teacher
forward (`docs/performance.md`, "Dump cost"). Row by row, the values do not depend on the chunking.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cache.format import counts_dtype
from common.alignment import vocab_logprobs

CPU_CHUNK_BYTES = 1 << 20  # fp32 values per chunk on a CPU: half a core's L2 (one Qwen2 row is 0.6 MB); measured
# at Qwen2's size, 1 row per chunk costs 6.4 % of the forward for top-k, 2 rows 6.7 %, 8 rows 7.7 %
GPU_ROWS = 1024  # elsewhere: big chunks (memory stays bounded at ~1024 × vocabulary × 12 bytes)
GROUP = 128  # consecutive vocabulary ids per group, for the top-k selection and the two-level draws


def rows_per_chunk(device: torch.device, vocab_size: int) -> int:
    return max(1, CPU_CHUNK_BYTES // (4 * vocab_size)) if device.type == "cpu" else GPU_ROWS


@functools.lru_cache(maxsize=None)
def _workers(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="targets")


def _each_chunk(logits: torch.Tensor, work: Callable[[slice, torch.Tensor], None]) -> None:
    """`work(rows, their logits)` over the positions of `logits` [..., padded vocab], a chunk at a time. On a
    CPU with T threads the positions are cut into T ranges, each worked through by a thread of its own with
    single-threaded ops: an OpenMP team per op costs more than the op on chunks this small (4x the time on a
    busy machine), while these threads run independently."""
    rows = logits.reshape(-1, logits.size(-1))
    step = rows_per_chunk(logits.device, logits.size(-1))
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # thread-local: passed on

    def span(first: int, end: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for start in range(first, end, step):
                chunk = slice(start, min(start + step, end))
                work(chunk, rows[chunk])

    threads = torch.get_num_threads()
    # (the thread count can be lowered and restored per call with OpenMP; PyTorch's native backend fixes it)
    if logits.device.type != "cpu" or threads == 1 or not torch.backends.openmp.is_available():
        span(0, rows.size(0))
        return
    bounds = [rows.size(0) * i // threads for i in range(threads + 1)]
    torch.set_num_threads(1)  # for the ops of the worker threads; the forward gets its threads back below
    try:
        list(_workers(threads).map(span, bounds[:-1], bounds[1:]))  # waits; a worker's error is raised here
    finally:
        torch.set_num_threads(threads)


def select_topk(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(logprobs, k)` of each row, largest first, searched among the ids of the k groups (GROUP
    consecutive ids) with the largest maxima: an id of the top k lies in one of them, or else k group maxima
    would all be larger than it. The values are exactly torch.topk's; ids can differ only in the order of exactly
    equal values. At Qwen2's size this halves the selection's cost; a vocabulary of at most k groups goes
    straight to torch.topk."""
    rows, n = logprobs.shape
    groups = n // GROUP
    if groups <= k:
        return torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    head = logprobs[:, :groups * GROUP].view(rows, groups, GROUP)
    best = torch.topk(head.amax(-1), k, dim=-1, sorted=False).indices
    ids = (best.unsqueeze(-1) * GROUP + torch.arange(GROUP, device=logprobs.device)).view(rows, k * GROUP)
    if n > groups * GROUP:  # the last, partial group is always searched
        ids = torch.cat([ids, torch.arange(groups * GROUP, n, device=logprobs.device).expand(rows, -1)], dim=-1)
    values, positions = torch.topk(logprobs.gather(-1, ids), k, dim=-1, largest=True, sorted=True)
    return values, ids.gather(-1, positions)


def topk_targets(logits: torch.Tensor, vocab_size: int, k: int) -> dict[str, torch.Tensor]:
    """The k most likely ids per position, most likely first, and their log-probs in fp16."""
    positions = logits.shape[:-1]
    ids = torch.empty(positions.numel(), k, dtype=torch.int32, device=logits.device)
    values = torch.empty(positions.numel(), k, dtype=torch.float16, device=logits.device)
    def work(rows: slice, chunk: torch.Tensor) -> None:
        values[rows], ids[rows] = select_topk(vocab_logprobs(chunk, vocab_size), k)

    _each_chunk(logits, work)
    return {"topk_ids": ids.view(*positions, k), "topk_logprobs": values.view(*positions, k)}


def topk_tail_targets(logits: torch.Tensor, vocab_size: int, k: int, temperature: float,
                      uniforms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-k plus tail draws (`cache.tail_draws`): the k most likely ids of the teacher at temperature T and
    their log-probs at T, and one draw per uniform of `uniforms` [..., t] from the rest of that distribution,
    p_i / r for the ids outside the k (r = 1 − Σ top-k p), stored as unique ids and counts as sample mode's.
    With the exact top-k probabilities, r · count_i / t on the tail ids is an unbiased estimate of the whole
    distribution at T (`docs/results.md`). The top-k set is the same at every T (the order of the logits).
    A position whose rest underflows to 0 draws uniformly from the ids outside the k (its tail weighs 0)."""
    positions, draws = logits.shape[:-1], uniforms.size(-1)
    flat_uniforms = uniforms.reshape(-1, draws).to(logits.device)
    ids = torch.empty(positions.numel(), k, dtype=torch.int32, device=logits.device)
    values = torch.empty(positions.numel(), k, dtype=torch.float16, device=logits.device)
    drawn = torch.empty(positions.numel(), draws, dtype=torch.int64, device=logits.device)
    def work(rows: slice, chunk: torch.Tensor) -> None:
        scaled = chunk[:, :vocab_size]
        logprobs = vocab_logprobs(scaled if temperature == 1.0 else scaled.float() / temperature, vocab_size)
        top_values, top_ids = select_topk(logprobs, k)
        values[rows], ids[rows] = top_values, top_ids
        rest = logprobs.exp_().scatter_(1, top_ids, 0.0)  # the tail's weights: p outside the top k
        empty = rest.sum(-1) == 0
        if empty.any():
            rest[empty] = 1.0
            rest[empty] = rest[empty].scatter_(1, top_ids[empty], 0.0)
        drawn[rows] = inverse_transform(rest, flat_uniforms[rows])

    _each_chunk(logits, work)
    tail_ids, tail_counts = unique_counts(drawn)
    return {"topk_ids": ids.view(*positions, k), "topk_logprobs": values.view(*positions, k),
            "tail_ids": tail_ids.to(torch.int32).reshape(*positions, draws),
            "tail_counts": tail_counts.to(getattr(torch, counts_dtype(draws))).reshape(*positions, draws)}


def full_targets(logits: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """Every log-prob over the truncated vocabulary, in fp16."""
    positions = logits.shape[:-1]
    out = torch.empty(positions.numel(), vocab_size, dtype=torch.float16, device=logits.device)
    def work(rows: slice, chunk: torch.Tensor) -> None:
        out[rows] = vocab_logprobs(chunk, vocab_size)

    _each_chunk(logits, work)
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
    """Draws with replacement from the teacher at temperature T at every position, one per uniform in
    `uniforms` [..., draws] (positions as `logits`), stored as unique ids and their counts.

    The distribution is softmax(vocab_logprobs / T) = softmax(logits[:V] / T), computed as the latter: one
    fused pass. Slots are as many as draws; unused slots hold id -1 and count 0, and ids come most drawn first,
    ties in ascending id order.
    """
    draws = uniforms.size(-1)
    flat_uniforms = uniforms.reshape(-1, draws).to(logits.device)
    drawn = torch.empty(flat_uniforms.size(0), draws, dtype=torch.int64, device=logits.device)
    def work(rows: slice, chunk: torch.Tensor) -> None:
        scaled = chunk[:, :vocab_size].float()
        probs = torch.softmax(scaled if temperature == 1.0 else scaled / temperature, dim=-1)
        drawn[rows] = inverse_transform(probs, flat_uniforms[rows])

    _each_chunk(logits, work)
    ids, counts = unique_counts(drawn)
    shape = (*logits.shape[:-1], draws)
    return {"sample_ids": ids.to(torch.int32).reshape(shape),
            "sample_counts": counts.to(getattr(torch, counts_dtype(draws))).reshape(shape)}


def inverse_transform(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each uniform u of a row, the id i with Σ_{j<i} w_j ≤ u·Σw < Σ_{j≤i} w_j: an exact draw from the row's
    weights [rows, n] (no id is left out), in two levels so that no cumulative sum runs over the whole vocabulary:
    the group (GROUP consecutive ids) from the cumulative weights of the groups, then the id from the drawn
    group's own cumulative weights, all sums in float64."""
    rows, n = weights.shape
    full = n // GROUP
    head = weights[:, :full * GROUP].view(rows, full, GROUP)
    sums = head.sum(-1, dtype=torch.float64)
    tail = None
    if n > full * GROUP:  # the last, partial group, padded with zero weights (never drawn)
        tail = F.pad(weights[:, full * GROUP:], (0, GROUP - (n - full * GROUP)))
        sums = torch.cat([sums, tail.sum(-1, keepdim=True, dtype=torch.float64)], dim=-1)
    cumulative = sums.cumsum(-1)
    targets = uniforms * cumulative[:, -1:]
    group = torch.searchsorted(cumulative, targets, right=True).clamp_(max=cumulative.size(-1) - 1)
    before = torch.where(group > 0, cumulative.gather(-1, (group - 1).clamp(min=0)), torch.zeros_like(targets))
    if full:
        members = head.gather(1, group.clamp(max=full - 1).unsqueeze(-1).expand(-1, -1, GROUP))
        if tail is not None:
            members = torch.where((group == full).unsqueeze(-1), tail.unsqueeze(1), members)
    else:  # a vocabulary smaller than one group
        members = tail.unsqueeze(1).expand(-1, uniforms.size(-1), -1)
    inner = members.cumsum(-1, dtype=torch.float64)
    within = torch.searchsorted(inner, (targets - before).unsqueeze(-1), right=True).squeeze(-1)
    return (group * GROUP + within.clamp_(max=GROUP - 1)).clamp_(max=n - 1)


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
