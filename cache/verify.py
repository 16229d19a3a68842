"""`python -m cache.verify DIR`: check a cache against its manifest (checksums, coverage, the stored datasets'
shapes, dtypes and filters) and every block as the reader checks it (decodes, ids in range, log-probs ≤ 0 and
finite, counts adding up to the draws). One `FAIL <shard>[ block N]: <problem>` line per problem, exit 1.
Files the manifest does not list (beside it and the lock file) are named on `EXTRA <name>` lines: they do not
change what is read, but stage one refuses to overwrite a cache that holds them."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from cache.format import MANIFEST
from cache.lock import LOCK_FILE
from cache.manifest import load_manifest
from cache.reader import verify_cache
from common.cli import run_main


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache_dir")
    args = parser.parse_args(argv)
    problems = verify_cache(args.cache_dir, every_block=True)
    manifest = load_manifest(args.cache_dir)
    listed = {MANIFEST, LOCK_FILE} | {shard.file for shard in manifest.shards}
    extra = sorted(set(os.listdir(args.cache_dir)) - listed)
    for name in extra:
        print(f"EXTRA {name}: not listed in the manifest")
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    unlisted = f"; {len(extra)} file{'s' * (len(extra) > 1)} the manifest does not list (EXTRA)" if extra else ""
    print(f"OK {args.cache_dir}: {manifest.mode} cache, {manifest.num_blocks} blocks in "
          f"{len(manifest.shards)} shards, checksums match{unlisted}")
    return 0


if __name__ == "__main__":
    run_main(main)
