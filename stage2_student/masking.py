"""Conversations (a chat cache): the loss on the trained positions only, as the mean over the trained positions of
the whole global batch — every micro-batch of the optimizer step, on every process.

The training loop divides each micro-batch's loss by the number of micro-batches and DDP averages the gradients
over the processes; so a micro-batch's loss is Σ_trained loss · (G · N_proc / N), N the trained positions of the
global batch (one all-reduce per step), and the step's gradient is that of Σ_all trained loss / N however the
positions fall into micro-batches and processes. `loss_weights` gives those per-position factors; the loss
(stage2_student/losses.py) then sums weight · value where it would otherwise average over positions.
"""
from __future__ import annotations

import torch


def trained_positions(group: list) -> int:
    """The trained positions of this process's micro-batches of one step (blocks the reader refused: none)."""
    return sum(int(batch["loss_mask"].sum()) for batch in group if isinstance(batch, dict))


def global_trained_positions(accelerator, group: list, device: torch.device) -> int:
    """The trained positions of the step's global batch: this process's, summed over the processes."""
    count = trained_positions(group)
    if accelerator.num_processes > 1:
        count = int(accelerator.reduce(torch.tensor(count, device=device), "sum").item())
    return count


def loss_weights(mask: torch.Tensor, micro_batches: int, processes: int, total: int) -> torch.Tensor:
    """[B, L] float32 weights of one micro-batch's positions: G · N_proc / N where trained, 0 elsewhere (all 0 when
    the global batch trains nothing: the step then changes nothing but the schedule)."""
    return mask.float() * (micro_batches * processes / max(total, 1))
