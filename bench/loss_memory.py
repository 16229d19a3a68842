"""Peak memory of the KD loss step at Qwen2's real vocabulary: chunked vs one chunk, side by side.

`python -m bench.loss_memory [--batch 2] [--seq-len 256] [--chunk 128] [--vocab 151646]` runs each setting
in a fresh process (peak RSS is per process) and prints one table: the student's [B, L, 151936] logits
stand in for a model's output, the teacher is a top-64 or full cache batch, and each row is forward +
backward of the registered loss, over all positions at once and in chunks of `--chunk` positions. A
smaller `--vocab` (the student keeps Qwen2-1.5B's 290 padded rows beyond it) makes a quick check.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCAB, PADDED = 151_646, 151_936  # Qwen2 tokenizer and Qwen2-1.5B's padded embedding rows


def measure(kind: str, chunk: int, batch: int, seq_len: int, vocab: int) -> dict:
    import torch

    from common.config import TrainConfig
    from stage2_student.losses import KDLoss, TeacherTargets

    torch.manual_seed(0)
    logits = torch.randn(batch, seq_len, vocab + PADDED - VOCAB, requires_grad=True)
    # teacher data built without large temporaries, so the baseline peak is logits + cached batch
    if kind == "topk":
        values = torch.log_softmax(torch.randn(batch, seq_len, 65), -1)[..., :64].half()
        targets = TeacherTargets("topk", values, torch.randint(0, vocab, (batch, seq_len, 64), dtype=torch.int32))
    else:
        dense = torch.empty(batch, seq_len, vocab, dtype=torch.float16)
        for b in range(batch):
            for t in range(seq_len):
                dense[b, t] = torch.log_softmax(torch.randn(vocab), -1)
        targets = TeacherTargets("full", dense)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = KDLoss.from_config(TrainConfig(loss="forward_kl", loss_chunk=chunk), vocab)(logits, targets, 2.0)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "chunk": chunk, "extra_peak_mib": (peak - base) / 1024, "seconds": seconds,
            "loss": loss.item()}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"  # a small setting may not grow the peak RSS at all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--chunk", type=positive_int, default=128, help="positions per loss chunk in the chunked rows")
    parser.add_argument("--vocab", type=positive_int, default=VOCAB,
                        help=f"tokenizer vocabulary (default: Qwen2's {VOCAB})")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch, args.seq_len, args.vocab)))
        return
    positions, padded = args.batch * args.seq_len, args.vocab + PADDED - VOCAB
    logits_mib = positions * padded * 4 / 2**20
    print(f"B={args.batch} L={args.seq_len} V={args.vocab} (padded {padded}); "
          f"one fp32 [B, L, V] tensor = {logits_mib:.0f} MiB")
    print("| teacher | loss chunk (positions) | extra peak RSS, MiB | × one [B,L,V] | seconds | loss |")
    print("|---|---|---|---|---|---|")
    for kind in ("topk", "full"):
        rows = []
        for chunk in (positions, args.chunk):
            out = subprocess.run([sys.executable, "-m", "bench.loss_memory", "--one", kind, str(chunk),
                                  "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                                  "--vocab", str(args.vocab)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for r in rows:
            label = f"{r['chunk']}" + (" (unchunked)" if r["chunk"] == positions else "")
            print(f"| {kind} | {label} | {r['extra_peak_mib']:.0f} | {ratio(r['extra_peak_mib'], logits_mib)} | "
                  f"{r['seconds']:.2f} | {r['loss']:.4f} |")
        chunked, unchunked = rows[1], rows[0]
        peak_ratio = ratio(chunked['extra_peak_mib'], unchunked['extra_peak_mib'])
        print(f"| {kind} | ratio chunked / unchunked | {peak_ratio} | "
              f"| {ratio(chunked['seconds'], unchunked['seconds'])} | |")


if __name__ == "__main__":
    main()
