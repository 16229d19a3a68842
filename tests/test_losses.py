"""The KD losses against an independent dense reference (plain torch, full-vocabulary probability vectors).

The reference never calls stage2_student.losses: it builds probability vectors over the whole vocabulary (or the
coarse k+1 support, built from a boolean vocabulary mask) in float64 and applies the textbook formulas.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cache.compat import unsupported_reason
from common.config import TrainConfig
from stage2_student.losses import LOSSES, KDLoss, StudentLogits, TeacherTargets, hard_label_loss
from tests.conftest import run_cli, tiny_overrides

B, L, V, V_PAD, K = 2, 5, 37, 41, 6   # B*L = 10 positions; the student has 4 padded logits
BETA, ALPHA = 0.3, 0.2                 # asymmetric, so swapped roles show
TEMPERATURES = (1.0, 2.0)
CHUNKS = (3, 5, 10, 64)                # 3 does not divide 10, 5 does, 10 and 64 are one chunk


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the reference ------------------------------------------------------------------------------------

def xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x·log y with 0·log 0 = 0."""
    return torch.where(x > 0, x * torch.log(torch.where(x > 0, y, torch.ones_like(y))), torch.zeros_like(x))


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (xlogy(p, p) - xlogy(p, q)).sum(-1)


def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-position divergence between teacher p and student q, probability vectors [P, S]."""
    if name == "forward_kl":
        return -xlogy(p, q).sum(-1)          # soft cross-entropy, as the original recipe
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, m) + (1 - BETA) * kl(q, m)
    if name == "skew_kl":
        return kl(p, ALPHA * p + (1 - ALPHA) * q)
    raise AssertionError(name)


def ref_loss(name: str, p: torch.Tensor, q: torch.Tensor, temperature: float) -> torch.Tensor:
    return ref_divergence(name, p, q).mean() * temperature**2


def student_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """q = softmax(z/T) over the first V logits, float64, flattened to [P, V]."""
    return torch.softmax(z[..., :V].double() / temperature, dim=-1).reshape(-1, V)


def ref_dense(name, z, teacher_lp, temperature):
    p = torch.softmax(teacher_lp.double() / temperature, dim=-1).reshape(-1, V)
    return ref_loss(name, p, student_probs(z, temperature), temperature)


def ref_topk_bucket(name, z, ids, topk_lp, temperature):
    """Coarse (k+1)-distributions: the k ids plus everything else, on both sides."""
    ids = ids.reshape(-1, K)
    lp = topk_lp.double().reshape(-1, K)
    rest = 1.0 - lp.exp().sum(-1, keepdim=True)
    assert (rest > 1e-3).all()  # the test data keeps the tail well away from the floor
    p = torch.softmax(torch.cat([lp, rest.log()], -1) / temperature, dim=-1)
    q_full = student_probs(z, temperature)
    mask = torch.zeros_like(q_full, dtype=torch.bool)
    mask.scatter_(1, ids, True)
    q_ids = q_full.gather(1, ids)
    q_rest = (q_full * ~mask).sum(-1, keepdim=True)
    q = torch.cat([q_ids, q_rest], -1)
    return ref_loss(name, p, q, temperature)


def ref_topk_renormalize(name, z, ids, topk_lp, temperature):
    """Teacher renormalized over its k ids (zero elsewhere), student over the whole vocabulary."""
    ids = ids.reshape(-1, K)
    p_ids = torch.softmax(topk_lp.double().reshape(-1, K) / temperature, dim=-1)
    q = student_probs(z, temperature)
    p = torch.zeros_like(q).scatter(1, ids, p_ids)
    return ref_loss(name, p, q, temperature)


def ref_sample(z, ids, counts, temperature):
    """−Σ (c_i/N) log q(i) over the drawn ids, padding skipped by hand."""
    q = student_probs(z, temperature)
    ids, counts = ids.reshape(q.size(0), -1), counts.reshape(q.size(0), -1)
    per_position = []
    for pos in range(q.size(0)):
        total = counts[pos].sum().double()
        terms = [-(counts[pos, j].double() / total) * torch.log(q[pos, ids[pos, j]])
                 for j in range(ids.size(1)) if ids[pos, j] >= 0]
        per_position.append(torch.stack(terms).sum())
    return torch.stack(per_position).mean() * temperature**2


# --- inputs -------------------------------------------------------------------------------------------

def student_logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, V_PAD, generator=g) * 2.0).requires_grad_(True)


def teacher_logprobs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(B, L, V, generator=g) * 1.5, dim=-1)


def topk_of(teacher_lp: torch.Tensor):
    values, ids = torch.topk(teacher_lp, K, dim=-1)
    return ids.to(torch.int32), values.to(torch.float16)   # as stored in a cache


def draw_sample(teacher_lp: torch.Tensor, draws: int, slots: int, temperature: float = 1.0, seed: int = 2):
    """ids/counts [B, L, slots] from `draws` draws of softmax(lp/T), padded with id -1 / count 0."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(teacher_lp.reshape(-1, V).double() / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=g)
    ids = torch.full((probs.size(0), slots), -1, dtype=torch.int32)
    counts = torch.zeros((probs.size(0), slots), dtype=torch.int32)
    for pos in range(probs.size(0)):
        unique, count = torch.unique(drawn[pos], return_counts=True)
        assert len(unique) < slots  # some padding in every row
        order = torch.randperm(len(unique), generator=g)  # slot order must not matter
        ids[pos, : len(unique)] = unique[order].to(torch.int32)
        counts[pos, : len(unique)] = count[order].to(torch.int32)
    return ids.reshape(B, L, slots), counts.reshape(B, L, slots)


