"""What stage two's start-up check costs per GB of cache: sha256 of every shard against the manifest.

`python -m bench.verify_cost [--mb 1024] [--repeats 5]` writes one file of `--mb` random megabytes (a
shard's bytes: the check does not depend on what they mean) and times, alternating, `--repeats` times each:
reading it (what any check must do at least) and `cache.format.file_sha256` on it (what
`cache.reader.verify_cache`, and so `python -m cache.verify` and stage two, do per shard; the dataset shape
checks beside it read only HDF5 metadata). Medians, as seconds per GB and MB/s, with the page cache warm
(the file was just written; a cold disk adds its own read time, the first row's bound). The table goes
into docs/performance.md, section "verify cost".
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from bench.report import cpu_name, replace_section
from cache.format import file_sha256

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")
BEGIN, END = "<!-- BEGIN verify cost -->", "<!-- END verify cost -->"


def read_all(path: str, chunk_bytes: int = 1 << 22) -> None:
    with open(path, "rb") as fh:
        while fh.read(chunk_bytes):
            pass


def measure(megabytes: int, repeats: int) -> dict[str, float]:
    """Median seconds per route over `repeats` alternating runs."""
    routes = {"read the file": read_all, "sha256 (file_sha256, as verify_cache)": file_sha256}
    times: dict[str, list[float]] = {name: [] for name in routes}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "shard.bin")
        with open(path, "wb") as fh:
            for _ in range(megabytes):
                fh.write(os.urandom(1 << 20))
        for _ in range(repeats):
            for name, route in routes.items():
                start = time.perf_counter()
                route(path)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def table(megabytes: int, repeats: int, medians: dict[str, float]) -> str:
    gigabytes = megabytes * (1 << 20) / 1e9
    base = next(iter(medians.values()))
    lines = [f"`python -m bench.verify_cost --mb {megabytes} --repeats {repeats}` on {platform.machine()}, "
             f"{os.cpu_count()} CPUs ({cpu_name()}); one {megabytes} MiB file, "
             f"page cache warm; median of {repeats} alternating runs.", "",
             "| route | s / GB | MB/s | × reading |", "| --- | --- | --- | --- |"]
    for name, seconds in medians.items():
        lines.append(f"| {name} | {seconds / gigabytes:.2f} | {gigabytes * 1000 / seconds:.0f} | "
                     f"{seconds / base:.2f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: str) -> None:
    replace_section(path, text, BEGIN, END, "Stage two: cache verification at start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="size of the file, MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per route (default 5)")
    parser.add_argument("--doc", default=DOC, help="markdown file whose section is rewritten (default "
                                                   "docs/performance.md)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the markdown file alone")
    args = parser.parse_args()
    if args.mb < 1 or args.repeats < 1:
        parser.error("--mb and --repeats must be positive")
    text = table(args.mb, args.repeats, measure(args.mb, args.repeats))
    print(text, end="")
    if not args.no_doc:
        write_section(text, args.doc)
        print(f"→ {args.doc}")


if __name__ == "__main__":
    main()
