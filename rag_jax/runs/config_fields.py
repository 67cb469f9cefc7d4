"""What each field of a run config (experiments/configs/nq.py) may hold: its type and range (RULES), checked by
check_fields before anything else (config_check.py checks the combinations). Light imports only, as config_check's.

Fields a config does not have are not checked (a variant or an older saved config may lack newer ones); fields
without a rule here are free-form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from rag_jax.models import registry as generators
from rag_jax.readers import registry as readers
from rag_jax.runs import encoder_training
from rag_jax.tasks import registry as tasks

LOSSES = tuple(readers.ALIASES)  # model.loss: the old name of model.reader ("sequence", "token")
RETRIEVAL_MODES = ("host", "device")
# train.retriever_loss: how the retriever learns from the reader (rag_jax/training/retriever_losses.py)
RETRIEVER_LOSSES = ("none", "marginal", "pdist", "emdr2", "loop", "adist")
HOST_SEARCHERS = ("exact", "scann", "codes")
HOST_CONTEXTS = ("auto", "table", "strings")
COMPUTE_DTYPES = ("float32", "bfloat16")
INDEX_DTYPES = ("float32", "float16", "bfloat16")
AUTO_POOLING = "auto"  # model.*_encoder.pooling: as the checkpoint says; "cls" for random init
POOLINGS = ("cls", "pooler", "mean", AUTO_POOLING)
RETRIEVER_DATA = ("gold", "dpr", "ict")  # train_retriever's data.kind
DOC_ENCODER = encoder_training.DOC_ENCODER  # model.question_encoder.init: start q(x) as a copy of d(z)


class ConfigError(ValueError):
    """A run config that cannot work; the message names the field (e.g. `train.global_batch_size`)."""


@dataclasses.dataclass(frozen=True)
class _Number:
    """An int (integer=True) or a finite float in [low, high] (either end open when its flag says so)."""

    integer: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow: tuple = ()  # values allowed outside the range (e.g. -1: "all the rest")

    def problem(self, value) -> str | None:
        kind = "an integer" if self.integer else "a number"
        if value in self.allow and not isinstance(value, bool):
            return None
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return f"must be {kind}, got {type(value).__name__}"
        if not math.isfinite(value):
            return f"must be {kind} (finite)"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {kind} {'>' if self.low_open else '>='} {self.low}{self._also()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"must be {kind} {'<' if self.high_open else '<='} {self.high}{self._also()}"
        return None

    def _also(self) -> str:
        return f" (or {', '.join(map(repr, self.allow))})" if self.allow else ""


@dataclasses.dataclass(frozen=True)
class _Choice:
    options: tuple

    def problem(self, value) -> str | None:
        return None if value in self.options and not isinstance(value, bool) else f"choose one of {self.options}"


@dataclasses.dataclass(frozen=True)
class _Registered:
    """A name a registry knows (`known`), listing `names()` when it does not."""

    known: Any
    names: Any

    def problem(self, value) -> str | None:
        if self.known(value):
            return None
        return f"choose one of {tuple(self.names())}, or 'package.module:name' of a module that registers one"


@dataclasses.dataclass(frozen=True)
class _Type:
    types: tuple
    what: str

    def problem(self, value) -> str | None:
        return None if isinstance(value, self.types) else f"must be {self.what}, got {type(value).__name__}"


class _ScoreScale:
    """retrieval.score_scale: "auto" or a number > 0 (a command-line override of the string field arrives as text)."""

    def problem(self, value) -> str | None:
        if value == "auto":
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"must be 'auto' or a number > 0, got {value!r}"
        return None if math.isfinite(number) and number > 0 and not isinstance(value, bool) else (
            f"must be 'auto' or a finite number > 0, got {value!r}")


_POSITIVE = _Number(integer=True, low=1)
_COUNT = _Number(integer=True, low=0)
_RATE = _Number(integer=False, low=0.0, high=1.0, high_open=True)  # dropout, label smoothing, Adam betas
_SCALE = _Number(integer=False, low=0.0, low_open=True)
_BOOL = _Type((bool,), "true or false")


class _OptionalPositive:
    """An integer >= 1, or None (a default taken from another field)."""

    def problem(self, value) -> str | None:
        return None if value is None else _POSITIVE.problem(value)


_OPTIONAL_POSITIVE = _OptionalPositive()
_TEXT = _Type((str,), "a string")
_PATH = _Type((str, type(None)), "a path (or None)")
_OPTIONAL_BOOL = _Type((bool, type(None)), "true, false or None (as the checkpoint says)")

_ENCODER = {"init": _PATH, "vocab_size": _POSITIVE, "hidden_size": _POSITIVE, "num_layers": _POSITIVE,
            "num_heads": _POSITIVE, "intermediate_size": _POSITIVE, "max_position_embeddings": _POSITIVE,
            "initializer_range": _SCALE, "pooling": _Choice(POOLINGS), "dropout": _RATE, "normalize": _OPTIONAL_BOOL}
_GENERATOR = {"architecture": _Registered(generators.known, generators.names), "init": _PATH, "vocab_size": _POSITIVE,
              "d_kv": _POSITIVE, "feed_forward_proj": _Choice(("relu", "gated-gelu", "gelu", "gated-relu", "gated-silu")), "d_model": _POSITIVE, "encoder_layers": _POSITIVE,
              "decoder_layers": _POSITIVE, "heads": _POSITIVE, "ffn_dim": _POSITIVE,
              "max_position_embeddings": _POSITIVE, "init_std": _SCALE, "dropout": _RATE, "attention_dropout": _RATE}
RULES: dict[str, Any] = {
    "seed": _COUNT,
    "data.source": _Choice(("mini", "official")),
    "data.data_dir": _PATH, "data.manual_dir": _PATH,
    "task.train_file": _PATH, "task.dev_file": _PATH,
    "data.train_file": _PATH, "data.dev_file": _PATH,  # their old names (and train_retriever's own files)
    "data.passages": _PATH,
    "data.max_question_length": _POSITIVE,
    "data.max_target_length": _Number(integer=True, low=2),  # <s> and </s> at least
    "data.answer_choice": _Choice(("first", "random")),
    "data.answer_prefix_space": _BOOL,
    "tokenizers.question": _PATH, "tokenizers.generator": _PATH,
    "model.init_from_rag": _PATH,
    **{f"model.question_encoder.{k}": rule for k, rule in _ENCODER.items()},
    **{f"model.doc_encoder.{k}": rule for k, rule in _ENCODER.items()},
    **{f"model.generator.{k}": rule for k, rule in _GENERATOR.items()},
    "model.n_docs": _POSITIVE,
    # None: a pretrained encoder's fine-tuning rate (runs/encoder_training.py)
    "model.doc_encoder.trainable": _BOOL, "model.doc_encoder.lr_scale": dataclasses.replace(_SCALE, allow=(None,)),
    "retrieval.rerank_candidates": _COUNT,  # 0: no reranking
    "model.reader": _Registered(readers.known, readers.names),
    "model.loss": _Choice(LOSSES + (None,)),  # None: model.reader decides
    "task.name": _Registered(tasks.known, tasks.names),
    "model.label_smoothing": _RATE,
    "model.max_combined_length": _POSITIVE,
    "model.fid.passage_length": _OPTIONAL_POSITIVE, "model.fid.remat": _BOOL,
    "model.title_sep": _TEXT, "model.doc_sep": _TEXT,
    "model.compute_dtype": _Choice(COMPUTE_DTYPES),
    "index.dir": _PATH,
    "index.batch_size": _POSITIVE, "index.max_length": _POSITIVE, "index.shard_size": _POSITIVE,
    "index.dtype": _Choice(INDEX_DTYPES),
    "index.backend": _Choice(("exact", "scann")),
    "index.codes": _TEXT, "index.codes_sample": _Number(integer=True, low=256), "index.codes_seed": _COUNT,
    "retrieval.rerank_from_codes": _COUNT,
    "index.refresh_every": _Type((str, int), "a step count or a schedule such as '0-1000:500,1000-:2000'"),
    "retrieval.mode": _Choice(RETRIEVAL_MODES),
    "retrieval.host_searcher": _Choice(HOST_SEARCHERS),
    "retrieval.host_contexts": _Choice(HOST_CONTEXTS),
    "retrieval.prefetch": _BOOL, "retrieval.stale_prefetch": _BOOL,
    "retrieval.score_scale": _ScoreScale(), "retrieval.learn_score_scale": _BOOL,
    "optim.learning_rate": _SCALE,
    "optim.warmup_steps": _COUNT,
    "optim.end_learning_rate": _Number(integer=False, low=0.0),
    "optim.weight_decay": _Number(integer=False, low=0.0),
    "optim.b1": _RATE, "optim.b2": _RATE,
    "optim.eps": _SCALE,
    "optim.max_grad_norm": _Number(integer=False, low=0.0),  # 0: no clipping
    "optim.question_encoder_lr_scale": _Number(integer=False, low=0.0, allow=(None,)),  # None: see lr_scale
    "train.steps": _POSITIVE, "train.global_batch_size": _POSITIVE, "train.grad_accum_steps": _POSITIVE,
    "train.retrieval_loss_weight": _Number(integer=False, low=0.0),
    "train.retriever_loss": _Choice(RETRIEVER_LOSSES),
    "train.retriever_temperature": _Number(integer=False, low=0.0, low_open=True),
    "train.log_every": _POSITIVE, "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _Number(integer=True, low=1, allow=(None,)),  # None: keep all
    "train.async_checkpoints": _BOOL,
    "train.eval_every": _COUNT,  # 0: no evaluation
    "eval.num_examples": _COUNT,  # 0: all
    "eval.batch_size": _POSITIVE, "eval.n_docs": _POSITIVE,
    "eval.max_length": _Number(integer=True, low=2),  # the decoder start token and one more
    "denoise.steps": _COUNT, "denoise.batch_size": _POSITIVE, "denoise.learning_rate": _SCALE,
    "denoise.max_length": _Number(integer=True, low=3),  # <s>, one token, </s>
    "denoise.mask_ratio": _RATE, "denoise.mean_span": _SCALE,
    "mesh.data": _Number(integer=True, low=1, allow=(-1,)),  # -1: every device `model` leaves
    "mesh.model": _POSITIVE, "mesh.dcn_data": _POSITIVE,
    # experiments/configs/retriever.py (train_retriever) only
    "data.kind": _Choice(RETRIEVER_DATA), "data.hard_negatives": _PATH, "data.hard_negatives_per_question": _COUNT,
    "data.ict_keep_sentence": _Number(integer=False, low=0.0, high=1.0), "data.max_passage_length": _POSITIVE,
    "model.shared_encoder": _BOOL, "model.train_doc_encoder": _BOOL, "model.score_scale": _SCALE,
}


_MISSING = object()


def get_field(config: ml_collections.ConfigDict, field: str, default=_MISSING):
    """The value of a dotted field, or `default` when the config lacks it."""
    node = config
    for part in field.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return default
        node = node[part]
    return node


def task_file(config: ml_collections.ConfigDict, split: str) -> tuple[str, str | None]:
    """(field, path) of the run's "train" or "dev" file: task.{split}_file, or its old name data.{split}_file where
    only that is set (configs saved before the task section held the files, command lines written for them);
    (task.{split}_file, None) when neither is. The one place a run's files are read from its config; both names
    set to different files is refused."""
    field, old_field = f"task.{split}_file", f"data.{split}_file"
    path, old_path = get_field(config, field, None), get_field(config, old_field, None)
    if old_path is None or old_path == path:
        return field, path
    if path is not None:
        raise ConfigError(f"config {field}={path!r} and {old_field}={old_path!r} (its old name) name different "
                          f"files; set only --config.{field}")
    if get_field(config, field, _MISSING) is not _MISSING:  # a config that has the new field: say it once
        readers.note_deprecated(f"config {old_field}", field)
    return old_field, old_path


def field_error(field: str, value, problem: str) -> ConfigError:
    return ConfigError(f"config {field}={value!r}: {problem} (set it with --config.{field}=...)")


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Every field of RULES that the config has: type and range."""
    for field, rule in RULES.items():
        value = get_field(config, field, _MISSING)
        if value is not _MISSING and (problem := rule.problem(value)) is not None:
            raise field_error(field, value, problem)
    ks = get_field(config, "eval.recall_ks", ())
    if not isinstance(ks, (list, tuple)) or not all(_POSITIVE.problem(k) is None for k in ks):
        raise field_error("eval.recall_ks", ks, "must be a tuple of integers >= 1, e.g. (1, 5)")