def kd_loss(name: str, chunk: int, tail: str = "bucket", detached: bool = False) -> KDLoss:
    """The KD loss alone with this file's β and α, which the reference uses too; `detached` = KD weight 0."""
    return KDLoss(name, V, tail=tail, chunk=chunk, beta=BETA, alpha=ALPHA, kd_weight=0.0 if detached else 1.0,
                  hard_weight=0.0)


def grad_of(loss: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, z)
    return grad


def assert_value_and_grad(loss, ref, z, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-7):
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    grad, ref_grad = grad_of(loss, z), grad_of(ref, z)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=grad_rtol, atol=grad_atol)
    assert grad.shape == z.shape
    assert torch.all(grad[..., V:] == 0)  # padded logits beyond the vocabulary get no gradient
    assert grad.abs().sum() > 0


# --- dense --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_dense_matches_reference(name, temperature, chunk):
    z, t_lp = student_logits(), teacher_logprobs()
    loss = kd_loss(name, chunk)(z, TeacherTargets("full", t_lp), temperature)
    assert_value_and_grad(loss, ref_dense(name, z, t_lp, temperature), z)


def test_settings_come_from_the_train_config():
    """KDLoss has no defaults of its own: the run's loss takes each setting from TrainConfig."""
    with pytest.raises(TypeError):
        KDLoss("jsd", V)
    train = TrainConfig(loss="jsd", topk_tail="renormalize", loss_chunk=3, loss_beta=BETA, loss_alpha=ALPHA,
                        kd_weight=0.0, hard_weight=0.25)  # every value differs from the schema's default
    assert KDLoss.from_config(train, V) == KDLoss("jsd", V, tail="renormalize", chunk=3, beta=BETA, alpha=ALPHA,
                                                  kd_weight=0.0, hard_weight=0.25)


