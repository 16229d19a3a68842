"""`python -m stage1_teacher.dump [--config pipeline.yaml] [key=value …]`

Runs the teacher once over the blocks of the data and writes its next-token distributions (log-probs over the
truncated vocabulary) to a sharded HDF5 cache: top-k, full or sampled. N processes, one teacher each:
`torchrun --nproc_per_node N -m stage1_teacher.dump …` or `accelerate launch --num_processes N -m …`.

The data is streamed: each shard's blocks (tokens only) are gathered as the data is read, then the teacher
runs over them in batches of `teacher.batch_size` that never straddle a shard; targets are reduced on the
device and a background thread writes. Process r of N computes shards r, r+N, …; every process reads the
data, so the number of blocks, and the fingerprint, are known to all at the end. Contents depend on the
settings and the data, not on N: draws come from a generator keyed by the block. A rerun after a crash keeps
the complete shards of `<cache.dir>.partial` when the settings that determine the contents are the ones it
was started with, and re-reads the data first to check that the kept shards hold its tokens.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C or SIGTERM meanwhile ends in one line too
    from common.cli import stop_quietly_while_loading

    stop_quietly_while_loading()

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cache.chat import blank_untrained, chat_stored_datasets
from cache.encoding import stored_datasets
from cache.format import FORMAT_NAME, FORMAT_VERSION, STAGING_SUFFIX
from cache.manifest import DataEntry, Manifest, SampleEntry, TeacherEntry, TokenizerEntry
from cache.writer import (
    Resume,
    ShardRecord,
    ShardSpec,
    ShardWriter,
    StagingDir,
    check_destination,
)
from common.alignment import AlignmentLog, truncate_vocab
from common.chat import block_stream, template_sha256
from common.cli import UserError, run_main
from common.config import PipelineConfig, config_arg_parser, draw_temperature, parse_args, result_keys
from common.data import BlockStream, row_kind, source_settings, tokens_sha256
from common.models import (
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    model_config_hash,
    resolve_device,
    resolve_dtype,
    tokenizer_hash,
)
from stage1_teacher.processes import Failure, LostContact, Processes, Stopped
from stage1_teacher.targets import block_uniforms, full_targets, sample_targets, topk_tail_targets, topk_targets

# cache.* keys that only one mode uses
MODE_CACHE_KEYS = {"k": "topk", "tail_draws": "topk", "draws": "sample", "sample_temperature": "sample",
                   "seed": "sample", "max_dp": "topk", "max_kl": "topk"}
BUDGET_KEYS = {"max_dp", "max_kl"}  # cache.quantize=true only
DRAW_KEYS = {"sample_temperature", "seed"}  # also a top-k cache's, when it has tail draws
CONFIG_ERROR_TIMEOUT_S = 60.0  # N processes that all refuse their config wait this long for each other
CHAT_DATA_KEYS = {"messages_column", "train_on"}  # data.* keys that only data.rows=chat reads


def check_settings(cfg: PipelineConfig) -> None:
    """Refuse, before anything is read or loaded, settings that cannot make a cache."""
    cache = cfg.cache
    if not cache.dir.strip():
        raise UserError("cache.dir is empty")
    if os.path.normpath(cache.dir).endswith(STAGING_SUFFIX):
        raise UserError(f"cache.dir {cache.dir} ends with {STAGING_SUFFIX}, the name of stage one's staging "
                        "directories; choose another name")
    # (Every key's range was checked when the config loaded: common/config.py.)


def teacher_device(cfg: PipelineConfig, procs: Processes) -> torch.device:
    """One process: teacher.device. N processes: each its own GPU (LOCAL_RANK), or all on the CPU."""
    device = resolve_device(cfg.teacher.device)
    if procs.world == 1:
        return device
    if cfg.teacher.device_map is not None:
        raise UserError("teacher.device_map=auto spreads one teacher over every visible GPU and cannot be combined "
                        f"with {procs.world} processes (each runs its own teacher): run one process")
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"with {procs.world} processes each uses the GPU of its LOCAL_RANK: set teacher.device to "
                        f"auto or cuda, not {cfg.teacher.device}")
    if procs.local_rank >= torch.cuda.device_count():
        raise UserError(f"process {procs.rank} has LOCAL_RANK {procs.local_rank} but only "
                        f"{torch.cuda.device_count()} GPUs are visible")
    torch.cuda.set_device(procs.local_rank)
    return torch.device("cuda", procs.local_rank)


def _stack(blocks: list) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(blocks[0], dict):  # conversations: tokens, mask and positions (common.chat)
        return {name: np.stack([block[name] for block in blocks]) for name in blocks[0]}
    return np.stack(blocks)


def tokens_of(blocks: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    return blocks["input_ids"] if isinstance(blocks, dict) else blocks


def shards_of(stream: Iterable[np.ndarray], shard_blocks: int) -> Iterator[tuple[ShardSpec, np.ndarray]]:
    """Consecutive shards of the stream's blocks, each with its tokens [n, seq_len] (conversations: a dict of
    tokens, mask and positions); the last may be short. Only tokens are held: one shard's worth."""
    pending: list[np.ndarray] = []
    index = first = 0
    for block in stream:
        pending.append(block)
        if len(pending) == shard_blocks:
            yield ShardSpec(index, first, len(pending)), _stack(pending)
            index, first, pending = index + 1, first + len(pending), []
    if pending:
        yield ShardSpec(index, first, len(pending)), _stack(pending)


