"""Trains a dense retriever (DPR's bi-encoder, or an ICT warm start) on your own passages.

  python -m experiments.train_retriever                            # local: fine-tunes all-MiniLM-L6-v2 on mini NQ
  python -m experiments.train_retriever --config=experiments/configs/retriever.py:paper \\
      --config.data.train_file=biencoder-nq-train.json --config.data.passages=psgs_w100.tsv ...   # DPR's recipe
  python -m experiments.train_retriever --config.data.kind=ict --config.data.passages=my_passages.tsv   # no labels

A rerun with the same --workdir resumes from its latest checkpoint (a run preempted by SIGTERM exits 75 once its
checkpoint is saved, as train_nq's: docs/pods.md). The trained encoders end up in
WORKDIR/export/question_encoder and WORKDIR/export/ctx_encoder (Hugging Face directories: build_index --encoder,
train_nq --config.model.question_encoder.init / doc_encoder.init).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli
from rag_jax.runs import config_check

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "retriever.py")

try:  # the default config is parsed (with the overrides) right here
    _CONFIG = config_flags.DEFINE_config_file("config", _CONFIG_FILE, "Run config file[:variant].", lock_config=True)
except (KeyError, AttributeError) as e:
    sys.exit(cli.unknown_config_field(e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export); default "
                               "./workdir/retriever_VARIANT.")
cli.define_distributed_flags()


def train_and_evaluate(config, workdir: str) -> None:
    from rag_jax.training import retriever_loop  # pylint: disable=g-import-not-at-top (jax: after the config checks)

    return retriever_loop.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    cli.run_training(_CONFIG, _WORKDIR, "retriever", config_check.check_retriever_config, train_and_evaluate)
