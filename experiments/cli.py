"""What every entry point shares: flag parsing and distributed start-up, quiet logging, checks of output paths
(the outputs themselves appear whole or not at all: rag_jax.files), and bad input ending with one clear line on
stderr and exit status 1, not a traceback.

This module imports nothing heavy, and the entry points import the library inside `main`: a bad flag or config
field is refused in a fraction of a second, before jax, the models or an index load.
"""

from __future__ import annotations

import contextlib
import errno
import logging as py_logging
import os
import signal
import sys
from typing import Callable

from absl import flags, logging

from experiments import output_checks
from experiments.errors import UsageError  # noqa: F401 (cli.UsageError: what the entry points raise)


# Errors that describe the user's input (files, flags, config fields) or a run that cannot go on, each with a message
# that names the culprit and says what to do: (module, class names). They are looked up among the modules already
# loaded when an error arrives (a class whose module never loaded cannot have been raised), so that this list
# imports nothing.
_USER_ERRORS = (
    ("builtins", ("FileNotFoundError", "FileExistsError", "NotADirectoryError", "IsADirectoryError")),
    ("experiments.errors", ("UsageError",)),
    ("rag_jax.data.tokenizers", ("TokenizerError",)),
    ("rag_jax.models.hf_files", ("CheckpointError",)),
    ("rag_jax.retrieval.code_spec", ("CodesError",)),
    ("rag_jax.retrieval.contexts", ("SplitTokenizationError",)),
    ("rag_jax.retrieval.corpus", ("CorpusError",)),
    ("rag_jax.retrieval.index_io", ("IndexFormatError",)),
    ("rag_jax.retrieval.merge", ("SearchError",)),
    ("rag_jax.retrieval.training_data", ("DataError",)),
    ("rag_jax.runs.config_check", ("ConfigError",)),
    ("rag_jax.runs.checkpoint", ("CheckpointSaveError", "CheckpointRestoreError")),
    ("rag_jax.training.trainer", ("NonFiniteLossError",)),
)


# What the user can fix about a failed read or write of theirs: errno -> (operation, remedy). Other OS errors are
# bugs (a bad file descriptor, ...) and keep their traceback.
_OS_ERRORS = {
    errno.ENOSPC: ("writing", "free space there"),
    errno.EDQUOT: ("writing", "free space there (or raise the disk quota)"),
    errno.EFBIG: ("writing", "the file is larger than this process or filesystem allows (ulimit -f)"),
    errno.EROFS: ("writing", "the filesystem is read-only; give a writable path"),
    errno.EACCES: ("opening", "permission denied; fix the permissions or give another path"),
    errno.EPERM: ("opening", "operation not permitted; fix the permissions or give another path"),
}
_declared_outputs: list[str] = []  # what the running entry point writes, named when an OS error has no file name


def declare_outputs(*paths: str) -> None:
    """Names the files or directories this command writes: for an OS error that does not say which (a failed
    `write` on an open file carries no file name), and for SIGTERM, which removes their partial copies."""
    _declared_outputs.extend(paths)


