"""From a run config (experiments/configs/nq.py) to the pieces of a run, with the start-up checks.

Everything a training run or an evaluation of its checkpoint needs to rebuild from the config lives here: the RAG
model (and pretrained weights), the frozen document encoder, the tokenizers, the data sources and the run's index
(the optimizer is in training/optim.py). Each check fails with a `ConfigError` naming the config field and what to do; the
checks of the config alone are in config_check.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import rag
from rag_jax.data import nq_open, task_files
from rag_jax.data import tokenizers as tk
from rag_jax.models import bert, hf, registry
from rag_jax.readers import registry as readers
from rag_jax.retrieval import code_spec, embed, index_codes, index_io, scann_backend
from rag_jax.retrieval.contexts import ContextFormat
from rag_jax.runs import config_check, encoder_training, streams, workdir as workdir_lib
from rag_jax.tasks import base as task_base, registry as tasks
# The config's own checks live in config_check.py (light, so that entry points run them before jax loads); they are
# part of building a run, so build.check_config and build.ConfigError are how the rest of training reaches them.
from rag_jax.runs.config_check import AUTO_POOLING, DOC_ENCODER, ConfigError, require_path

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.compute_dtype


def check_config(config: ml_collections.ConfigDict) -> None:
    """config_check.check_config, then what needs the modules the config names (after jax loads): the generator
    architecture's own checks (its registry entry's), and that model.reader names a registered reader."""
    config_check.check_config(config)
    problem = generator_architecture(config.model.generator).check_run_config(config)
    if problem:
        raise ConfigError(problem)
    try:
        readers.from_config(config)
    except ValueError as e:
        raise ConfigError(f"config model.reader={readers.configured_name(config.model)!r}: {e}") from None


def check_batch(config: ml_collections.ConfigDict, data_ways: int, num_processes: int) -> None:
    """The batch sizes must split evenly over the data axis (and over hosts, and into microbatches)."""
    t = config.train
    micro = t.global_batch_size // t.grad_accum_steps
    if micro % data_ways:
        raise ConfigError(
            f"config train.global_batch_size={t.global_batch_size} (/ train.grad_accum_steps={t.grad_accum_steps} "
            f"= {micro} per microbatch) is not divisible by the {data_ways}-way data axis of the mesh "
            f"(mesh.data); choose a multiple of {data_ways * t.grad_accum_steps}"
        )
    if config.eval.batch_size % data_ways or config.eval.batch_size % num_processes:
        raise ConfigError(f"config eval.batch_size={config.eval.batch_size} is not divisible by the {data_ways}-way "
                          f"data axis (mesh.data) and {num_processes} processes")


# ---------------------------------------------------------------------------------------------------- models


def _encoder_config(c: ml_collections.ConfigDict, dtype) -> bert.BertConfig:
    """A random-init encoder's config ("auto" pooling is [CLS], as DPR's)."""
    pooling = c.get("pooling", "cls")
    return bert.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        hidden_dropout=c.dropout, attention_dropout=c.dropout, initializer_range=c.initializer_range,
        pooling="cls" if pooling == AUTO_POOLING else pooling, normalize=bool(c.get("normalize")), dtype=dtype)


def _load_encoder(c: ml_collections.ConfigDict, **overrides) -> hf.Loaded:
    """The checkpoint encoder of config section c; "auto" pooling and unset normalize keep the checkpoint's."""
    pooling = c.get("pooling", "cls")  # a config saved before the field existed used [CLS]
    if c.get("normalize") is not None:
        overrides["normalize"] = c.normalize
    return hf.load_encoder(c.init, pooling=None if pooling == AUTO_POOLING else pooling, **overrides)


def generator_architecture(c: ml_collections.ConfigDict) -> registry.Generator:
    """The registry entry model.generator.architecture names ("bart" in configs saved before the field existed)."""
    name = c.get("architecture", "bart")
    try:
        return registry.get(name)
    except ValueError as e:
        raise ConfigError(f"config model.generator.architecture={name!r}: {e}") from None


