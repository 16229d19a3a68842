"""`python -m cache.verify DIR`: check a cache against its manifest (checksums, coverage, the stored datasets'
shapes, dtypes and filters) and every block as the reader checks it (decodes, ids in range, log-probs ≤ 0 and
finite, counts adding up to the draws). One `FAIL <shard>[ block N]: <problem>` line per problem, exit 1."""
from __future__ import annotations

import argparse
from typing import Sequence

from cache.manifest import load_manifest
from cache.reader import verify_cache
from common.cli import run_main


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache_dir")
    args = parser.parse_args(argv)
    problems = verify_cache(args.cache_dir, every_block=True)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    manifest = load_manifest(args.cache_dir)
    print(f"OK {args.cache_dir}: {manifest.mode} cache, {manifest.num_blocks} blocks in "
          f"{len(manifest.shards)} shards, checksums match")
    return 0


if __name__ == "__main__":
    run_main(main)
