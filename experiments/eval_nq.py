"""Evaluates a RAG model on NQ-open style questions: `python -m experiments.evaluate --task=qa` under its old name,
with the same flags (--task too) and the same output.

  python -m experiments.eval_nq --model=DIR --index=DIR --questions=FILE --output=FILE [flags of experiments.evaluate]
"""

from absl import app

from experiments import cli, evaluate

if __name__ == "__main__":
    app.run(cli.main_running(evaluate.evaluate), flags_parser=cli.parse_flags)