def test_dense_float16_cache_values():
    """A full cache stores float16 log-probs; the loss reads them as they are."""
    z, t_lp = student_logits(), teacher_logprobs().to(torch.float16)
    loss = kd_loss("forward_kl", 4)(z, TeacherTargets("full", t_lp), 2.0)
    assert_value_and_grad(loss, ref_dense("forward_kl", z, t_lp, 2.0), z)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_original_recipe_formula_equals_forward_kl(temperature):
    """−(softmax(t/T)·log_softmax(s/T)).sum(-1).mean()·T² on raw teacher logits (the original recipe)."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(B, L, V, generator=g) * 3.0 + 4.0   # raw logits, not normalized
    s = (torch.randn(B, L, V, generator=g) * 2.0).requires_grad_(True)
    original = -(F.softmax(t / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)).sum(-1).mean()
    original = original * temperature**2
    cached = torch.log_softmax(t.float(), dim=-1)
    loss = kd_loss("forward_kl", 3)(s, TeacherTargets("full", cached), temperature)
    torch.testing.assert_close(loss, original, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(loss, s), grad_of(original, s), rtol=1e-4, atol=1e-7)


def test_sequence_lengths_are_aligned():
    """A teacher shorter than the student's sequence: the first common positions are compared."""
    z, t_lp = student_logits(), teacher_logprobs()
    loss = kd_loss("forward_kl", 4)(z, TeacherTargets("full", t_lp[:, : L - 2]), 1.0)
    p = torch.softmax(t_lp[:, : L - 2].double(), dim=-1).reshape(-1, V)
    q = student_probs(z[:, : L - 2], 1.0)
    torch.testing.assert_close(loss.double(), ref_loss("forward_kl", p, q, 1.0).detach(), rtol=1e-5, atol=1e-6)


# --- top-k --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk", (3, 10))
def test_topk_bucket_matches_reference(name, temperature, chunk):
    z = student_logits()
    ids, values = topk_of(teacher_logprobs())
    loss = kd_loss(name, chunk, tail="bucket")(
        z, TeacherTargets("topk", values, ids), temperature)
    assert_value_and_grad(loss, ref_topk_bucket(name, z, ids.long(), values, temperature), z,
                          rtol=2e-5, grad_rtol=2e-4, grad_atol=1e-6)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "reverse_kl"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk", (3, 10))
def test_topk_renormalize_matches_reference(name, temperature, chunk):
    z = student_logits()
    ids, values = topk_of(teacher_logprobs())
    assert unsupported_reason(name, "topk", "renormalize") is None
    loss = kd_loss(name, chunk, tail="renormalize")(
        z, TeacherTargets("topk", values, ids), temperature)
    assert_value_and_grad(loss, ref_topk_renormalize(name, z, ids.long(), values, temperature), z,
                          rtol=2e-5, grad_rtol=2e-4, grad_atol=1e-6)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "reverse_kl"])
def test_topk_renormalize_with_every_id_is_the_dense_loss(name):
    """k = V: the renormalized teacher is the whole teacher, so the loss is the dense one."""
    z, t_lp = student_logits(), teacher_logprobs()
    values, ids = torch.topk(t_lp, V, dim=-1)
    loss = kd_loss(name, 4, tail="renormalize")(
        z, TeacherTargets("topk", values, ids), 2.0)
    torch.testing.assert_close(loss.double(), ref_dense(name, z, t_lp, 2.0).detach(), rtol=1e-5, atol=1e-6)


def test_topk_bucket_with_every_id_is_nearly_the_dense_loss():
    """k = V at T = 1: the bucket holds only the REST_FLOOR (1e-6) of teacher mass."""
    z, t_lp = student_logits(), teacher_logprobs()
    values, ids = torch.topk(t_lp, V, dim=-1)
    loss = kd_loss("forward_kl", 4, tail="bucket")(z, TeacherTargets("topk", values, ids), 1.0)
    torch.testing.assert_close(loss.double(), ref_dense("forward_kl", z, t_lp, 1.0).detach(), rtol=0, atol=1e-4)


def test_support_rules():
    for name in LOSSES:
        assert unsupported_reason(name, "full", "bucket") is None
        assert unsupported_reason(name, "topk", "bucket") is None
    assert "reverse_kl" in unsupported_reason("reverse_kl", "topk", "renormalize")
    assert unsupported_reason("forward_kl", "sample", "bucket") is None
    for name in ("reverse_kl", "jsd", "skew_kl"):
        assert unsupported_reason(name, "sample", "bucket") is not None


