"""Import of Hugging Face checkpoints (BERT, DPR encoders, BART, T5, whole RAG models) into rag_jax parameters.

Each architecture has one table (rag_jax/models/hf_tables.py says how they work); T5 has its own module, hf_t5.py.
Which generator a checkpoint holds is its config.json's model_type, looked up in the generator registry
(rag_jax/models/registry.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.models import bart, bert, hf_files, hf_t5, registry, sentence_transformers_dir
from rag_jax.models.hf_tables import Entry, check_unexpected, convert, expected_shapes, export_tensors  # noqa: F401
from rag_jax.models.hf_tables import attention as _attention
from rag_jax.models.hf_tables import linear as _linear
from rag_jax.models.hf_tables import norm as _norm
from rag_jax.models.hf_files import CheckpointError
from rag_jax.models.sentence_transformers_dir import pretrained_retriever_dir  # noqa: F401 (part of this interface)


def bert_table(cfg: bert.BertConfig) -> list[Entry]:
    table = [
        Entry("embeddings.word_embeddings.weight", ("word", "embedding")),
        Entry("embeddings.position_embeddings.weight", ("position", "embedding")),
        Entry("embeddings.token_type_embeddings.weight", ("token_type", "embedding")),
        *_norm("embeddings.LayerNorm", ("embedding_norm",)),
    ]
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
        names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "out": "attention.output.dense"}  # fmt: skip
        table += _attention({k: f"{hf}.{v}" for k, v in names.items()}, ours + ("attention",))
        table += _norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",))
        table += _linear(f"{hf}.intermediate.dense", ours + ("intermediate",))
        table += _linear(f"{hf}.output.dense", ours + ("output",))
        table += _norm(f"{hf}.output.LayerNorm", ours + ("output_norm",))
    if cfg.pooling == "pooler":
        table += _linear("pooler.dense", ("pooler",))
    return table


def bart_table(cfg: bart.BartConfig) -> list[Entry]:
    table = [
        Entry("model.shared.weight", ("shared", "embedding")),
        Entry("final_logits_bias", ("final_logits_bias",), "row"),
    ]
    attention_names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        table.append(Entry(f"model.{side}.embed_positions.weight", (f"{side}_positions", "embedding")))
        table += _norm(f"model.{side}.layernorm_embedding", (f"{side}_embedding_norm",))
        for i in range(n_layers):
            hf, ours = f"model.{side}.layers.{i}", (f"{side}_layer_{i}",)
            attentions = [("self_attn", "self_attn")] + ([("encoder_attn", "cross_attn")] if side == "decoder" else [])
            for hf_attn, our_attn in attentions:
                table += _attention({k: f"{hf}.{hf_attn}.{v}" for k, v in attention_names.items()}, ours + (our_attn,))
                table += _norm(f"{hf}.{hf_attn}_layer_norm", ours + (f"{our_attn}_norm",))
            table += _linear(f"{hf}.fc1", ours + ("ffn", "fc1"))
            table += _linear(f"{hf}.fc2", ours + ("ffn", "fc2"))
            table += _norm(f"{hf}.final_layer_norm", ours + ("ffn_norm",))
    return table


# Tensors a checkpoint may hold that carry nothing we need: tied copies of the shared embedding and buffers.
_BART_IGNORED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


# --------------------------------------------------------------------------------------------------- configs


def bert_config_from_hf(hf: dict[str, Any], *, pooling: str = "cls", **overrides) -> bert.BertConfig:
    """A BertConfig from a BERT or DPR config.json dict."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=hf.get("hidden_act", "gelu"),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id") or 0,
        pooling=pooling,
        projection_dim=hf.get("projection_dim", 0) or 0,
    )
    fields.update(overrides)
    return bert.BertConfig(**fields)


