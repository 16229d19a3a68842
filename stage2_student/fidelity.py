"""Teacher fidelity: how close a model's next-token distributions q come to its teacher's p, per position.

- `kl_to_teacher`: mean KL(p ‖ q) in nats per position. Exact against a live teacher (`evaluate --teacher`)
  and a full cache (its fp16 log-probs renormalized: their rounding leaves Σp a few 1e-4 from 1). From a
  top-k cache without tail draws only the k probabilities and the missing mass r = 1 − Σ p_topk are known:
  the KL between the two distributions coarsened to k+1 buckets (the k ids, everything else) is reported,
  a lower bound of the true KL (coarsening never increases a KL divergence); `kl_lower_bound` holds the
  same number. From a top-k cache with tail draws (`cache.tail_draws`) and from a sample cache, the KL from
  the cache's estimate p̂ of the teacher, the target stage two trains on (top-k probabilities plus
  r·count/t on the tail draws; count/N on the draws): its cross-entropy part −Σ p̂ log q is unbiased and the
  entropy of p̂ is on average below the teacher's (concavity), so the estimate is biased upwards, for a tail
  cache by at most r·H(tail) (the tail's entropy share); a tail cache also gives the bucket lower bound.
- `top1_agreement`: share of positions where the model's most likely token is the teacher's (a sample
  cache: the most drawn token, an estimate).
- `topk_mass_share`: the mass the model puts on the teacher's k most likely ids, over the mass the teacher
  puts there (Σ over positions of each; k = the cache's k, or `cache.k` for a full cache or live teacher;
  none for a sample cache).

Every log-probability is over the real vocabulary (len(tokenizer)), at the cache's temperature (a sample or
tail cache drew at `cache.sample_temperature`: the model's logits are divided by it as well).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cache.manifest import Manifest
from cache.reader import CacheReader
from common.alignment import vocab_logprobs


@dataclass
class FidelityScore:
    kl_to_teacher: float
    top1_agreement: float
    topk_mass_share: float | None
    kl_lower_bound: float | None


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p·(log p − log q) per row in float64, with 0·log 0 = 0."""
    log_p, log_q = log_p.double(), log_q.double()
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def top_k_mask(log_p: torch.Tensor, k: int) -> torch.Tensor:
    """[N, V] True at each row's k most likely ids, ties by ascending id (as stage one's top-k ids)."""
    k = min(k, log_p.size(-1))
    threshold = log_p.topk(k, dim=-1).values[:, -1:]
    above = log_p > threshold
    at = log_p == threshold
    room = k - above.sum(-1, keepdim=True)  # how many of the ids at the threshold are in, the lowest ids first
    return above | (at & (at.cumsum(-1) <= room))


