"""The layout of a training workdir: every path inside it is named here and nowhere else.

  WORKDIR/checkpoints/<step>/        orbax checkpoints (checkpoint.py)
  WORKDIR/checkpoints_skipped/<step>/  checkpoints that did not restore, moved aside by a resumed run (kept to look at)
  WORKDIR/index/                     the run's index, or a link to config index.dir (build.ensure_index)
  WORKDIR/question_encoder_tokenizer/, WORKDIR/generator_tokenizer/
                                     the run's tokenizers, in the RagTokenizer layout of a Hugging Face RAG directory
  WORKDIR/metrics.jsonl              one line per logged step and per dev evaluation (metric_writer.py)
  WORKDIR/tensorboard/               TensorBoard event files
  WORKDIR/export/question_encoder/, WORKDIR/export/ctx_encoder/
                                     train_retriever's encoders as Hugging Face directories (retriever_loop.py)
"""

from __future__ import annotations

import os

from rag_jax.data import tokenizers


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def skipped_checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints_skipped")


def index_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "index")


def metrics_file(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "metrics.jsonl")


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "tensorboard")


def export_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "export")


def tokenizer_dirs(workdir: str) -> dict[str, str]:
    """{"question": ..., "generator": ...}: where the run keeps its two tokenizers."""
    root = os.path.abspath(workdir)
    return {"question": os.path.join(root, tokenizers.RAG_QUESTION_SUBDIR),
            "generator": os.path.join(root, tokenizers.RAG_GENERATOR_SUBDIR)}


def is_workdir(path: str) -> bool:
    """Whether `path` looks like a training workdir (it has a checkpoints directory)."""
    return os.path.isdir(checkpoints_dir(path))
