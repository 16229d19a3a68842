"""Stage two's output directory: the run record, checkpoints, the final model, and what counts as finished.

    run.json                 the run record: written when the run starts ("finished": false) and rewritten with
                             "finished": true only after every file of the final model is in place
    metrics.jsonl            one line per optimizer step
    checkpoints/step-N/      accelerate's `save_state` (student weights, optimizer, grad scaler, the RNG states of
                             every process, the LR scheduler registered with it) + trainer_state.json (step, data
                             position, the settings that determine the result, every file's size) + the metrics
                             so far; written as step-N.tmp and renamed when complete
    model.tmp/               the final model being saved; its files then move up and run.json lists them
    config.json, model.safetensors, tokenizer files …   the final model (`from_pretrained(output_dir)`)

Only these names, and the files run.json lists, are ever deleted, at any depth: inside a checkpoint the
files its trainer_state.json lists (one still being written: accelerate's and our names), inside model.tmp
save_pretrained's names. A directory holding anything else is refused, naming it.
`check_finished_model` is what evaluation asks of a directory before loading it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable

from cache.lock import close_lock_descriptor, take_flock
from common.cli import UserError, error_line
from common.config import first_difference
from common.fsutil import publish_directory, refuse_foreign, write_json_atomic

RUN_RECORD = "run.json"
RUN_FORMAT = "offline-kd-run"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_STAGING = "model.tmp"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FORMAT = "offline-kd-checkpoint"
OWN_NAMES = frozenset({RUN_RECORD, f"{RUN_RECORD}.tmp", METRICS, f"{METRICS}.tmp", CHECKPOINTS, MODEL_STAGING})
_STEP_DIR = re.compile(r"step-(\d+)(\.tmp|\.old-\d+)?")  # complete, being written, being replaced


def read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read {what}: {error_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


_SAVED_MODEL_FILE = re.compile(r"config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|"
                               r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|"
                               r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|vocab\.json|"
                               r"merges\.txt")
# what accelerate's save_state and seal_checkpoint write into a checkpoint that has no trainer state listing
# its files yet (being written); FSDP's sharded state is a directory of .distcp files
_CHECKPOINT_FILE = re.compile(r"(model|pytorch_model|optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\."
                              r"(bin|safetensors)|random_states_\d+\.pkl|scaler\.pt|custom_checkpoint_\d+\.pkl|"
                              r"(pytorch_model_fsdp|optimizer)_\d+/(__\d+_\d+\.distcp|\.metadata)|"
                              r"trainer_state\.json(\.tmp)?|metrics\.jsonl")


def read_run_record(directory: str) -> dict[str, Any] | None:
    """run.json if it is one of ours; None if absent or foreign (a foreign run.json is reported by name)."""
    path = os.path.join(directory, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        record = read_json(path, "the run record")
    except UserError:
        return None
    return record if record.get("format") == RUN_FORMAT else None


@dataclass(frozen=True)
class Checkpoint:
    path: str
    step: int
    state: dict[str, Any]  # trainer_state.json

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def complete_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, path) of every complete (renamed) checkpoint, oldest first."""
    root = os.path.join(out, CHECKPOINTS)
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = _STEP_DIR.fullmatch(name)
        if match and not match.group(2):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def newest_checkpoint(out: str) -> Checkpoint | None:
    found = complete_checkpoints(out)
    if not found:
        return None
    step, path = found[-1]
    state = read_json(os.path.join(path, TRAINER_STATE), "the checkpoint's trainer state")
    if state.get("format") != CHECKPOINT_FORMAT or state.get("step") != step:
        raise UserError(f"{path}: not a checkpoint of this release (its {TRAINER_STATE} does not match); "
                        f"move it away or pass train.overwrite=true")
    return Checkpoint(path, step, state)


def foreign_entries(out: str, record: dict[str, Any] | None) -> list[str]:
    """Paths in `out`, at any depth, that this tool did not write (and so must never delete)."""
    listed = set(record.get("files", [])) if record else set()
    names = set(os.listdir(out))
    foreign = [name for name in names if name not in OWN_NAMES and name not in listed]
    if RUN_RECORD in names and record is None:
        foreign.append(f"{RUN_RECORD} (not a stage-two run record of this release)")
    root = os.path.join(out, CHECKPOINTS)
    if os.path.isdir(root) and not os.path.islink(root):
        for name in os.listdir(root):
            if _STEP_DIR.fullmatch(name) and _is_directory(path := os.path.join(root, name)):
                foreign += _unknown_files(path, f"{CHECKPOINTS}/{name}", _checkpoint_owns(path))
            else:
                foreign.append(f"{CHECKPOINTS}/{name}")
    elif os.path.lexists(root):
        foreign.append(CHECKPOINTS)
    staging = os.path.join(out, MODEL_STAGING)
    if _is_directory(staging):
        foreign += _unknown_files(staging, MODEL_STAGING, _SAVED_MODEL_FILE.fullmatch)
    elif os.path.lexists(staging):
        foreign.append(MODEL_STAGING)
    return sorted(foreign)