def bart_config_from_hf(hf: dict[str, Any], **overrides) -> bart.BartConfig:
    if hf.get("add_final_layer_norm") or hf.get("normalize_before"):
        raise CheckpointError("pre-LayerNorm BART variants (mBART-style add_final_layer_norm) are not supported")
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"],
        encoder_heads=hf["encoder_attention_heads"],
        decoder_heads=hf["decoder_attention_heads"],
        encoder_ffn_dim=hf["encoder_ffn_dim"],
        decoder_ffn_dim=hf["decoder_ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"],
        activation_function=hf.get("activation_function", "gelu"),
        scale_embedding=bool(hf.get("scale_embedding", False)),
        dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.0),
        activation_dropout=hf.get("activation_dropout", 0.0),
        init_std=hf.get("init_std", 0.02),
        pad_token_id=hf.get("pad_token_id", 1),
        bos_token_id=hf.get("bos_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 2),
        decoder_start_token_id=hf.get("decoder_start_token_id", 2),
    )
    fields.update(overrides)
    return bart.BartConfig(**fields)


def _normalise_legacy_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta."""
    renamed = {}
    for name, value in tensors.items():
        if name.endswith("LayerNorm.gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[: -len("beta")] + "bias"
        renamed[name] = value
    return renamed


def bert_prefix(tensors: dict[str, np.ndarray], source: str) -> str:
    """The prefix before `embeddings.word_embeddings.weight` ('' for BertModel, 'bert.' for heads, DPR's ...)."""
    prefixes = [n[: -len("embeddings.word_embeddings.weight")] for n in tensors
                if n.endswith("embeddings.word_embeddings.weight")]  # fmt: skip
    if len(prefixes) != 1:
        raise CheckpointError(f"{source}: expected exactly one BERT embedding table, found {len(prefixes)}")
    return prefixes[0]


def _bert_params(tensors, prefix, cfg, source, used: set[str]):
    table = bert_table(cfg)
    module = bert.BertEncoder(cfg)
    params = convert(tensors, prefix, table, expected_shapes(module, jnp.zeros((1, 1), jnp.int32)), source)
    used.update(prefix + e.hf_name for e in table)
    if cfg.pooling != "pooler":  # BertModel checkpoints carry a pooler that DPR-style pooling does not use
        used.update(n for n in tensors if n.startswith(prefix + "pooler."))
    return params


def _projection(tensors, prefix, cfg, params, source, used):
    if cfg.projection_dim:
        table = _linear("encode_proj", ("projection",))
        shapes = {"projection": {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, cfg.projection_dim), jnp.float32),
                                 "bias": jax.ShapeDtypeStruct((cfg.projection_dim,), jnp.float32)}}  # fmt: skip
        params.update(convert(tensors, prefix, table, shapes, source))
        used.update(prefix + e.hf_name for e in table)
    return params


