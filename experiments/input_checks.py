"""Inputs checked against what the model and the data can do, at start-up, one line each naming the flag (or config
field) and the limit:

  - output lengths against the generator's positions: BART learns one embedding per position
    (max_position_embeddings); a longer output would read past the table, which jnp.take clamps without a word
    (the reference fails there). T5 has relative positions (buckets past relative_attention_max_distance share
    one), so no length exceeds what it can encode: no limit applies to it;
  - input lengths (questions, passages) against the encoders' max_position_embeddings, for the same reason;
  - gold passage ids against the corpus (training_data.check_gold_ids: the rule train_retriever applies), a
    training file with fewer questions than one batch, a file flag that names a directory.

Imports of the library happen inside the functions, after the flag checks that need none.
"""

from __future__ import annotations

import json
import os

from experiments.errors import UsageError


def require_file(path: str, flag: str, what: str) -> None:
    """`path` (given as `flag`) must be an existing file: a directory is named as one, not as a missing file."""
    if os.path.isdir(path):
        raise UsageError(f"{flag}={path} is a directory; give {what}")
    if not os.path.isfile(path):
        raise UsageError(f"{flag}={path}: no such file ({what})")


def position_limit(config) -> int | None:
    """How many positions a model config (BART, BERT: learnt absolute positions) can encode; None for relative
    positions (T5), which have no table to run out of."""
    return getattr(config, "max_position_embeddings", None)


def check_length(length: int, config, source: str, part: str, flag: str | None = None) -> None:
    """Refuses `length` tokens (named by `source`, e.g. '--max_length=300') beyond the positions of `part` (e.g.
    'the generator'); `flag`: the flag that sets it, when `source` is a default."""
    limit = position_limit(config)
    if limit is not None and length > limit:
        raise UsageError(f"{source} exceeds the {limit} positions of {part} (max_position_embeddings={limit}); "
                         f"{f'pass {flag}=' if flag else 'give '}{limit} or less")


# ---------------------------------------------------------------------------------------------------- training data


def _hf_positions(path: str | None, key: str | None = None) -> int | None:
    """max_position_embeddings of a local Hugging Face checkpoint's config.json (of its `key` sub-config, for a
    RAG directory), None when it has none or is not a local directory (a hub id: the loader checks it)."""
    if not path or not os.path.isdir(path):
        return None
    candidates = [path] + [os.path.join(path, d) for d in sorted(os.listdir(path))
                           if os.path.isfile(os.path.join(path, d, "config.json"))]  # a sentence-transformers module
    for directory in candidates:
        config_file = os.path.join(directory, "config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (ValueError, OSError):
                return None  # the loader names what is wrong with it
            config = config.get(key, {}) if key else config
            if isinstance(config, dict) and isinstance(config.get("max_position_embeddings"), int):
                return config["max_position_embeddings"]
    return None


def _check_pretrained_lengths(config) -> None:
    """The lengths of a run config against the positions of the checkpoints it starts from (config_check checks
    them against randomly initialised models' sizes)."""
    m, rag_dir = config.model, config.model.get("init_from_rag")
    lengths = (("data.max_question_length", "question_encoder", "question_encoder"),
               ("index.max_length", "doc_encoder", None),
               ("model.max_combined_length", "generator", "generator"),
               ("data.max_target_length", "generator", "generator"),
               ("eval.max_length", "generator", "generator"))
    for field, part, rag_key in lengths:
        init = m[part].get("init", "random")
        if rag_dir and rag_key:
            limit, source = _hf_positions(rag_dir, rag_key), f"model.init_from_rag={rag_dir!r}"
        elif init not in ("random", "doc_encoder"):
            limit, source = _hf_positions(init), f"model.{part}.init={init!r}"
        else:
            continue
        section, name = field.split(".")
        value = config[section].get(name)
        if limit is not None and isinstance(value, int) and value > limit:
            from rag_jax.runs import config_check  # pylint: disable=g-import-not-at-top

            raise config_check.ConfigError(f"config {field}={value} exceeds the {limit} positions of {source} "
                                           f"(max_position_embeddings={limit}); give at most {limit}")


def _reads_as_nq(config, path: str) -> bool:
    """Whether a run reads `path` as NQ-open JSONL (task qa, a file of that format), as runs/build.data_source does."""
    from rag_jax.data import task_files  # pylint: disable=g-import-not-at-top
    from rag_jax.tasks import registry as tasks  # pylint: disable=g-import-not-at-top

    return tasks.from_config(config).name == "qa" and task_files.detect_format(path) == "nq"


def check_nq_training_inputs(config) -> None:
    """What train_nq (and knowledge_demo) can check of a run config's files before anything loads: the question
    files' records, one batch's worth of training questions, gold passage ids that name passages of
    data.passages, lengths within the positions of the pretrained models."""
    from rag_jax.data import nq_jsonl  # pylint: disable=g-import-not-at-top
    from rag_jax.retrieval import training_data  # pylint: disable=g-import-not-at-top
    from rag_jax.runs import config_check  # pylint: disable=g-import-not-at-top
    from rag_jax.tasks import base as task_base, registry as tasks  # pylint: disable=g-import-not-at-top

    _check_pretrained_lengths(config)
    for split in ("train", "dev"):
        field, path = config_check.task_file(config, split)
        if path is None:
            continue
        try:
            if _reads_as_nq(config, path):
                count = sum(1 for _ in nq_jsonl.read_nq_jsonl(path))
                training_data.check_gold_ids(path, config.data.passages)
            else:  # another task's file, or a qa file in another format (KILT, DPR): the task's examples
                count = len(task_base.ExampleSource(path, tasks.from_config(config)))
        except ValueError as e:  # DataError and the readers' errors name the file and line
            raise config_check.ConfigError(f"config {field}: {e}") from None
        batch = config.train.global_batch_size
        if split == "train" and count < batch:
            raise config_check.ConfigError(f"config {field}={path!r} holds {count} questions, fewer than one batch of "
                                           f"train.global_batch_size={batch}; lower the batch size or add questions")