# --- sample -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk", (3, 10))
def test_sample_matches_reference(temperature, chunk):
    z = student_logits()
    ids, counts = draw_sample(teacher_logprobs(), draws=12, slots=16, temperature=temperature)
    loss = kd_loss("forward_kl", chunk)(z, TeacherTargets("sample", counts.to(torch.uint8), ids),
                                                temperature)
    assert_value_and_grad(loss, ref_sample(z, ids, counts, temperature), z)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_sample_loss_is_unbiased(temperature):
    """Many draws from softmax(lp/T): the sample loss approaches the dense forward_kl at T."""
    z, t_lp = student_logits(), teacher_logprobs()
    ids, counts = draw_sample(t_lp, draws=20000, slots=V + 3, temperature=temperature, seed=11)
    loss = kd_loss("forward_kl", 7)(z.detach(), TeacherTargets("sample", counts, ids), temperature)
    dense = ref_dense("forward_kl", z.detach(), t_lp, temperature)
    assert abs(loss.item() - dense.item()) < 0.01 * dense.item() + 0.01
    few_ids, few_counts = draw_sample(t_lp, draws=3, slots=5, temperature=temperature, seed=11)
    few = kd_loss("forward_kl", 7)(z.detach(), TeacherTargets("sample", few_counts, few_ids), temperature)
    assert abs(few.item() - dense.item()) > abs(loss.item() - dense.item())  # the error shrinks with draws


# --- hard labels and chunking -------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", (1, 3, 4, 100))
def test_hard_label_loss(chunk):
    z = student_logits(seed=9)
    g = torch.Generator().manual_seed(10)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    loss = hard_label_loss(z, input_ids, V, chunk)
    ref = F.cross_entropy(z[:, :-1, :V].reshape(-1, V), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grad, ref_grad = grad_of(loss, z), grad_of(ref, z)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert torch.all(grad[:, -1] == 0) and torch.all(grad[..., V:] == 0)


@pytest.mark.parametrize("kind", ["full", "topk", "sample"])
def test_small_chunks_equal_one_big_chunk(kind):
    t_lp = teacher_logprobs()
    if kind == "full":
        targets = TeacherTargets("full", t_lp)
    elif kind == "topk":
        ids, values = topk_of(t_lp)
        targets = TeacherTargets("topk", values, ids)
    else:
        ids, counts = draw_sample(t_lp, 12, 16)
        targets = TeacherTargets("sample", counts, ids)
    results = []
    for chunk in (1, 3, 4, B * L, 4096):
        z = student_logits()
        loss = kd_loss("forward_kl", chunk)(z, targets, 2.0)
        results.append((loss.detach(), grad_of(loss, z)))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-8)


def test_detached_loss_reports_the_value_without_a_graph():
    z, t_lp = student_logits(), teacher_logprobs()
    targets = TeacherTargets("full", t_lp)
    live = kd_loss("jsd", 3)(z, targets, 2.0)
    detached = kd_loss("jsd", 3, detached=True)(z, targets, 2.0)
    assert not detached.requires_grad
    torch.testing.assert_close(detached, live.detach())


def test_no_grad_path_equals_grad_path():
    z, t_lp = student_logits(), teacher_logprobs()
    targets = TeacherTargets("full", t_lp)
    with torch.no_grad():
        plain = kd_loss("skew_kl", 3)(z, targets, 1.0)
    torch.testing.assert_close(plain, kd_loss("skew_kl", 3)(z, targets, 1.0).detach())


# --- the fused step: KD and hard-label terms from one pass, one gradient buffer --------------------------
# What TextBrewer does with the KD loss and the student adaptor's hard-label term: total = kd·w_kd + hard·w_hard,
# against the same references, every loss/tail/temperature/chunk combination above, weights 0 on either side.

WEIGHTS = [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3), (0.0, 0.0)]
FUSED_CASES = ([("full", name, "bucket", chunk) for name in LOSSES for chunk in CHUNKS]
               + [("topk", name, "bucket", chunk) for name in LOSSES for chunk in (3, 10)]
               + [("topk", name, "renormalize", chunk) for name in LOSSES if name != "reverse_kl" for chunk in (3, 10)]
               + [("sample", "forward_kl", "bucket", chunk) for chunk in (3, 10)])


