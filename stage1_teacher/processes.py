"""The processes of one dump: one, or N started by `torchrun` / `accelerate launch` (which set RANK,
WORLD_SIZE and LOCAL_RANK).

The processes exchange nothing but small status objects, at a few points (after the staging directory is
prepared, after each round of N shards, at the end), through one collective, `sync`: an all-gather over
torch.distributed's gloo backend, whatever the teacher's device (no tensor ever crosses processes, so NCCL
would add nothing). A process that fails reports its error at its next `sync` and every process stops there
with the same status; the lowest failing rank prints the one line. Every collective has a timeout
(`teacher.sync_timeout`), so no process waits forever for one that hangs or died.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, NoReturn

from common.cli import UserError, error_line


@dataclass
class Failure:
    """What a failed process reports: its rank, the one line, the exit status."""
    rank: int
    message: str
    status: int


class Stopped(Exception):
    """Raised by `sync` in every process when one of them failed."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class LostContact(Exception):
    """The collective itself failed: another process died, or did not arrive within the timeout."""


class Processes:
    """This process's place among the dump's processes, and the one collective between them."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, timeout_s: float) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        except (ValueError, RuntimeError) as err:
            raise UserError(f"cannot start the {self.world} processes' group: {error_line(err)}") from None
        self._group = True

    def sync(self, payload: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every process's `payload`, in rank order, once all have arrived; raises `Stopped` if any failed."""
        statuses = self._gather({"failure": None, **(payload or {})})
        failures = [s["failure"] for s in statuses if s["failure"] is not None]
        if failures:
            raise Stopped(min(failures, key=lambda f: f.rank))
        return statuses

    def report(self, failure: Failure) -> NoReturn:
        """Tell the others (at their next `sync`) that this process failed; raises `Stopped` with the failure
        of the lowest failing rank (this one, or another that failed at the same time)."""
        self.sync({"failure": failure})
        raise AssertionError("sync returned although this process failed")

    def _gather(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if self.world == 1:
            return [payload]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, payload)
        except RuntimeError as err:
            raise LostContact(error_line(err)[:300]) from None
        return out

    def stop(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False
