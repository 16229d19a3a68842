"""Peak memory of the KD loss step at Qwen2's real vocabulary: chunked vs one chunk, side by side.

`python -m bench.loss_memory [--batch 2] [--seq-len 256]` runs each setting in a fresh process (peak RSS
is per process) and prints one table: the student's [B, L, 151936] logits stand in for a model's output,
the teacher is a top-64 or full cache batch, and each row is forward + backward of the registered loss.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCAB, PADDED = 151_646, 151_936  # Qwen2 tokenizer and Qwen2-1.5B's padded embedding rows


def measure(kind: str, chunk: int, batch: int, seq_len: int) -> dict:
    import torch

    from common.config import TrainConfig
    from common.losses import KDLoss, TeacherTargets

    torch.manual_seed(0)
    logits = torch.randn(batch, seq_len, PADDED, requires_grad=True)
    # teacher data built without large temporaries, so the baseline peak is logits + cached batch
    if kind == "topk":
        values = torch.log_softmax(torch.randn(batch, seq_len, 65), -1)[..., :64].half()
        targets = TeacherTargets("topk", values, torch.randint(0, VOCAB, (batch, seq_len, 64), dtype=torch.int32))
    else:
        dense = torch.empty(batch, seq_len, VOCAB, dtype=torch.float16)
        for b in range(batch):
            for t in range(seq_len):
                dense[b, t] = torch.log_softmax(torch.randn(VOCAB), -1)
        targets = TeacherTargets("full", dense)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = KDLoss.from_config(TrainConfig(loss="forward_kl", loss_chunk=chunk), VOCAB)(logits, targets, 2.0)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "chunk": chunk, "extra_peak_mib": (peak - base) / 1024, "seconds": seconds,
            "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch, args.seq_len)))
        return
    positions = args.batch * args.seq_len
    logits_mib = positions * PADDED * 4 / 2**20
    print(f"B={args.batch} L={args.seq_len} V={VOCAB} (padded {PADDED}); "
          f"one fp32 [B, L, V] tensor = {logits_mib:.0f} MiB")
    print("| teacher | loss chunk (positions) | extra peak RSS, MiB | × one [B,L,V] | seconds | loss |")
    print("|---|---|---|---|---|---|")
    for kind in ("topk", "full"):
        rows = []
        for chunk in (positions, 128):
            out = subprocess.run([sys.executable, "-m", "bench.loss_memory", "--one", kind, str(chunk),
                                  "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for r in rows:
            label = f"{r['chunk']}" + (" (unchunked)" if r["chunk"] == positions else "")
            print(f"| {kind} | {label} | {r['extra_peak_mib']:.0f} | {r['extra_peak_mib'] / logits_mib:.2f} | "
                  f"{r['seconds']:.2f} | {r['loss']:.4f} |")
        print(f"| {kind} | ratio chunked / unchunked | {rows[1]['extra_peak_mib'] / rows[0]['extra_peak_mib']:.2f} | | "
              f"{rows[1]['seconds'] / rows[0]['seconds']:.2f} | |")


if __name__ == "__main__":
    main()