def os_error_line(error: OSError) -> str | None:
    """One line for an OS error the user can fix (disk full, read-only, permissions): the path, the operation and
    the remedy; None for other OS errors."""
    if error.errno not in _OS_ERRORS:
        return None
    operation, remedy = _OS_ERRORS[error.errno]
    where = error.filename or ("into " + " or ".join(_declared_outputs) if _declared_outputs else "a file")
    return (f"{operation} {where} failed: {error.strerror or os.strerror(error.errno)} "
            f"({errno.errorcode[error.errno]}): {remedy}. What was written before is kept; rerun the same command "
            "once it is fixed")


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is one of the errors above (its message is meant for the user), not a bug."""
    if isinstance(error, OSError) and os_error_line(error) is not None:
        return True
    for module_name, names in _USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, name) for name in names)):
            return True
    return False


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a bad flag reported as one `error:` line (app.run(main, flags_parser=parse_flags))."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # A config file that raised while parsing (an unknown variant) comes with its traceback: keep its last line.
        message = str(e)
        if "Traceback (most recent call last)" in message:
            head = message.split("\n")[0].rstrip(": ")
            cause = [line for line in message.split("\n") if line.strip()][-1]
            message = f"{head}: {cause.split(': ', 1)[-1]}"
        sys.exit(f"error: {message} (see --helpshort)")


def unknown_config_field(error: Exception) -> str:
    """ml_collections reports an unknown --config.* field as a KeyError/AttributeError while flags are parsed."""
    detail = " ".join(str(error).encode().decode("unicode_escape").replace("'", "").split())
    given = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
    return f"error: unknown config field: {detail} (in {given})"


def define_distributed_flags() -> None:
    """--coordinator_address, --num_processes, --process_id: for entry points that run as several processes."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", lower_bound=0)
    flags.register_multi_flags_validator(
        ["num_processes", "process_id"],
        lambda f: f["process_id"] is None or f["num_processes"] is None or f["process_id"] < f["num_processes"],
        message="--process_id must be below --num_processes (processes are numbered from 0)")


def init_distributed() -> None:
    """Joins a multi-process JAX job: the one the flags describe, or on a multi-host TPU slice the one its
    environment describes; a single process otherwise. Call before the first computation."""
    import jax  # pylint: disable=g-import-not-at-top

    f = flags.FLAGS
    if f.coordinator_address or f.num_processes:
        # Cross-process collectives of the CPU backend (tests, laptops); accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                                   process_id=f.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice: peers from the environment
        jax.distributed.initialize()


def verbose() -> bool:
    """--verbosity=1 (or more): library INFO logs, and tracebacks for user errors too."""
    return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1


class _NoLibraryTracebacks(py_logging.Filter):
    """Drops the tracebacks that libraries log beside an exception they then raise (orbax logs a failed background
    save with its traceback, then raises it in the main thread, where it is reported as one line)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= py_logging.ERROR)


# Exit status of a command stopped by SIGTERM before it finished (the shell's 128 + signal number) ...
EXIT_TERMINATED = 128 + signal.SIGTERM
# ... and of a training run that saved its checkpoint on SIGTERM and stopped: sysexits.h EX_TEMPFAIL, "a temporary
# failure; the user is invited to retry". Not 0 (a scheduler would take the run as finished) nor 1 (a user error,
# not worth retrying) nor 143 (killed before its state was safe); docs/pods.md says how schedulers requeue on it.
EXIT_PREEMPTED = 75


def _terminate(signum, frame) -> None:
    """SIGTERM: removes this process's partial outputs (output_checks.remove_partials), says so, and exits at once.
    Exiting from the handler, rather than raising into the command, because a handler runs wherever the main
    thread is, a garbage-collection callback included, where an exception is printed and dropped."""
    del signum, frame
    for output in _declared_outputs:
        with contextlib.suppress(OSError):
            output_checks.remove_partials(output, [os.getpid()])
    _end_progress_bars()
    print("error: stopped by SIGTERM before finishing; its partial outputs were removed, earlier ones kept",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_TERMINATED)  # pylint: disable=protected-access


def _end_progress_bars() -> None:
    """Ends the progress bars an error interrupted, so that the error line starts a line of its own (a bar's last
    state ends with a carriage return, not a newline)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def run(main: Callable[[], None]) -> None:
    """Runs `main` with library INFO logging quieted (--verbosity brings it back) and user errors as one line."""
    # absl would print every library's INFO lines (jax probing for a TPU, orbax at every save).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not verbose():
        logging.get_absl_logger().addFilter(_NoLibraryTracebacks())
    try:
        main()
    except Exception as e:  # pylint: disable=broad-except
        if verbose() or not is_user_error(e):
            raise
        line = os_error_line(e) if isinstance(e, OSError) else None
        _end_progress_bars()
        print(f"error: {line or e}", file=sys.stderr)
        sys.exit(1)


