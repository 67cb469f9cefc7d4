"""Runs an entry point as `python -m` does, with an operating-system fault injected, for the hostile tables
(tests/test_cli_hostile*.py): the disks and filesystems a test cannot make (tests run as root, whom chmod does not
stop; no tmpfs can be mounted) fail as the real ones do.

  python -m tests.faults FAULT MODULE [ARGS...]

FAULT is KIND:SUBSTRING, for every path containing SUBSTRING:
  enospc   a file opened for writing fails at its first write with ENOSPC, as a full disk does (the error carries no
           file name, as a failed write(2) on an open file does not)
  erofs    opening a file for writing or making a directory fails with EROFS naming the path, as a read-only mount
  enospc-checkpoint   (SUBSTRING: a step) orbax's background write of that checkpoint fails with ENOSPC
"""

import builtins
import errno
import io
import os
import runpy
import sys


class _FullDisk:
    """A file whose writes fail with ENOSPC (the file itself was opened, and is closed as usual)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        del data
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _inject(kind: str, where: str) -> None:
    real_open, real_mkdir = builtins.open, os.mkdir

    def matches(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and where in os.fsdecode(path)

    if kind == "enospc":
        def full_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _FullDisk(f) if matches(file) and _writing(mode) else f

        builtins.open = io.open = full_open
    elif kind == "erofs":
        def read_only(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

        def ro_open(file, mode="r", *args, **kwargs):
            if matches(file) and _writing(mode):
                read_only(file)
            return real_open(file, mode, *args, **kwargs)

        def ro_mkdir(path, *args, **kwargs):
            if matches(path):
                read_only(path)
            return real_mkdir(path, *args, **kwargs)

        builtins.open = io.open = ro_open
        os.mkdir = ro_mkdir
    elif kind == "enospc-checkpoint":
        import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

        original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

        async def disk_full(self, x, directory):
            if f"{os.sep}checkpoints{os.sep}{where}" in str(directory):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
            return await original(self, x, directory)

        ocp.JsonCheckpointHandler._save_fn = disk_full  # pylint: disable=protected-access
    else:
        raise SystemExit(f"unknown fault {kind!r}")


if __name__ == "__main__":
    fault, module, *args = sys.argv[1:]
    _inject(*fault.split(":", 1))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
