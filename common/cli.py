"""Entry-point plumbing shared by every `python -m …` command.

A user mistake (bad config, missing file, incompatible cache) raises `UserError`; `run_main` turns it
into one line on stderr and exit status 2, never a traceback.

Under a launcher (torchrun, accelerate launch) every process runs `run_main`. One failure is reported
once: the first process to fail claims the report in the run's rendezvous store and prints its line; the
others, which meet the same error or only lose contact with the failed process, exit quietly with status 1.

A Ctrl-C or SIGTERM of a process run on its own ends it with one line too (`interrupted`, status 130;
`terminated (SIGTERM)`, status 143), raised as an exception so that what the run holds is released on the
way out; during an entry point's imports, before anything is held, it exits at once
(`stop_quietly_while_loading`). Under a launcher, the launcher stops its processes and reports.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Sequence

FAILURE_KEY = "offline-kd/first-failure"
# how a collective reports that another process of the run died or hung (gloo, NCCL, the store)
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
              "timeout")


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def error_line(err: BaseException) -> str:
    """The one way a library's error becomes part of our one-line message: an OS error as its reason (and
    file); anything else as its first line, blanks collapsed (HDF5 and the hub put newlines and timestamps
    into theirs); an error with no text as its type's name."""
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno) + (f" ({err.filename})" if err.filename else "")
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as a Ctrl-C raises KeyboardInterrupt."""


_STOPPED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}  # the line; status 128 + signal


def _launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return os.environ.get("WORLD_SIZE", "1") != "1"


def _stop_at_once(signum, frame) -> None:
    print(_STOPPED[signum], file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _terminate(signum, frame) -> None:
    raise Terminated()


def stop_quietly_while_loading() -> None:
    """For an entry point run as __main__, before its heavy imports (torch, transformers: seconds) while nothing
    is held yet: a Ctrl-C or SIGTERM meanwhile exits at once with the line `run_main` prints, not a traceback
    from the middle of an import. `run_main` replaces these handlers. A signal ignored by the parent stays so."""
    if _launched():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop_at_once)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_at_once)


def _raise_on_signals() -> None:
    """From here on a Ctrl-C raises KeyboardInterrupt and a SIGTERM Terminated (one process, main thread)."""
    if _launched() or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is _stop_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _stop_at_once):
        signal.signal(signal.SIGTERM, _terminate)


def _distributed():
    """torch.distributed if this process belongs to an initialized process group (imported only if already in use)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def first_to_report() -> bool:
    """Whether this process reports the failure it met: always with one process; under a launcher, only the
    first process to fail (before the processes connect, rank 0 speaks for all: they meet the same error)."""
    dist = _distributed()
    if dist is None:
        return os.environ.get("RANK", "0") == "0"
    rank = str(dist.get_rank())
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store().compare_set(FAILURE_KEY, "", rank).decode() == rank
    except Exception:  # the store is gone with the launcher: speak rather than stay silent
        return True


def _fresh_line() -> str:
    """A newline where another process (the main one, rank 0) may have left a progress bar mid-line."""
    dist = _distributed()
    return "\n" if dist is not None and dist.get_rank() != 0 else ""


def _lost_peer(err: BaseException) -> bool:
    dist = _distributed()
    return dist is not None and (isinstance(err, dist.DistError) or
                                 (isinstance(err, RuntimeError) and any(s in str(err) for s in _LOST_PEER)))


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _raise_on_signals()
    try:
        status = main(argv) or 0
    except UserError as err:
        if first_to_report():
            print(f"{_fresh_line()}error: {err}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print(_STOPPED[signal.SIGINT], file=sys.stderr)
        status = 128 + signal.SIGINT
    except Terminated:
        print(_STOPPED[signal.SIGTERM], file=sys.stderr)
        status = 128 + signal.SIGTERM
    except Exception as err:
        if _distributed() is None:
            raise
        if not first_to_report():
            status = 1  # another process failed first and said why; this one only lost contact with it
        elif _lost_peer(err):
            print(f"{_fresh_line()}error: lost contact with another process of this run (killed, out of memory, "
                  f"or hung past the collective timeout): {error_line(err)}", file=sys.stderr)
            status = 1
        else:
            raise
    sys.stdout.flush()
    sys.exit(status)