def _check_architecture(g_cfg, field: str, path: str, c: ml_collections.ConfigDict) -> None:
    found = registry.for_config(g_cfg)
    if found is not generator_architecture(c):
        raise ConfigError(f"config {field}={path!r} holds a {found.name} generator but model.generator.architecture="
                          f"{c.get('architecture', 'bart')!r}; set --config.model.generator.architecture={found.name}")


@dataclasses.dataclass
class Models:
    """The RAG model of a run and, for the parts that start from a checkpoint, their numpy weights."""

    rag: rag.Rag
    pretrained: dict[str, Any]  # subset of {"question_encoder", "generator"} -> numpy params


def build_rag(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> Models:
    """The RAG model described by `config.model`; pretrained parts are read when `load_weights`."""
    m = config.model
    dtype = DTYPES[m.compute_dtype]
    q_overrides = dict(hidden_dropout=m.question_encoder.dropout, attention_dropout=m.question_encoder.dropout,
                       dtype=dtype)
    g_overrides = dict(dropout=m.generator.dropout, attention_dropout=m.generator.attention_dropout, dtype=dtype)
    pretrained: dict[str, Any] = {}
    prefix = ""  # the generator checkpoint's `prefix`, which leads every context (transformers' RagRetriever)
    if m.init_from_rag is not None:
        loaded = hf.load_rag(m.init_from_rag, encoder_overrides=q_overrides, generator_overrides=g_overrides)
        q_cfg, g_cfg = loaded.question_encoder.config, loaded.generator.config
        _check_architecture(g_cfg, "model.init_from_rag", m.init_from_rag, m.generator)
        prefix = loaded.generator.hf_config.get("prefix") or ""
        pretrained = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    else:
        if m.question_encoder.init == "random":
            q_cfg = _encoder_config(m.question_encoder, dtype)
        elif m.question_encoder.init == DOC_ENCODER:
            d_cfg, d_params = doc_encoder(config)
            q_cfg = dataclasses.replace(d_cfg, **q_overrides)
            pretrained["question_encoder"] = d_params
        else:
            loaded = _load_encoder(m.question_encoder, **q_overrides)
            q_cfg, pretrained["question_encoder"] = loaded.config, loaded.params
        if m.generator.init == "random":
            g_cfg = generator_architecture(m.generator).config_from_run(m.generator, dtype)
        else:
            loaded = hf.load_generator(m.generator.init, **g_overrides)
            _check_architecture(loaded.config, "model.generator.init", m.generator.init, m.generator)
            g_cfg, pretrained["generator"] = loaded.config, loaded.params
            prefix = loaded.hf_config.get("prefix") or ""
    q_cfg = dataclasses.replace(q_cfg, score_scale=score_scale(config, q_cfg),
                                learn_score_scale=bool(config.retrieval.get("learn_score_scale", False)))
    if "question_encoder" in pretrained:
        pretrained["question_encoder"] = bert.with_score_scale(pretrained["question_encoder"], q_cfg)
    doc_cfg = None
    if trains_doc_encoder(config):  # end to end: d(z) starts as the run's document encoder (the index's)
        d_cfg, pretrained["doc_encoder"] = doc_encoder(config)
        d_dropout = m.doc_encoder.get("dropout", d_cfg.hidden_dropout)
        doc_cfg = dataclasses.replace(d_cfg, hidden_dropout=d_dropout, attention_dropout=d_dropout, dtype=dtype)
    rag_config = rag.RagConfig(
        n_docs=m.n_docs, label_smoothing=m.label_smoothing,
        remat_encoder=bool(m.get("fid", {}).get("remat", False)),  # (absent from configs saved before it)
        context=readers.from_config(config).context_format(
            ContextFormat(title_sep=m.title_sep, doc_sep=m.doc_sep, max_combined_length=m.max_combined_length,
                          prefix=prefix), m))
    if not load_weights:
        pretrained = {}
    return Models(rag.Rag(q_cfg, g_cfg, rag_config, doc_encoder_config=doc_cfg), pretrained)


# sentence-transformers trains normalised encoders (all-MiniLM-L6-v2 among them) with MultipleNegativesRankingLoss,
# whose softmax sees cosine x scale with scale=20.0 by default; its saved files (modules.json,
# config_sentence_transformers.json) do not record the scale. Cosines in [-1, 1] without it give nearly uniform
# priors p(z|x) over the K retrieved passages.
NORMALIZED_SCORE_SCALE = 20.0


def score_scale(config: ml_collections.ConfigDict, q_cfg: bert.BertConfig) -> float:
    """retrieval.score_scale as a number: "auto" is NORMALIZED_SCORE_SCALE for an L2-normalised q(x) and 1 (DPR's
    unnormalised inner products, the reference's) otherwise. A config saved before the field existed scored at 1."""
    value = config.retrieval.get("score_scale", 1.0)
    if value == "auto":
        return NORMALIZED_SCORE_SCALE if q_cfg.normalize else 1.0
    return float(value)


def trains_doc_encoder(config: ml_collections.ConfigDict) -> bool:
    """model.doc_encoder.trainable (absent from configs saved before it: the paper's frozen d(z))."""
    return encoder_training.trains_doc_encoder(config)


def doc_encoder(config: ml_collections.ConfigDict) -> tuple[bert.BertConfig, Any]:
    """The document encoder d(z) that embeds the run's index: its config and numpy params (random ones are a function
    of the seed). Frozen in the paper's recipe; with model.doc_encoder.trainable the trained one starts from it."""
    c = config.model.doc_encoder
    if c.init != "random":
        loaded = _load_encoder(c)
        return loaded.config, loaded.params
    cfg = _encoder_config(c, jnp.float32)
    return cfg, _random_encoder_params(cfg, streams.key(config.seed, streams.DOC_ENCODER))


def _random_encoder_params(cfg: bert.BertConfig, rng: jax.Array) -> Any:
    variables = jax.jit(bert.BertEncoder(cfg).init)(rng, jnp.zeros((1, 8), jnp.int32))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(_unbox(variables["params"])))


