"""The TextBrewer side: the KD loss registered in TextBrewer's registry, the adaptors, the distiller.

The teacher adaptor reads the distributions carried in the batch (`teacher_cache`), so no teacher
model exists in stage two; with `live_teacher` it instead turns a real teacher's logits into the same
targets (the original recipe's route, kept as a reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.presets import register_new

from common.alignment import AlignmentLog, truncate_vocab, vocab_logprobs
from common.config import TrainConfig
from common.losses import KDLoss, TeacherTargets, hard_label_loss
from stage2_student.batches import cached_targets

KD_LOSS_PREFIX = "cached_"


@dataclass
class TeacherAdaptor:
    vocab_size: int
    alignment: AlignmentLog

    def __call__(self, batch: dict, results) -> dict:
        if isinstance(results, dict) and "logits" not in results:  # teacher_cache from the batch
            return {"logits": cached_targets(results)}
        truncate_vocab(results.logits, self.vocab_size, "Teacher", self.alignment)  # announces the alignment
        return {"logits": TeacherTargets("full", vocab_logprobs(results.logits, self.vocab_size))}


@dataclass
class StudentAdaptor:
    vocab_size: int
    hard_weight: float
    chunk: int
    alignment: AlignmentLog

    def __call__(self, batch: dict, outputs) -> dict:
        truncate_vocab(outputs.logits, self.vocab_size, "Student", self.alignment)  # announce; losses cut each chunk
        logits = outputs.logits  # untruncated: a sliced view would cost a full-size zero gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hard_weight != 0):
            hard = hard_label_loss(logits, batch["input_ids"], self.vocab_size, self.chunk)
        return {"logits": logits, "losses": hard}


def register_kd_loss(train: TrainConfig, vocab_size: int, alignment: AlignmentLog) -> str:
    """Register this run's KD loss in TextBrewer's KD_LOSS_MAP; returns its registry name."""
    name = KD_LOSS_PREFIX + train.loss
    register_new("kd_loss", name, KDLoss.from_config(train, vocab_size, alignment))
    return name


def build_distiller(train: TrainConfig, student: torch.nn.Module, vocab_size: int, device: torch.device,
                    teacher: torch.nn.Module | None = None) -> GeneralDistiller:
    """A GeneralDistiller over the cache (teacher None) or a live teacher; one alignment log per run."""
    alignment = AlignmentLog()
    train_config = TrainingConfig(device=device, output_dir=train.output_dir, log_dir=None,
                                  gradient_accumulation_steps=train.gradient_accumulation, ckpt_steps=1)
    distill_config = DistillationConfig(temperature=train.temperature,
                                        kd_loss_type=register_kd_loss(train, vocab_size, alignment),
                                        kd_loss_weight=train.kd_weight, hard_label_weight=train.hard_weight)
    return GeneralDistiller(train_config, distill_config, model_T=teacher, model_S=student,
                            adaptor_T=TeacherAdaptor(vocab_size, alignment),
                            adaptor_S=StudentAdaptor(vocab_size, train.hard_weight, train.loss_chunk, alignment))
