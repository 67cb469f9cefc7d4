"""Trains RAG on NQ-open: `python -m experiments.train` under its old name, with the same flags and the same run.

  python -m experiments.train_nq [--config=FILE[:variant]] [--workdir=DIR] [--config.FIELD=VALUE ...]
"""

from experiments import train

if __name__ == "__main__":
    train.main()