def main_running(job: Callable[[], None]) -> Callable[[list[str]], None]:
    """The absl `main` of an entry point that takes flags only: refuses positional arguments (a forgotten `--` is
    not silently ignored), then runs `job` as `run` does."""

    def main(argv: list[str]) -> None:
        def checked_job() -> None:
            if len(argv) > 1:
                raise UsageError(f"unexpected arguments: {' '.join(argv[1:])} (this command takes --flags only)")
            job()

        # SIGTERM takes the job's partial outputs with it (a training loop inside it installs its own handler,
        # which saves a checkpoint instead, and puts this one back).
        signal.signal(signal.SIGTERM, _terminate)
        run(checked_job)

    return main


def run_training(config_flag, workdir_flag, workdir_prefix: str, check_config: Callable,
                 train_and_evaluate: Callable, check_inputs: Callable | None = None) -> None:
    """The `__main__` of a training entry point (train_nq, train_retriever): checks the config, the workdir (not
    another tool's directory) and `check_inputs(config)` before jax loads, starts the distributed runtime, then runs
    `train_and_evaluate(config, workdir)` (which imports its training loop itself, so that the loop loads after the
    checks); the workdir defaults to ./workdir/PREFIX_VARIANT. A run stopped by SIGTERM after saving its checkpoint
    exits with EXIT_PREEMPTED. An unknown config field named on the command line surfaces as KeyError/AttributeError
    while absl parses the flags: one error line then, a traceback only once the run began."""
    from absl import app  # pylint: disable=g-import-not-at-top

    from rag_jax.runs import config_check  # pylint: disable=g-import-not-at-top

    started = False

    def main(argv: list[str]) -> None:
        nonlocal started
        started = True
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")

        def train() -> None:
            config = config_flag.value
            workdir = workdir_flag.value or os.path.join("workdir", f"{workdir_prefix}_{config.variant}")
            check_config(config)  # every field, before jax and the models load
            config_check.check_workdir(workdir)
            output_checks.refuse_foreign_workdir(workdir, "--workdir")
            if check_inputs is not None:
                check_inputs(config)
            declare_outputs(os.path.abspath(workdir))
            import jax  # pylint: disable=g-import-not-at-top (after the config checks)

            init_distributed()
            if jax.process_index() == 0:
                print(f"workdir: {os.path.abspath(workdir)}", flush=True)
            last = train_and_evaluate(config, workdir) or {}
            if last.get("preempted"):  # its checkpoint is saved: a scheduler should rerun the same command
                sys.exit(EXIT_PREEMPTED)

        run(train)

    try:
        app.run(main, flags_parser=parse_flags)
    except (KeyError, AttributeError) as e:
        if started:  # a real error of the run, not of the command line
            raise
        sys.exit(unknown_config_field(e))


# ---------------------------------------------------------------------------------------------------- outputs


def check_new_output(path: str, flag: str, *, overwrite: bool, directory: bool = False) -> None:
    """Refuses an output path that would lose data or cannot be written, before any work: an existing file (or a
    non-empty directory) without `overwrite`, a file where a directory goes and the reverse, a file's missing
    parent (a directory's parents are made with it)."""
    kind = "directory" if directory else "file"
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            raise UsageError(f"{flag}={path} is {'a directory' if os.path.isdir(path) else 'a file'}; give a {kind} "
                             "path")
        if not overwrite and (not directory or os.listdir(path)):
            raise UsageError(f"{flag}={path} exists{' and is not empty' if directory else ''}; pass --overwrite to "
                             f"replace it (it is replaced only once the new one is complete), or give a new {kind}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        if directory:  # made with it
            return
        raise UsageError(f"{flag}={path}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag}={path}: the directory {parent} is not writable")