@dataclass(frozen=True)
class StreamStats:
    """What reading the whole data tells: known only at its end."""
    num_blocks: int
    stream_tokens: int
    fingerprint: str
    num_shards: int
    read_files: list  # the files read, in order (common.data.DataFile; none for the hub)
    trained: Optional[int] = None  # data.rows=chat: the positions trained (the others hold placeholders)


class TeacherDump:
    """setup → run → finish, top-down; `execute` runs them and always releases what it holds."""

    def __init__(self, cfg: PipelineConfig, procs: Processes, model: Optional[torch.nn.Module] = None) -> None:
        """`model`: the teacher of teacher.model already loaded, on the device (benchmarks compare the dump and
        the bare forward with one model); None: loaded when there is something to compute."""
        self.cfg, self.procs = cfg, procs
        self.writer: Optional[ShardWriter] = None
        self.staging: Optional[StagingDir] = None
        self.model = model
        self.stats: Optional[StreamStats] = None  # set by a pass over the data that needed no teacher
        self.kept: dict[int, ShardRecord] = {}  # complete shards of this process kept from an earlier run
        self.complete: Optional[Manifest] = None  # the staging directory already held this complete cache
        self.computed_blocks = 0

    def execute(self) -> Manifest:
        try:
            self.setup()
            self.run()
            return self.finish()
        finally:
            if self.writer is not None:
                self.writer.abort()
            if self.staging is not None:
                self.staging.close()

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, procs = self.cfg, self.procs
        check_settings(cfg)
        self.device = teacher_device(cfg, procs)
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
        if cfg.cache.mode == "topk" and cfg.cache.tail_draws and cfg.cache.k >= self.vocab_size:
            raise UserError(f"cache.k={cfg.cache.k} covers the whole vocabulary ({self.vocab_size}): there is no "
                            "tail to draw from; set cache.tail_draws=0")
        self.chat = row_kind(cfg.data) == "chat"
        stream = self.new_stream()  # reads no row yet: checks the data files (and a chat template) before the teacher
        self.template = stream.template if self.chat else None
        self.datasets = stored_datasets(cfg.cache.mode, cfg.data.seq_len, self.vocab_size, cfg.cache.k,
                                        cfg.cache.draws, cfg.cache.quantize,
                                        cfg.cache.tail_draws if cfg.cache.mode == "topk" else 0,
                                        cfg.cache.max_dp, cfg.cache.max_kl)
        if self.chat:
            self.datasets.update(chat_stored_datasets(cfg.data.seq_len))
        self.staging = StagingDir(cfg.cache.dir)
        resume = Resume()
        if procs.main:  # one process prepares the staging directory, the others wait
            check_destination(cfg.cache.dir, cfg.cache.overwrite)
            resume = self.staging.open(self.contents(), cfg.cache.overwrite)
        resume = procs.sync({"resume": resume})[0]["resume"]
        if resume.records:
            self.resume(resume)
        if self.model is None and (self.stats is None or self.has_work()):
            self.model = load_causal_lm(cfg.teacher.model, "teacher", self.device, self.dtype,
                                        cfg.teacher.device_map).eval()
        if self.model is not None:
            self.input_device = self.model.get_input_embeddings().weight.device

    def contents(self) -> dict[str, Any]:
        """The settings that determine what the cache holds, by the names users set them by: a staging
        directory is resumed only when they are equal (the data's tokens are checked shard by shard too)."""
        cfg = self.cfg

        def local(path: Optional[str]) -> Optional[str]:
            return os.path.abspath(path) if path and os.path.exists(path) else path

        data = {f"data.{key}": local(getattr(cfg.data, key)) if key == "local_dir" else getattr(cfg.data, key)
                for key in result_keys("data")
                if self.chat or key not in CHAT_DATA_KEYS}  # other rows: as before conversations existed
        if self.chat:
            data["tokenizer.chat_template_sha256"] = template_sha256(self.template)
        tail = cfg.cache.mode == "topk" and cfg.cache.tail_draws > 0
        cache = {f"cache.{key}": getattr(cfg.cache, key) for key in result_keys("cache")
                 if (MODE_CACHE_KEYS.get(key, cfg.cache.mode) == cfg.cache.mode or (tail and key in DRAW_KEYS))
                 and not (key == "tail_draws" and not tail)  # a top-k cache without tail draws: as before them
                 and not (key in BUDGET_KEYS and not cfg.cache.quantize)}
        if "cache.sample_temperature" in cache:  # the temperature drawn at, whichever key set it
            cache["cache.sample_temperature"] = draw_temperature(cfg.cache, cfg.train)
        return {"format_version": FORMAT_VERSION,  # the settings first: a difference names the one a user set
                "teacher.model": local(cfg.teacher.model), "teacher.config_hash": model_config_hash(self.model_config),
                "teacher.dtype": str(self.dtype), "teacher.batch_size": cfg.teacher.batch_size,
                "tokenizer.hash": self.tokenizer_hash, **data, **cache,
                "datasets": {name: dataclasses.asdict(entry) for name, entry in self.datasets.items()}}

    def resume(self, resume: Resume) -> None:
        """Keep what an earlier run completed: each process re-checks the sha256 of the shards it owns, then
        every process re-reads the data (tokens only) to check that the kept shards hold its tokens and to
        count the shards. A complete cache is kept whole or not at all; a changed data set is refused, or
        with cache.overwrite=true the staging directory starts afresh."""
        procs, staging = self.procs, self.staging
        problem = None
        for index, record in sorted(resume.records.items()):
            if index % procs.world != procs.rank:
                continue
            if staging.keep(record):
                self.kept[index] = record
            elif resume.manifest is not None:
                problem = problem or f"the complete cache in {staging.path} is damaged: {record.file} does not " \
                                     "match its sha256"
            else:
                tqdm.write(f"[stage1] {record.file} does not match its sha256; it is computed again")
        stats, changed = self.read_data(compute=False)
        problem = problem or changed or self.check_kept(stats, resume)
        statuses = procs.sync({"kept": sorted(self.kept), "problem": problem})
        problems = [s["problem"] for s in statuses if s["problem"]]
        if problems and not self.cfg.cache.overwrite:
            raise UserError(f"{problems[0]}; rerun with cache.overwrite=true to start afresh")
        if problems:
            if procs.main:
                tqdm.write(f"[stage1] starting afresh: {problems[0]}")
                staging.restart()
            procs.sync()
            self.kept = {}
            return
        kept = sum(len(s["kept"]) for s in statuses)
        if procs.main:
            tqdm.write(f"[stage1] resuming: {kept} of {stats.num_shards} shards complete in {staging.path}")
        self.stats = stats
        self.complete = resume.manifest

    def check_kept(self, stats: StreamStats, resume: Resume) -> Optional[str]:
        """Why the kept shards do not fit the data as read now (None: they do)."""
        where = f"the data changed since {self.staging.path} was started"
        if resume.manifest is not None:
            if (stats.fingerprint, stats.num_blocks) != (resume.manifest.dataset.fingerprint,
                                                         resume.manifest.num_blocks):
                return f"{where}: its tokens differ from the fingerprint of the complete cache there"
            return None
        beyond = [r.file for i, r in self.kept.items() if i >= stats.num_shards]
        return f"{where}: it now makes {stats.num_shards} shards, and {beyond[0]} was complete" if beyond else None

    def has_work(self) -> bool:
        """Whether this process has shards to compute (known once the data was read)."""
        return any(i % self.procs.world == self.procs.rank and i not in self.kept for i in range(self.stats.num_shards))

    def new_stream(self) -> BlockStream:
        return block_stream(self.cfg.data, self.tokenizer, self.tokenizer_hash)

    # -- run -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self) -> None:
        cfg = self.cfg
        self.start = time.perf_counter()
        if self.stats is not None and not any(self.procs.sync({"work": self.has_work()})[i]["work"]
                                              for i in range(self.procs.world)):
            return  # every shard was complete: the data was already read
        self.stats = None
        self.alignment = AlignmentLog()
        self.writer = ShardWriter(self.staging.path, cfg.cache.mode, self.datasets, cfg.cache.queue_size)
        self.progress = tqdm(unit="tok", unit_scale=True, desc="teacher", dynamic_ncols=True,
                             disable=not self.procs.main)
        try:
            self.stats, _ = self.read_data(compute=True)
            self.writer.close()
        finally:
            self.progress.close()

    def read_data(self, compute: bool) -> tuple[StreamStats, Optional[str]]:
        """One pass over the data: check the tokens of this process's kept shards (the first that differ is
        returned as a reason; while computing it is raised), and with `compute` run the teacher over its other
        shards, syncing with the other processes after each round of N shards."""
        procs = self.procs
        stream = self.new_stream()
        count, changed = 0, None
        for spec, blocks in shards_of(stream, self.cfg.cache.shard_blocks):
            count += 1
            if spec.index % procs.world == procs.rank:
                record = self.kept.get(spec.index)
                if record is None:
                    if compute:
                        self.compute(spec, blocks)
                elif changed is None and record.tokens_sha256 is not None and (
                        (record.first_block, record.num_blocks) != (spec.first_block, spec.num_blocks)
                        or record.tokens_sha256 != tokens_sha256(tokens_of(blocks)).hexdigest()):
                    changed = f"the data changed since {self.staging.path} was started: {record.file} holds other " \
                              "tokens than it gives now"
                    if compute:
                        raise UserError(changed)
            if compute and (spec.index + 1) % procs.world == 0:
                procs.sync()
        return StreamStats(stream.num_blocks, stream.stream_tokens, stream.fingerprint, count,
                           stream.source.files, stream.trained if self.chat else None), changed

    def compute(self, spec: ShardSpec, blocks: np.ndarray | dict[str, np.ndarray]) -> None:
        """The teacher over one shard, in batches that stay inside it; the writer takes each batch. Conversations
        (a dict of tokens, mask and positions) are run with their position ids, so that each attends only to
        itself, and their untrained positions get the placeholder (cache/chat.py)."""
        batch = self.cfg.teacher.batch_size
        chat = blocks if isinstance(blocks, dict) else None
        blocks = tokens_of(blocks)
        for start in range(0, len(blocks), batch):
            ids = blocks[start:start + batch]
            extra = {} if chat is None else {name: values[start:start + batch] for name, values in chat.items()
                                             if name != "input_ids"}
            positions = {} if chat is None else {
                "position_ids": torch.from_numpy(extra["position_ids"]).to(self.input_device, torch.long)}
            try:
                logits = self.model(input_ids=torch.from_numpy(ids).to(self.input_device, torch.long),
                                    use_cache=False, **positions).logits
                if self.procs.main:
                    truncate_vocab(logits, self.vocab_size, "Teacher", self.alignment)  # announces the alignment
                arrays = {name: t.cpu().numpy() for name, t in self.targets(logits, spec.first_block + start).items()}
            except (torch.OutOfMemoryError, MemoryError):
                raise UserError(f"the teacher ran out of memory on {self.device} with teacher.batch_size={batch} "
                                f"blocks of data.seq_len={self.cfg.data.seq_len} tokens: lower teacher.batch_size "
                                "(or use teacher.device_map=auto)") from None
            if chat is not None:
                blank_untrained(arrays, extra["loss_mask"])
            self.writer.put(spec, {"input_ids": ids, **arrays, **extra})
            self.computed_blocks += len(ids)
            self.progress.update(ids.size)

    def targets(self, logits: torch.Tensor, first_block: int) -> dict[str, torch.Tensor]:
        cache = self.cfg.cache
        if cache.mode == "topk" and cache.tail_draws:
            uniforms = block_uniforms(cache.seed, first_block, logits.size(0), logits.size(1), cache.tail_draws)
            return topk_tail_targets(logits, self.vocab_size, cache.k, draw_temperature(cache, self.cfg.train),
                                     uniforms)
        if cache.mode == "topk":
            return topk_targets(logits, self.vocab_size, cache.k)
        if cache.mode == "full":
            return full_targets(logits, self.vocab_size)
        uniforms = block_uniforms(cache.seed, first_block, logits.size(0), logits.size(1), cache.draws)
        return sample_targets(logits, self.vocab_size, draw_temperature(cache, self.cfg.train), uniforms)

    # -- finish --------------------------------------------------------------------------------------------
    def finish(self) -> Manifest:
        """Agree on what was read and written, then one process writes the manifest and publishes."""
        cfg, procs = self.cfg, self.procs
        busy = self.writer.write_seconds if self.writer is not None else 0.0
        statuses = procs.sync({"stats": self.stats, "computed": self.computed_blocks, "busy": busy})
        if any(s["stats"] != self.stats for s in statuses):
            raise UserError(f"the {procs.world} processes read different data (was it changed during the run?)")
        manifest = self.complete
        if procs.main:
            if manifest is None:
                records = self.staging.records(self.stats.num_shards)
                manifest = self.staging.finish(self.manifest(records))
            self.staging.publish(cfg.cache.overwrite)
        manifest = procs.sync({"manifest": manifest})[0]["manifest"]
        self.seconds = time.perf_counter() - self.start
        self.writer_busy = max(s["busy"] for s in statuses)
        if procs.main:
            self.summary(manifest, sum(s["computed"] for s in statuses))
        return manifest

    def manifest(self, records: list[ShardRecord]) -> Manifest:
        cfg, stats = self.cfg, self.stats
        temperature = draw_temperature(cfg.cache, cfg.train)
        sample = SampleEntry(draws=cfg.cache.draws, temperature=temperature, slots=cfg.cache.draws,
                             seed=cfg.cache.seed) if cfg.cache.mode == "sample" else None
        tail = SampleEntry(draws=cfg.cache.tail_draws, temperature=temperature,
                           slots=cfg.cache.tail_draws, seed=cfg.cache.seed) \
            if cfg.cache.mode == "topk" and cfg.cache.tail_draws else None
        at = f" at temperature {tail.temperature} (the tail draws')" if tail and tail.temperature != 1.0 else ""
        return Manifest(
            format=FORMAT_NAME, format_version=FORMAT_VERSION, mode=cfg.cache.mode, num_blocks=stats.num_blocks,
            seq_len=cfg.data.seq_len, vocab_size=self.vocab_size, value_dtype="float16",
            values=f"log_softmax of the teacher's logits over the first vocab_size entries{at}, in fp32",
            k=cfg.cache.k if cfg.cache.mode == "topk" else None, datasets=self.datasets,
            teacher=TeacherEntry(model=cfg.teacher.model, config_hash=model_config_hash(self.model_config),
                                 padded_vocab_size=self.model_config.vocab_size, dtype=str(self.dtype)),
            tokenizer=TokenizerEntry(name=cfg.teacher.model, hash=self.tokenizer_hash, size=self.vocab_size),
            dataset=DataEntry(name=cfg.data.dataset, subset=cfg.data.subset, split=cfg.data.split,
                              local_dir=os.path.abspath(cfg.data.local_dir) if cfg.data.local_dir else None,
                              max_blocks=cfg.data.max_blocks, stream_tokens=stats.stream_tokens,
                              fingerprint=stats.fingerprint, **source_settings(cfg.data),
                              read_files=stats.read_files, **self.chat_entry()),
            settings={"processes": self.procs.world, "device": str(self.device), "torch": torch.__version__},
            sample=sample, shards=[r.entry() for r in records], tail=tail)

    def chat_entry(self) -> dict[str, Any]:
        """The manifest's record of how conversations were rendered (none for other rows)."""
        if not self.chat:
            return {}
        return {"chat_template": self.template, "chat_template_sha256": template_sha256(self.template)}

    def summary(self, manifest: Manifest, computed_blocks: int) -> None:
        seconds, writer_busy = self.seconds, self.writer_busy
        size, tokens = manifest.bytes_on_disk, manifest.num_tokens
        computed = computed_blocks * manifest.seq_len
        resumed = manifest.num_blocks - computed_blocks
        shards = f"{len(manifest.shards)} shards" + (f" ({resumed} blocks resumed)" if resumed else "")
        procs = f" on {self.procs.world} processes" if self.procs.world > 1 else ""
        if self.device.type == "cuda":  # what a larger teacher.batch_size has room for
            procs += f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        print(f"[stage1] {manifest.num_blocks} blocks, {tokens} tokens, {shards}, {size / 2**20:.1f} MiB on disk, "
              f"{size / tokens:.1f} B/token, {seconds:.1f} s ({computed / seconds:.0f} tok/s{procs}; writer busy "
              f"{writer_busy:.1f} s) → {self.cfg.cache.dir}", flush=True)
        if self.stats is not None and self.stats.trained is not None:
            print(f"[stage1] conversations: {self.stats.trained} of {tokens} positions trained "
                  f"({100 * self.stats.trained / tokens:.1f} %, data.train_on={self.cfg.data.train_on}); the teacher's "
                  "data is stored for those only", flush=True)


