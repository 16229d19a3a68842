"""Publishing files and directories so that a reader sees the old version or the whole new one, never a part.

Both helpers rely on `os.replace`/`os.rename` being atomic within one file system, so the temporary
file or directory must live next to its final path (a sibling), not in the system's temp directory.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Sequence

from common.cli import UserError


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through `<path>.tmp`, flushed to disk before the rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON to `path`, atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def publish_directory(staging: str, final: str) -> None:
    """Rename the finished directory `staging` to `final`, replacing whatever `final` was.

    `staging` must be complete (its own "done" marker written) and on the same file system as `final`.
    A directory already at `final` is renamed aside to `<final>.old-<pid>` first (digits appended while that
    name is taken: whatever is there is not ours to replace) and removed only after the swap, so at every
    moment `final` is the old directory, the new one, or (between the two renames) absent: never a mix. Only
    that directory, moved aside by this call, is removed. The caller decides whether `final` may be replaced;
    this function does not ask.
    """
    final = final.rstrip(os.sep)  # "cache/x/" must be moved aside as "cache/x.old-…", not inside itself
    if not os.path.lexists(final):
        os.replace(staging, final)
        return
    old = f"{final}.old-{os.getpid()}"
    while os.path.lexists(old):
        old += "0"
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)  # the swap is done: a failure leaves only wasted space, not a wrong `final`


def refuse_foreign(place: str, names: Sequence[str]) -> None:
    """The one refusal of a directory that holds files this tool did not write: they are never deleted."""
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise UserError(f"{place} holds files this tool did not write ({shown}); nothing was deleted: move them "
                        "away or choose another directory")
