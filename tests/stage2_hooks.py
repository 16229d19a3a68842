"""`python -m tests.stage2_hooks HOOK … -- [train args]`: stage two's real entry point with test hooks, to
reproduce failures at a chosen moment (also under torchrun: `torchrun … -m tests.stage2_hooks …`).

  kill-after-step=N            SIGKILL this process once step N is logged (and checkpointed if due)
  pause-after-step=N:PATH      after step N, create PATH.ready and wait until PATH exists
  file-size-limit-at-save=B    from the final save on, files are limited to B bytes (RLIMIT_FSIZE, SIGXFSZ
                               ignored, so a write fails with EFBIG as on a full disk)
  file-size-limit-at-checkpoint=B   the same from the first checkpoint on
  fail-at-step=N:RANK          process RANK raises a UserError as step N starts
"""
from __future__ import annotations

import os
import resource
import signal
import sys
import time

from common.cli import UserError, run_main
from stage2_student import train


def install(hook: str) -> None:
    name, _, value = hook.partition("=")
    recipe = train.DistillRecipe
    if name in ("kill-after-step", "pause-after-step"):
        step_text, _, path = value.partition(":")
        end_step = recipe.end_step

        def after_step(self, record, epoch, position):
            end_step(self, record, epoch, position)
            if self.step != int(step_text):
                return
            if name == "kill-after-step":
                os.kill(os.getpid(), signal.SIGKILL)
            open(f"{path}.ready", "w").close()
            while not os.path.exists(path):
                time.sleep(0.05)

        recipe.end_step = after_step
    elif name in ("file-size-limit-at-save", "file-size-limit-at-checkpoint"):
        method = "save" if name == "file-size-limit-at-save" else "save_checkpoint"
        save = getattr(recipe, method)

        def limited_save(self, *args):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(value), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return save(self, *args)

        setattr(recipe, method, limited_save)
    elif name == "fail-at-step":
        step_text, _, rank = value.partition(":")
        optimizer_step = recipe.optimizer_step

        def failing_step(self, epoch, group):
            if self.step + 1 == int(step_text) and self.accelerator.process_index == int(rank):
                raise UserError(f"test hook: process {rank} fails at step {step_text}")
            return optimizer_step(self, epoch, group)

        recipe.optimizer_step = failing_step
    else:
        raise SystemExit(f"unknown hook {hook}")


if __name__ == "__main__":
    split = sys.argv.index("--")
    for hook in sys.argv[1:split]:
        install(hook)
    run_main(train.main, sys.argv[split + 1:])