def trained_encoder(c: ml_collections.ConfigDict, rng: jax.Array) -> tuple[bert.BertConfig, Any]:
    """A trained encoder of config section c (train_retriever's model.question_encoder / doc_encoder): its config,
    with the section's dropout, and numpy params (random ones drawn from `rng`)."""
    if c.init == "random":
        cfg = _encoder_config(c, jnp.float32)
        return cfg, _random_encoder_params(cfg, rng)
    loaded = _load_encoder(c, hidden_dropout=c.dropout, attention_dropout=c.dropout)
    return loaded.config, loaded.params


def _unbox(tree):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    return nn.meta.unbox(tree)


def load_tokenizers(config: ml_collections.ConfigDict) -> tk.RagTokenizers:
    return tk.RagTokenizers(tk.load_question_tokenizer(config.tokenizers.question),
                            tk.load_generator_tokenizer(config.tokenizers.generator))


def check_vocab(models: Models, doc_config: bert.BertConfig, tokenizers: tk.RagTokenizers,
                config: ml_collections.ConfigDict) -> None:
    """Every id a tokenizer can produce must have a row in the embedding table of the model that reads it."""
    m = config.model
    q_source = m.init_from_rag or {"random": "model.question_encoder.vocab_size",
                                   DOC_ENCODER: "model.doc_encoder"}.get(m.question_encoder.init, m.question_encoder.init)
    g_source = m.init_from_rag or (
        "model.generator.vocab_size" if m.generator.init == "random" else m.generator.init)
    d_source = "model.doc_encoder.vocab_size" if m.doc_encoder.init == "random" else m.doc_encoder.init
    checks = ((len(tokenizers.question), models.rag.question_encoder_config.vocab_size, "question",
               config.tokenizers.question, q_source),
              (len(tokenizers.question), doc_config.vocab_size, "question", config.tokenizers.question, d_source),
              (len(tokenizers.generator), models.rag.generator_config.vocab_size, "generator",
               config.tokenizers.generator, g_source))
    for tok_size, model_size, which, tok_path, source in checks:
        if tok_size > model_size:
            raise ConfigError(
                f"vocabulary size mismatch: the {which} tokenizer ({tok_path}, config tokenizers.{which}) has "
                f"{tok_size} entries but the model's embedding table ({source}) has {model_size} rows; use the "
                "tokenizer the model was trained with, or a vocab_size >= the tokenizer's")


