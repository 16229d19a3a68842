"""`python -m stage2_student.train --cache DIR [key=value …]` (also under torchrun / accelerate launch)

Trains the student from a stage-one cache through a TextBrewer distiller. The teacher is never loaded: its
distributions come with each batch. The cache is only read, under a shared lock, so one cache serves many
runs. For data parallelism start it with `torchrun --nproc_per_node N -m stage2_student.train …` or
`accelerate launch --num_processes N -m stage2_student.train …`. Every train.checkpoint_steps optimizer
steps a checkpoint is written; rerunning the same command after a crash resumes from the newest one and
ends with the weights an uninterrupted run would have.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C or SIGTERM meanwhile ends in one line too
    from common.cli import stop_quietly_while_loading

    stop_quietly_while_loading()

import datetime
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache.compat import Consumer, check_compatible
from cache.format import file_sha256
from cache.lock import CacheLock
from cache.manifest import check_published, load_manifest, manifest_path
from cache.reader import CacheReader, verify_cache
from common.chat import chat_template, check_same_rendering
from common.cli import UserError, error_line, run_main
from common.config import PipelineConfig, Precision, TrainConfig, config_arg_parser, parse_args, result_keys
from common.data import source_settings
from common.fsutil import write_json_atomic
from common.models import (
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    model_config_hash,
    resolve_device,
    resolve_dtype,
    tokenizer_hash,
)
from stage2_student.batches import (
    CachedBlocks,
    UnreadableBlock,
    batches_per_epoch,
    collate_cached,
    collate_live,
    epoch_loader,
)
from stage2_student.checkpoint import (
    CHECKPOINTS,
    METRICS,
    MODEL_STAGING,
    RUN_FORMAT,
    RUN_RECORD,
    Checkpoint,
    DirectoryLock,
    check_checkpoint_files,
    clear_run,
    last_checkpoint_note,
    plan_start,
    prune_checkpoints,
    publish_model,
    read_run_record,
    remove_partial,
    seal_checkpoint,
    write_failure,
)
from stage2_student.distiller import build_distiller
from stage2_student.masking import global_trained_positions, loss_weights

T = TypeVar("T")

def check_train_settings(cfg: PipelineConfig) -> None:
    """The output directories, refused before anything is loaded if they cannot be written. (Every key's range
    and the rules between keys were checked when the config loaded: common/config.py.)"""
    check_writable_dir("train.output_dir", cfg.train.output_dir)
    check_writable_dir("train.log_dir", cfg.train.log_dir)


def check_writable_dir(key: str, path: str) -> None:
    """A directory that exists or can be made, and written to (checked without creating it)."""
    if not path.strip():
        raise UserError(f"{key} is empty: name the directory to write")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} {path} exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{key} {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path} is not writable ({existing} refuses writes)")


# train.precision → accelerate's mixed_precision (the names are checked when the config loads)
MIXED_PRECISION: dict[Precision, str] = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def mixed_precision(precision: Precision, device: torch.device) -> str:
    """accelerate's autocast mode: `auto` = bf16 where the GPU has it, else none (fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a GPU (its grad scaler); use bf16 or fp32 on the CPU")
    return MIXED_PRECISION[precision]


