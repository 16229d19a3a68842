"""Entry-point plumbing shared by every `python -m …` command.

A user mistake (bad config, missing file, incompatible cache) raises `UserError`; `run_main` turns it
into one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    sys.stdout.flush()
    sys.exit(status)
