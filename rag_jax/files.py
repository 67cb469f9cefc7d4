"""Files and directories that appear whole or not at all.

Everything rag_jax writes that another process may read while it is written (index shards and index.json, which
several hosts of one build write side by side; the passage store; the context token table; exports; the outputs of
the entry points) is written under a temporary name beside its destination and renamed into place, so a reader
finds the old content or the new one, never half of it, and a writer that fails leaves no partial file behind.
A writer killed outright (SIGKILL) may leave its temporary file: PATH.<random>.tmp for the library's own files
(`temporary_path`; index shards written by several hosts at once), and `.NAME.partial-PID` (with an overwritten
directory's `.NAME.old-PID`) beside an entry point's output (`output`, `new_directory`), whose PID tells a later run
whether the writer is still alive (experiments/output_checks.remove_partials cleans those of dead processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import IO, Any, Iterator

import numpy as np


def temporary_path(path: str) -> str:
    """PATH.<random>.tmp: unique per writer, because hosts sharing a filesystem may write the same file (same
    content) at the same time, and each must rename its own whole copy into place, never one another's half-written
    one."""
    return f"{path}.{uuid.uuid4().hex[:12]}.tmp"


def partial_path(path: str) -> str:
    """DIR/.NAME.partial-PID: where this process writes the output `path` before renaming it into place."""
    head, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    return os.path.join(head, f".{name}.{PARTIAL}-{os.getpid()}")


def moved_aside_path(path: str) -> str:
    """DIR/.NAME.old-PID: where an overwritten output directory waits while its replacement is renamed in."""
    head, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    return os.path.join(head, f".{name}.{MOVED_ASIDE}-{os.getpid()}")


PARTIAL, MOVED_ASIDE = "partial", "old"


@contextlib.contextmanager
def replaced_when_done(path: str, tmp: str | None = None) -> Iterator[str]:
    """A temporary path (`tmp`, default temporary_path(path)) to write `path`'s new content to; renamed to `path`
    (replacing any file there) when the `with` block completes, removed when it fails."""
    tmp = tmp or temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save, atomically."""
    with replaced_when_done(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_json(path: str, obj: Any) -> None:
    """JSON (indented, keys sorted), atomically."""
    with replaced_when_done(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


@contextlib.contextmanager
def output(path: str, binary: bool = False) -> Iterator[IO]:
    """A text (or `binary`) file, flushed to disk, that appears at `path` (replacing any file there) only when the
    `with` block completes; a failure leaves `path` as it was."""
    with replaced_when_done(path, partial_path(path)) as tmp:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def new_directory(directory: str) -> Iterator[str]:
    """A temporary directory beside `directory` to fill; when the `with` block completes it takes `directory`'s
    place (an old one there is moved aside first, then deleted), and when it fails it is deleted and `directory` is
    left as it was."""
    partial, old = partial_path(directory), moved_aside_path(directory)
    os.makedirs(partial)
    try:
        yield partial
        if os.path.exists(directory):
            os.rename(directory, old)
            os.rename(partial, directory)
            shutil.rmtree(old)
        else:
            os.rename(partial, directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
