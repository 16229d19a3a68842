"""The student's loss terms, from cached (or live) teacher distributions: the KD loss and the next-token
cross-entropy, computed together with one gradient buffer.

Every KD mode is reduced to a pair of log-distributions on a common support of S entries per position:

  full (full cache, live teacher)   S = V    the whole truncated vocabulary
  topk, tail "bucket" (default)     S = k+1  the k ids plus one bucket for everything else, on both
                                             sides: the teacher's rest is 1 − Σ p_topk, the student's is
                                             its own mass outside the k ids
  topk, tail "renormalize"          S = k+1  the teacher renormalized over its k ids (rest = 0); the
                                             student keeps its full-vocabulary probabilities
  sample                            S = m    the empirical distribution c_i / N of the draws
  topk + tail draws                 S = k+t  the exact top-k probabilities plus r·c_i / t on the t tail draws'
                                             unique ids (r = 1 − Σ p_topk): an unbiased estimate of the
                                             teacher, so the forward KL and its gradient are unbiased; the
                                             student's log-probs at those ids (no bucket)

Temperature T divides the teacher's log-probs (then renormalized over the support) and the student's
logits; every KD loss is averaged over positions and multiplied by T², as in the original recipe. Draws
(sample mode, tail draws) are made at T already (stage two checks that T is the cache's sample temperature),
and a tail cache's top-k log-probs are stored at that T: they are used as they are.

Cost. The student's logits z are [P, V] (P positions, V ≈ 152k): every pass over them costs about what
the whole loss costs on the small supports, and every fresh tensor of their size costs its page faults,
so the passes and the temporaries are counted:

- sparse modes (top-k, sample): the student enters the loss only through its logsumexp and its logits at
  the cached ids. One exponential pass writes exp(z/T − max) into the gradient buffer and gives the
  logsumexp; the loss and its gradient with respect to (logsumexp, logits at the ids) come from autograd
  on the small [P, S] tensors; the gradient is then that buffer times a coefficient per row plus a
  scatter at the ids. The hard-label cross-entropy at T = 1 shares the exponential pass (its value is a
  gather).
- full distributions with the forward KL (the default loss) and the hard-label term alone: the gradient is
  known in closed form (q − p, q − onehot) and written in the same single pass.
- full distributions with the other divergences: autograd over chunks of `chunk` positions.

The gradient is computed during the forward pass into one [P, V] buffer (no autograd graph over [P, V]
is kept), with the configured weights of the two terms; the backward pass only scales it, after checking
that the gradients that arrive are in the proportion of those weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, get_args

import torch
import torch.nn.functional as F

from common.alignment import AlignmentLog
from common.config import CacheMode, LossName, TopkTail, TrainConfig


@dataclass
class TeacherTargets:
    """A batch of teacher distributions, of a cache mode's kind. `ids` is None for full distributions."""
    kind: CacheMode
    values: torch.Tensor  # full/topk: log-probs [B, L, S]; sample: counts [B, L, m]
    ids: torch.Tensor | None = None  # [B, L, S] token ids (sample: -1 = empty slot)
    tail_ids: torch.Tensor | None = None  # topk with tail draws: [B, L, t] drawn ids outside the top k (-1 = empty)
    tail_counts: torch.Tensor | None = None  # [B, L, t] their counts, adding up to t

    def flatten(self, length: int) -> "TeacherTargets":
        """First `length` positions of each sequence, flattened to [B*length, S]."""
        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, :length].reshape(-1, t.size(-1))
        return TeacherTargets(self.kind, flat(self.values), flat(self.ids), flat(self.tail_ids),
                              flat(self.tail_counts))

    def support_ids(self) -> torch.Tensor:
        """[P, S] the ids of a sparse support (empty slots: id 0, with teacher probability 0)."""
        ids = self.ids if self.tail_ids is None else torch.cat([self.ids, self.tail_ids.to(self.ids.dtype)], dim=-1)
        return ids.long().clamp(min=0)


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


# --- the two sides of a sparse support ------------------------------------------------------------------

REST_FLOOR = 1e-6  # fp16 top-k log-probs can sum past 1 by rounding; keep the rest bucket positive


