"""What every benchmark shares: where the real data lies, the machine's name, a marked section of a
markdown file rewritten in place, and a benchmark scale read from `--scale-json`."""
from __future__ import annotations

import json
import os
import platform
from typing import Any, TypeVar

from common.cli import UserError
from common.fsutil import write_text_atomic
from tiny_world.models import ModelShape

ScaleT = TypeVar("ScaleT")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))  # the real data, next to the repository
DEFAULT_DATA_DIR = os.path.join(SHARED, "wikitext-2-raw-v1")
DEFAULT_TOKENIZER = os.path.join(SHARED, "qwen2-tokenizer")
DATA = {"data.dataset": "wikitext", "data.subset": "wikitext-2-raw-v1", "data.split": "validation"}  # as overrides


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def replace_section(path: str, block: str, begin: str, end: str, heading: str) -> None:
    """Replace what stands between the markers `begin` and `end` in `path` with `block` (a section under
    `heading` is appended where the file has no such markers); the rest of the file is kept."""
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + "\n" + block + text[text.index(end):]
    else:
        text += f"\n## {heading}\n\n{begin}\n{block}{end}\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)


def scale_from_json(cls: type[ScaleT], text: str) -> ScaleT:
    """A benchmark scale from a JSON object of field overrides, model shapes (`teacher`, `student`) as
    objects: for tests smaller than `--quick`, and for bench/gpu_check.py's real shapes."""
    try:
        fields: dict[str, Any] = json.loads(text)
        for role in ("teacher", "student"):
            if isinstance(fields.get(role), dict):
                fields[role] = ModelShape(**fields[role])
        return cls(**fields)
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise UserError(f"--scale-json: {err}") from None
