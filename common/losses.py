"""Distillation losses from cached (or live) teacher distributions, computed in chunks of positions.

Every mode is reduced to a pair of log-distributions on a common support of S entries per position:

  full (full cache, live teacher)   S = V    the whole truncated vocabulary
  topk, tail "bucket" (default)     S = k+1  the k ids plus one bucket for everything else, on both
                                             sides: the teacher's rest is 1 − Σ p_topk, the student's is
                                             its own mass outside the k ids
  topk, tail "renormalize"          S = k+1  the teacher renormalized over its k ids (rest = 0); the
                                             student keeps its full-vocabulary probabilities
  sample                            S = m    the empirical distribution c_i / N of the draws

Temperature T divides the teacher's log-probs (then renormalized over the support) and the student's
logits; every loss is averaged over positions and multiplied by T², as in the original recipe. The
student's fp32 log-softmax over [positions, V] is the memory peak of training, so it is computed one
chunk of positions at a time, its gradient too (see `_ChunkedSum`): it is never held for more than one chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, get_args

import torch
import torch.nn.functional as F

from cache.format import CacheMode
from common.alignment import AlignmentLog
from common.config import LossName, TopkTail, TrainConfig


@dataclass
class TeacherTargets:
    """A batch of teacher distributions, of a cache mode's kind. `ids` is None for full distributions."""
    kind: CacheMode
    values: torch.Tensor  # full/topk: log-probs [B, L, S]; sample: counts [B, L, m]
    ids: torch.Tensor | None = None  # [B, L, S] token ids (sample: -1 = empty slot)

    def flatten(self, length: int) -> "TeacherTargets":
        """First `length` positions of each sequence, flattened to [B*length, S]."""
        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, :length].reshape(-1, t.size(-1))
        return TeacherTargets(self.kind, flat(self.values), flat(self.ids))

    def rows(self, start: int, end: int) -> "TeacherTargets":
        return TeacherTargets(self.kind, self.values[start:end],
                              None if self.ids is None else self.ids[start:end])


# --- divergences on a common support: log_p (teacher), log_q (student), both [P, S] ------------------

def _plogq(log_p: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
    """Σ p·log x over the support, with 0·log 0 = 0 (and 0·(−inf) = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * log_x, torch.zeros_like(p)).sum(-1)


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, **_) -> torch.Tensor:
    """Soft cross-entropy −Σ p log q: forward KL plus the teacher's entropy (no gradient), as the original."""
    return -_plogq(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, **_) -> torch.Tensor:
    return _plogq(log_q, log_q) - _plogq(log_q, log_p)


def _mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1−w)·q), computed in log space."""
    if weight_p <= 0.0:
        return log_q
    if weight_p >= 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def jsd(log_p: torch.Tensor, log_q: torch.Tensor, *, beta: float, **_) -> torch.Tensor:
    """Generalized JSD: β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q (GKD, Agarwal et al. 2024)."""
    log_m = _mix(log_p, log_q, beta)
    kl_pm = _plogq(log_p, log_p) - _plogq(log_p, log_m)
    kl_qm = _plogq(log_q, log_q) - _plogq(log_q, log_m)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float, **_) -> torch.Tensor:
    """Skew KL: KL(p ‖ α·p + (1−α)·q) (DistiLLM, Ko et al. 2024)."""
    return _plogq(log_p, log_p) - _plogq(log_p, _mix(log_p, log_q, alpha))


LOSSES: dict[LossName, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
}
assert tuple(LOSSES) == get_args(LossName), "LOSSES must define every LossName, in its order"


# --- supports ------------------------------------------------------------------------------------------

REST_FLOOR = 1e-6  # fp16 top-k log-probs can sum past 1 by rounding; keep the rest bucket positive


def _log_rest(log_in: torch.Tensor) -> torch.Tensor:
    """log(max(1 − Σ exp(log_in), REST_FLOOR)) per row."""
    covered = torch.logsumexp(log_in, dim=-1, keepdim=True).clamp(max=math.log1p(-REST_FLOOR))
    return torch.log(-torch.expm1(covered))


def supports(z: torch.Tensor, teacher: TeacherTargets, temperature: float,
             tail: TopkTail) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_p, log_q) [P, S] for student logits z [P, V] (fp32) and one chunk of teacher targets."""
    log_q_full = torch.log_softmax(z / temperature, dim=-1)
    if teacher.kind == "full":
        return torch.log_softmax(teacher.values.float() / temperature, dim=-1), log_q_full
    ids = teacher.ids.long()
    if teacher.kind == "sample":
        counts = teacher.values.float()
        log_p = torch.log(counts / counts.sum(-1, keepdim=True))  # empty slots: log 0 = −inf
        return log_p, log_q_full.gather(-1, ids.clamp(min=0))
    log_q_ids = log_q_full.gather(-1, ids)
    log_q = torch.cat([log_q_ids, _log_rest(log_q_ids)], dim=-1)
    teacher_lp = teacher.values.float()
    if tail == "renormalize":
        log_p = torch.log_softmax(teacher_lp / temperature, dim=-1)
        rest = torch.full_like(log_p[:, :1], -math.inf)
        return torch.cat([log_p, rest], dim=-1), log_q
    bucketed = torch.cat([teacher_lp, _log_rest(teacher_lp)], dim=-1)
    return torch.log_softmax(bucketed / temperature, dim=-1), log_q