@dataclass
class FullTeacher:
    """A teacher's whole distribution at N positions, with the parts of the fidelity that do not depend on the
    compared model: computed once, however many models are compared with it."""
    p: torch.Tensor  # [N, V]
    plogp: float  # Σ p log p over the positions (float64 sum)
    top1: torch.Tensor  # [N] the most likely id
    top_ids: torch.Tensor | None  # [N, k] the k most likely ids (ties: the lowest ids), for the mass share
    top_mass: float  # Σ p over those ids

    @classmethod
    def of(cls, log_p: torch.Tensor, k: int | None) -> "FullTeacher":
        """`log_p` [N, V] normalized; `k`: the top-k mass share's k (none: no share)."""
        p = log_p.exp()
        top_ids = None
        if k:
            top = top_k_mask(log_p, k)
            # each row has exactly min(k, V) ids in its mask: their column indices, row by row
            top_ids = top.nonzero()[:, 1].reshape(log_p.size(0), -1)
        # the same product as add_full's Σ p q, so that a model against itself gives exactly 0 (a log p of −inf,
        # at p = 0, clamped: 0 · finite)
        plogp = torch.linalg.vecdot(p, log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(dtype=torch.float64).item()
        return cls(p, plogp, log_p.max(-1).indices, top_ids,
                   0.0 if top_ids is None else p.gather(-1, top_ids).sum(dtype=torch.float64).item())


class Fidelity:
    """Sums over positions; `result()` the means. Model log-probs `q` are [N, V] fp32 over the real vocabulary."""

    def __init__(self) -> None:
        self.positions = self.agree = 0
        self.kl = self.kl_lower = 0.0
        self.model_mass = self.teacher_mass = 0.0
        self.has_lower = self.has_mass = False

    def _agreement(self, q: torch.Tensor, teacher_top: torch.Tensor) -> None:
        self.agree += int((q.max(-1).indices == teacher_top).sum())  # max: ~3× faster than argmax on the CPU
        self.positions += q.size(0)

    def _mass(self, q: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor) -> None:
        self.has_mass = True
        self.model_mass += q.gather(-1, ids).double().exp().sum().item()
        self.teacher_mass += log_p.double().exp().sum().item()

    def add_full(self, q: torch.Tensor, teacher: "FullTeacher") -> None:
        """The teacher's whole distribution at the same positions (`FullTeacher.of`, made once for every model
        compared with it)."""
        # KL(p ‖ q) = Σ p log p − Σ p q: the teacher's part is computed once
        self.kl += teacher.plogp - torch.linalg.vecdot(teacher.p, q).sum(dtype=torch.float64).item()
        self._agreement(q, teacher.top1)
        if teacher.top_ids is not None:
            self.has_mass = True
            self.model_mass += q.gather(-1, teacher.top_ids).exp().sum(dtype=torch.float64).item()
            self.teacher_mass += teacher.top_mass

    def add_topk(self, q: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor,
                 tail_ids: torch.Tensor | None = None, tail_counts: torch.Tensor | None = None) -> None:
        """A top-k cache's ids [N, k] (most likely first) and log-probs, and its tail draws if any."""
        ids = ids.long()
        q_top = q.gather(-1, ids)
        rest_p = (1.0 - log_p.double().exp().sum(-1)).clamp(min=0.0)  # fp16 values can sum past 1
        log_rest_q = torch.logsumexp(q.scatter(-1, ids, -math.inf), dim=-1).double()
        top = _plogp_ratio(log_p, q_top)
        lower = top + torch.where(rest_p > 0, rest_p * (rest_p.log() - log_rest_q), torch.zeros_like(rest_p))
        self.has_lower = True
        self.kl_lower += lower.sum().item()
        if tail_counts is None:
            self.kl += lower.sum().item()
        else:  # p̂ = r·c/t on the drawn ids (padding: count 0, p̂ = 0)
            counts = tail_counts.double()
            log_tail = rest_p.log()[:, None] + (counts / counts.sum(-1, keepdim=True)).log()
            self.kl += (top + _plogp_ratio(log_tail, q.gather(-1, tail_ids.long().clamp(min=0)))).sum().item()
        self._agreement(q, ids[:, 0])
        self._mass(q, ids, log_p)

    def add_sample(self, q: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """A sample cache's unique drawn ids [N, m] (most drawn first, −1 = empty) and their counts."""
        counts = counts.double()
        log_p = (counts / counts.sum(-1, keepdim=True)).log()
        self.kl += _plogp_ratio(log_p, q.gather(-1, ids.long().clamp(min=0))).sum().item()
        self._agreement(q, ids[:, 0].long())

    def result(self) -> FidelityScore:
        n = max(self.positions, 1)
        share = self.model_mass / self.teacher_mass if self.has_mass and self.teacher_mass > 0 else None
        return FidelityScore(self.kl / n, self.agree / n, share, self.kl_lower / n if self.has_lower else None)


def cache_temperature(manifest: Manifest) -> float:
    """The temperature a cache's distributions are at: a sample or tail cache's draws, else 1."""
    draws = manifest.sample or manifest.tail
    return draws.temperature if draws is not None else 1.0


def cache_estimator(manifest: Manifest) -> str:
    """What `kl_to_teacher` is, from this cache, in words."""
    if manifest.mode == "full":
        return "exact (the full distribution, fp16 log-probs renormalized)"
    if manifest.mode == "sample":
        return f"plug-in KL from the {manifest.sample.draws} draws' empirical distribution (biased upwards)"
    if manifest.tail is not None:
        return (f"plug-in KL from the top-{manifest.k} probabilities plus r·count/t on {manifest.tail.draws} tail "
                f"draws (biased upwards, by at most r·H(tail)); kl_lower_bound: top-{manifest.k} + 1 bucket")
    return f"lower bound: KL over the top-{manifest.k} ids + 1 bucket for the rest"


@torch.inference_mode()
def cache_fidelity(model: torch.nn.Module, reader: CacheReader, device: torch.device, batch_size: int,
                   k: int) -> tuple[FidelityScore, int]:
    """The fidelity of `model` on every position of the cache (all L of each block: position t holds the
    teacher's distribution of token t+1 given the block's tokens up to t); and the number of positions. A chat
    cache: on its trained positions only (the others hold placeholders), the model given the blocks' position ids
    (each conversation attends only to itself, as the teacher did)."""
    manifest = reader.manifest
    temperature, vocab = cache_temperature(manifest), manifest.vocab_size
    fidelity = Fidelity()
    blocks = list(range(reader.num_blocks))
    for start in range(0, len(blocks), batch_size):
        items = [reader.block(i) for i in blocks[start:start + batch_size]]
        batch = {name: torch.from_numpy(np.stack([item[name] for item in items])) for name in items[0]}
        batch = {name: value.long() if name.endswith(("_ids", "_counts")) else value for name, value in batch.items()}
        inputs = {"input_ids": batch.pop("input_ids").to(device), "use_cache": False}
        if "position_ids" in batch:
            inputs["position_ids"] = batch.pop("position_ids").long().to(device)
        mask = batch.pop("loss_mask", None)
        logits = model(**inputs).logits
        q = vocab_logprobs(logits if temperature == 1 else logits[..., :vocab] / temperature, vocab)
        q = q.reshape(-1, vocab).cpu()
        flat = {name: value.reshape(q.size(0), -1) for name, value in batch.items()}
        if mask is not None:  # a chat cache: the trained positions only
            keep = mask.reshape(-1).bool()
            q, flat = q[keep], {name: value[keep] for name, value in flat.items()}
        if manifest.mode == "full":
            fidelity.add_full(q, FullTeacher.of(torch.log_softmax(flat["logprobs"].float(), dim=-1), k))
        elif manifest.mode == "topk":
            fidelity.add_topk(q, flat["topk_ids"], flat["topk_logprobs"].float(), flat.get("tail_ids"),
                              flat.get("tail_counts"))
        else:
            fidelity.add_sample(q, flat["sample_ids"], flat["sample_counts"])
    return fidelity.result(), fidelity.positions