def token_ids(seed: int = 10) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def ref_hard(z: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float64 over the first V logits, mean over the B·(L−1) predicted tokens."""
    log_q = torch.log_softmax(z[:, :-1, :V].double(), dim=-1)
    return -log_q.gather(-1, input_ids[:, 1:, None]).mean()


def targets_and_reference(kind: str, name: str, tail: str, z: torch.Tensor, temperature: float):
    """The teacher targets of `kind` and the reference KD loss for the student logits z."""
    t_lp = teacher_logprobs()
    if kind == "full":
        return TeacherTargets("full", t_lp), ref_dense(name, z, t_lp, temperature)
    if kind == "topk":
        ids, values = topk_of(t_lp)
        ref = ref_topk_bucket if tail == "bucket" else ref_topk_renormalize
        return TeacherTargets("topk", values, ids), ref(name, z, ids.long(), values, temperature)
    ids, counts = draw_sample(t_lp, draws=12, slots=16, temperature=temperature)
    return TeacherTargets("sample", counts.to(torch.uint8), ids), ref_sample(z, ids, counts, temperature)


def fused_step(loss: KDLoss, z: torch.Tensor, input_ids: torch.Tensor, targets: TeacherTargets, temperature: float):
    """(kd, hard, total) as TextBrewer's compute_loss forms them from the KD loss and the student adaptor."""
    student = StudentLogits(z, input_ids, with_hard=True)
    kd = loss(student, targets, temperature)
    hard = loss.hard_label_loss(student)
    return kd, hard, kd * loss.kd_weight + hard * loss.hard_weight


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: f"kd{w[0]}-hard{w[1]}")
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind, name, tail, chunk", FUSED_CASES)
def test_fused_step_matches_references(kind, name, tail, chunk, temperature, weights):
    z, input_ids = student_logits(), token_ids()
    targets, ref_kd = targets_and_reference(kind, name, tail, z, temperature)
    loss = KDLoss(name, V, tail=tail, chunk=chunk, beta=BETA, alpha=ALPHA, kd_weight=weights[0], hard_weight=weights[1])
    kd, hard, total = fused_step(loss, z, input_ids, targets, temperature)
    ref_ce = ref_hard(z, input_ids)
    tol = {"rtol": 1e-5, "atol": 1e-6} if kind != "topk" else {"rtol": 2e-5, "atol": 1e-6}
    torch.testing.assert_close(kd.double(), ref_kd.detach(), **tol)
    torch.testing.assert_close(hard.double(), ref_ce.detach(), **tol)
    assert kd.requires_grad == (weights[0] != 0) and hard.requires_grad == (weights[1] != 0)
    if weights == (0.0, 0.0):
        assert not total.requires_grad  # nothing to learn: no gradient buffer at all
        return
    grad = grad_of(total * 0.125, z)  # as after division by the accumulation steps: the buffer is scaled once
    ref_grad = grad_of((weights[0] * ref_kd + weights[1] * ref_ce) * 0.125, z)
    grad_tol = {"rtol": 1e-4, "atol": 1e-7} if kind != "topk" else {"rtol": 2e-4, "atol": 1e-6}
    torch.testing.assert_close(grad.double(), ref_grad.double(), **grad_tol)
    assert torch.all(grad[..., V:] == 0)


def test_gradients_out_of_the_configured_proportion_fail_loudly():
    """The shared buffer was formed with the configured weights: backpropagating only one of two weighted
    terms (or with other weights) would silently train on the wrong mix, so it is refused."""
    z, input_ids = student_logits(), token_ids()
    targets = TeacherTargets("topk", *reversed(topk_of(teacher_logprobs())))
    loss = KDLoss("forward_kl", V, tail="bucket", chunk=4, beta=BETA, alpha=ALPHA, kd_weight=1.0, hard_weight=0.5)
    kd, hard, _ = fused_step(loss, z, input_ids, targets, 2.0)
    with pytest.raises(RuntimeError, match="proportion of the configured weights 1 : 0.5"):
        (kd + hard).backward()


