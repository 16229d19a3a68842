"""`python -m stage2_student.train --cache cache/wikitext [--config pipeline.yaml] [key=value …]`

Trains the student from a stage-one cache through a TextBrewer distiller. The teacher is never loaded:
its distributions come with each batch. The cache is only read, so one cache serves many runs.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from contextlib import nullcontext
from typing import Any, Sequence, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache.compat import Consumer, check_compatible
from cache.format import file_sha256
from cache.manifest import manifest_path
from cache.reader import CacheReader
from common.cli import UserError, run_main
from common.config import PipelineConfig, Precision, config_arg_parser, parse_args
from common.models import (
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tokenizer_hash,
)
from stage2_student.batches import CachedBlocks, collate_cached, collate_live
from stage2_student.distiller import build_distiller


def check_output_dir(path: str, overwrite: bool) -> None:
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"train.output_dir {path} is not empty; pass train.overwrite=true or choose another")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"train.output_dir exists and is not a directory: {path}")


def check_train_settings(cfg: PipelineConfig) -> None:
    t = cfg.train
    positive = {"batch_size": t.batch_size, "gradient_accumulation": t.gradient_accumulation,
                "epochs": t.epochs, "loss_chunk": t.loss_chunk}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"train.{key} must be positive, got {value}")
    if t.num_workers < 0:
        raise UserError(f"train.num_workers must be 0 or more, got {t.num_workers}")
    if t.max_steps is not None and t.max_steps < 1:
        raise UserError(f"train.max_steps must be positive or null, got {t.max_steps}")
    if t.temperature <= 0 or t.lr <= 0:
        raise UserError("train.temperature and train.lr must be positive")
    if t.kd_weight == 0 and t.hard_weight == 0:
        raise UserError("train.kd_weight and train.hard_weight are both 0: the student would not learn")


# train.precision → autocast's compute dtype; None = no autocast (the names are checked when the config loads)
AUTOCAST_DTYPES: dict[Precision, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
assert set(AUTOCAST_DTYPES) | {"auto"} == set(get_args(Precision)), "AUTOCAST_DTYPES must name every Precision but auto"


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Native autocast (no apex): `auto` = bf16 where the device has it, else none."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AUTOCAST_DTYPES[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DistillRecipe:
    """setup → train → save, top-down. `teacher` is only for the live reference route."""

    def __init__(self, cfg: PipelineConfig, cache_dir: str, live_teacher: bool = False) -> None:
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.live_teacher = live_teacher

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_train_settings(cfg)
        self.reader = CacheReader(self.cache_dir)
        self.tokenizer = load_tokenizer(cfg.student.model, "student tokenizer")
        student_config = load_model_config(cfg.student.model, "student")
        consumer = Consumer(name=f"the student {cfg.student.model}", tokenizer_hash=tokenizer_hash(self.tokenizer),
                            vocab_size=student_config.vocab_size, seq_len=cfg.data.seq_len, dataset=cfg.data.dataset,
                            subset=cfg.data.subset, split=cfg.data.split, loss=cfg.train.loss,
                            topk_tail=cfg.train.topk_tail, temperature=cfg.train.temperature)
        check_compatible(self.reader.manifest, self.cache_dir, consumer, self.reader.read_all("input_ids"))
        check_output_dir(cfg.train.output_dir, cfg.train.overwrite)
        self.vocab_size = self.reader.vocab_size
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        seed_everything(cfg.train.seed)
        self.student = self.load_student()
        teacher = None
        if self.live_teacher:
            teacher = load_causal_lm(cfg.teacher.model, "teacher", self.device,
                                     resolve_dtype(cfg.teacher.dtype, self.device)).eval()
        self.loader = DataLoader(CachedBlocks(self.reader, tokens_only=self.live_teacher),
                                 batch_size=cfg.train.batch_size, shuffle=True,
                                 collate_fn=collate_live if self.live_teacher else collate_cached,
                                 generator=torch.Generator().manual_seed(cfg.train.seed),
                                 num_workers=cfg.train.num_workers, pin_memory=self.device.type == "cuda")
        self.distiller = build_distiller(cfg.train, self.student, self.vocab_size, self.device, teacher)
        self.total_steps = self.planned_steps()
        self.build_optimizer()

    def load_student(self) -> torch.nn.Module:
        cfg = self.cfg
        dtype = resolve_dtype(cfg.student.dtype, self.device)
        student = load_causal_lm(cfg.student.model, "student", self.device, dtype)
        if cfg.train.gradient_checkpointing:  # renamed in transformers 5; the old name still works in 4.x
            enable = getattr(student, "activation_checkpointing_enable", None)
            (enable or student.gradient_checkpointing_enable)()
        student.config.use_cache = False
        return student

    def build_optimizer(self) -> None:
        from transformers import get_linear_schedule_with_warmup

        train = self.cfg.train
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        warmup = math.ceil(train.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def planned_steps(self) -> int:
        """train.max_steps if set (as in HF Trainer it overrides epochs), else whole epochs."""
        if self.cfg.train.max_steps:
            return self.cfg.train.max_steps
        return math.ceil(len(self.loader) / self.cfg.train.gradient_accumulation) * self.cfg.train.epochs

    def print_training_info(self) -> None:
        t = self.cfg.train
        effective = t.batch_size * t.gradient_accumulation
        print("===== Training info =====")
        print(f"Total batches: {len(self.loader)}")
        print(f"Batch size: {t.batch_size}")
        print(f"Gradient accumulation: {t.gradient_accumulation}")
        print(f"Effective batch size: {effective}")
        print(f"Total samples: {len(self.reader)}")
        print(f"Estimated steps: {self.total_steps}")
        print(f"Loss: {t.loss} (T={t.temperature}, KD weight {t.kd_weight}, hard-label weight {t.hard_weight}) "
              f"from a {self.reader.mode} cache; autocast {self.amp_dtype or 'off (fp32)'} on {self.device}")
        print("=========================", flush=True)

    # -- train ---------------------------------------------------------------------------------------
    def micro_batches(self):
        """(epoch, the micro-batches of one optimizer step) until the planned steps are done. The last
        group of an epoch may be short; optimizer_step scales its loss by its own size."""
        accum, step = self.cfg.train.gradient_accumulation, 0
        for epoch in itertools.count():
            iterator = iter(self.loader)
            for start in range(0, len(self.loader), accum):
                yield epoch, [next(iterator) for _ in range(min(accum, len(self.loader) - start))]
                step += 1
                if step >= self.total_steps:
                    return

    def train(self) -> None:
        os.makedirs(self.cfg.train.output_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(log_dir=self.cfg.train.log_dir)
        self.metrics_path = os.path.join(self.cfg.train.output_dir, "metrics.jsonl")
        self.print_training_info()
        self.student.train()
        self.step, self.tokens = 0, 0
        self.last: dict[str, Any] = {}
        self.start = time.perf_counter()
        progress = tqdm(total=self.total_steps, desc="distil", unit="step", dynamic_ncols=True)
        with open(self.metrics_path, "w") as metrics:
            for epoch, group in self.micro_batches():
                record = self.optimizer_step(epoch, group)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update(1)
        progress.close()
        self.tb.close()

    def optimizer_step(self, epoch: int, group: list[dict]) -> dict[str, Any]:
        sums: dict[str, float | None] = {"loss": 0.0, "kd_loss": None, "hard_loss": None}  # None: not computed
        tokens = 0
        for batch in group:
            autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
            with autocast:
                total, parts = self.distiller.train_on_batch(batch, {})
            self.scaler.scale(total / len(group)).backward()
            sums["loss"] += total.item() / len(group)
            for key, part in (("kd_loss", "unweighted_kd_loss"), ("hard_loss", "unweighted_hard_label_loss")):
                if part in parts:  # a term of weight 0 is left out unless it is cheap (stage2_student/distiller.py)
                    sums[key] = (sums[key] or 0.0) + parts[part].item() / len(group)
            tokens += batch["student"]["input_ids"].numel()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        record = {"step": self.step, "epoch": epoch, **sums, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": self.tokens, "tokens_per_s": self.tokens / elapsed, "elapsed_s": elapsed}
        for name in ("loss", "kd_loss", "hard_loss", "lr", "grad_norm"):
            if record[name] is not None:
                self.tb.add_scalar(f"train/{name}", record[name], self.step)
        self.last = record
        return record

    # -- save ----------------------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        out = self.cfg.train.output_dir
        self.student.config.use_cache = True
        self.student.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        record = {"config": self.cfg.to_dict(), "cache_dir": os.path.abspath(self.cache_dir),
                  "cache_manifest_sha256": file_sha256(manifest_path(self.cache_dir)),
                  "cache_mode": self.reader.mode, "live_teacher": self.live_teacher,
                  "steps": self.step, "tokens": self.tokens,
                  "seconds": time.perf_counter() - self.start,
                  "seconds_per_step": (time.perf_counter() - self.start) / max(self.step, 1),
                  "final": self.last}
        with open(os.path.join(out, "run.json"), "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"[stage2] {self.step} steps, {self.tokens} tokens, {record['seconds']:.1f} s, final loss "
              f"{self.last.get('loss', float('nan')):.4f} → {out}")
        return record


def main(argv: Sequence[str]) -> int:
    parser = config_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache directory (default: cache.dir from the config)")
    parser.add_argument("--live-teacher", action="store_true",
                        help="reference route: run the teacher live instead of reading its distributions "
                             "(the cache still supplies the blocks)")
    args, cfg = parse_args(parser, argv)
    recipe = DistillRecipe(cfg, args.cache or cfg.cache.dir, live_teacher=args.live_teacher)
    recipe.setup()
    recipe.train()
    recipe.save()
    return 0


if __name__ == "__main__":
    run_main(main)
