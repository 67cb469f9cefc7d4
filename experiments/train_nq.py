"""Trains RAG on NQ-open.

  python -m experiments.train_nq                                   # local: tiny models, bundled mini task, CPU
  python -m experiments.train_nq --config=experiments/configs/nq.py:paper --config.data.manual_dir=... \\
      --workdir=gs://... or /path                                  # the paper's recipe (set the model paths)
  python -m experiments.train_nq --config.train.steps=10           # any config field, field by field

A rerun with the same --workdir resumes from its latest checkpoint. Several processes: on a TPU pod slice every
worker runs the same command (jax.distributed finds its peers); elsewhere pass --coordinator_address,
--num_processes and --process_id.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "nq.py")


def _unknown_field(error: Exception) -> str:
    """ml_collections reports an unknown --config.* field as a KeyError/AttributeError while flags are parsed."""
    detail = " ".join(str(error).encode().decode("unicode_escape").replace("'", "").split())
    given = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
    return f"error: unknown config field: {detail} (in {given})"


try:  # the default config is parsed (with the overrides) right here
    _CONFIG = config_flags.DEFINE_config_file("config", _CONFIG_FILE, "Run config file[:variant].", lock_config=True)
except (KeyError, AttributeError) as e:
    sys.exit(_unknown_field(e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, index, metrics); default ./workdir/nq_VARIANT.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _init_distributed() -> None:
    import jax  # pylint: disable=g-import-not-at-top

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        # Cross-process collectives of the CPU backend (tests, laptops); accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice: peers from the environment
        jax.distributed.initialize()


_MAIN_STARTED = False


def main(argv):
    global _MAIN_STARTED
    _MAIN_STARTED = True
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    _init_distributed()
    from rag_jax import experiment, train  # pylint: disable=g-import-not-at-top (after distributed init)

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdir", f"nq_{config.variant}")
    if train.jax.process_index() == 0:
        print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    try:
        train.train_and_evaluate(config, workdir)
    except (experiment.ConfigError, train.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    try:
        app.run(main)
    except (KeyError, AttributeError) as e:
        if _MAIN_STARTED:  # a real error of the run, not of the command line
            raise
        sys.exit(_unknown_field(e))