# --- chunked losses ----------------------------------------------------------------------------------

def _row_chunks(rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


class _ChunkedSum(torch.autograd.Function):
    """Σ_chunks fn(z[rows]) whose gradient is computed chunk by chunk during the forward pass and written
    into one [P, V] buffer: at any time only one chunk's fp32 intermediates are alive, and the gradient
    reaches z as that single buffer (slicing z in the graph would allocate a full-size zero gradient per
    chunk instead)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, fn: Callable[..., torch.Tensor], chunk: int,
                slice_rest: Callable[[int, int], tuple]) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(z) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=z.device)
        for start, end in _row_chunks(z.size(0), chunk):
            with torch.enable_grad():
                rows = z[start:end].detach().requires_grad_(want_grad)
                value = fn(rows, *slice_rest(start, end))
                if want_grad:
                    grad[start:end] = torch.autograd.grad(value, rows)[0]
            total += value.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total), None, None, None  # the buffer is used once: scale it in place


def chunked_sum(fn: Callable[..., torch.Tensor], z: torch.Tensor, chunk: int,
                slice_rest: Callable[[int, int], tuple]) -> torch.Tensor:
    """Σ over row chunks of fn(z[rows], *slice_rest(rows)), holding one chunk's intermediates at a time."""
    if torch.is_grad_enabled() and z.requires_grad:
        return _ChunkedSum.apply(z, fn, chunk, slice_rest)
    with torch.no_grad():
        return sum((fn(z[a:b], *slice_rest(a, b)) for a, b in _row_chunks(z.size(0), chunk)),
                   torch.zeros((), device=z.device))


@dataclass
class KDLoss:
    """A TextBrewer KD loss: `(student_logits [B, L, V'], teacher targets, temperature) -> scalar`.
    No defaults here: the settings' one source is `TrainConfig` (see `from_config`)."""
    name: LossName
    vocab_size: int
    tail: TopkTail
    chunk: int
    beta: float
    alpha: float
    detached: bool = False  # weight 0: report the value, skip its backward
    alignment: AlignmentLog = field(default_factory=AlignmentLog, compare=False)  # this run's [ALIGN] lines

    @classmethod
    def from_config(cls, train: TrainConfig, vocab_size: int, alignment: AlignmentLog | None = None) -> "KDLoss":
        return cls(train.loss, vocab_size, tail=train.topk_tail, chunk=train.loss_chunk, beta=train.loss_beta,
                   alpha=train.loss_alpha, detached=train.kd_weight == 0, alignment=alignment or AlignmentLog())

    def _chunk_sum(self, z: torch.Tensor, teacher: TeacherTargets, temperature: float) -> torch.Tensor:
        log_p, log_q = supports(z[:, : self.vocab_size].float(), teacher, temperature, self.tail)
        return LOSSES[self.name](log_p, log_q, beta=self.beta, alpha=self.alpha).sum()

    def __call__(self, logits_S: torch.Tensor, targets_T: TeacherTargets, temperature: float) -> torch.Tensor:
        length = min(logits_S.size(1), targets_T.values.size(1))  # align sequence lengths
        if length < logits_S.size(1):
            self.alignment.once("len:KD", f"[ALIGN] Student sequence length {logits_S.size(1)} → {length}")
            logits_S = logits_S[:, :length]
        z = logits_S.reshape(-1, logits_S.size(-1))  # a view: no copy of the logits or their gradient
        teacher = targets_T.flatten(length)
        if self.detached:
            z = z.detach()
        total = chunked_sum(self._chunk_sum, z, self.chunk, lambda a, b: (teacher.rows(a, b), temperature))
        return total / z.size(0) * temperature**2


def hard_label_loss(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int, chunk: int) -> torch.Tensor:
    """Next-token cross-entropy over the truncated vocabulary, mean over the B·(L−1) predicted tokens.
    The last position has no label (ignore_index) rather than being sliced off, so z stays a view."""
    z = logits.reshape(-1, logits.size(-1))
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)

    def chunk_sum(z_chunk: torch.Tensor, label_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z_chunk[:, :vocab_size].float(), label_chunk, reduction="sum", ignore_index=-100)

    return chunked_sum(chunk_sum, z, chunk, lambda a, b: (labels[a:b],)) / (input_ids.numel() - input_ids.size(0))
