"""What every entry point shares: distributed start-up, quiet logging, and bad input ending with one clear line on
stderr and exit status 1, not a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags, logging

from rag_jax.models.hf_files import CheckpointError
from rag_jax.retrieval.corpus import CorpusError
from rag_jax.retrieval.index_io import IndexFormatError
from rag_jax.retrieval.merge import SearchError
from rag_jax.training.build import ConfigError
from rag_jax.training.loop import NonFiniteLossError


class UsageError(ValueError):
    """A flag combination or input file that the entry point itself rejects."""


# Errors that describe the user's input (files, flags, config fields) or a run that cannot go on, each with a message
# that names the culprit and says what to do.
USER_ERRORS = (CheckpointError, CorpusError, IndexFormatError, SearchError, ConfigError, NonFiniteLossError,
               UsageError, FileNotFoundError, FileExistsError)


def define_distributed_flags() -> None:
    """--coordinator_address, --num_processes, --process_id: for entry points that run as several processes."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


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


def run(main: Callable[[], None]) -> None:
    """Runs `main` with library INFO logging quieted (--verbosity brings it back) and user errors as one line."""
    # absl would print every library's INFO lines (jax probing for a TPU, orbax at every save).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
