"""The TextBrewer side: the KD loss registered in TextBrewer's registry, the adaptors, the distiller.

The teacher adaptor reads the distributions carried in the batch (`teacher_cache`), so no teacher
model exists in stage two; with `live_teacher` it instead turns a real teacher's logits into the same
targets (the original recipe's route, kept as a reference).

TextBrewer's `compute_loss` forms `kd_loss(l_S, l_T, T) · kd_weight + Σ results_S["losses"] · hard_weight`
and calls the KD loss first. The student adaptor hands it `StudentLogits` (the logits with their tokens),
so the KD loss computes the hard-label term in the same pass over the logits, with one gradient buffer for
both; the adaptor's `losses` entry returns that term (or computes it alone when there is no KD term).

A term whose weight is 0 is computed only when it is cheap, and otherwise left out of TextBrewer's
results, so it is logged as null: the hard-label term at T = 1 (a gather next to the KD loss's softmax),
the KD term at T = 1 from a top-k or sample cache (small tensors next to the cross-entropy's softmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.presets import register_new

from common.alignment import AlignmentLog, truncate_vocab, vocab_logprobs
from common.config import CacheMode, TrainConfig
from stage2_student.batches import cached_targets
from stage2_student.losses import KDLoss, StudentLogits, TeacherTargets

KD_LOSS_PREFIX = "cached_"


def kd_is_computed(train: TrainConfig, kind: CacheMode) -> bool:
    """The KD term has a gradient, or costs only small tensors: at T = 1 with sparse targets, where the
    cross-entropy (whose weight is then not 0) has already computed the student's logsumexp."""
    return train.kd_weight != 0 or (train.temperature == 1 and kind != "full")


def hard_is_computed(train: TrainConfig) -> bool:
    """The hard-label term has a gradient, or costs a gather: at T = 1, where the KD loss's softmax is it."""
    return train.hard_weight != 0 or train.temperature == 1


@dataclass
class TeacherAdaptor:
    vocab_size: int
    train: TrainConfig
    alignment: AlignmentLog

    def __call__(self, batch: dict, results) -> dict:
        if isinstance(results, dict) and "logits" not in results:  # teacher_cache from the batch
            targets = cached_targets(results)
        else:
            truncate_vocab(results.logits, self.vocab_size, "Teacher", self.alignment)  # announces the alignment
            targets = TeacherTargets("full", vocab_logprobs(results.logits, self.vocab_size))
        return {"logits": targets} if kd_is_computed(self.train, targets.kind) else {}  # no logits: no KD term


@dataclass
class HardLabelTerm:
    """The student adaptor's `losses` entry: TextBrewer reads it after the KD loss, through `.mean()`."""
    student: StudentLogits
    loss: KDLoss

    def mean(self) -> torch.Tensor:
        return self.loss.hard_label_loss(self.student)


@dataclass
class StudentAdaptor:
    loss: KDLoss
    train: TrainConfig
    alignment: AlignmentLog
    # [B, L] the next batch's per-position loss weights (conversations: stage2_student/masking.py), set by the
    # training loop before each micro-batch (TextBrewer hands adaptors the model's inputs only); None: means
    weights: torch.Tensor | None = None

    def __call__(self, batch: dict, outputs) -> dict:
        truncate_vocab(outputs.logits, self.loss.vocab_size, "Student", self.alignment)  # announce; losses cut rows
        with_hard = hard_is_computed(self.train)
        # untruncated logits: a sliced view would cost a full-size zero gradient
        student = StudentLogits(outputs.logits, batch["input_ids"], with_hard, weights=self.weights)
        return {"logits": student, "losses": HardLabelTerm(student, self.loss)} if with_hard else {"logits": student}


def build_distiller(train: TrainConfig, student: torch.nn.Module, vocab_size: int, device: torch.device,
                    teacher: torch.nn.Module | None = None) -> GeneralDistiller:
    """A GeneralDistiller over the cache (teacher None) or a live teacher; one alignment log per run."""
    alignment = AlignmentLog()
    loss = KDLoss.from_config(train, vocab_size, alignment)
    loss_name = KD_LOSS_PREFIX + train.loss
    register_new("kd_loss", loss_name, loss)  # TextBrewer looks its KD loss up by name
    train_config = TrainingConfig(device=device, output_dir=train.output_dir, log_dir=None,
                                  gradient_accumulation_steps=train.gradient_accumulation, ckpt_steps=1)
    distill_config = DistillationConfig(temperature=train.temperature, kd_loss_type=loss_name,
                                        kd_loss_weight=train.kd_weight, hard_label_weight=train.hard_weight)
    return GeneralDistiller(train_config, distill_config, model_T=teacher, model_S=student,
                            adaptor_T=TeacherAdaptor(vocab_size, train, alignment),
                            adaptor_S=StudentAdaptor(loss, train, alignment))