def main(argv: Sequence[str]) -> int:
    procs = Processes()
    if procs.world == 1:
        _, cfg = parse_args(config_arg_parser(__doc__.splitlines()[0]), argv)
        TeacherDump(cfg, procs).execute()
        return 0
    return main_of_many(argv, procs)


def main_of_many(argv: Sequence[str], procs: Processes) -> int:
    """One of N processes: whatever fails in any of them stops all, and the main process prints one line, then
    waits for the others, so that no launcher kills it before it has said why."""
    try:
        try:
            _, cfg = parse_args(config_arg_parser(__doc__.splitlines()[0]), argv)
        except UserError as err:  # the same in every process
            procs.start(CONFIG_ERROR_TIMEOUT_S)
            raise Stopped(Failure(procs.rank, str(err), 2)) from None
        procs.start(cfg.teacher.sync_timeout)
        try:
            TeacherDump(cfg, procs).execute()
            return 0
        except (Stopped, LostContact):
            raise
        except BaseException as err:  # noqa: BLE001 - every failure becomes the one line below
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            procs.report(Failure(procs.rank, " ".join(message.split()), 2 if isinstance(err, UserError) else 1))
    except Stopped as stop:
        if procs.main:
            print(f"error: rank {stop.failure.rank} of {procs.world}: {stop.failure.message}", file=sys.stderr,
                  flush=True)
        try:
            procs.sync()  # the line is out before any process exits
        except (Stopped, LostContact):
            pass
        return stop.failure.status
    except LostContact as err:  # a process died, or one hung past teacher.sync_timeout
        print(f"error: rank {procs.rank} of {procs.world}: lost contact with the other processes (one died, or did "
              f"not arrive within teacher.sync_timeout): {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        procs.stop()


if __name__ == "__main__":
    run_main(main)