def _is_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _checkpoint_owns(checkpoint: str) -> Callable[[str], bool]:
    """Which paths in a checkpoint directory are ours: those its trainer state lists (and that file); in one
    still being written (no trainer state of ours yet), the names save_state and we write."""
    try:
        state = read_json(os.path.join(checkpoint, TRAINER_STATE), "the checkpoint's trainer state")
    except UserError:
        state = {}
    if state.get("format") == CHECKPOINT_FORMAT and isinstance(state.get("files"), dict):
        return (set(state["files"]) | {TRAINER_STATE}).__contains__
    return lambda path: _CHECKPOINT_FILE.fullmatch(path) is not None


def _unknown_files(directory: str, shown: str, ours: Callable[[str], Any]) -> list[str]:
    """Everything under `directory` (named `shown/…`) whose path relative to it `ours` does not accept: files,
    links, and directories holding none of ours (named once, not their contents)."""
    unknown = []
    for folder, subfolders, files in os.walk(directory):
        prefix = os.path.relpath(folder, directory) + "/" if folder != directory else ""
        unknown += [f"{shown}/{prefix}{name}" for name in files if not ours(prefix + name)]
        for name in list(subfolders):
            path = os.path.join(folder, name)
            inside = [os.path.relpath(os.path.join(f, n), directory) for f, _, names in os.walk(path) for n in names]
            if os.path.islink(path) or not any(ours(file) for file in inside):
                unknown.append(f"{shown}/{prefix}{name}")
                subfolders.remove(name)  # named once, as a whole
    return unknown


class DirectoryLock:
    """An exclusive flock on the output directory itself (no lock file is added to it): one run per directory.
    Held by this process alone: a forked child (a DataLoader worker) closes its copy (cache.lock)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        take_flock(self.fd, True, f"train.output_dir {path} is in use by another stage-two run; wait for it to "
                                  "finish or choose another directory", f"train.output_dir {path}")

    def release(self) -> None:
        if self.fd >= 0:
            close_lock_descriptor(self.fd)
            self.fd = -1


def plan_start(out: str, settings: dict[str, Any], resume: str, overwrite: bool) -> Checkpoint | None:
    """The checkpoint to resume from, or None to start afresh (after `clear_run`); refuses, in one line, a
    directory with files that are not ours, a checkpoint made with other settings, or an earlier run that
    only train.overwrite=true may replace."""
    if not os.listdir(out):
        return None
    record = read_run_record(out)
    refuse_foreign(f"train.output_dir {out}", foreign_entries(out, record))
    finished = bool(record and record.get("finished"))
    checkpoint = None if finished else newest_checkpoint(out)
    fresh_hint = "or pass train.overwrite=true to delete that run and start afresh"
    if resume == "auto" and checkpoint is not None:
        difference = first_difference(checkpoint.state.get("settings", {}), settings)
        if difference is None:
            return checkpoint
        if not overwrite:
            key, was, now = difference
            raise UserError(f"train.output_dir {out} holds checkpoint {checkpoint.name} of a run made with "
                            f"{key}={was}, this run has {key}={now}: rerun with the same settings to resume it, "
                            f"{fresh_hint}")
    elif (resume == "auto" and record is not None and not finished
          and first_difference(record.get("settings", {}), settings) is None):
        return None  # this run was stopped before its first checkpoint: it simply starts again
    if overwrite:
        return None
    if finished:
        raise UserError(f"train.output_dir {out} holds a finished run ({record.get('steps')} steps); pass "
                        f"train.overwrite=true to replace it, or choose another directory")
    if resume == "never":
        raise UserError(f"train.output_dir {out} holds an earlier run and train.resume=never: pass "
                        f"train.overwrite=true to delete it and start afresh")
    raise UserError(f"train.output_dir {out} holds an unfinished run made with other settings and no checkpoint "
                    f"to resume; {fresh_hint}")


def clear_run(out: str) -> None:
    """Delete an earlier run's files (ours only: `plan_start` refused anything else). The record is first
    marked unfinished, so a kill halfway leaves a directory that nobody takes for a complete model."""
    record = read_run_record(out)
    if record is not None:
        write_json_atomic(os.path.join(out, RUN_RECORD), {**record, "finished": False})
        for name in record.get("files", []):
            if os.path.lexists(path := os.path.join(out, name)):
                os.remove(path)
    for name in (CHECKPOINTS, MODEL_STAGING):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in (METRICS, f"{METRICS}.tmp", f"{RUN_RECORD}.tmp", RUN_RECORD):
        if os.path.lexists(path := os.path.join(out, name)):
            os.remove(path)


def remove_partial(out: str) -> None:
    """Drop what a killed run left half-written: checkpoints being saved, the final model being staged."""
    root = os.path.join(out, CHECKPOINTS)
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = _STEP_DIR.fullmatch(name)
        if match and match.group(2):
            shutil.rmtree(os.path.join(root, name))
    shutil.rmtree(os.path.join(out, MODEL_STAGING), ignore_errors=True)


def last_checkpoint_note(out: str) -> str:
    """What a stopped run leaves to resume from, in words."""
    found = complete_checkpoints(out)
    if not found:
        return "no checkpoint was completed yet"
    return f"the last complete checkpoint {os.path.join(out, CHECKPOINTS, os.path.basename(found[-1][1]))} is intact"


PROBE_BYTES = 1 << 20


def os_reason(directory: str) -> str | None:
    """Why writing in `directory` fails, as the OS says it (`No space left on device`, `File too large`), found
    by writing and syncing a probe file of PROBE_BYTES there; None if that succeeds."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return None  # `directory` went meanwhile (another process removed what failed)
    except OSError as err:
        return error_line(err)
    finally:
        if os.path.lexists(probe):
            os.remove(probe)
    return None


