"""The start-up checks of a run config (experiments/configs/nq.py): every field's type and range, the combinations
that cannot work, and the paths it names. They need nothing but the config and the filesystem, and this module
imports nothing heavy, so `train_nq` refuses a bad config before jax or a model loads. Each check fails with a
`ConfigError` naming the field, the value and what is allowed.

Fields a config does not have are not checked (a variant or an older saved config may lack newer ones); fields
without a rule here are free-form.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import ml_collections

from rag_jax.models import registry as generators
from rag_jax.readers import registry as readers
from rag_jax.retrieval import code_spec as codes_lib

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
DOC_ENCODER = "doc_encoder"  # model.question_encoder.init: start q(x) as a copy of the document encoder d(z)


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
    "data.data_dir": _PATH, "data.manual_dir": _PATH, "data.train_file": _PATH, "data.dev_file": _PATH,
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
    "model.doc_encoder.trainable": _BOOL, "model.doc_encoder.lr_scale": _SCALE,
    "retrieval.rerank_candidates": _COUNT,  # 0: no reranking
    "model.reader": _Registered(readers.known, readers.names),
    "model.loss": _Choice(LOSSES + (None,)),  # None: model.reader decides
    "model.label_smoothing": _RATE,
    "model.max_combined_length": _POSITIVE,
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
    "optim.question_encoder_lr_scale": _Number(integer=False, low=0.0),
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


def _get(config: ml_collections.ConfigDict, field: str, default=_MISSING):
    """The value of a dotted field, or `default` when the config lacks it."""
    node = config
    for part in field.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return default
        node = node[part]
    return node


def _fail(field: str, value, problem: str) -> ConfigError:
    return ConfigError(f"config {field}={value!r}: {problem} (set it with --config.{field}=...)")


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Every field of RULES that the config has: type and range."""
    for field, rule in RULES.items():
        value = _get(config, field, _MISSING)
        if value is not _MISSING and (problem := rule.problem(value)) is not None:
            raise _fail(field, value, problem)
    ks = _get(config, "eval.recall_ks", ())
    if not isinstance(ks, (list, tuple)) or not all(_POSITIVE.problem(k) is None for k in ks):
        raise _fail("eval.recall_ks", ks, "must be a tuple of integers >= 1, e.g. (1, 5)")


def _check_sizes(config: ml_collections.ConfigDict) -> None:
    """Combinations of the encoders' sizes that cannot work (those of random-init networks; a checkpoint's are
    checked when it loads). The generator's are its architecture's (registry entry `check_run_config`, which
    build.check_config runs once jax has loaded)."""
    m = config.model
    for part in ("question_encoder", "doc_encoder"):
        c = m[part]
        if c.init == "random" and c.hidden_size % c.num_heads:
            raise ConfigError(f"config model.{part}.hidden_size={c.hidden_size} is not divisible by model.{part}."
                              f"num_heads={c.num_heads}; attention heads split the width evenly")
    for field, part in (("data.max_question_length", "question_encoder"), ("index.max_length", "doc_encoder")):
        positions = m[part].max_position_embeddings
        if m[part].init == "random" and m.init_from_rag is None and _get(config, field) > positions:
            raise ConfigError(f"config {field}={_get(config, field)} exceeds model.{part}.max_position_embeddings="
                              f"{positions}; lower it or give the model more positions")


def _check_end_to_end(config: ml_collections.ConfigDict) -> None:
    """A trained document encoder and reranking: the combinations built so far."""
    trainable = bool(_get(config, "model.doc_encoder.trainable", False))
    candidates = _get(config, "retrieval.rerank_candidates", 0)
    if candidates and not trainable:
        raise ConfigError(f"config retrieval.rerank_candidates={candidates} reranks with the current document "
                          "encoder, but model.doc_encoder.trainable=False (a frozen one would keep the index's order); "
                          "set --config.model.doc_encoder.trainable=True or --config.retrieval.rerank_candidates=0")
    if candidates and candidates < config.model.n_docs:
        raise ConfigError(f"config retrieval.rerank_candidates={candidates} is below model.n_docs="
                          f"{config.model.n_docs}: rerank L >= K candidates (or 0 for none)")


def _check_retriever_loss(config: ml_collections.ConfigDict) -> None:
    """The retriever losses' needs: ADist a FiD reader's cross-attention, LOOP two passages to leave one out."""
    loss = _get(config, "train.retriever_loss", "marginal")
    reader = readers.configured_name(config.model)
    if loss == "adist" and reader != "fid":
        raise ConfigError(f"config train.retriever_loss='adist' distils the FiD decoder's cross-attention over the "
                          f"passages, which model.reader={reader!r} does not have: set --config.model.reader=fid or "
                          "another --config.train.retriever_loss (pdist, emdr2, loop, marginal)")
    if loss == "loop" and config.model.n_docs < 2:
        raise ConfigError(f"config train.retriever_loss='loop' leaves one passage out, which needs model.n_docs >= "
                          f"2 (got {config.model.n_docs}); raise --config.model.n_docs or use pdist")


