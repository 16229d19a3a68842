"""`python -m tests.stage1_hooks ACTION@EVENT [dump args]`: stage one's real entry point with a test hook, to
reproduce failures at a chosen moment (also under a launcher: `torchrun … -m tests.stage1_hooks …`).

ACTION: `exit` (this process ends at once with status 137, as if killed), `fail` (raises a RuntimeError) or
`hang` (sleeps an hour). EVENT:

  shard-N    shard N is complete: its file and record are written (in the writer thread)
  rank-R     process R begins its first shard
  publish    the manifest is written, the swap into cache.dir is next (the main process)
"""
from __future__ import annotations

import os
import sys
import time

from cache.writer import ShardWriter, StagingDir
from common.cli import run_main
from stage1_teacher import dump


def act(action: str, event: str) -> None:
    if action == "exit":
        os._exit(137)
    if action == "fail":
        raise RuntimeError(f"test hook: failing at {event}")
    time.sleep(3600)


def install(hook: str) -> None:
    action, _, event = hook.partition("@")
    if action not in ("exit", "fail", "hang"):
        raise SystemExit(f"unknown action in {hook}")
    where, _, number = event.partition("-")
    if where == "shard":
        close = ShardWriter._close

        def closing(self, shard):
            close(self, shard)
            if shard.spec.index == int(number):
                act(action, event)

        ShardWriter._close = closing
    elif where == "rank":
        compute = dump.TeacherDump.compute

        def computing(self, spec, blocks):
            if self.computed_blocks == 0 and self.procs.rank == int(number):
                act(action, event)
            return compute(self, spec, blocks)

        dump.TeacherDump.compute = computing
    elif event == "publish":
        publish = StagingDir.publish

        def publishing(self, overwrite):
            act(action, event)
            return publish(self, overwrite)

        StagingDir.publish = publishing
    else:
        raise SystemExit(f"unknown event in {hook}")


if __name__ == "__main__":
    install(sys.argv[1])
    run_main(dump.main, sys.argv[2:])
