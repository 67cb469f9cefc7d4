"""What every entry point shares: bad input ends with one clear line on stderr and exit status 1, not a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags, logging

from rag_jax.models.hf_files import CheckpointError
from rag_jax.retrieval.corpus import CorpusError
from rag_jax.retrieval.index_io import IndexFormatError
from rag_jax.retrieval.merge import SearchError

# Errors that describe the user's input (files, flags), each with a message that names it and says what to do.
USER_ERRORS = (CheckpointError, CorpusError, IndexFormatError, SearchError, FileNotFoundError, FileExistsError)


class UsageError(ValueError):
    """A flag combination or input file that the entry point itself rejects."""


def run(main: Callable[[], None]) -> None:
    # absl would print every library's INFO lines (e.g. jax probing for a TPU); --verbosity=0 brings them back.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        main()
    except (*USER_ERRORS, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
