"""`python -m stage1_teacher.dump [--config pipeline.yaml] [key=value …]`

Runs the teacher once over the packed blocks and writes its next-token distributions (log-probs over
the truncated vocabulary) to a sharded HDF5 cache: top-k, full or sampled. The teacher never waits on
the disk: reductions happen on the device and a background thread writes behind a bounded queue.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import torch
from tqdm import tqdm

from cache.encoding import stored_datasets
from cache.format import FORMAT_NAME, FORMAT_VERSION
from cache.manifest import DataEntry, Manifest, SampleEntry, TeacherEntry, TokenizerEntry
from cache.writer import CacheLayout, CacheWriter, check_destination
from common.alignment import AlignmentLog, truncate_vocab, vocab_logprobs
from common.cli import UserError, run_main
from common.config import PipelineConfig, config_arg_parser, parse_args
from common.data import Blocks, load_blocks
from common.models import (
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    model_config_hash,
    resolve_device,
    resolve_dtype,
    tokenizer_hash,
)
from stage1_teacher.targets import full_targets, sample_targets, topk_targets


def check_cache_settings(cfg: PipelineConfig) -> None:
    cache = cfg.cache
    if cache.mode == "topk" and cache.k < 1:
        raise UserError(f"cache.k must be positive, got {cache.k}")
    if cache.mode == "sample" and cache.draws < 1:
        raise UserError(f"cache.draws must be positive, got {cache.draws}")
    if cache.mode == "sample" and cache.sample_temperature <= 0:
        raise UserError(f"cache.sample_temperature must be positive, got {cache.sample_temperature}")
    if cache.shard_blocks < 1 or cache.queue_size < 1 or cfg.teacher.batch_size < 1:
        raise UserError("cache.shard_blocks, cache.queue_size and teacher.batch_size must be positive")


class TeacherDump:
    """setup → run → finish, top-down."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        check_cache_settings(cfg)
        check_destination(cfg.cache.dir, cfg.cache.overwrite)  # refuse before any expensive work
        self.device = resolve_device(cfg.teacher.device)
        self.dtype = resolve_dtype(cfg.teacher.dtype, self.device)
        self.tokenizer = load_tokenizer(cfg.teacher.model, "teacher tokenizer")
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.model_config = load_model_config(cfg.teacher.model, "teacher")
        if self.model_config.vocab_size < self.vocab_size:
            raise UserError(f"teacher has {self.model_config.vocab_size} logits but its tokenizer "
                            f"{self.vocab_size} tokens")
        if cfg.cache.mode == "topk" and cfg.cache.k > self.vocab_size:
            raise UserError(f"cache.k={cfg.cache.k} exceeds the vocabulary size {self.vocab_size}")
        self.blocks: Blocks = load_blocks(cfg.data, self.tokenizer, self.tokenizer_hash)
        self.model = load_causal_lm(cfg.teacher.model, "teacher", self.device, self.dtype).eval()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.cache.seed)
        self.alignment = AlignmentLog()
        num_blocks, seq_len = self.blocks.input_ids.shape
        specs = stored_datasets(cfg.cache.mode, seq_len, self.vocab_size, cfg.cache.k, cfg.cache.draws,
                                cfg.cache.quantize)
        self.writer = CacheWriter(cfg.cache.dir, CacheLayout(cfg.cache.mode, num_blocks, seq_len, specs,
                                                             cfg.cache.shard_blocks),
                                  overwrite=cfg.cache.overwrite, queue_size=cfg.cache.queue_size)

    def targets(self, logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
        mode = self.cfg.cache.mode
        if mode == "topk":
            return topk_targets(logprobs, self.cfg.cache.k)
        if mode == "full":
            return full_targets(logprobs)
        return sample_targets(logprobs, self.cfg.cache.draws, self.cfg.cache.sample_temperature, self.generator)

    @torch.inference_mode()
    def run(self) -> None:
        blocks = self.blocks.input_ids
        batch = self.cfg.teacher.batch_size
        self.start = time.perf_counter()
        progress = tqdm(total=blocks.size, unit="tok", unit_scale=True, desc="teacher", dynamic_ncols=True)
        try:
            for first in range(0, len(blocks), batch):
                ids = blocks[first:first + batch]
                logits = self.model(input_ids=torch.from_numpy(ids).to(self.device, torch.long),
                                    use_cache=False).logits
                truncate_vocab(logits, self.vocab_size, "Teacher", self.alignment)  # announces the alignment
                logprobs = vocab_logprobs(logits, self.vocab_size)  # fp32 on the device
                arrays = {name: t.cpu().numpy() for name, t in self.targets(logprobs).items()}
                self.writer.put({"input_ids": ids, **arrays})
                progress.update(ids.size)
        except BaseException:
            self.writer.abort()
            raise
        finally:
            progress.close()

    def finish(self) -> Manifest:
        cfg = self.cfg
        manifest = self.writer.finish(self.manifest())
        seconds = time.perf_counter() - self.start
        size = manifest.bytes_on_disk
        print(f"[stage1] {manifest.num_blocks} blocks, {manifest.num_tokens} tokens, {len(manifest.shards)} shards, "
              f"{size / 2**20:.1f} MiB on disk, {size / manifest.num_tokens:.1f} B/token, {seconds:.1f} s "
              f"({manifest.num_tokens / seconds:.0f} tok/s; writer busy {self.writer.write_seconds:.1f} s) "
              f"→ {cfg.cache.dir}")
        return manifest

    def manifest(self) -> Manifest:
        """Everything but the shards, which the writer adds."""
        cfg = self.cfg
        num_blocks, seq_len = self.blocks.input_ids.shape
        sample = SampleEntry(draws=cfg.cache.draws, temperature=cfg.cache.sample_temperature, slots=cfg.cache.draws,
                             seed=cfg.cache.seed) if cfg.cache.mode == "sample" else None
        return Manifest(
            format=FORMAT_NAME, format_version=FORMAT_VERSION, mode=cfg.cache.mode, num_blocks=num_blocks,
            seq_len=seq_len, vocab_size=self.vocab_size, value_dtype="float16",
            values="log_softmax of the teacher's logits over the first vocab_size entries, in fp32",
            k=cfg.cache.k if cfg.cache.mode == "topk" else None,
            datasets=self.writer.layout.datasets,
            teacher=TeacherEntry(model=cfg.teacher.model, config_hash=model_config_hash(self.model_config),
                                 padded_vocab_size=self.model_config.vocab_size, dtype=str(self.dtype)),
            tokenizer=TokenizerEntry(name=cfg.teacher.model, hash=self.tokenizer_hash, size=self.vocab_size),
            dataset=DataEntry(name=cfg.data.dataset, subset=cfg.data.subset, split=cfg.data.split,
                              local_dir=os.path.abspath(cfg.data.local_dir) if cfg.data.local_dir else None,
                              max_blocks=cfg.data.max_blocks, stream_tokens=self.blocks.num_stream_tokens,
                              fingerprint=self.blocks.fingerprint),
            settings={"cache": {k: v for k, v in vars(cfg.cache).items() if k != "overwrite"},
                      "teacher_batch_size": cfg.teacher.batch_size, "device": str(self.device),
                      "torch": torch.__version__},
            sample=sample)


def main(argv: Sequence[str]) -> int:
    _, cfg = parse_args(config_arg_parser(__doc__.splitlines()[0]), argv)
    dump = TeacherDump(cfg)
    dump.setup()
    dump.run()
    dump.finish()
    return 0


if __name__ == "__main__":
    run_main(main)