def write_failure(what: str, path: str, err: BaseException, out: str) -> UserError:
    """One line for a write that failed (disk full, file size limit, permissions), naming what is still intact.
    torch's own file writer does not say why (`[enforce fail at inline_container.cc:…] unexpected pos …`): then
    the OS is asked, by a probe written into `path` (a directory, to be removed with what failed)."""
    detail = error_line(err)
    if not isinstance(err, OSError) and os.path.isdir(path):
        detail = os_reason(path) or detail
    return UserError(f"cannot write {what} {path}: {detail}; {last_checkpoint_note(out)} (free space and rerun "
                     f"the same command to resume)")


def checkpoint_files(path: str) -> dict[str, int]:
    """Every file under `path` (FSDP's sharded state is a directory of them) → its size."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(files.items()))


def seal_checkpoint(tmp: str, final: str, state: dict[str, Any], metrics_path: str) -> None:
    """Complete a checkpoint written into `tmp` (by every process): add the metrics so far and the trainer
    state (with every file's size, checked on resume), flush it all to disk, and rename it to `final`."""
    shutil.copyfile(metrics_path, os.path.join(tmp, METRICS))
    files = checkpoint_files(tmp)
    write_json_atomic(os.path.join(tmp, TRAINER_STATE), {"format": CHECKPOINT_FORMAT, **state, "files": files})
    for name in files:  # on disk before the rename that makes the checkpoint count
        with open(os.path.join(tmp, name), "rb") as fh:
            os.fsync(fh.fileno())
    publish_directory(tmp, final)


def prune_checkpoints(out: str, keep: int) -> None:
    for _, path in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(path)


def check_checkpoint_files(checkpoint: Checkpoint) -> None:
    """Every file the checkpoint was sealed with, at its size (accelerate skips a missing RNG state silently)."""
    for name, size in checkpoint.state.get("files", {}).items():
        path = os.path.join(checkpoint.path, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise UserError(f"checkpoint {checkpoint.path} is damaged: {name} is missing or not its recorded "
                            f"size; delete that checkpoint to resume from an older one, or pass train.overwrite=true")


def publish_model(out: str, staging: str, record: dict[str, Any]) -> None:
    """Move the final model's files from `staging` into `out`, then mark the run finished: until run.json says
    so, evaluation refuses the directory."""
    files = sorted(os.listdir(staging))
    write_json_atomic(os.path.join(out, RUN_RECORD), {**record, "finished": False, "files": files})
    for name in files:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    write_json_atomic(os.path.join(out, RUN_RECORD), {**record, "finished": True, "files": files})


def check_finished_model(model_dir: str) -> None:
    """Refuse, in one line, a stage-two run directory that holds no complete final model (an unfinished run,
    or checkpoints without a model). Any other directory (a hub download, the teacher) passes."""
    if not os.path.isdir(model_dir):
        return
    record = read_run_record(model_dir)
    if record is not None:
        if not record.get("finished"):
            raise UserError(f"{model_dir} is an unfinished stage-two run (run.json says it is not finished), not a "
                            f"model; rerun the same stage-two command to resume and finish it")
        missing = [name for name in record.get("files", []) if not os.path.isfile(os.path.join(model_dir, name))]
        if missing:
            raise UserError(f"{model_dir}: the final model is incomplete: {missing[0]} is missing")
    elif os.path.isdir(os.path.join(model_dir, CHECKPOINTS)):
        raise UserError(f"{model_dir} holds stage-two checkpoints but no finished model (no run.json of a "
                        f"finished run); rerun the same stage-two command to finish it")
