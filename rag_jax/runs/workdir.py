"""The layout of a training workdir: every path inside it is named here and nowhere else (the modules that write
them are named relative to rag_jax/).

  WORKDIR/checkpoints/<step>/        orbax checkpoints (runs/checkpoint.py)
  WORKDIR/checkpoints_skipped/<step>/  checkpoints that did not restore, moved aside by a resumed run (kept to look at)
  WORKDIR/index/                     the run's index, or a link to config index.dir (runs/build.ensure_index): version 0
  WORKDIR/index_versions/<step>/     the index re-embedded with the document encoder of <step>
                                     (training/index_refresh.py)
  WORKDIR/question_encoder_tokenizer/, WORKDIR/generator_tokenizer/
                                     the run's tokenizers, in the RagTokenizer layout of a Hugging Face RAG directory
  WORKDIR/metrics.jsonl              one line per logged step and per dev evaluation (training/metric_writer.py)
  WORKDIR/tensorboard/               TensorBoard event files
  WORKDIR/export/question_encoder/, WORKDIR/export/ctx_encoder/
                                     train_retriever's encoders as Hugging Face directories
                                     (training/retriever_loop.py)
"""

from __future__ import annotations

import os

from rag_jax.data import tokenizers
from rag_jax.retrieval import index_io


def _inside(workdir: str, name: str) -> str:
    # Absolute, so that a path names the same place whatever the current directory is when it is used or logged.
    return os.path.join(os.path.abspath(workdir), name)


def checkpoints_dir(workdir: str) -> str:
    return _inside(workdir, "checkpoints")


def skipped_checkpoints_dir(workdir: str) -> str:
    return _inside(workdir, "checkpoints_skipped")


def index_dir(workdir: str) -> str:
    return _inside(workdir, "index")


def index_versions_dir(workdir: str) -> str:
    return _inside(workdir, "index_versions")


def index_version_dir(workdir: str, version: int) -> str:
    """Version 0 is the run's first index (WORKDIR/index); version s > 0 was embedded after step s."""
    if version == 0:
        return index_dir(workdir)
    return os.path.join(index_versions_dir(workdir), str(int(version)))


def index_versions(workdir: str) -> list[int]:
    """The index versions that have a directory (complete or not), oldest first."""
    root = index_versions_dir(workdir)
    found = [int(name) for name in os.listdir(root) if name.isdigit()] if os.path.isdir(root) else []
    return ([0] if os.path.isdir(index_dir(workdir)) else []) + sorted(found)


def latest_complete_version(workdir: str) -> int | None:
    """The newest index version of a workdir whose index.json says it is complete (None: none is)."""
    for version in reversed(index_versions(workdir)):
        meta = index_io.read_metadata(index_version_dir(workdir, version))
        if meta is not None and meta.get("complete"):
            return version
    return None


def metrics_file(workdir: str) -> str:
    return _inside(workdir, "metrics.jsonl")


def tensorboard_dir(workdir: str) -> str:
    return _inside(workdir, "tensorboard")


def export_dir(workdir: str) -> str:
    return _inside(workdir, "export")


def tokenizer_dirs(workdir: str) -> dict[str, str]:
    """{"question": ..., "generator": ...}: where the run keeps its two tokenizers."""
    return {"question": _inside(workdir, tokenizers.RAG_QUESTION_SUBDIR),
            "generator": _inside(workdir, tokenizers.RAG_GENERATOR_SUBDIR)}


def is_workdir(path: str) -> bool:
    """Whether `path` looks like a training workdir (it has a checkpoints directory)."""
    return os.path.isdir(checkpoints_dir(path))