def bart_params(tensors, prefix, cfg, source, used: set[str]):
    if prefix + "model.shared.weight" not in tensors and prefix + "model.encoder.embed_tokens.weight" in tensors:
        tensors = dict(tensors, **{prefix + "model.shared.weight": tensors[prefix + "model.encoder.embed_tokens.weight"]})
    table = bart_table(cfg)
    module = bart.Bart(cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = expected_shapes(module, ids, ids, ids)
    params = convert(tensors, prefix, table, shapes, source, optional=("final_logits_bias",))
    used.update(prefix + e.hf_name for e in table)
    used.update(prefix + n for n in _BART_IGNORED)
    return params


# --------------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Loaded:
    """A loaded network: its config, its parameters (numpy, unboxed), and the source config.json."""

    config: Any
    params: dict[str, Any]
    hf_config: dict[str, Any]

    def module(self) -> nn.Module:
        return module_for(self.config)


def module_for(config) -> nn.Module:
    """The network a config describes: a BertEncoder, or the generator its registry entry builds."""
    if isinstance(config, bert.BertConfig):
        return bert.BertEncoder(config)
    return registry.for_config(config).module_class(config)


@dataclasses.dataclass
class LoadedRag:
    question_encoder: Loaded
    generator: Loaded
    hf_config: dict[str, Any]  # the RagConfig dict: n_docs, title_sep, doc_sep, max_combined_length, ...
    directory: str


def load_encoder(path: str, *, pooling: str | None = None, **overrides) -> Loaded:
    """A BERT-family encoder: BertModel (pooler output by default), DPR question/context encoder, or a
    sentence-transformers directory (whose modules.json sets pooling and normalize); `pooling` and a `normalize`
    override take precedence."""
    directory = hf_files.resolve(path)
    pipeline = sentence_transformers_dir.read_pipeline(directory)
    if pipeline is not None:
        directory, pooling = pipeline.transformer_dir, pooling or pipeline.pooling
        overrides = {"normalize": pipeline.normalize, **overrides}
    hf = hf_files.read_config(directory)
    model_type = hf.get("model_type")
    if model_type not in ("bert", "dpr"):
        raise CheckpointError(
            f"{directory}/config.json: model_type {model_type!r} is not a BERT/DPR encoder (expected 'bert' or 'dpr')"
        )
    tensors, source = hf_files.read_weights(directory)
    tensors = _normalise_legacy_names(tensors)
    prefix = bert_prefix(tensors, source)
    if pooling is None:
        pooling = "pooler" if model_type == "bert" and prefix + "pooler.dense.weight" in tensors else "cls"
    cfg = bert_config_from_hf(hf, pooling=pooling, **overrides)
    used: set[str] = set()
    params = _bert_params(tensors, prefix, cfg, source, used)
    # DPR keeps encode_proj beside bert_model: 'question_encoder.bert_model.' -> 'question_encoder.'
    outer = prefix[: -len("bert_model.")] if prefix.endswith("bert_model.") else prefix
    params = _projection(tensors, outer, cfg, params, source, used)
    check_unexpected(tensors, used, source)
    return Loaded(cfg, params, hf)


def _read_generator(path: str, model_type: str) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """(config.json dict, tensors, source) of the checkpoint at `path`, whose config must say `model_type`."""
    directory = hf_files.resolve(path)
    hf = hf_files.read_config(directory)
    if hf.get("model_type") != model_type:
        raise CheckpointError(f"{directory}/config.json: model_type {hf.get('model_type')!r} is not {model_type!r}")
    tensors, source = hf_files.read_weights(directory)
    return hf, tensors, source


def load_bart(path: str, **overrides) -> Loaded:
    """BartForConditionalGeneration or BartModel (whose final_logits_bias is then zero)."""
    hf, tensors, source = _read_generator(path, "bart")
    if "model.shared.weight" not in tensors and "shared.weight" in tensors:  # a BartModel checkpoint
        tensors = {("" if n == "final_logits_bias" else "model.") + n: v for n, v in tensors.items()}
    cfg = bart_config_from_hf(hf, **overrides)
    used: set[str] = set()
    params = bart_params(tensors, "", cfg, source, used)
    check_unexpected(tensors, used, source)
    return Loaded(cfg, params, hf)


def load_t5(path: str, **overrides) -> Loaded:
    """T5ForConditionalGeneration (T5 v1.0, v1.1, Flan-T5)."""
    hf, tensors, source = _read_generator(path, "t5")
    used: set[str] = set()
    cfg, params = hf_t5.params(tensors, "", hf, source, used, **overrides)
    check_unexpected(tensors, used, source)
    return Loaded(cfg, params, hf)


def _generator_entry(model_type: str | None, where: str) -> registry.Generator:
    entry = registry.for_hf(model_type)
    if entry is None:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a generator rag_jax imports "
                              f"({', '.join(map(repr, registry.hf_model_types()))})")
    return entry


def load_generator(path: str, **overrides) -> Loaded:
    """A generator checkpoint (BART, T5, or another registered architecture), as its config.json's model_type says."""
    directory = hf_files.resolve(path)
    model_type = hf_files.read_config(directory).get("model_type")
    return _generator_entry(model_type, f"{directory}/config.json").load(directory, **overrides)


def generator_config_from_hf(hf: dict[str, Any], **overrides) -> Any:
    """The generator config of a generator's config.json dict (sizes only: a T5's head tying is read from its
    weights when it loads)."""
    return _generator_entry(hf.get("model_type"), "config.json").config_from_hf(hf, **overrides)


RAG_QUESTION_ENCODER_PREFIX = "rag.question_encoder.question_encoder."
RAG_GENERATOR_PREFIX = "rag.generator."