def test_sequence_shorter_teacher_with_hard_labels():
    """A teacher shorter than the student: KD on the common positions, the hard-label term on all of them."""
    z, t_lp, input_ids = student_logits(), teacher_logprobs(), token_ids()
    loss = KDLoss("forward_kl", V, tail="bucket", chunk=4, beta=BETA, alpha=ALPHA, kd_weight=1.0, hard_weight=0.5)
    kd, hard, total = fused_step(loss, z, input_ids, TeacherTargets("full", t_lp[:, : L - 2]), 1.0)
    p = torch.softmax(t_lp[:, : L - 2].double(), dim=-1).reshape(-1, V)
    ref_kd = ref_loss("forward_kl", p, student_probs(z[:, : L - 2], 1.0), 1.0)
    ref_ce = ref_hard(z, input_ids)
    torch.testing.assert_close(total.double(), (ref_kd + 0.5 * ref_ce).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(total, z).double(), grad_of(ref_kd + 0.5 * ref_ce, z).double(), rtol=1e-4,
                               atol=1e-7)



@pytest.mark.parametrize("kind, name, tail", [("full", "forward_kl", "bucket"), ("full", "jsd", "bucket"),
                                              ("topk", "skew_kl", "bucket"), ("sample", "forward_kl", "bucket")])
def test_bfloat16_logits_are_computed_in_float32(kind, name, tail):
    """Autocast hands the loss bf16 logits: values and gradients are those of the same (rounded) logits in
    float64, to fp32 precision for the values and to the gradient buffer's bf16 precision for the gradients."""
    z16 = student_logits().detach().to(torch.bfloat16).requires_grad_(True)
    z64 = z16.detach().double().requires_grad_(True)
    input_ids = token_ids()
    targets, ref_kd = targets_and_reference(kind, name, tail, z64, 2.0)
    loss = KDLoss(name, V, tail=tail, chunk=3, beta=BETA, alpha=ALPHA, kd_weight=0.7, hard_weight=0.3)
    kd, hard, total = fused_step(loss, z16, input_ids, targets, 2.0)
    ref_ce = ref_hard(z64, input_ids)
    torch.testing.assert_close(kd.double(), ref_kd.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(hard.double(), ref_ce.detach(), rtol=2e-5, atol=1e-6)
    grad = grad_of(total, z16)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), grad_of(0.7 * ref_kd + 0.3 * ref_ce, z64), rtol=1e-2, atol=1e-4)


class ExpCounter(TorchDispatchMode):
    """Counts the elements of full-vocabulary tensors that go through an exponential (softmax, log-softmax,
    logsumexp, exp), in units of one pass over the [P, V] logits."""
    EXPONENTIAL = {"_softmax", "_log_softmax", "_log_softmax_backward_data", "logsumexp", "exp", "exp_"}

    def __init__(self, positions: int) -> None:
        super().__init__()
        self.positions, self.elements = positions, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0]
        if func.__name__.split(".")[0] in self.EXPONENTIAL and x.dim() == 2 and x.size(-1) >= V:
            self.elements += x.numel()
        return func(*args, **(kwargs or {}))

    @property
    def passes(self) -> float:
        return self.elements / (self.positions * V)