def require_path(value, field: str, what: str, *, directory: bool) -> str:
    """`value`, which config `field` names, if it is an existing file (or directory)."""
    if value is None:
        raise ConfigError(f"config {field} is not set: give {what} (e.g. --config.{field}=/path)")
    check = os.path.isdir if directory else os.path.isfile
    if not check(value):
        kind = "directory" if directory else "file"
        found = "a file" if os.path.isfile(value) else "a directory" if os.path.isdir(value) else None
        raise ConfigError(f"config {field}={value!r}: " + (f"is {found}; give {what}" if found else
                                                            f"no such {kind} ({what})"))
    return value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Value checks that need no devices or files beyond the paths named in the config."""
    check_fields(config)
    m, t = config.model, config.train
    if config.retrieval.host_searcher == "scann" and config.index.backend != "scann":
        raise ConfigError("config retrieval.host_searcher='scann' needs index.backend='scann' (the searcher is built "
                          "with the index)")
    if _get(config, "retrieval.learn_score_scale", False) and config.optim.question_encoder_lr_scale == 0:
        raise ConfigError("config retrieval.learn_score_scale=True trains the scale with q(x), which "
                          "optim.question_encoder_lr_scale=0 freezes; set --config.optim.question_encoder_lr_scale "
                          "above 0 or --config.retrieval.learn_score_scale=false")
    codes = config.index.get("codes", "")  # (absent from configs saved before it)
    if codes:
        try:
            codes_lib.parse_spec(codes, "config index.codes")
        except codes_lib.CodesError as e:
            raise ConfigError(str(e) + " (or '' for none)") from None
    if config.retrieval.host_searcher == "codes" and not codes:
        raise ConfigError("config retrieval.host_searcher='codes' needs index.codes ('int8' or 'pq:M'): the codes are "
                          "built with the index")
    if config.retrieval.stale_prefetch and config.retrieval.mode != "host":
        raise ConfigError(f"config retrieval.stale_prefetch=True needs retrieval.mode='host' (mode "
                          f"{config.retrieval.mode!r} retrieves inside the step, with the current parameters); "
                          "set --config.retrieval.stale_prefetch=false")
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(f"config train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.grad_accum_steps={t.grad_accum_steps}")
    if config.retrieval.mode == "device" and not m.doc_sep.endswith(" "):
        raise ConfigError(f"config model.doc_sep={m.doc_sep!r}: device retrieval assembles passage and question "
                          "tokens separately, which matches the tokenizer only when doc_sep ends with a space")
    _check_end_to_end(config)
    _check_retriever_loss(config)
    _check_sizes(config)
    refresh_schedule(_get(config, "index.refresh_every", "0"))
    require_path(config.data.passages, "data.passages", "the passages file (DPR psgs_w100.tsv layout)",
                  directory=False)
    for field in ("data.train_file", "data.dev_file"):
        value = config.data.get(field.split(".")[1])
        if value is not None:
            require_path(value, field, "a JSONL questions file", directory=False)
    if config.data.train_file is None or config.data.dev_file is None:
        if config.data.data_dir is not None:
            require_path(config.data.data_dir, "data.data_dir", "the TFDS data directory (create it, or leave it "
                          "unset for TFDS's default)", directory=True)
        if config.data.source == "official":
            require_path(config.data.manual_dir, "data.manual_dir",
                          "the directory holding NQ-open.train.jsonl and NQ-open.dev.jsonl", directory=True)
    for field in ("tokenizers.question", "tokenizers.generator"):
        require_path(config.tokenizers.get(field.split(".")[1]), field, "a tokenizer directory", directory=True)
    if m.init_from_rag is None:
        for part in ("question_encoder", "generator"):
            init = m[part].init
            if init != "random" and not (part == "question_encoder" and init == DOC_ENCODER):
                require_path(init, f"model.{part}.init", "'random' or a Hugging Face checkpoint directory",
                              directory=True)
    else:
        require_path(m.init_from_rag, "model.init_from_rag", "a Hugging Face RAG checkpoint directory", directory=True)
    if m.doc_encoder.init != "random":
        require_path(m.doc_encoder.init, "model.doc_encoder.init", "'random' or a BERT/DPR checkpoint directory",
                      directory=True)
    if config.index.dir is not None:
        require_path(config.index.dir, "index.dir", "a prebuilt index directory", directory=True)


def refresh_schedule(value) -> list[tuple[int, int | None, int]]:
    """config index.refresh_every as (first step, end step or None, every) ranges; every 0: no refresh there.

    "500" (or 500): every 500 steps; "0": never; "0-1000:500,1000-:2000": every 500 steps before step 1000, every
    2000 from then on (Atlas's notation). Steps count from 0; a refresh is due after step s when s is a positive
    multiple of the `every` of the range holding s.
    """
    field = "index.refresh_every"
    text = str(value).strip()
    if isinstance(value, bool):
        raise _fail(field, value, "must be a step count or a schedule such as '0-1000:500,1000-:2000'")
    if text.isdigit():
        return [(0, None, int(text))]
    ranges = []
    for part in text.split(","):
        span, _, every = part.strip().partition(":")
        start, dash, stop = span.partition("-")
        if not (dash and start.strip().isdigit() and every.strip().isdigit()
                and (stop.strip().isdigit() or not stop.strip())):
            raise _fail(field, value, f"cannot read {part.strip()!r}: write a step count, or ranges START-END:EVERY "
                                      "separated by commas, the last one open (e.g. '0-1000:500,1000-:2000')")
        ranges.append((int(start), int(stop) if stop.strip() else None, int(every)))
    for (_, stop, _), (start, _, _) in zip(ranges, ranges[1:]):
        if stop != start:
            raise _fail(field, value, f"the ranges must follow each other: one ends at {stop}, the next starts at "
                                      f"{start}")
    if ranges[0][0] != 0 or ranges[-1][1] is not None:
        raise _fail(field, value, "the ranges must start at step 0 and the last one must be open ('1000-:2000')")
    if any(stop is not None and stop <= start for start, stop, _ in ranges):
        raise _fail(field, value, "each range must end after it starts")
    return ranges


def check_retriever_config(config: ml_collections.ConfigDict) -> None:
    """train_retriever's config (experiments/configs/retriever.py): fields, sizes and the paths it names."""
    check_fields(config)
    d, m = config.data, config.model
    for part in ("question_encoder", "doc_encoder"):
        c = m[part]
        if c.init == "random" and c.hidden_size % c.num_heads:
            raise ConfigError(f"config model.{part}.hidden_size={c.hidden_size} is not divisible by model.{part}."
                              f"num_heads={c.num_heads}; attention heads split the width evenly")
        if c.init == "random" and max(d.max_question_length, d.max_passage_length) > c.max_position_embeddings:
            raise ConfigError(f"config data.max_question_length / data.max_passage_length exceed model.{part}."
                              f"max_position_embeddings={c.max_position_embeddings}")
        if c.init != "random" and not (part == "doc_encoder" and m.shared_encoder):
            require_path(c.init, f"model.{part}.init", "'random' or a BERT/DPR checkpoint directory", directory=True)
    require_path(d.passages, "data.passages", "the passages file (DPR psgs_w100.tsv layout or JSONL)",
                 directory=False)
    if not m.train_doc_encoder and (m.shared_encoder or d.kind != "gold"):
        raise ConfigError(f"config model.train_doc_encoder=False freezes the document encoder, which needs "
                          f"model.shared_encoder=False (now {m.shared_encoder}) and data.kind='gold' (now "
                          f"{d.kind!r}: its passages are rows of data.passages); change one of them")
    if d.kind == "dpr":
        require_path(d.train_file, "data.train_file", "DPR's training JSON (e.g. biencoder-nq-train.json)",
                     directory=False)
    for field in ("data.train_file", "data.dev_file", "data.hard_negatives"):
        value = d.get(field.split(".")[1])
        if value is not None:
            require_path(value, field, "a data file", directory=False)
    require_path(config.tokenizers.question, "tokenizers.question", "a tokenizer directory", directory=True)


def check_workdir(workdir: str) -> None:
    """A run directory must be a directory (or not exist yet, with a directory to create it in)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file; give a directory (new, or a run's to resume it)")
    parent = os.path.dirname(os.path.abspath(workdir))
    if not os.path.exists(workdir) and os.path.exists(parent) and not os.path.isdir(parent):
        raise ConfigError(f"--workdir={workdir}: {parent} is a file, not a directory")


def differences(saved: dict[str, Any], config: ml_collections.ConfigDict, prefixes: Sequence[str]) -> list[str]:
    """'field: saved -> now' for the fields under `prefixes` whose values differ between a saved config (JSON, as in
    a checkpoint) and `config`; fields only one of them has are left out."""
    now = json.loads(config.to_json_best_effort())
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    chosen = [k for k in sorted(flat_saved) if any(k == p or k.startswith(p + ".") for p in prefixes)]
    return [f"{k}={flat_saved[k]!r} there, {flat_now[k]!r} now" for k in chosen
            if k in flat_now and flat_saved[k] != flat_now[k]]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