def load_rag(path: str, *, encoder_overrides: dict | None = None, generator_overrides: dict | None = None) -> LoadedRag:
    """A RagSequenceForGeneration / RagTokenForGeneration / RagModel checkpoint: question encoder + generator."""
    directory = hf_files.resolve(path)
    hf = hf_files.read_config(directory)
    if hf.get("model_type") != "rag":
        raise CheckpointError(f"{directory}/config.json: model_type {hf.get('model_type')!r} is not 'rag'")
    for part in ("question_encoder", "generator"):
        if part not in hf:
            raise CheckpointError(f"{directory}/config.json: the RAG config has no {part!r} section")
    generator = _generator_entry(hf["generator"].get("model_type"), f"{directory}/config.json: the generator's")
    tensors, source = hf_files.read_weights(directory)
    tensors = _normalise_legacy_names(tensors)
    if not any(n.startswith("rag.") for n in tensors):  # RagModel saves without the 'rag.' prefix
        tensors = {"rag." + n: v for n, v in tensors.items()}
    used: set[str] = set()
    qcfg = bert_config_from_hf(hf["question_encoder"], pooling="cls", **(encoder_overrides or {}))
    qparams = _bert_params(tensors, RAG_QUESTION_ENCODER_PREFIX + "bert_model.", qcfg, source, used)
    qparams = _projection(tensors, RAG_QUESTION_ENCODER_PREFIX, qcfg, qparams, source, used)
    gcfg, gparams = generator.params_from_hf(tensors, RAG_GENERATOR_PREFIX, hf["generator"], source, used,
                                             **(generator_overrides or {}))  # fmt: skip
    check_unexpected(tensors, used, source)
    return LoadedRag(
        question_encoder=Loaded(qcfg, qparams, hf["question_encoder"]),
        generator=Loaded(gcfg, gparams, hf["generator"]),
        hf_config=hf,
        directory=directory,
    )


def load(path: str) -> Loaded | LoadedRag:
    """Loads whatever a directory holds: a RAG model, a generator (BART, T5, ...) or a BERT/DPR encoder."""
    directory = hf_files.resolve(path)
    model_type = hf_files.read_config(directory).get("model_type")
    loaders: dict[str, Callable[[str], Any]] = {"rag": load_rag, "bert": load_encoder, "dpr": load_encoder}
    loaders.update({name: load_generator for name in registry.hf_model_types()})
    if model_type not in loaders:
        raise CheckpointError(
            f"{directory}/config.json: unknown model_type {model_type!r}; rag_jax loads {sorted(loaders)}"
        )
    return loaders[model_type](directory)


# --------------------------------------------------------------------------------------------------- export


def encoder_tensors(cfg: bert.BertConfig, params: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """A BERT/DPR encoder's tensors; `prefix` is what precedes `bert_model.` (DPR) in the target layout."""
    tensors = export_tensors(params, bert_table(cfg), prefix + "bert_model.")
    if cfg.projection_dim:
        tensors.update(export_tensors(params, _linear("encode_proj", ("projection",)), prefix))
    return tensors


def dpr_config_dict(cfg: bert.BertConfig) -> dict[str, Any]:
    """DPRConfig fields for an encoder; DPR has only [CLS] pooling and no normalisation."""
    if cfg.pooling != "cls" or cfg.normalize:
        used = f"{cfg.pooling!r} pooling" + (" with L2 normalisation" if cfg.normalize else "")
        raise CheckpointError(f"DPR has only 'cls' pooling and no normalisation, so this encoder ({used}) cannot be "
                              "exported as one; export the parameters alone (experiments.export --format=orbax)")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        projection_dim=cfg.projection_dim,
    )  # fmt: skip


def bart_config_dict(cfg: bart.BartConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.encoder_heads,
        decoder_attention_heads=cfg.decoder_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
        decoder_ffn_dim=cfg.decoder_ffn_dim, max_position_embeddings=cfg.max_position_embeddings,
        activation_function=cfg.activation_function, scale_embedding=cfg.scale_embedding, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout, init_std=cfg.init_std,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
    )  # fmt: skip