@pytest.mark.parametrize("kind", ["topk", "sample"])
@pytest.mark.parametrize("temperature, hard_weight, passes", [
    (2.0, 0.0, 1),  # KD alone: one softmax; the cross-entropy is not computed (its value would need another)
    (1.0, 0.0, 1),  # T = 1: the cross-entropy is logged from the same softmax, without a gradient
    (1.0, 0.5, 1),  # T = 1: both terms with gradients from one softmax
    (2.0, 0.5, 3),  # T ≠ 1, both: the KD softmax, the cross-entropy's logsumexp, its softmax in the gradient
])
def test_exponential_passes_over_the_logits(kind, temperature, hard_weight, passes):
    """Forward and backward of a sparse step, as the student adaptor asks for it: how many passes of
    exponentials over the full-vocabulary logits it takes (a plain cross-entropy step takes two)."""
    z, input_ids = student_logits(), token_ids()
    t_lp = teacher_logprobs()
    targets = TeacherTargets("topk", *reversed(topk_of(t_lp))) if kind == "topk" else \
        TeacherTargets("sample", *reversed(draw_sample(t_lp, 12, 16, temperature)))
    loss = KDLoss("forward_kl", V, tail="bucket", chunk=3, beta=BETA, alpha=ALPHA, kd_weight=1.0,
                  hard_weight=hard_weight)
    student = StudentLogits(z, input_ids, with_hard=hard_weight != 0 or temperature == 1)
    with ExpCounter(B * L) as counter:
        total = loss(student, targets, temperature)
        if student.with_hard:
            total = total + loss.hard_label_loss(student) * hard_weight
        total.backward()
    assert counter.passes == passes
    assert (student.hard is None) == (temperature != 1 and hard_weight == 0)
    with ExpCounter(B * L) as plain:
        F.cross_entropy(z[:, :-1, :V].reshape(-1, V), input_ids[:, 1:].reshape(-1)).backward()
    assert plain.passes == pytest.approx(2 * (L - 1) / L)  # its forward and backward, on the labelled rows


# --- through the training entry point: what a step logs ----------------------------------------------------

@pytest.fixture(scope="module")
def small_topk_cache(tiny, tmp_path_factory) -> Path:
    from stage1_teacher.dump import main as dump_main

    cache = tmp_path_factory.mktemp("losses") / "topk"
    dump_main(tiny_overrides(tiny, cache, **{"data.max_blocks": 4}))
    return cache


def first_step(tiny: Path, cache: Path, out: Path, **settings: object) -> dict:
    from stage2_student.train import main as train_main

    train_main(["--cache", str(cache), *tiny_overrides(tiny, cache, **{
        "data.max_blocks": 4, "train.max_steps": 1, "train.output_dir": out, "train.log_dir": out / "tb",
        **settings})])
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_a_term_of_weight_zero_is_logged_only_when_cheap(tiny, small_topk_cache, tmp_path):
    """T ≠ 1: the term of weight 0 is not computed (null). T = 1: it is, and its value is the one the same
    first step logs when that term has the weight (same student, same blocks)."""
    run = lambda name, **s: first_step(tiny, small_topk_cache, tmp_path / name, **s)  # noqa: E731
    kd_only = run("kd_only", **{"train.temperature": 2.0, "train.kd_weight": 1, "train.hard_weight": 0})
    ce_only = run("ce_only", **{"train.temperature": 2.0, "train.kd_weight": 0, "train.hard_weight": 1})
    assert kd_only["hard_loss"] is None and kd_only["kd_loss"] > 0
    assert ce_only["kd_loss"] is None and ce_only["hard_loss"] > 0
    kd_t1 = run("kd_t1", **{"train.temperature": 1.0, "train.kd_weight": 1, "train.hard_weight": 0})
    ce_t1 = run("ce_t1", **{"train.temperature": 1.0, "train.kd_weight": 0, "train.hard_weight": 1})
    assert kd_t1["hard_loss"] == pytest.approx(ce_t1["hard_loss"], rel=1e-6) == pytest.approx(ce_only["hard_loss"])
    assert ce_t1["kd_loss"] == pytest.approx(kd_t1["kd_loss"], rel=1e-6)
    assert kd_t1["loss"] == pytest.approx(kd_t1["kd_loss"]) and ce_t1["loss"] == pytest.approx(ce_t1["hard_loss"])


def test_both_weights_zero_is_refused(tiny, small_topk_cache, tmp_path):
    result = run_cli("stage2_student.train", "--cache", small_topk_cache, *tiny_overrides(tiny, small_topk_cache, **{
        "data.max_blocks": 4, "train.kd_weight": 0, "train.hard_weight": 0, "train.output_dir": tmp_path / "out"}))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.kd_weight and train.hard_weight are both 0: the loss would be " \
                                    "0 and train nothing"  # refused before the student loads: nothing else
