"""Trains a RAG model (any reader, any task: config model.reader, task.name) from a run config.

  python -m experiments.train                                      # local: the bundled NQ-open mini task, CPU
  python -m experiments.train --config=experiments/configs/nq.py:paper --config.data.manual_dir=... \\
      --workdir=gs://... or /path                                  # the paper's recipe (set the model paths)
  python -m experiments.train --config.train.steps=10              # any config field, field by field

`python -m experiments.train_nq` is the same command under its old name.

A rerun with the same --workdir resumes from its latest checkpoint. Several processes: on a TPU pod slice every
worker runs the same command (jax.distributed finds its peers); elsewhere pass --coordinator_address,
--num_processes and --process_id. SIGTERM (preemption) saves a checkpoint of the step reached and exits with status
75 (EX_TEMPFAIL: rerun the same command; docs/pods.md says how a scheduler should treat it); a bad flag, config
field or input file exits 1 with one `error:` line.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli, input_checks
from rag_jax.runs import config_check

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "nq.py")


try:  # the default config is parsed (with the overrides) right here
    _CONFIG = config_flags.DEFINE_config_file("config", _CONFIG_FILE, "Run config file[:variant].", lock_config=True)
except (KeyError, AttributeError) as e:
    sys.exit(cli.unknown_config_field(e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, index, metrics); default ./workdir/nq_VARIANT.")
cli.define_distributed_flags()


def train_and_evaluate(config, workdir: str) -> None:
    from rag_jax.training import loop  # pylint: disable=g-import-not-at-top (jax: after the config checks)

    return loop.train_and_evaluate(config, workdir)


def main() -> None:
    cli.run_training(_CONFIG, _WORKDIR, "nq", config_check.check_config, train_and_evaluate,
                     check_inputs=input_checks.check_nq_training_inputs)


if __name__ == "__main__":
    main()
