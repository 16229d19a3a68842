"""Cache size and speed per encoding, on one teacher with the real Qwen2 vocabulary (151,646 tokens).

    python -m bench.cache_size [--quick] [--out bench/out/cache_size] [--doc docs/performance.md]
                               [--data-dir ../shared/data/wikitext-2-raw-v1]
                               [--tokenizer ../shared/data/qwen2-tokenizer]

1. A small Qwen2 teacher with the real Qwen2 tokenizer whose top-k sets vary from position to position, as a
   large LM's do (`build_teacher`). It is trained (`tiny_world.models.train_teacher`) on every block of
   `wiki.valid.raw` at a compact vocabulary, the ids the text uses, then widened to the full vocabulary: every
   other id of the tokenizer gets a scaled copy a·w_t of a random used id t's output row (a uniform in
   `twin_scale`). Its logit follows t's by context and stays below it wherever t is likely, so the top-k reach
   ids the text never uses and change with the context, as a 7B teacher's spread over variants and synonyms.
   Kept under `<out>/teacher-<key>/`, keyed by every setting that makes it, so a rerun skips the training.
   The teacher's logits are then scaled (its final norm's weight) so that 50 draws give 12 unique ids per
   position, as a real 7B teacher's on this text: a teacher trained for minutes on a CPU is far less sure, and
   the sizes follow the teacher's entropy. The distinct ids per block, the overlap of consecutive positions'
   top-k sets and the share of ids the text never uses are printed beside the sizes.
2. One cache per mode through the real entry point `python -m stage1_teacher.dump` (format 3): top-64 lossless,
   top-64 with `cache.quantize=true`, sample (50 draws), full (a few blocks: 303 KB/token raw); each re-written
   in format 2 (`rewrite`: the format before, which this release still reads) and format 1 (`write_format_1`:
   the decoded arrays, which it no longer reads) for reference.
3. Per cache: bytes/token (shard bytes over tokens), max |Δp| and the mean KL of the renormalised top-k against
   the lossless cache, encode tokens/s (the writer thread's busy time, from stage one's `[stage1]` line),
   decode tokens/s on one core (`CacheReader.block` over every block: HDF5 read, decode and the value checks;
   a format-1 reference: the HDF5 reads of its decoded arrays alone; the caches alternating, the full ones
   among themselves, several repeats, median).
4. The alternatives tried for each mode, on the same arrays (`alternatives`): other filters and levels,
   other id and value layouts, other quantisation grids.

Prints the tables, writes them with this command into the "Cache size" section of `--doc` (between its
markers) and a bar chart to `docs/cache_size.png` (next to `--doc`). `--quick` shrinks the teacher and the data
to smoke-test the script in about two minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bench.report import DATA, DEFAULT_DATA_DIR, DEFAULT_TOKENIZER, REPO, replace_section, scale_from_json
from cache.encoding import ZSTD_LEVEL
from common.cli import UserError, run_main
from common.config import CacheConfig
from tiny_world.models import ModelShape

SEED = 42
BEGIN, END = "<!-- BEGIN cache size -->", "<!-- END cache size -->"
USED_IDS = "used_ids.npy"  # in the teacher's folder: the ids the text uses (the rest are its widened rows)


@dataclass
class Scale:
    """Every size of the benchmark; `quick()` is the smoke-test version."""
    teacher: ModelShape = ModelShape(hidden_size=256, num_hidden_layers=2, intermediate_size=768,
                                     tie_word_embeddings=True)
    teacher_steps: int = 400  # of 16 blocks, over every block of the text, at the compact vocabulary
    twin_scale: tuple[float, float] = (0.5, 1.0)  # the range of a: an unused id's output row is a·(a used id's)
    unique_ids: float = 12.0  # the teacher's logits are scaled so that 50 draws give this many unique ids
    seq_len: int = 128
    blocks: int = 128  # dumped: 16,384 positions, the issue's one shard
    full_blocks: int = 4  # the full cache: 77 MB of fp16 per block of 128 positions
    repeats: int = 5  # decode timings, alternating over the caches
    k: int = 64
    draws: int = 50

    @classmethod
    def quick(cls) -> "Scale":
        return cls(teacher=ModelShape(hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                                      tie_word_embeddings=True),
                   teacher_steps=20, seq_len=64, blocks=8, full_blocks=1, repeats=2)


def log(msg: str) -> None:
    print(f"[cache_size {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def file_digest(path: str) -> str:
    from cache.format import file_sha256

    return file_sha256(path)


# --- the teacher ---------------------------------------------------------------------------------------------

def teacher_key(scale: Scale, tokenizer_dir: str, data_dir: str) -> dict[str, Any]:
    """Everything that makes the teacher: its shape and training, the exact tokenizer and text, the libraries."""
    import torch
    import transformers

    tokenizer_files = sorted(f for f in os.listdir(tokenizer_dir) if os.path.isfile(os.path.join(tokenizer_dir, f)))
    return {"shape": asdict(scale.teacher), "steps": scale.teacher_steps, "seq_len": scale.seq_len,
            "twin_scale": list(scale.twin_scale), "widened": "compact vocabulary, twin rows",
            "unique_ids": scale.unique_ids, "draws": scale.draws,
            "blocks": scale.blocks, "seed": SEED,
            "tokenizer": {f: file_digest(os.path.join(tokenizer_dir, f)) for f in tokenizer_files},
            "text": file_digest(os.path.join(data_dir, "wiki.valid.raw")),
            "torch": torch.__version__, "transformers": transformers.__version__}


def build_teacher(out: str, tokenizer_dir: str, data_dir: str, scale: Scale) -> tuple[str, dict[str, Any]]:
    """The trained teacher's directory (model + tokenizer) and what its training measured; reused when its key
    matches, written to a temporary name and renamed when complete."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from common.config import DataConfig
    from common.data import load_blocks
    from common.models import tokenizer_hash
    from tiny_world.models import EOS, model_config, padded_vocab_sizes, perplexity, train_teacher

    key = teacher_key(scale, tokenizer_dir, data_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    final = os.path.join(out, f"teacher-{digest}")
    ready = os.path.join(final, "READY.json")
    if os.path.isfile(ready):
        with open(ready) as fh:
            info = json.load(fh)
        log(f"reusing the teacher in {final} (trained in {info['train_seconds']} s)")
        return final, info
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = DataConfig(local_dir=data_dir, split=DATA["data.split"], seq_len=scale.seq_len, max_blocks=None)
    blocks = load_blocks(data, tokenizer, tokenizer_hash(tokenizer)).input_ids  # every block: it trains on all
    used = np.unique(blocks)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(SEED)
    # bos, eos and pad: a spare row past the used ids (the pad row is never trained)
    compact = Qwen2ForCausalLM(model_config(scale.teacher, -(-(len(used) + 1) // 64) * 64, len(used)))
    log(f"training the teacher at the {len(used):,} ids the text uses ({len(blocks)} blocks of {scale.seq_len}) "
        f"for {scale.teacher_steps} steps")
    seconds = train_teacher(compact, np.searchsorted(used, blocks), scale.teacher_steps, SEED)
    padded = padded_vocab_sizes(len(tokenizer))[0]  # logits beyond the tokenizer's, as Qwen2's
    model = widen(compact, used, len(tokenizer), padded, scale, eos)
    dumped = blocks[: scale.blocks]
    train_ppl = perplexity(model, dumped)
    sharpen = sharpen_to(model, dumped[:4], len(tokenizer), scale.draws, scale.unique_ids)
    log(f"teacher trained in {seconds:.0f} s (perplexity {train_ppl:.1f} on the blocks dumped); logits scaled by "
        f"{sharpen:.3f} so that {scale.draws} draws give {scale.unique_ids} unique ids per position")
    info = {"key": key, "train_seconds": round(seconds, 1), "train_ppl": round(train_ppl, 2), "sharpen": sharpen,
            "sharpened_ppl": round(perplexity(model, dumped), 2),
            "params": sum(p.numel() for p in model.parameters()), "blocks": int(len(dumped)),
            "train_blocks": int(len(blocks)), "used_ids": int(len(used)),
            "tokenizer_size": len(tokenizer), "padded_vocab": padded}
    staging = f"{final}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    np.save(os.path.join(staging, USED_IDS), used)
    with open(os.path.join(staging, "READY.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    os.replace(staging, final)
    return final, info


def widen(compact, used: np.ndarray, tokens: int, padded: int, scale: Scale, eos: int):
    """The compact teacher (its rows: the `used` ids, ascending) at the full vocabulary of `padded` logits. Each
    used id keeps its row. Every other id of the tokenizer gets a·w_t, the row of a random used id t scaled by a
    uniform a in `scale.twin_scale`: its logit follows t's by context and stays below it where t is likely. The
    padding rows beyond the tokenizer are zero (stage one never reads their logits)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from tiny_world.models import model_config

    rng = np.random.default_rng(SEED)
    unused = np.setdiff1d(np.arange(tokens), used)
    twin = torch.from_numpy(rng.integers(0, len(used), len(unused)))
    factor = torch.from_numpy(rng.uniform(*scale.twin_scale, len(unused))).float()[:, None]
    state = compact.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # tied: both name one tensor, widened alike
        if name in state:
            rows = state[name]
            wide = rows.new_zeros(padded, rows.size(1))
            wide[torch.from_numpy(used)] = rows[: len(used)]
            wide[torch.from_numpy(unused)] = factor * rows[twin]
            state[name] = wide
    model = Qwen2ForCausalLM(model_config(scale.teacher, padded, eos))
    model.load_state_dict(state)
    return model


def expected_unique(logits, scale: float, draws: int) -> float:
    """Mean over positions of the expected number of unique ids among `draws` draws from softmax(scale · logits)."""
    import torch

    p = torch.softmax(logits * scale, dim=-1)
    return float((1 - (1 - p).pow(draws)).sum(-1).mean())


def sharpen_to(model, blocks: np.ndarray, vocab: int, draws: int, unique: float) -> float:
    """Scale the teacher's logits (its final norm's weight: the logits are linear in it) by the factor, found by
    bisection on `blocks`, at which `draws` draws give `unique` unique ids per position: a CPU-sized teacher
    trained for minutes is far less sure than a 7B one, and the cache sizes follow the teacher's entropy."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(blocks.astype(np.int64))).logits[..., :vocab].float()
        low, high = 0.25, 64.0
        for _ in range(16):  # the factor to 0.04 %
            mid = (low * high) ** 0.5
            low, high = (mid, high) if expected_unique(logits, mid, draws) > unique else (low, mid)
        model.model.norm.weight.mul_(low)
    return low


# --- the caches ----------------------------------------------------------------------------------------------

@dataclass
class Cache:
    """One measured cache: its label, mode, directory and what was measured."""
    label: str
    mode: str
    dir: str
    encoding: str
    stats: dict[str, Any] = field(default_factory=dict)
    through_hdf5: bool = False  # read every chunk through h5py and HDF5's filters, as before cache/chunks.py


def dump(out: str, teacher: str, data_dir: str, scale: Scale, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`python -m stage1_teacher.dump` into `<out>/caches/<name>`; returns its `[stage1]` figures."""
    cache_dir = os.path.join(out, "caches", name)
    args = overrides({**DATA, "data.local_dir": data_dir, "data.seq_len": scale.seq_len,
                      "data.max_blocks": scale.blocks, "teacher.model": teacher, "teacher.batch_size": 8,
                      "teacher.device": "cpu", "cache.dir": cache_dir, "cache.overwrite": "true", **settings})
    log("python -m stage1_teacher.dump " + " ".join(shlex.quote(a) for a in args))
    proc = subprocess.run([sys.executable, "-m", "stage1_teacher.dump", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("[stage1]")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"stage1_teacher.dump failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tokens = int(re.search(r"(\d+) tokens", line).group(1))
    busy = float(re.search(r"writer busy ([0-9.]+) s", line).group(1))
    return {"dir": cache_dir, "tokens": tokens, "writer_busy_s": busy, "line": line}


def write_format_1(source: str, target: str) -> None:
    """`source` re-written as format 1 stored it: the decoded arrays (sample: gzip 9 + shuffle), one block per
    chunk, the manifest last. For reference rows only."""
    import h5py

    from cache.format import MODE_DATASETS, file_sha256
    from cache.reader import CacheReader

    reader = CacheReader(source)
    manifest = json.loads(reader.manifest.to_json())
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    datasets = {}
    for shard in manifest["shards"]:
        path = os.path.join(target, shard["file"])
        blocks = [reader.block(b) for b in range(shard["first_block"], shard["first_block"] + shard["num_blocks"])]
        with h5py.File(path, "w") as h5:
            for name in MODE_DATASETS[manifest["mode"]]:
                values = np.stack([b[name] for b in blocks])
                gzip = {"compression": "gzip", "compression_opts": 9, "shuffle": True} if "sample" in name else {}
                h5.create_dataset(name, data=values, chunks=(1, *values.shape[1:]), **gzip)
                datasets[name] = {"shape_per_block": list(values.shape[1:]), "dtype": str(values.dtype),
                                  "compression": "gzip" if gzip else None, "compression_opts": 9 if gzip else None}
            h5.attrs["first_block"] = shard["first_block"]
        shard.update(sha256=file_sha256(path), bytes=os.path.getsize(path))
    reader.close()
    manifest.update(format_version=1, datasets=datasets)
    with open(os.path.join(target, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)


def rewrite(source: str, target: str, factor: int = 1, quantize: bool = False, version: int | None = None) -> None:
    """`source` re-written through the project's writer: in blocks `factor` times longer (the default seq_len 256
    from blocks of 128: the decoding speed per token at that block length, on the same positions), and/or in
    format `version` (2: the format this release still reads, for reference). `quantize` re-quantises a lossless
    top-k source. Its fingerprint is the source's, so it is for timing and sizes only."""
    import dataclasses

    from cache.encoding import stored_datasets
    from cache.format import FORMAT_VERSION
    from cache.manifest import load_manifest
    from cache.reader import CacheReader
    from cache.writer import CacheLayout, CacheWriter

    version = version or FORMAT_VERSION
    reader = CacheReader(source)
    arrays = {name: reader.read_all(name) for name in reader.dataset_names}
    reader.close()
    manifest = load_manifest(source)
    num_blocks, seq_len = manifest.num_blocks // factor, manifest.seq_len * factor
    arrays = {name: a[: num_blocks * factor].reshape(num_blocks, seq_len, *a.shape[2:]) for name, a in arrays.items()}
    draws = manifest.sample.draws if manifest.sample is not None else 1
    budget = {key: manifest.settings.get(f"cache.{key}", default) for key, default in (("max_dp", 4e-3),
                                                                                       ("max_kl", 1e-5))}
    layout = CacheLayout(manifest.mode, num_blocks, seq_len,
                         stored_datasets(manifest.mode, seq_len, manifest.vocab_size, manifest.k, draws, quantize,
                                         version=version, **budget), 512)
    writer = CacheWriter(target, layout, overwrite=True)
    writer.put(arrays)
    writer.finish(dataclasses.replace(manifest, format_version=version, num_blocks=num_blocks, seq_len=seq_len,
                                      datasets=layout.datasets, shards=[]))


def read_manifest_json(cache_dir: str) -> dict:
    with open(os.path.join(cache_dir, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)


def bytes_per_token(cache_dir: str) -> float:
    """Shard bytes over tokens, from the manifest as JSON (the format-1 references' too)."""
    manifest = read_manifest_json(cache_dir)
    return sum(s["bytes"] for s in manifest["shards"]) / (manifest["num_blocks"] * manifest["seq_len"])


def read_format_1_blocks(cache_dir: str) -> tuple[float, float, int, float]:
    """`read_every_block` of a format-1 reference: one chunk read per dataset and block, nothing to decode."""
    import h5py

    manifest = read_manifest_json(cache_dir)
    opened = time.thread_time()
    files = [h5py.File(os.path.join(cache_dir, shard["file"]), "r") for shard in manifest["shards"]]
    datasets = [[h5[name] for name in manifest["datasets"]] for h5 in files]
    opened = time.thread_time() - opened
    wall, cpu = time.perf_counter(), time.thread_time()
    for shard, shard_datasets in zip(manifest["shards"], datasets):
        for row in range(shard["num_blocks"]):
            for dataset in shard_datasets:
                dataset[row]
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    for h5 in files:
        h5.close()
    return cpu, wall, manifest["num_blocks"] * manifest["seq_len"], opened / len(files)


def hdf5_filter_reader(cache_dir: str):
    """A CacheReader that reads every chunk through h5py and HDF5's filter pipeline, as the reader did before
    it read chunks itself (cache/chunks.py): the same blocks, the same checks, for comparison."""
    from cache.reader import CacheReader

    class NoDirectChunks:
        def read(self, name: str, row: int) -> None:
            return None

        def close(self) -> None:
            pass

    class HDF5FilterReader(CacheReader):
        def _handle(self, index: int):
            handle = super()._handle(index)
            if not isinstance(self._chunks[index], NoDirectChunks):
                self._chunks[index].close()
                self._chunks[index] = NoDirectChunks()
            return handle

    return HDF5FilterReader(cache_dir)


def read_every_block(cache_dir: str, through_hdf5: bool = False) -> tuple[float, float, int, float]:
    """(CPU seconds of this thread, wall seconds, tokens) to read every block through a fresh CacheReader whose
    shards are open, and the CPU seconds that opening took per shard (once per shard and process: timed apart,
    as a bench cache has 20 times fewer blocks per shard than the default cache.shard_blocks)."""
    from cache.reader import CacheReader

    if read_manifest_json(cache_dir)["format_version"] == 1:
        return read_format_1_blocks(cache_dir)
    reader = hdf5_filter_reader(cache_dir) if through_hdf5 else CacheReader(cache_dir)
    opened = time.thread_time()
    for index in range(len(reader.shards)):
        reader._handle(index)  # opens the shard, checks its layout, lists its chunks
    opened = time.thread_time() - opened
    wall, cpu = time.perf_counter(), time.thread_time()
    for b in range(len(reader)):
        reader.block(b)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    reader.close()
    return cpu, wall, len(reader) * reader.seq_len, opened / len(reader.shards)


def opening_note(caches: list[Cache], block_length: int) -> str:
    """The cost of opening a shard, which the decode figures leave out, against reading a default shard."""
    stats = next(c for c in caches if c.label == "topk x2").stats  # top-64 lossless in blocks of block_length
    per_shard = CacheConfig().shard_blocks
    reading = per_shard * block_length / stats["decode_tok_s"]
    return (f"Opening a shard (HDF5 open, layout check, chunk list) is timed apart, as it comes once per shard and "
            f"process: {stats['open_shard_s'] * 1e3:.1f} ms for the top-64 lossless cache in blocks of "
            f"{block_length}, {stats['open_shard_s'] / reading:.1%} of the time to read a shard of the default "
            f"{per_shard} such blocks.")


def decode_speeds(caches: list[Cache], repeats: int) -> None:
    """Decode tokens/s per cache on one core: the caches alternating (the full ones among themselves), `repeats`
    times, the median. Counted in the reading thread's CPU time (numpy, numba's kernels, h5py and zstd run in it,
    single-threaded), which a machine shared with other jobs does not inflate as it does the wall time (kept
    beside it)."""
    from cache.reader import CacheReader

    cpu: dict[str, list[float]] = {c.label: [] for c in caches}
    wall: dict[str, list[float]] = {c.label: [] for c in caches}
    opening: dict[str, list[float]] = {c.label: [] for c in caches}
    for cache in caches:  # numba compiles (or loads) each of the decoder's kernels on its first call: not timed
        if read_manifest_json(cache.dir)["format_version"] > 1:
            reader = CacheReader(cache.dir)
            reader.block(0)
            reader.close()
    # the full caches (~300 KB a token) alternate among themselves: between two compact caches they would evict
    # what a reader of one cache keeps in the CPU's caches, and slow the next compact one by ~20%
    for group in ([c for c in caches if c.mode != "full"], [c for c in caches if c.mode == "full"]):
        for _ in range(repeats):
            for cache in group:
                cpu_s, wall_s, tokens, open_s = read_every_block(cache.dir, cache.through_hdf5)
                cpu[cache.label].append(tokens / cpu_s)
                wall[cache.label].append(tokens / wall_s)
                opening[cache.label].append(open_s)
    for cache in caches:
        cache.stats["decode_tok_s"] = float(np.median(cpu[cache.label]))
        cache.stats["decode_wall_tok_s"] = float(np.median(wall[cache.label]))
        cache.stats["open_shard_s"] = float(np.median(opening[cache.label]))


def topk_variety(ids: np.ndarray, used: np.ndarray) -> dict[str, float]:
    """How much the top-k sets [blocks, L, k] vary, which sets what the id gaps cost: distinct ids in all and per
    block, ids shared by consecutive positions of a block, and the share of ids the text never uses."""
    _, length, k = ids.shape
    per_block = [np.unique(block).size for block in ids]
    shared = [np.intersect1d(a, b, assume_unique=True).size for block in ids for a, b in zip(block[:-1], block[1:])]
    return {"distinct": int(np.unique(ids).size), "distinct_per_block": float(np.mean(per_block)),
            "slots_per_block": length * k, "consecutive_overlap": float(np.mean(shared)) if shared else float("nan"),
            "unused_share": float(np.isin(ids, used, invert=True).mean())}


def topk_by_id(cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Every block's top-k ids and fp64 probabilities, each position sorted by id (so two caches line up)."""
    from cache.reader import CacheReader

    reader = CacheReader(cache_dir)
    ids = reader.read_all("topk_ids")
    probs = np.exp(reader.read_all("topk_logprobs").astype(np.float64))
    reader.close()
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(probs, order, -1)


def quantization_error(p: np.ndarray, p_hat: np.ndarray) -> dict[str, float]:
    """max |Δp| over every cached probability, and the mean over positions of KL(p ‖ p̂) of the renormalised
    top-k (both [..., k], the same ids in the same order)."""
    s, s_hat = p.sum(-1, keepdims=True), p_hat.sum(-1, keepdims=True)
    ratio = np.log(np.maximum(p, 1e-300) / s) - np.log(np.maximum(p_hat, 1e-300) / s_hat)
    kl = (p / s * ratio).sum(-1)
    return {"max_dp": float(np.abs(p_hat - p).max()), "mean_kl": float(kl.mean()),
            "max_mass_error": float(np.abs(s_hat - s).max())}


def unique_per_position(cache_dir: str) -> float:
    from cache.reader import CacheReader

    reader = CacheReader(cache_dir)
    counts = reader.read_all("sample_counts")
    reader.close()
    return float((counts > 0).sum(-1).mean())


# --- the alternatives tried ----------------------------------------------------------------------------------

def stored_bytes(arrays: dict[str, np.ndarray], filters: dict[str, Any]) -> int:
    """Bytes of an HDF5 file holding `arrays` ([n, …] each, one block per chunk), every one with `filters`."""
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.h5")
        with h5py.File(path, "w") as h5:
            for name, values in arrays.items():
                h5.create_dataset(name, data=values, chunks=(1, *values.shape[1:]), **filters)
        return os.path.getsize(path)


def chosen(yes: bool) -> str:
    return " (chosen)" if yes else ""


def zstd(level: int) -> dict[str, Any]:
    import hdf5plugin

    return {"shuffle": True, **hdf5plugin.Zstd(clevel=level)}


def blosc2_zstd(level: int) -> dict[str, Any]:
    """Blosc2's own byte shuffle (SIMD) and zstd over each byte plane separately (one thread: BLOSC_NTHREADS)."""
    import hdf5plugin

    return dict(hdf5plugin.Blosc2(cname="zstd", clevel=level, filters=hdf5plugin.Blosc2.SHUFFLE))


def bitshuffle_zstd(level: int) -> dict[str, Any]:
    import hdf5plugin

    return dict(hdf5plugin.Bitshuffle(cname="zstd", clevel=level))


GZIP4 = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def topk_alternatives(tokens: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, vocab: int) -> list[dict[str, Any]]:
    """Top-k layouts and filters on the lossless cache's decoded arrays (ids most likely first), bytes per token
    and, for the lossy ones, the error against them."""
    from cache.encoding import (
        block_vocabulary,
        decode,
        encode,
        encode_topk,
        sort_by_id,
        sqrt_grid,
        sqrt_grid_logprobs,
        stored_datasets,
    )

    positions, (_, length, k) = tokens.size, ids.shape
    by_id = encode_topk(ids, logprobs, None)
    rank_bits = logprobs.view(np.uint16)
    rank_gaps = np.diff(rank_bits.astype(np.int32), axis=-1, prepend=0).astype(np.uint16)  # ≥ 0 after the first
    rows: list[dict[str, Any]] = []

    def add(what: str, arrays: dict[str, np.ndarray], filters, error: dict[str, float] | None = None) -> None:
        rows.append({"what": what, "bytes_per_token": stored_bytes({"input_ids": tokens, **arrays}, filters)
                     / positions, **(error or {})})

    def format_3(topk_ids: np.ndarray, quantize: bool = False) -> dict[str, np.ndarray]:
        datasets = stored_datasets("topk", length, vocab, k, 1, quantize)
        stored = encode(datasets, {"input_ids": tokens, "topk_ids": topk_ids, "topk_logprobs": logprobs})
        return {name: a for name, a in stored.items() if name != "input_ids"}

    add("format 1: int32 ids + fp16, most likely first, no filter", {"ids": ids, "lp": logprobs}, {})
    add("format 1 + shuffle + gzip-4", {"ids": ids, "lp": logprobs}, GZIP4)
    add("ids most likely first (uint32) + fp16 bit gaps down the ranks, shuffle + zstd-3",
        {"ids": ids.astype(np.uint32), "lp": rank_gaps}, zstd(3))
    for level in (3, 9, 19):
        add(f"ids sorted as gaps + fp16 in id order, shuffle + zstd-{level}" + (" (format 2)" if level == 9 else ""),
            by_id, zstd(level))
    add("ids sorted as gaps + fp16 in id order, bitshuffle + zstd-3", by_id, bitshuffle_zstd(3))
    add("ids sorted as gaps + fp16 in id order, Blosc2 shuffle + zstd-5", by_id, blosc2_zstd(5))
    lossless = format_3(ids)
    for level in (3, 9, 19):
        add(f"block vocabulary + index gaps + fp16 in id order, shuffle + zstd-{level}" + chosen(level == ZSTD_LEVEL),
            lossless, zstd(level))
    p = np.take_along_axis(np.exp(logprobs.astype(np.float64)), np.argsort(ids, -1), -1)
    ids_sorted, lp_by_id = sort_by_id(ids, logprobs)
    vocab_gaps, index_gaps = block_vocabulary(ids_sorted, np.ones(ids.shape, bool), "uint16")
    for grid in (512, 724, 1024):  # one grid for every position
        q, c = sqrt_grid(lp_by_id, grid)
        p_hat = np.exp(sqrt_grid_logprobs(q, c, grid).astype(np.float64))
        error = quantization_error(p, p_hat)
        add(f"quantized: ids as gaps + √(p/p_max) on a 1/{grid} grid + log-scale, shuffle + zstd-{ZSTD_LEVEL}"
            + (" (format 2)" if grid == 1024 else ""), {"gaps": by_id["topk_id_gaps"], "q": q, "c": c},
            zstd(ZSTD_LEVEL), error)
        add(f"quantized: block vocabulary + index gaps + √(p/p_max) on a 1/{grid} grid + log-scale, "
            f"shuffle + zstd-{ZSTD_LEVEL}", {"vocab": vocab_gaps, "index": index_gaps, "q": q, "c": c},
            zstd(ZSTD_LEVEL), error)
    quantized = format_3(ids, quantize=True)
    datasets = stored_datasets("topk", length, vocab, k, 1, quantize=True)
    decoded = decode(datasets, {"input_ids": tokens, **quantized})
    p_hat = np.take_along_axis(np.exp(decoded["topk_logprobs"].astype(np.float64)),
                               np.argsort(decoded["topk_ids"], -1), -1)
    add(f"quantized: block vocabulary + index gaps + √(p/p_max) on each position's coarsest grid within "
        f"cache.max_dp = {datasets['topk_sqrtp_by_id'].max_dp:g} and cache.max_kl = "
        f"{datasets['topk_sqrtp_by_id'].max_kl:g} + log-scale, shuffle + zstd-{ZSTD_LEVEL} (chosen)",
        quantized, zstd(ZSTD_LEVEL), quantization_error(p, p_hat))
    # an upper bound for the ids: every position's k ids drawn anew, uniformly, from the whole vocabulary (a
    # teacher whose top-k sets share nothing beyond chance; a small teacher's repeat far more than a 7B's)
    rng = np.random.default_rng(SEED)
    random_ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(ids.size // k)]).reshape(ids.shape)
    random_ids = random_ids.astype(np.int32)
    add(f"upper bound, random ids: the chosen lossless encoding, every position's ids drawn at random from the "
        f"{vocab:,}", format_3(random_ids), zstd(ZSTD_LEVEL))
    add("upper bound, random ids: the chosen quantized encoding", format_3(random_ids, quantize=True),
        zstd(ZSTD_LEVEL))
    add("upper bound, random ids: format 2's lossless layout (ids as gaps)", encode_topk(random_ids, logprobs, None),
        zstd(ZSTD_LEVEL))
    return rows


def sample_alternatives(tokens: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> list[dict[str, Any]]:
    from cache.encoding import encode_draws

    positions = tokens.size
    packed = {f"sample_{name}": a for name, a in encode_draws(ids, counts).items()}
    vocabulary = {f"sample_{name}": a for name, a in encode_draws(ids, counts, "uint16").items()}
    rows = []
    for what, arrays, filters in (
            ("format 1: int32 ids + counts, most drawn first, −1/0 padded, shuffle + gzip-9",
             {"ids": ids, "counts": counts}, {"compression": "gzip", "compression_opts": 9, "shuffle": True}),
            ("format 1 layout, shuffle + zstd-3", {"ids": ids, "counts": counts}, zstd(3)),
            *((f"packed: ids ascending as gaps within each position + counts, shuffle + zstd-{level}"
               + (" (format 2)" if level == ZSTD_LEVEL else ""), packed, zstd(level)) for level in (3, 9, 19)),
            ("packed, bitshuffle + zstd-3", packed, bitshuffle_zstd(3)),
            *((f"packed: block vocabulary + index gaps within each position + counts, shuffle + zstd-{level}"
               + chosen(level == ZSTD_LEVEL), vocabulary, zstd(level)) for level in (3, 9, 19))):
        size = stored_bytes({"input_ids": tokens, **arrays}, filters)
        rows.append({"what": what, "bytes_per_token": size / positions})
    return rows


def full_alternatives(tokens: np.ndarray, logprobs: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Filters for the full fp16 log-probs: size, and write / read MB/s of the raw data through HDF5 (one core)."""
    import h5py
    import hdf5plugin

    positions, raw = tokens.size, logprobs.nbytes
    options: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("no filter (chosen)", lambda: {}),
        ("shuffle + zstd-1", lambda: zstd(1)), ("shuffle + zstd-3", lambda: zstd(3)),
        ("bitshuffle + lz4", lambda: dict(hdf5plugin.Bitshuffle(cname="lz4"))),
        ("bitshuffle + zstd-1", lambda: bitshuffle_zstd(1)), ("shuffle + gzip-1",
                                                              lambda: {"compression": "gzip", "compression_opts": 1,
                                                                       "shuffle": True})]
    timings: dict[str, dict[str, list[float]]] = {name: {"write": [], "read": []} for name, _ in options}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, filters in options:
                path = os.path.join(tmp, "full.h5")
                start = time.perf_counter()
                with h5py.File(path, "w") as h5:
                    h5.create_dataset("logprobs", data=logprobs, chunks=(1, *logprobs.shape[1:]), **filters())
                timings[name]["write"].append(raw / (time.perf_counter() - start) / 1e6)
                sizes[name] = os.path.getsize(path)
                start = time.perf_counter()
                with h5py.File(path, "r") as h5:
                    for b in range(len(logprobs)):
                        h5["logprobs"][b]
                timings[name]["read"].append(raw / (time.perf_counter() - start) / 1e6)
    return [{"what": name, "bytes_per_token": (sizes[name] + tokens.nbytes) / positions,
             "write_mb_s": float(np.median(timings[name]["write"])),
             "read_mb_s": float(np.median(timings[name]["read"]))} for name, _ in options]


# --- report --------------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main_table(caches: list[Cache]) -> str:
    rows = ["| mode | encoding | B / token | max \\|Δp\\| | mean KL (renormalised top-k) | encode tok/s (writer busy) "
            "| decode tok/s, one core (CPU time) | decode tok/s (wall) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in caches:
        s = c.stats
        rows.append(f"| {c.mode} | {c.encoding} | {fmt(s.get('bytes_per_token'), ',.1f')} | "
                    f"{fmt(s.get('max_dp'), '.2e')} | {fmt(s.get('mean_kl'), '.2e')} | "
                    f"{fmt(s.get('encode_tok_s'), ',.0f')} | {s['decode_tok_s']:,.0f} | "
                    f"{s['decode_wall_tok_s']:,.0f} |")
    return "\n".join(rows)


def alternatives_table(title: str, rows: list[dict[str, Any]]) -> str:
    lossy = any("max_dp" in r for r in rows)
    speed = any("write_mb_s" in r for r in rows)
    head = f"| {title} | B / token |" + (" max \\|Δp\\| | mean KL |" if lossy else "") + \
        (" write MB/s | read MB/s |" if speed else "")
    lines = [head, "|---|---:|" + ("---:|---:|" if lossy else "") + ("---:|---:|" if speed else "")]
    for r in rows:
        line = f"| {r['what']} | {r['bytes_per_token']:,.1f} |"
        if lossy:
            line += f" {fmt(r.get('max_dp'), '.2e')} | {fmt(r.get('mean_kl'), '.2e')} |"
        if speed:
            line += f" {r['write_mb_s']:,.0f} | {r['read_mb_s']:,.0f} |"
        lines.append(line)
    return "\n".join(lines)


def plot(caches: list[Cache], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = [c for c in caches if "blocks of" not in c.encoding and not c.through_hdf5]  # bytes as their source
    fig, ax = plt.subplots(figsize=(10, 4.5))
    short = {"format 1 (reference)": "format 1", "format 2 (reference), cache.quantize=true": "format 2\nquantized",
             "format 3, cache.quantize=true": "format 3\nquantized"}
    labels = [f"{c.mode}\n{short.get(c.encoding, c.encoding.replace(' (reference)', '').replace(', ', chr(10)))}"
              for c in caches]
    values = [c.stats["bytes_per_token"] for c in caches]
    colors = ["#999999" if c.encoding.startswith("format 1") else "#aec7e8" if c.encoding.startswith("format 2")
              else "#1f77b4" for c in caches]
    bars = ax.bar(range(len(caches)), values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(caches)), labels, fontsize=7)
    ax.set_ylabel("bytes per token on disk (log scale)")
    ax.set_title("Cache size per mode and encoding (grey: format 1, light blue: format 2, blue: format 3)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_doc(path: str, block: str) -> None:
    replace_section(path, block, BEGIN, END, "Cache size")


def machine() -> str:
    import platform

    import h5py
    import hdf5plugin
    import numba
    import torch
    import zstandard

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; numpy {np.__version__}, "
            f"numba {numba.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), hdf5plugin "
            f"{hdf5plugin.version}, zstandard {zstandard.__version__}, torch {torch.__version__}")


# --- main ----------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_size", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/cache_size", help="scratch directory (default: %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small teacher and few blocks: a smoke test")
    size.add_argument("--scale-json", help=argparse.SUPPRESS)  # tests: Scale fields as JSON
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with WikiText-2 raw's wiki.valid.raw "
                        "(default: ../shared/data/wikitext-2-raw-v1 next to the repository)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="the Qwen2 tokenizer's folder "
                        "(default: ../shared/data/qwen2-tokenizer next to the repository)")
    parser.add_argument("--doc", default=None, help="markdown file whose 'Cache size' section is rewritten "
                        "(default: docs/performance.md; with --quick, <out>/performance.md)")
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else scale_from_json(Scale, args.scale_json) if args.scale_json else Scale()
    data_dir, tokenizer_dir, out = (os.path.abspath(p) for p in (args.data_dir, args.tokenizer, args.out))
    if not os.path.isfile(os.path.join(data_dir, "wiki.valid.raw")):
        raise UserError(f"{data_dir} has no wiki.valid.raw; pass --data-dir with the WikiText-2 raw files")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        raise UserError(f"{tokenizer_dir} is not a tokenizer folder; pass --tokenizer")
    small = args.quick or args.scale_json  # must not overwrite the record by default
    doc = args.doc or (os.path.join(out, "performance.md") if small else "docs/performance.md")
    if not os.path.isfile(doc):
        if args.doc is not None or not small:
            raise UserError(f"{doc} not found")
        os.makedirs(out, exist_ok=True)
        with open(doc, "w", encoding="utf-8") as fh:
            fh.write(f"# Performance\n\n## Cache size\n\n{BEGIN}\n{END}\n")
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("BLOSC_NTHREADS", "1")):  # every figure is one core's
        os.environ.setdefault(name, value)
    import datasets

    datasets.disable_progress_bars()
    start = time.time()
    os.makedirs(out, exist_ok=True)
    teacher, teacher_info = build_teacher(out, tokenizer_dir, data_dir, scale)

    dumped = {
        "topk": dump(out, teacher, data_dir, scale, "topk", {"cache.mode": "topk", "cache.k": scale.k,
                                                                  "cache.tail_draws": 0}),
        "quantized": dump(out, teacher, data_dir, scale, "topk-quantized",
                          {"cache.mode": "topk", "cache.k": scale.k, "cache.tail_draws": 0, "cache.quantize": "true"}),
        "sample": dump(out, teacher, data_dir, scale, "sample", {"cache.mode": "sample", "cache.draws": scale.draws,
                                                                  "cache.sample_temperature": 1.0}),
        "full": dump(out, teacher, data_dir, scale, "full", {"cache.mode": "full",
                                                             "data.max_blocks": scale.full_blocks}),
    }
    caches = []
    for key, mode, label in (("topk", "top-64", "lossless"), ("quantized", "top-64", "cache.quantize=true"),
                             ("sample", "sample, 50 draws", "packed"), ("full", "full", "raw")):
        reference = os.path.join(out, "caches", f"{key}-format1")
        write_format_1(dumped[key]["dir"], reference)
        if key != "quantized":  # format 1 had no quantized top-k
            caches.append(Cache(f"{key} format 1", mode, reference, "format 1 (reference)"))
        if key != "full":  # format 2: the format before this one, still read
            reference = os.path.join(out, "caches", f"{key}-format2")
            source = dumped["topk" if key == "quantized" else key]["dir"]
            rewrite(source, reference, quantize=key == "quantized", version=2)
            caches.append(Cache(f"{key} format 2", mode, reference, f"format 2 (reference), {label}"))
        cache = Cache(key, mode, dumped[key]["dir"], f"format 3, {label}")
        cache.stats["encode_tok_s"] = dumped[key]["tokens"] / max(dumped[key]["writer_busy_s"], 0.05)
        caches.append(cache)
    for cache in caches:
        cache.stats["bytes_per_token"] = bytes_per_token(cache.dir)
    if scale.blocks >= 2:  # the default block length, 256, for the decoding speed (not bytes: same positions)
        for key, label in (("topk", "lossless"), ("quantized", "cache.quantize=true")):
            target = os.path.join(out, "caches", f"{key}-blocks-of-{2 * scale.seq_len}")
            rewrite(dumped["topk"]["dir"], target, 2, key == "quantized")
            caches.append(Cache(f"{key} x2", "top-64", target, f"format 3, {label}, blocks of {2 * scale.seq_len}",
                                {"bytes_per_token": bytes_per_token(target)}))
    for cache in [c for c in caches if c.label in ("topk", "topk x2")]:  # chunks read as before, same caches
        caches.append(Cache(f"{cache.label} through HDF5", cache.mode, cache.dir,
                            f"{cache.encoding}, chunks read through HDF5's filters",
                            {"bytes_per_token": cache.stats["bytes_per_token"]}, through_hdf5=True))
    log("decoding every block of every cache, alternating")
    decode_speeds(caches, scale.repeats)
    ids, p = topk_by_id(dumped["topk"]["dir"])
    for label in ("quantized", "quantized format 2"):
        quantized = next(c for c in caches if c.label == label)
        ids_q, p_q = topk_by_id(quantized.dir)
        if not np.array_equal(ids, ids_q):
            raise SystemExit(f"the {label} and lossless caches hold different ids")
        quantized.stats.update(quantization_error(p, p_q))
    unique = unique_per_position(dumped["sample"]["dir"])
    mass = float(p.sum(-1).mean())
    variety = topk_variety(ids, np.load(os.path.join(teacher, USED_IDS)))

    log("alternatives")
    from cache.manifest import load_manifest
    from cache.reader import CacheReader

    reader = CacheReader(dumped["topk"]["dir"])
    tokens, topk_ids, topk_lp = (reader.read_all(n) for n in ("input_ids", "topk_ids", "topk_logprobs"))
    reader.close()
    reader = CacheReader(dumped["sample"]["dir"])
    sample_ids, sample_counts = reader.read_all("sample_ids"), reader.read_all("sample_counts")
    reader.close()
    reader = CacheReader(dumped["full"]["dir"])
    full_tokens, full_lp = reader.read_all("input_ids"), reader.read_all("logprobs")
    reader.close()
    vocab = load_manifest(dumped["topk"]["dir"]).vocab_size
    alternatives = {"top-64": topk_alternatives(tokens, topk_ids, topk_lp, vocab),
                    "sample, 50 draws": sample_alternatives(tokens, sample_ids, sample_counts),
                    "full": full_alternatives(full_tokens, full_lp, scale.repeats)}

    command = "python -m bench.cache_size" + (" --quick" if args.quick else "") + \
        (f" --scale-json {shlex.quote(args.scale_json)}" if args.scale_json else "") + \
        (f" --out {args.out}" if args.out != "bench/out/cache_size" else "") + \
        (f" --data-dir {args.data_dir}" if os.path.abspath(args.data_dir) != DEFAULT_DATA_DIR else "") + \
        (f" --tokenizer {args.tokenizer}" if os.path.abspath(args.tokenizer) != DEFAULT_TOKENIZER else "") + \
        (f" --doc {args.doc}" if args.doc else "")
    chart = os.path.join(os.path.dirname(os.path.abspath(doc)), "cache_size.png")
    plot(caches, chart)
    tables = [main_table(caches)] + [alternatives_table(f"{mode}: alternatives tried", rows)
                                      for mode, rows in alternatives.items()]
    t = teacher_info
    summary = (f"Teacher: Qwen2, {scale.teacher.num_hidden_layers} layers × {scale.teacher.hidden_size}, "
               f"{t['params'] / 1e6:.1f} M params, tokenizer of {t['tokenizer_size']:,} tokens (logits padded to "
               f"{t['padded_vocab']:,}), trained {scale.teacher_steps} steps of 16 blocks on the "
               f"{t['train_blocks']:,} blocks of {scale.seq_len} tokens of wiki.valid.raw at the {t['used_ids']:,} "
               f"ids they use ({t['train_seconds']:.0f} s), then widened: every other id's output row a scaled copy "
               f"a·w_t of a random used id's, a uniform in [{scale.twin_scale[0]:g}, {scale.twin_scale[1]:g}]. "
               f"Dumped: the first {scale.blocks} blocks (perplexity on them {t['train_ppl']}); its logits scaled by "
               f"{t['sharpen']:.2f} so that {scale.draws} draws give {scale.unique_ids:g} unique ids per position, as "
               f"a 7B teacher's on this text (perplexity then {t['sharpened_ppl']}). Its top-64 sets vary: "
               f"{variety['distinct']:,} distinct ids in all, {variety['distinct_per_block']:,.0f} per block of "
               f"{scale.seq_len} positions ({variety['slots_per_block']:,} slots), "
               f"{variety['consecutive_overlap']:.1f} of 64 shared by consecutive positions; "
               f"{variety['unused_share']:.0%} of the top-64 slots hold ids the text never uses; the 'upper bound, "
               f"random ids' rows give the cost of sets "
               f"that share nothing. Cached positions: {tokens.size:,} "
               f"(full: {full_tokens.size:,}); "
               f"the top-64 hold {mass:.3f} of the teacher's mass on average; 50 draws give {unique:.1f} unique ids "
               f"per position. Decode: every block through `CacheReader.block` (its chunks read from the shard file: "
               f"Fletcher-32 checked, zstd-decompressed, unshuffled; then decoded and value-checked; these loops "
               f"compiled by numba, cache/kernels.py, compiled before the timing; 'chunks read through HDF5's "
               f"filters': the chunks read by h5py instead, as before cache/chunks.py; format 1: the HDF5 reads "
               f"alone), the caches alternating (the full ones among themselves), {scale.repeats} repeats, "
               f"median, in the reading thread's CPU time (one core; the wall-time figure beside it includes "
               f"waiting for a shared CPU); the 'blocks of {2 * scale.seq_len}' rows are the same positions "
               f"re-written in blocks of the default length. {opening_note(caches, 2 * scale.seq_len)} "
               f"Encode: tokens over the writer thread's "
               f"busy time (encode, HDF5 filters, write) in stage one. Max |Δp| and KL: the quantized cache against "
               f"the lossless one, matched by id, over every cached probability. Machine: {machine()}. "
               f"Wall time {(time.time() - start) / 60:.1f} min.")
    block = (f"<!-- generated by `{command}` -->\n\n" + "\n\n".join(tables) +
             f"\n\n![bytes per token per mode and encoding]({os.path.basename(chart)})\n\n{summary}\n")
    write_doc(doc, block)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({"command": command, "scale": asdict(scale), "teacher": teacher_info, "unique_ids": unique,
                   "topk_variety": variety,
                   "topk_mass": mass, "caches": [asdict(c) for c in caches], "alternatives": alternatives,
                   "dumps": dumped}, fh, indent=2)
    print("\n\n".join(tables))
    print(summary)
    log(f"wrote {doc} and {chart}")
    return 0


if __name__ == "__main__":
    run_main(main)