# ---------------------------------------------------------------------------------------------------- data


def data_source(config: ml_collections.ConfigDict, split: str):
    """The train or dev examples: a file when task.{train,dev}_file is set (config_check.task_file: or its old name
    data.{train,dev}_file; NQ-open JSONL, or for any task a format rag_jax/data/task_files.py reads, made into the
    task's examples), else the TFDS NQ-open source."""
    field, path = config_check.task_file(config, split)
    if path is not None:
        task = tasks.from_config(config)
        try:
            if task.name == "qa" and task_files.detect_format(path) == "nq":
                return nq_open.JsonlSource(path)
            return task_base.ExampleSource(path, task)
        except ValueError as e:
            raise ConfigError(f"config {field}: {e}") from None
    return nq_open.get_data_source(config.data.source, split, config.data.data_dir, config.data.manual_dir)


# ---------------------------------------------------------------------------------------------------- index


# Where each identity field of the run's index comes from in its config.
_IDENTITY_SOURCES = {"encoder_id": "model.doc_encoder (and seed, for a random one)",
                     "pooling": "model.doc_encoder.pooling", "normalize": "model.doc_encoder.normalize",
                     "max_length": "index.max_length", "tokenizer_id": "tokenizers.question", "dtype": "index.dtype"}


def index_identity(config: ml_collections.ConfigDict, doc_config: bert.BertConfig, doc_params: Any,
                   question_tokenizer) -> dict[str, Any]:
    """The identity (index_io.IDENTITY_FIELDS) of the index this run's config makes."""
    return {"encoder_id": embed.encoder_fingerprint(doc_config, doc_params), "dtype": config.index.dtype,
            **embed.index_identity(doc_config, question_tokenizer, config.index.max_length)}


def ensure_index(config: ml_collections.ConfigDict, workdir: str, doc_config: bert.BertConfig, doc_params: Any,
                 question_tokenizer, *, progress: bool = True) -> index_io.Index:
    """WORKDIR/index for this run's document encoder: linked to config index.dir, or built (resumably) there.

    An index already there that the config would not make (another document encoder, tokenizer, length or dtype)
    is refused naming the config field: the run's question encoder was trained against it.
    """
    target = workdir_lib.index_dir(workdir)
    identity = index_identity(config, doc_config, doc_params, question_tokenizer)
    if config.index.dir is not None and not os.path.exists(target):
        require_path(config.index.dir, "index.dir", "a prebuilt index directory", directory=True)
        os.makedirs(workdir, exist_ok=True)
        os.symlink(os.path.abspath(config.index.dir), target)
    recorded = index_io.read_metadata(target) if os.path.isdir(target) else None
    mismatch = recorded is not None and index_io.identity_mismatch(recorded, identity)
    if mismatch:
        field, got, want = mismatch
        remedy = ("point index.dir at an index built with the run's settings" if config.index.dir is not None else
                  "resume with the config the run was started with, or train into a new --workdir (or delete "
                  f"{target} to rebuild it, if no checkpoint was trained against it)")
        raise ConfigError(f"{target}: the run's index has {field}={got!r}, but this config gives {want!r} (config "
                          f"{_IDENTITY_SOURCES[field]}); {remedy}")
    try:
        index = index_io.load_index(target, expected_encoder=identity["encoder_id"])
    except index_io.IndexFormatError:
        if config.index.dir is not None:  # a linked index is never rebuilt here: say why it does not fit
            raise
        index = embed.build_index(
            doc_config, doc_params, question_tokenizer, config.data.passages, target,
            encoder_id=identity["encoder_id"], batch_size=config.index.batch_size, max_length=config.index.max_length,
            shard_size=config.index.shard_size, dtype=config.index.dtype, backend="exact", progress=progress)
    if config.index.backend == "scann" and "scann" not in index.metadata.get("backends", {}):
        scann_backend.build_scann_index(index)
    if config.index.get("codes") and not (index.metadata.get("codes") or {}).get("complete"):
        index = index_codes.write_codes(index, code_spec.parse_spec(config.index.codes, "config index.codes"),
                                        sample_size=config.index.codes_sample, seed=config.index.codes_seed)
    return index