def _log_rest(log_in: torch.Tensor) -> torch.Tensor:
    """log(max(1 − Σ exp(log_in), REST_FLOOR)) per row."""
    covered = torch.logsumexp(log_in, dim=-1, keepdim=True).clamp(max=math.log1p(-REST_FLOOR))
    return torch.log(-torch.expm1(covered))


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x if temperature == 1 else x / temperature  # no copy at T = 1


def teacher_support(teacher: TeacherTargets, temperature: float, tail: TopkTail) -> torch.Tensor:
    """log_p [P, S] of flattened top-k or sample targets, at the temperature."""
    if teacher.kind == "sample":
        counts = teacher.values.float()
        return torch.log(counts / counts.sum(-1, keepdim=True))  # empty slots: log 0 = −inf
    logprobs = teacher.values.float()
    if teacher.tail_counts is not None:  # at T already; the rest r spread as r·c_i/t over the drawn ids
        counts = teacher.tail_counts.float()
        tail = _log_rest(logprobs) + torch.log(counts / counts.sum(-1, keepdim=True))  # empty slots: −inf
        return torch.cat([logprobs, tail], dim=-1)
    if tail == "renormalize":
        log_p = torch.log_softmax(_scaled(logprobs, temperature), dim=-1)
        return torch.cat([log_p, torch.full_like(log_p[:, :1], -math.inf)], dim=-1)
    bucketed = torch.cat([logprobs, _log_rest(logprobs)], dim=-1)
    return torch.log_softmax(_scaled(bucketed, temperature), dim=-1)


def student_support(log_q_ids: torch.Tensor, teacher: TeacherTargets) -> torch.Tensor:
    """log_q [P, S] from the student's log-probs at the cached ids (a top-k support without tail draws adds the
    rest bucket)."""
    if teacher.kind == "sample" or teacher.tail_counts is not None:
        return log_q_ids
    return torch.cat([log_q_ids, _log_rest(log_q_ids)], dim=-1)


# --- one student step: the KD term, the hard-label term, one gradient buffer ------------------------------

