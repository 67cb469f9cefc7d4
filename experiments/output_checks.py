"""Outputs never replace inputs, nor another tool's files: the start-up rules every entry point that writes applies
to its output paths, and the cleaning of partial outputs left by runs that were killed.

  - an output path that resolves (symlinks followed) to one of the command's inputs, or to a directory holding one,
    is refused, with or without --overwrite;
  - a directory an entry point writes into (a workdir, an export, a task) must be new, empty or its own kind: one
    holding another tool's files is refused, as build_index refuses to write an index into a directory without one
    (index_writer.refuse_foreign_directory);
  - `.NAME.partial-PID` (and an overwrite's `.NAME.old-PID`) beside an output are a run's work in progress: SIGTERM
    removes the process's own (experiments.cli), and a later run those of processes no longer alive (kill -9 and
    power loss leave them), no others. (Whether a process is alive is judged on this host: on a filesystem shared
    by several hosts, write each output from one host at a time.)

This module imports nothing heavy: the checks run before jax or a model loads.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Iterable

from experiments.errors import UsageError
from rag_jax import files  # the partial names (files.partial_path); a module with no heavy imports

# What a training workdir holds (rag_jax/runs/workdir.py names each path; tests/test_cli_hostile_outputs.py
# checks that this list keeps up with it).
WORKDIR_ENTRIES = ("checkpoints", "checkpoints_skipped", "index", "index_versions", "question_encoder_tokenizer",
                   "generator_tokenizer", "metrics.jsonl", "tensorboard", "export")
# What knowledge_demo writes into its --workdir.
KNOWLEDGE_DEMO_ENTRIES = ("task", "run", "swapped_index", "knowledge_demo.json")


def _same_or_inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def refuse_input_as_output(output: str, flag: str, inputs: dict[str, str | None], *, overwrite: bool = False
                           ) -> None:
    """Refuses `output` (given as `flag`) when it resolves to one of `inputs` ({flag: path}) or to a directory that
    holds one: writing it, or replacing it with --overwrite, would destroy what the command reads. With `overwrite`,
    an existing output inside an input directory is refused too (a new one there is fine: predictions beside the
    model they came from)."""
    target = os.path.realpath(output)
    for input_flag, path in inputs.items():
        if path is None or not os.path.exists(path):
            continue
        source = os.path.realpath(path)
        if _same_or_inside(source, target):
            what = "is" if source == target else "holds"
            raise UsageError(f"{flag}={output} {what} the command's input {input_flag}={path}; an output never "
                             "replaces an input (with or without --overwrite): give another path")
        if overwrite and os.path.lexists(output) and _same_or_inside(target, source):
            raise UsageError(f"{flag}={output} is part of the command's input {input_flag}={path}; --overwrite never "
                             "replaces part of an input: give a path outside it")


def refuse_foreign_directory(path: str, flag: str, own_entries: Iterable[str], what: str) -> None:
    """Refuses an existing non-empty directory `path` none of whose entries is one of `own_entries` (hidden ones
    aside): another tool's, or someone's, files that writing `what` there would mix with or replace."""
    if not os.path.isdir(path):
        return
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    if names and not set(names) & set(own_entries):
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise UsageError(f"{flag}={path} is not empty and holds no {what} (it holds {shown}); give a new or "
                         "empty directory")


def refuse_foreign_workdir(workdir: str, flag: str) -> None:
    """A training run's --workdir: new, empty, or a run's (to resume it)."""
    refuse_foreign_directory(workdir, flag, WORKDIR_ENTRIES, "training run (no checkpoints/, index/, metrics.jsonl)")


# ---------------------------------------------------------------------------------------------------- partials


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_partials(output: str, pids: list[int] | None = None) -> list[str]:
    """Removes the partial copies of `output` (`.NAME.partial-PID` beside it) written by processes `pids`, or by
    any process no longer alive when `pids` is None (kill -9 and power loss leave them). An overwrite's
    `.NAME.old-PID` (the previous output, moved aside for a moment) goes back to NAME when NAME is missing (the
    process died between its two renames), and is removed otherwise. Those of live processes (a run writing now)
    are left alone, as is anything else. Returns what it removed or restored."""
    head, name = os.path.split(os.path.abspath(output))
    pattern = re.compile(rf"\.{re.escape(name)}\.({files.PARTIAL}|{files.MOVED_ASIDE})-(\d+)")
    done = []
    for entry in sorted(os.listdir(head)) if os.path.isdir(head) else []:
        match = pattern.fullmatch(entry)
        if not match:
            continue
        pid = int(match.group(2))
        if (pid not in pids) if pids is not None else (pid == os.getpid() or _pid_alive(pid)):
            continue
        stale = os.path.join(head, entry)
        if match.group(1) == "old" and not os.path.exists(output):
            os.rename(stale, output)
        elif os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.remove(stale)
        done.append(stale)
    return done