def make_accelerator(train: TrainConfig):
    """The engine: one process, or the N that torchrun / accelerate launch started (read from their environment)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(train.device)
    if device.type == "cuda" and device.index is not None:
        if processes > 1:
            raise UserError(f"train.device={train.device} names one GPU; with several processes leave it auto "
                            f"(each process takes its own GPU)")
        torch.cuda.set_device(device)
    if train.fsdp and (device.type != "cuda" or processes < 2):
        raise UserError("train.fsdp=true shards the student across several processes on GPUs (accelerate's FSDP "
                        "does not run on the CPU backend); launch N > 1 GPU processes, or use DDP (the default)")
    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)  # one state per run (several runs in one process)
    fsdp = (FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                           state_dict_type="SHARDED_STATE_DICT") if train.fsdp else None)
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=train.collective_timeout_s))
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision(train.precision, device),
                       fsdp_plugin=fsdp, kwargs_handlers=[timeout])


def on_main(accelerator, action: Callable[[], T]) -> T:
    """Run `action` on the main process only and give every process its result; a refusal there (UserError)
    is raised on every process, so that all of them stop."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except UserError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise UserError(error)
    return result


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DistillRecipe:
    """setup → train → save, top-down; a context manager that releases the locks. `live_teacher` is the
    reference route that runs the teacher instead of reading its distributions."""

    def __init__(self, cfg: PipelineConfig, cache_dir: str, live_teacher: bool = False) -> None:
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.live_teacher = live_teacher
        self.out = cfg.train.output_dir
        self.metrics_path = os.path.join(self.out, METRICS)
        self.cache_lock: CacheLock | None = None
        self.out_lock: DirectoryLock | None = None
        self.reader: CacheReader | None = None
        self.tb = None
        self.metrics = None
        self.step, self.tokens = 0, 0  # optimizer steps done, tokens trained on (all processes)
        self.seconds_before = 0.0  # training time of the run before it was resumed
        self.start = time.perf_counter()
        self.position = (0, 0)  # (epoch, micro-batch within it) of the next micro-batch
        self.last: dict[str, Any] = {}  # the last step's metrics

    def __enter__(self) -> "DistillRecipe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in (self.metrics, self.tb):
            if handle is not None:
                handle.close()
        self.metrics = self.tb = None
        if self.reader is not None:
            self.reader.close()
        for lock in (self.out_lock, self.cache_lock):
            if lock is not None:
                lock.release()
        self.out_lock = self.cache_lock = None

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_train_settings(cfg)
        self.accelerator = acc = make_accelerator(cfg.train)
        self.device = acc.device
        self.main = acc.is_main_process
        check_published(self.cache_dir)
        load_manifest(self.cache_dir)  # a directory that is not a complete cache gets no lock file
        self.cache_lock = CacheLock(self.cache_dir, exclusive=False).acquire()  # held until close()
        self.reader = CacheReader(self.cache_dir)  # the manifest read again, under the lock
        self.manifest_sha = file_sha256(manifest_path(self.cache_dir))
        if cfg.train.verify_cache:
            on_main(acc, self.check_shards)
        self.tokenizer = load_tokenizer(cfg.student.model, "student tokenizer")
        student_config = load_model_config(cfg.student.model, "student")
        consumer = Consumer(name=f"the student {cfg.student.model}", tokenizer_hash=tokenizer_hash(self.tokenizer),
                            vocab_size=student_config.vocab_size, seq_len=cfg.data.seq_len, dataset=cfg.data.dataset,
                            subset=cfg.data.subset, split=cfg.data.split, loss=cfg.train.loss,
                            topk_tail=cfg.train.topk_tail, temperature=cfg.train.temperature,
                            source=source_settings(cfg.data))
        try:
            input_ids = self.reader.read_all("input_ids")
        except OSError as err:  # h5py: a shard truncated or replaced (train.verify_cache=false lets it through)
            raise UserError(f"cache {self.cache_dir}: cannot read its tokens: {error_line(err)}; "
                            f"`python -m cache.verify {self.cache_dir}` checks every shard") from None
        check_compatible(self.reader.manifest, self.cache_dir, consumer, input_ids)
        if self.reader.chat:  # the student must render conversations as the teacher did
            name = f"the student {cfg.student.model}"
            check_same_rendering(self.tokenizer, chat_template(self.tokenizer, name),
                                 self.reader.manifest.dataset.chat_template, name)
        self.vocab_size = self.reader.vocab_size
        self.batches_per_epoch = batches_per_epoch(len(self.reader), acc.num_processes, cfg.train.batch_size)
        self.total_steps = self.planned_steps()
        self.settings = self.result_settings(model_config_hash(student_config))
        self.checkpoint: Checkpoint | None = on_main(acc, self.prepare_output_dir)

        seed_everything(cfg.train.seed)
        student = self.load_student()
        teacher = None
        if self.live_teacher:
            teacher = load_causal_lm(cfg.teacher.model, "teacher", self.device,
                                     resolve_dtype(cfg.teacher.dtype, self.device)).eval()
        self.dataset = CachedBlocks(self.reader, tokens_only=self.live_teacher)
        self.collate = collate_live if self.live_teacher else collate_cached
        self.build_optimizer(student)
        self.distiller = build_distiller(cfg.train, self.student, self.vocab_size, self.device, teacher)
        if self.checkpoint is not None:
            self.resume(self.checkpoint)

    def check_shards(self) -> None:
        """Every shard's sha256, shape and dtype against the manifest (what `python -m cache.verify` checks)."""
        start = time.perf_counter()
        problems = verify_cache(self.cache_dir)
        seconds = time.perf_counter() - start
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"cache {self.cache_dir} is damaged: {problems[0]}{more}; `python -m cache.verify "
                            f"{self.cache_dir}` lists every problem, stage one can rebuild it")
        megabytes = self.reader.manifest.bytes_on_disk / 1e6
        print(f"[stage2] verified {len(self.reader.shards)} shards ({megabytes:.1f} MB) against the manifest in "
              f"{seconds:.2f} s ({megabytes / max(seconds, 1e-9):.0f} MB/s); train.verify_cache=false skips this",
              flush=True)

    def result_settings(self, student_config_hash: str) -> dict[str, Any]:
        """What determines the weights this run ends with: a checkpoint resumes only under the same values."""
        cfg, acc = self.cfg, self.accelerator
        return {"cache manifest sha256": self.manifest_sha, "student config sha256": student_config_hash,
                "mixed precision": acc.mixed_precision, "processes": acc.num_processes,
                "--live-teacher": self.live_teacher,
                **{f"student.{key}": getattr(cfg.student, key) for key in result_keys("student")},
                **{f"train.{key}": getattr(cfg.train, key) for key in result_keys("train")}}

    def prepare_output_dir(self) -> Checkpoint | None:
        """(Main process.) Lock the output directory; pick the checkpoint to resume, or clear an earlier run of
        ours and record this one as started (unfinished)."""
        os.makedirs(self.out, exist_ok=True)
        self.out_lock = DirectoryLock(self.out)
        checkpoint = plan_start(self.out, self.settings, self.cfg.train.resume, self.cfg.train.overwrite)
        remove_partial(self.out)
        if checkpoint is None:
            clear_run(self.out)
        if checkpoint is None or read_run_record(self.out) is None:
            write_json_atomic(os.path.join(self.out, RUN_RECORD), self.run_record(finished=False))
        return checkpoint

    def load_student(self) -> torch.nn.Module:
        cfg = self.cfg
        dtype = resolve_dtype(cfg.student.dtype, self.device)
        student = load_causal_lm(cfg.student.model, "student", self.device, dtype)
        if cfg.train.gradient_checkpointing:  # renamed in transformers 5; the old name still works in 4.x
            enable = getattr(student, "activation_checkpointing_enable", None)
            (enable or student.gradient_checkpointing_enable)()
        student.config.use_cache = False
        return student

    def build_optimizer(self, student: torch.nn.Module) -> None:
        """AdamW and the student through accelerate (DDP/FSDP wrapping, mixed precision, grad scaler); the LR
        schedule is stepped here once per optimizer step (accelerate would step a prepared one once per
        process) and registered so that checkpoints hold it."""
        from transformers import get_linear_schedule_with_warmup

        train = self.cfg.train
        optimizer = torch.optim.AdamW(student.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        warmup = math.ceil(train.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer.optimizer, warmup, self.total_steps)
        self.accelerator.register_for_checkpointing(self.scheduler)

    def planned_steps(self) -> int:
        """train.max_steps if set (as in HF Trainer it overrides epochs), else whole epochs."""
        if self.cfg.train.max_steps:
            return self.cfg.train.max_steps
        return math.ceil(self.batches_per_epoch / self.cfg.train.gradient_accumulation) * self.cfg.train.epochs

    def resume(self, checkpoint: Checkpoint) -> None:
        """Weights, optimizer, scaler, scheduler and every process's RNG from accelerate's state; the step, the
        data position and the metrics so far from ours."""
        check_checkpoint_files(checkpoint)
        self.accelerator.load_state(checkpoint.path)
        state = checkpoint.state
        self.step, self.tokens, self.seconds_before = state["step"], state["tokens"], state["seconds"]
        self.position, self.last = (state["epoch"], state["micro_batch"]), state["last"]
        if self.main:
            shutil.copyfile(os.path.join(checkpoint.path, METRICS), f"{self.metrics_path}.tmp")
            os.replace(f"{self.metrics_path}.tmp", self.metrics_path)  # one line per step, up to the checkpoint
            print(f"[stage2] resuming from {checkpoint.path}: step {self.step} of {self.total_steps}, epoch "
                  f"{self.position[0]}, micro-batch {self.position[1]} of {self.batches_per_epoch}", flush=True)

    def run_record(self, finished: bool) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        seconds = self.seconds_before + time.perf_counter() - self.start
        return {"format": RUN_FORMAT, "finished": finished, "settings": self.settings, "config": cfg.to_dict(),
                "cache_dir": os.path.abspath(self.cache_dir), "cache_manifest_sha256": self.manifest_sha,
                "cache_mode": self.reader.mode, "live_teacher": self.live_teacher, "processes": acc.num_processes,
                "global_batch_blocks": self.global_batch(), "steps": self.step, "tokens": self.tokens,
                "seconds": seconds, "seconds_per_step": seconds / max(self.step, 1), "final": self.last}

    def global_batch(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.gradient_accumulation * self.accelerator.num_processes

    def print_training_info(self) -> None:
        t, acc = self.cfg.train, self.accelerator
        parallel = ("one process" if acc.num_processes == 1 else
                    f"{acc.num_processes} processes, {'FSDP' if t.fsdp else 'DDP'} over "
                    f"{torch.distributed.get_backend()}")
        print("===== Training info =====")
        print(f"Processes: {parallel}")
        print(f"Micro-batches per epoch (each process): {self.batches_per_epoch}")
        print(f"Batch size (each process): {t.batch_size}")
        print(f"Gradient accumulation: {t.gradient_accumulation}")
        print(f"Global batch: {t.batch_size} × {t.gradient_accumulation} × {acc.num_processes} processes = "
              f"{self.global_batch()} blocks ({self.global_batch() * self.reader.seq_len} tokens) per optimizer step")
        print(f"Total samples: {len(self.reader)}")
        print(f"Estimated steps: {self.total_steps}")
        print(f"Loss: {t.loss} (T={t.temperature}, KD weight {t.kd_weight}, hard-label weight {t.hard_weight}) "
              f"from a {self.reader.mode} cache; mixed precision {acc.mixed_precision} on {self.device}")
        every = f"every {t.checkpoint_steps} steps and " if t.checkpoint_steps else ""
        print(f"Checkpoints: {every}at the end, in {os.path.join(self.out, CHECKPOINTS)} (last "
              f"{t.keep_checkpoints} kept)")
        print("=========================", flush=True)

    # -- train ---------------------------------------------------------------------------------------
    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """This process's micro-batches of `epoch`, from micro-batch `skip_batches` on."""
        t, acc = self.cfg.train, self.accelerator
        return epoch_loader(self.dataset, self.collate, epoch=epoch, skip_batches=skip_batches, seed=t.seed,
                            processes=acc.num_processes, rank=acc.process_index, batch_size=t.batch_size,
                            num_workers=t.num_workers, pin_memory=self.device.type == "cuda")

    def micro_batches(self) -> Iterator[tuple[int, int, list]]:
        """(epoch, position after the group, the micro-batches of one optimizer step) from the current position
        until the planned steps are done. The last group of an epoch may be short; optimizer_step scales its
        loss by its own size."""
        accum = self.cfg.train.gradient_accumulation
        epoch, position = self.position
        while self.step < self.total_steps:
            self.check_cache_unchanged(epoch)
            batches = iter(self.loader(epoch, position))
            for start in range(position, self.batches_per_epoch, accum):
                group = [next(batches) for _ in range(min(accum, self.batches_per_epoch - start))]
                yield epoch, start + len(group), group
                if self.step >= self.total_steps:
                    return
            epoch, position = epoch + 1, 0

    def check_cache_unchanged(self, epoch: int) -> None:
        """At each epoch start: the manifest is still the one this run verified (a cache replaced under its
        readers, e.g. from another machine that the lock does not reach, stops the run)."""
        try:
            now = file_sha256(manifest_path(self.cache_dir))
        except OSError:
            now = None
        if now != self.manifest_sha:
            raise UserError(f"cache {self.cache_dir} changed during the run (its manifest is not the one this run "
                            f"started from): stopped before epoch {epoch}, after step {self.step}; "
                            f"{last_checkpoint_note(self.out)}")

    def train(self) -> None:
        self.start = time.perf_counter()
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run's steps after its checkpoint were logged once already: TensorBoard drops them
            self.tb = SummaryWriter(log_dir=self.cfg.train.log_dir, purge_step=self.step + 1 if self.step else None)
            self.metrics = open(self.metrics_path, "a" if self.step else "w")
            self.print_training_info()
        self.student.train()
        with tqdm(total=self.total_steps, initial=self.step, desc="distil", unit="step", dynamic_ncols=True,
                  disable=not self.main) as progress:  # closed on an error too, so that its line ends before ours
            for epoch, position, group in self.micro_batches():
                record = self.optimizer_step(epoch, group)
                self.end_step(record, epoch, position)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update(1)
        self.accelerator.wait_for_everyone()

    def optimizer_step(self, epoch: int, group: list) -> dict[str, Any]:
        acc = self.accelerator
        sums: dict[str, float | None] = {"loss": 0.0, "kd_loss": None, "hard_loss": None}  # None: not computed
        tokens = 0
        chat = self.reader.chat
        trained = global_trained_positions(acc, group, self.device) if chat else None
        for i, batch in enumerate(group):
            if isinstance(batch, UnreadableBlock):
                raise batch.error()
            if chat:  # the loss on trained positions only, their mean over the global batch (stage2_student/masking.py)
                self.distiller.adaptor_S.weights = loss_weights(batch["loss_mask"].to(self.device), len(group),
                                                                acc.num_processes, trained)
            # gradients are all-reduced once per optimizer step, on its last micro-batch
            with nullcontext() if i == len(group) - 1 else acc.no_sync(self.student):
                try:
                    total, parts = self.distiller.train_on_batch(batch, {})
                    acc.backward(total / len(group))
                except torch.OutOfMemoryError:
                    raise UserError(f"out of memory at step {self.step + 1} on {self.device}: lower "
                                    f"train.batch_size (raise train.gradient_accumulation to keep the global "
                                    f"batch) or train.loss_chunk, or set train.gradient_checkpointing=true; "
                                    f"{last_checkpoint_note(self.out)}") from None
            sums["loss"] += total.item() / len(group)
            for key, part in (("kd_loss", "unweighted_kd_loss"), ("hard_loss", "unweighted_hard_label_loss")):
                if part in parts:  # a term of weight 0 is left out unless it is cheap (stage2_student/distiller.py)
                    sums[key] = (sums[key] or 0.0) + parts[part].item() / len(group)
            tokens += batch["student"]["input_ids"].numel()
        if acc.num_processes > 1:  # metrics are the mean over the processes; tokens their sum
            computed = [key for key, value in sums.items() if value is not None]  # the same on every process
            mean = acc.reduce(torch.tensor([sums[key] for key in computed], dtype=torch.float64,
                                           device=self.device), "mean")
            sums.update(zip(computed, mean.tolist()))
            tokens = int(acc.reduce(torch.tensor(tokens, device=self.device), "sum").item())
        if not all(math.isfinite(value) for value in sums.values() if value is not None):
            raise UserError(f"the loss became {sums['loss']} at step {self.step + 1} (kd_loss {sums['kd_loss']}, "
                            f"hard_loss {sums['hard_loss']}); training stopped without applying it: "
                            f"{last_checkpoint_note(self.out)}; lower train.lr or check the cache")
        norm = acc.clip_grad_norm_(self.student.parameters(), self.cfg.train.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        if not math.isfinite(grad_norm) and acc.scaler is None:  # fp16's scaler skips such steps by design
            raise UserError(f"the gradient norm became {grad_norm} at step {self.step + 1}; training stopped "
                            f"without applying it: {last_checkpoint_note(self.out)}; lower train.lr")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        elapsed = self.seconds_before + time.perf_counter() - self.start
        chat_metrics = {} if trained is None else {"trained_positions": trained}  # the positions the loss is over
        return {"step": self.step, "epoch": epoch, **sums, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.tokens, "tokens_per_s": self.tokens / elapsed, "elapsed_s": elapsed, **chat_metrics}

    def end_step(self, record: dict[str, Any], epoch: int, position: int) -> None:
        """Log the step (main process), and checkpoint it when due (every process takes part)."""
        self.last = record
        if self.main:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            for name in ("loss", "kd_loss", "hard_loss", "lr", "grad_norm"):
                if record[name] is not None:  # a term of weight 0 left out is logged as null, not plotted
                    self.tb.add_scalar(f"train/{name}", record[name], self.step)
        every = self.cfg.train.checkpoint_steps
        if self.step == self.total_steps or (every and self.step % every == 0):
            if position == self.batches_per_epoch:
                epoch, position = epoch + 1, 0
            self.save_checkpoint(epoch, position)

    def save_checkpoint(self, epoch: int, position: int) -> None:
        """accelerate's save_state into checkpoints/step-N.tmp from every process, then (main) our trainer
        state and the metrics so far, and the rename that makes it complete; older ones beyond
        train.keep_checkpoints go once it is."""
        acc = self.accelerator
        final = os.path.join(self.out, CHECKPOINTS, f"step-{self.step}")
        tmp = f"{final}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self.metrics.flush()
        acc.wait_for_everyone()
        try:
            with quiet_logger("accelerate.utils.other"):  # "Removed shared tensor …": tied weights, re-tied on load
                acc.save_state(tmp, safe_serialization=True)
        except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a full disk as RuntimeError
            failure = write_failure("checkpoint", tmp, err, self.out)  # (it may probe the disk in tmp: first)
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failure from None
        acc.wait_for_everyone()
        if self.main:
            state = {"step": self.step, "epoch": epoch, "micro_batch": position, "tokens": self.tokens,
                     "seconds": self.seconds_before + time.perf_counter() - self.start, "last": self.last,
                     "settings": self.settings}
            try:
                seal_checkpoint(tmp, final, state, self.metrics_path)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                raise write_failure("checkpoint", tmp, err, self.out) from None
            prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()

    # -- save ----------------------------------------------------------------------------------------
    def save(self) -> dict[str, Any] | None:
        """The final model, saved to model.tmp and moved into train.output_dir; run.json says finished last.
        Returns the run record (on the main process)."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.student)  # under FSDP every process takes part in gathering it
        record = None
        if self.main:
            staging = os.path.join(self.out, MODEL_STAGING)
            shutil.rmtree(staging, ignore_errors=True)
            student = acc.unwrap_model(self.student)
            student.config.use_cache = True  # saved for generation
            record = self.run_record(finished=True)
            try:
                student.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(staging)
                publish_model(self.out, staging, record)
            except (OSError, SafetensorError) as err:
                shutil.rmtree(staging, ignore_errors=True)
                raise write_failure("the final model to", self.out, err, self.out) from None
            print(f"[stage2] {self.step} steps, {self.tokens} tokens, {record['seconds']:.1f} s, final loss "
                  f"{self.last.get('loss', float('nan')):.4f} → {self.out}")
        acc.wait_for_everyone()
        return record


def main(argv: Sequence[str]) -> int:
    parser = config_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache directory (default: cache.dir from the config)")
    parser.add_argument("--live-teacher", action="store_true",
                        help="reference route: run the teacher live instead of reading its distributions "
                             "(the cache still supplies the blocks)")
    args, cfg = parse_args(parser, argv)
    with DistillRecipe(cfg, args.cache or cfg.cache.dir, live_teacher=args.live_teacher) as recipe:
        recipe.setup()
        recipe.train()
        recipe.save()
        recipe.accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_main(main)