def _blocks(rows: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def _shift(x: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """out ← (x − max x) / T per row, written into `out` (no temporary of x's size); returns max x / T.
    Then exp(out) / Σ exp(out) = softmax(x/T) and max x / T + log Σ exp(out) = logsumexp(x/T)."""
    top = torch.amax(x, dim=-1, keepdim=True).float()
    if x.dtype == out.dtype:
        torch.sub(x, top, out=out)
    else:  # a mixed-dtype subtraction takes a slow path on the CPU (20x a copy): convert first
        out.copy_(x)
        out.sub_(top)
    if temperature != 1:
        out.div_(temperature)
    return top.squeeze(1) / temperature


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """[B*L] the next token of each position; the last position of each sequence has none (−100)."""
    return F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)


@dataclass
class _Terms:
    """What one call computes over flattened logits z [P, V'] (V' ≥ vocab_size): the KD term against
    `targets` ([P, S] rows; None = no KD term) and/or the next-token cross-entropy at `labels` ([P], −100 =
    no label; None = no such term). The gradient buffer holds kd_weight·∂kd/∂z + hard_weight·∂hard/∂z.

    The single-pass routes write exp(z/τ − max) straight into the gradient buffer (fp32) and scale it
    there: a few whole-tensor operations, no temporary of the logits' size. Blocks of `chunk` rows are
    used only where a per-row temporary is needed (the teacher's distribution, a second temperature, an
    fp32 buffer for lower-precision logits): they bound its memory, as in the autograd route."""
    vocab_size: int
    temperature: float
    loss: LossName
    tail: TopkTail
    beta: float
    alpha: float
    chunk: int
    targets: TeacherTargets | None
    labels: torch.Tensor | None
    kd_weight: float
    hard_weight: float
    # [P] per-row weights replacing both terms' means (conversations: the trained rows' 1/N, others 0); None: the
    # KD term is the mean over all rows and the cross-entropy the mean over the labelled rows
    weights: torch.Tensor | None = None

    def _kd_total(self, kd_rows: torch.Tensor, rows: int) -> torch.Tensor:
        """T² times the mean of the rows' KD values, or (weights) their weighted sum."""
        T = self.temperature
        return kd_rows.sum() * (T * T / rows) if self.weights is None else (kd_rows * self.weights).sum() * (T * T)

    def compute(self, z: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(kd, hard, gradient buffer or None); a term that is not asked for is 0."""
        grad = None
        if with_grad:
            grad = torch.empty_like(z)
            grad[:, self.vocab_size:].zero_()  # padded logits are never real tokens
        if self.targets is None or (self.targets.kind == "full" and self.loss == "forward_kl"):
            kd, hard = self._closed_form(z, grad)
        elif self.targets.kind == "full":
            kd, hard = self._dense_autograd(z, grad)
        else:
            kd, hard = self._sparse(z, grad)
        return kd, hard, grad

    def _temperatures(self) -> list[float]:
        """The student softmaxes the terms need: at T for KD, at 1 for the cross-entropy (one when T = 1)."""
        wanted = ([self.temperature] if self.targets is not None else []) + ([1.0] if self.labels is not None else [])
        return list(dict.fromkeys(wanted))

    def _layout(self, z: torch.Tensor, grad: torch.Tensor | None, per_row_temporary: bool):
        """(rows per block, fp32 work space [block, V] or None for the first softmax, one for a second):
        the first softmax goes straight into an fp32 gradient buffer; anything else needs blocks."""
        rows, V = z.size(0), self.vocab_size
        direct = grad is not None and grad.dtype == torch.float32
        second = len(self._temperatures()) > 1
        block = min(self.chunk, rows) if per_row_temporary or second or not direct else rows
        work = lambda: torch.empty(block, V, device=z.device)  # noqa: E731
        return block, (None if direct else work()), (work() if second else None)

    def _label_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels clamped to valid ids, mask of the labelled rows, 1 / their number, or the rows' weights)."""
        mask = self.labels >= 0
        inv_n = 1.0 / mask.sum().clamp(min=1).float() if self.weights is None else self.weights
        return self.labels.clamp(min=0), mask, inv_n

    def _hard_value(self, z: torch.Tensor, lse_1: torch.Tensor) -> torch.Tensor:
        """Mean over labelled rows of logsumexp(z) − z[label] (lse_1 given per row)."""
        labels, mask, inv_n = self._label_rows()
        z_label = z.gather(1, labels[:, None]).squeeze(1).float()
        if self.weights is not None:
            return (torch.where(mask, lse_1 - z_label, 0.0) * inv_n).sum()
        return torch.where(mask, lse_1 - z_label, 0.0).sum() * inv_n

    def _scatter_labels(self, grad: torch.Tensor) -> None:
        """The −onehot part of the cross-entropy's gradient, at this term's weight."""
        labels, mask, inv_n = self._label_rows()
        grad.scatter_add_(1, labels[:, None], (-self.hard_weight * inv_n * mask)[:, None].to(grad.dtype))

    def _closed_form(self, z: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward KL against full distributions and/or the cross-entropy, one pass per block of rows:
        ∂(−T² Σ p log softmax(z/T))/∂z = T·(q_T − p) and ∂CE/∂z = q_1 − onehot."""
        V, T, rows, device = self.vocab_size, self.temperature, z.size(0), z.device
        kd_on, hard_on = self.targets is not None, self.labels is not None
        temperatures = self._temperatures()
        block, first_work, second_work = self._layout(z, grad, per_row_temporary=kd_on)
        teacher_work = torch.empty(block, V, device=device) if kd_on else None
        kd_rows = torch.zeros(rows, device=device)
        # T² · (1/T) · mean over positions (or the rows' weights)
        kd_coef = self.kd_weight * T / rows if self.weights is None else self.kd_weight * T * self.weights
        lse_1 = torch.empty(rows, device=device) if hard_on else None
        if hard_on:
            _, mask, inv_n = self._label_rows()
            hard_coef = self.hard_weight * inv_n * mask  # per row
        for a, b in _blocks(rows, block):
            zb, n = z[a:b, :V], b - a
            acc = first_work[:n] if first_work is not None else grad[a:b, :V]  # this block's gradient, fp32
            if kd_on:  # the teacher's p = e_t / Σ e_t
                e_t = teacher_work[:n]
                _shift(self.targets.values[a:b], T, e_t)
                e_t.exp_()
                t_sums = e_t.sum(-1)
            for i, tau in enumerate(temperatures):
                work = acc if i == 0 else second_work[:n]
                top = _shift(zb, tau, work)
                if kd_on and tau == T:
                    dot = torch.bmm(e_t.unsqueeze(1), work.unsqueeze(2)).view(n)  # Σ e_t · (z/T − max)
                work.exp_()
                sums = work.sum(-1)
                coef = torch.zeros(n, device=device)
                if kd_on and tau == T:
                    kd_rows[a:b] = sums.log() - dot / t_sums  # −Σ p log q
                    coef += kd_coef if self.weights is None else kd_coef[a:b]
                if hard_on and tau == 1:
                    lse_1[a:b] = top + sums.log()
                    coef += hard_coef[a:b]
                if grad is not None:
                    if i == 0:
                        work.mul_((coef / sums)[:, None])
                    else:
                        acc.addcmul_(work, (coef / sums)[:, None])
            if grad is not None:
                if kd_on:
                    acc.addcmul_(e_t, (-(kd_coef if self.weights is None else kd_coef[a:b]) / t_sums)[:, None])
                if first_work is not None:
                    grad[a:b, :V] = acc
        kd = self._kd_total(kd_rows, rows) if kd_on else torch.zeros((), device=device)
        hard = self._hard_value(z, lse_1) if hard_on else torch.zeros((), device=device)
        if grad is not None and hard_on:
            self._scatter_labels(grad)
        return kd, hard

    def _sparse(self, z: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k or sample targets: the loss on the [P, S] supports with autograd, whose gradient with respect
        to the student's logsumexp and its logits at the ids gives softmax coefficients and a scatter."""
        V, T, rows, device = self.vocab_size, self.temperature, z.size(0), z.device
        temperatures = self._temperatures()
        block, first_work, second_work = self._layout(z, grad, per_row_temporary=False)
        lse = {tau: torch.empty(rows, device=device) for tau in temperatures}
        kept_sums = torch.empty(rows, device=device)  # the first softmax waits in the buffer, unnormalized
        for a, b in _blocks(rows, block):
            zb, n = z[a:b, :V], b - a
            for i, tau in enumerate(temperatures):
                work = second_work[:n] if i else first_work[:n] if first_work is not None else grad[a:b, :V]
                top = _shift(zb, tau, work)
                work.exp_()
                sums = work.sum(-1)
                lse[tau][a:b] = top + sums.log()
                if i == 0:
                    kept_sums[a:b] = sums
                    if grad is not None and first_work is not None:
                        grad[a:b, :V] = work
        leaves: list[torch.Tensor] = []
        with torch.enable_grad():
            for tau in temperatures:
                leaves.append(lse[tau].requires_grad_(grad is not None))
            total = torch.zeros((), device=device)
            kd = hard = torch.zeros((), device=device)
            if self.targets is not None:
                ids = self.targets.support_ids()  # padding (−1) has p = 0: no value, no gradient
                z_ids = z.gather(1, ids).float().requires_grad_(grad is not None)
                leaves.append(z_ids)
                log_q = student_support(_scaled(z_ids, T) - lse[T][:, None], self.targets)
                log_p = teacher_support(self.targets, T, self.tail)
                kd = self._kd_total(LOSSES[self.loss](log_p, log_q, beta=self.beta, alpha=self.alpha), rows)
                total = total + self.kd_weight * kd
            if self.labels is not None:
                hard = self._hard_value(z, lse[1.0])
                total = total + self.hard_weight * hard
            if grad is None:
                return kd.detach(), hard.detach()
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        coefs = [torch.zeros(rows, device=device) if g is None else g / tau
                 for g, tau in zip(grads, temperatures)]  # ∂lse_τ/∂z = softmax(z/τ)/τ
        grad[:, :V].mul_((coefs[0] / kept_sums)[:, None].to(grad.dtype))
        if len(temperatures) > 1:  # T ≠ 1 with both terms: the second softmax, recomputed block by block
            second = temperatures[1]
            for a, b in _blocks(rows, block):
                work = second_work[: b - a]
                _shift(z[a:b, :V], second, work)
                work.exp_()
                grad[a:b, :V].addcmul_(work, (coefs[1][a:b] / work.sum(-1))[:, None])
        if self.targets is not None and grads[len(temperatures)] is not None:
            grad.scatter_add_(1, ids, grads[len(temperatures)].to(grad.dtype))
        if self.labels is not None:
            self._scatter_labels(grad)
        return kd.detach(), hard.detach()

    def _dense_autograd(self, z: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Any divergence against full distributions: autograd over one chunk of rows at a time, its gradient
        written into the buffer before the next chunk."""
        V, T, rows = self.vocab_size, self.temperature, z.size(0)
        kd_sum = torch.zeros((), device=z.device)
        hard_sum = torch.zeros((), device=z.device)
        if self.labels is not None:
            labels, mask, inv_n = self._label_rows()
        for a, b in _blocks(rows, self.chunk):
            with torch.set_grad_enabled(grad is not None):
                zb = z[a:b, :V].detach().float().requires_grad_(grad is not None)
                log_q = torch.log_softmax(_scaled(zb, T), dim=-1)
                log_p = torch.log_softmax(_scaled(self.targets.values[a:b].float(), T), dim=-1)
                kd_rows = LOSSES[self.loss](log_p, log_q, beta=self.beta, alpha=self.alpha)
                kd = (kd_rows * (1.0 if self.weights is None else self.weights[a:b])).sum()
                total = kd * (self.kd_weight * T * T / (rows if self.weights is None else 1))
                if self.labels is not None:
                    log_q1 = log_q if T == 1 else torch.log_softmax(zb, dim=-1)
                    hard = -torch.where(mask[a:b], log_q1.gather(1, labels[a:b, None]).squeeze(1), 0.0)
                    if self.weights is not None:  # the rows' weights: inv_n is 1
                        hard = hard * self.weights[a:b]
                    hard = hard.sum()
                    total = total + hard * (self.hard_weight * (inv_n if self.weights is None else 1.0))
                    hard_sum += hard.detach()
                if grad is not None:
                    grad[a:b, :V] = torch.autograd.grad(total, zb)[0]
            kd_sum += kd.detach()
        if self.weights is not None:
            return kd_sum * T * T, hard_sum
        hard = hard_sum * inv_n if self.labels is not None else hard_sum
        return kd_sum * T * T / rows, hard


class _StudentLoss(torch.autograd.Function):
    """(kd, hard) of one `_Terms` with one gradient buffer, computed in the forward pass with the configured
    weights. The backward pass checks that the incoming gradients are those weights times one common
    factor (as in TextBrewer's `kd·kd_weight + hard·hard_weight`, then divided for accumulation or scaled
    for fp16) and scales the buffer by that factor in place (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, terms: _Terms) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.weights = (terms.kd_weight if terms.targets is not None else 0.0,
                       terms.hard_weight if terms.labels is not None else 0.0)
        with_grad = ctx.needs_input_grad[0] and any(ctx.weights)
        with torch.autocast(z.device.type, enabled=False):  # every step here chooses its own precision
            kd, hard, grad = terms.compute(z.detach(), with_grad)
        ctx.save_for_backward(grad)
        ctx.backward_done = False
        # weight 0: the value is reported without a gradient (one call: each call replaces the last)
        ctx.mark_non_differentiable(*(value for value, weight in zip((kd, hard), ctx.weights) if not weight))
        return kd, hard

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kd: torch.Tensor, grad_hard: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError("the student loss's gradient buffer is scaled in place: one backward pass only")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        factors = [incoming.item() / weight for incoming, weight in zip((grad_kd, grad_hard), ctx.weights) if weight]
        finite = all(math.isfinite(factor) for factor in factors)  # a NaN loss: the run's own check stops it
        if finite and not math.isclose(min(factors), max(factors), rel_tol=1e-5, abs_tol=1e-30):
            raise RuntimeError(
                f"the KD and hard-label terms' gradients arrived as {grad_kd.item():g} and {grad_hard.item():g}, "
                f"not in the proportion of the configured weights {ctx.weights[0]:g} : {ctx.weights[1]:g} that "
                "their shared gradient was computed with")
        if factors[0] != 1.0:
            grad.mul_(factors[0])
        return grad, None


def student_losses(z: torch.Tensor, terms: _Terms) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kd, hard) for flattened logits z [P, V']; None for a term `terms` does not ask for."""
    kd, hard = _StudentLoss.apply(z, terms)
    return (kd if terms.targets is not None else None), (hard if terms.labels is not None else None)


# --- what TextBrewer calls ------------------------------------------------------------------------------

@dataclass
class StudentLogits:
    """The student adaptor's `logits` for TextBrewer: the logits [B, L, V'] with the tokens they predict,
    so that the KD loss can compute the hard-label term in the same pass (`with_hard`); `hard` holds it
    once computed."""
    logits: torch.Tensor
    input_ids: torch.Tensor
    with_hard: bool
    hard: torch.Tensor | None = None
    # [B, L] per-position weights (conversations: trained positions' share of the global batch, others 0): both
    # terms are then Σ weight · value instead of means
    weights: torch.Tensor | None = None


@dataclass
class KDLoss:
    """A TextBrewer KD loss: `(student logits, teacher targets, temperature) -> scalar`, where the student
    logits are a tensor [B, L, V'] or a `StudentLogits` (then the hard-label term is computed with it).
    `kd_weight` and `hard_weight` are the weights TextBrewer applies (they form the shared gradient); a
    weight of 0 reports that term's value without a gradient. No defaults here: the settings' one source
    is `TrainConfig` (see `from_config`)."""
    name: LossName
    vocab_size: int
    tail: TopkTail
    chunk: int
    beta: float
    alpha: float
    kd_weight: float
    hard_weight: float
    alignment: AlignmentLog = field(default_factory=AlignmentLog, compare=False)  # this run's [ALIGN] lines

    @classmethod
    def from_config(cls, train: TrainConfig, vocab_size: int, alignment: AlignmentLog | None = None) -> "KDLoss":
        return cls(train.loss, vocab_size, tail=train.topk_tail, chunk=train.loss_chunk, beta=train.loss_beta,
                   alpha=train.loss_alpha, kd_weight=train.kd_weight, hard_weight=train.hard_weight,
                   alignment=alignment or AlignmentLog())

    def _terms(self, temperature: float, targets: TeacherTargets | None, labels: torch.Tensor | None,
               weights: torch.Tensor | None = None, length: int | None = None) -> _Terms:
        if weights is not None:  # the positions kept, flattened as the logits are
            weights = weights[:, :length].reshape(-1).float()
        return _Terms(self.vocab_size, temperature, self.name, self.tail, self.beta, self.alpha, self.chunk,
                      targets, labels, self.kd_weight, self.hard_weight, weights)

    def __call__(self, logits_S: torch.Tensor | StudentLogits, targets_T: TeacherTargets,
                 temperature: float) -> torch.Tensor:
        student = logits_S if isinstance(logits_S, StudentLogits) else None
        logits = logits_S.logits if student else logits_S
        length = min(logits.size(1), targets_T.values.size(1))  # align sequence lengths
        with_hard = student is not None and student.with_hard and student.hard is None
        if length < logits.size(1):
            self.alignment.once("len:KD", f"[ALIGN] Student sequence length {logits.size(1)} → {length}")
            if with_hard:  # the terms cover different positions: two passes
                self.hard_label_loss(student)
                with_hard = False
            logits = logits[:, :length]
        z = logits.reshape(-1, logits.size(-1))  # a view: no copy of the logits or their gradient
        labels = next_token_labels(student.input_ids) if with_hard else None
        weights = student.weights if student is not None else None
        kd, hard = student_losses(z, self._terms(temperature, targets_T.flatten(length), labels, weights, length))
        if with_hard:
            student.hard = hard
        return kd

    def hard_label_loss(self, student: StudentLogits) -> torch.Tensor:
        """The hard-label term of `student`: the one the KD loss computed with it, or computed now alone."""
        if student.hard is None:
            z = student.logits.reshape(-1, student.logits.size(-1))
            _, student.hard = student_losses(z, self._terms(1.0, None, next_token_labels(student.input_ids),
                                                            student.weights))
        return student.hard


def hard_label_loss(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int, chunk: int) -> torch.Tensor:
    """Next-token cross-entropy over the truncated vocabulary, mean over the B·(L−1) predicted tokens.
    The last position has no label rather than being sliced off, so the logits stay a view."""
    terms = _Terms(vocab_size, 1.0, "forward_kl", "bucket", 0.0, 0.0, chunk, None, next_token_labels(input_ids),
                   kd_weight=0.0, hard_weight=1.0)
    return student_losses(logits.reshape(-1, logits.size(-1)), terms)[1]
