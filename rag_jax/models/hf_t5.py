"""Import and export of Hugging Face T5ForConditionalGeneration weights (T5 v1.0, v1.1, Flan-T5), alone or as the
generator of a RAG checkpoint: the T5 table of rag_jax/models/hf_tables.py's kind.

Whether the LM head is tied is read from the weights, not from config.json: transformers 5 writes
`tie_word_embeddings: true` for every T5 and keeps an untied head (v1.1, Flan-T5) only when the checkpoint holds an
`lm_head.weight` that differs from `shared.weight`. Whether the decoder output is scaled by d_model**-0.5 is
`scale_decoder_outputs` (transformers 5), else the old meaning of `tie_word_embeddings` (true for v1.0).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from rag_jax.models import t5
from rag_jax.models.hf_files import CheckpointError
from rag_jax.models.hf_tables import Entry, attention, convert, expected_shapes

_ATTENTION_NAMES = {"query": "q", "key": "k", "value": "v", "out": "o"}
# Tied copies of the shared embedding, and a cross-attention relative bias that T5 never uses (old checkpoints).
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")  # fmt: skip


def _weight(hf: str, path: tuple[str, ...], n_in: int = 1) -> Entry:
    return Entry(f"{hf}.weight", path + ("kernel",), "linear", n_in)


def table(cfg: t5.T5Config) -> list[Entry]:
    entries = [Entry("shared.weight", ("shared", "embedding"))]
    if not cfg.tie_word_embeddings:
        entries.append(_weight("lm_head", ("lm_head",)))
    ffn = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        entries.append(Entry(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                             (f"{side}_relative_bias", "embedding", "embedding")))  # fmt: skip
        entries.append(Entry(f"{side}.final_layer_norm.weight", (f"{side}_final_norm", "scale")))
        for i in range(n_layers):
            hf, ours = f"{side}.block.{i}.layer", (f"{side}_layer_{i}",)
            sublayers = [("SelfAttention", "self_attn")] + ([("EncDecAttention", "cross_attn")] if side == "decoder" else [])
            for j, (hf_attn, our_attn) in enumerate(sublayers):
                names = {k: f"{hf}.{j}.{hf_attn}.{v}" for k, v in _ATTENTION_NAMES.items()}
                entries += [e for e in attention(names, ours + (our_attn,)) if e.path[-1] != "bias"]
                entries.append(Entry(f"{hf}.{j}.layer_norm.weight", ours + (f"{our_attn}_norm", "scale")))
            j = len(sublayers)
            entries += [_weight(f"{hf}.{j}.DenseReluDense.{name}", ours + ("ffn", name)) for name in ffn]
            entries.append(Entry(f"{hf}.{j}.layer_norm.weight", ours + ("ffn_norm", "scale")))
    return entries


def config_from_hf(hf: dict[str, Any], *, tie_word_embeddings: bool | None = None, **overrides) -> t5.T5Config:
    """A T5Config from a T5 config.json dict; `tie_word_embeddings` as read from the weights when known."""
    old_tie = hf.get("tie_word_embeddings", True) is not False
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        encoder_layers=hf["num_layers"],
        decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        tie_word_embeddings=old_tie if tie_word_embeddings is None else tie_word_embeddings,
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", old_tie)),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        dropout=hf.get("dropout_rate", 0.1),
        attention_dropout=hf.get("dropout_rate", 0.1),
        initializer_factor=hf.get("initializer_factor", 1.0),
        pad_token_id=hf.get("pad_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 1),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
    )
    fields.update(overrides)
    return t5.T5Config(**fields)


def config_dict(cfg: t5.T5Config) -> dict[str, Any]:
    """transformers.T5Config fields for `cfg` (both the old and the transformers-5 way of saying v1.0 or v1.1)."""
    return dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers, num_heads=cfg.heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings, scale_decoder_outputs=cfg.scale_decoder_outputs,
        layer_norm_epsilon=cfg.layer_norm_eps, dropout_rate=cfg.dropout, initializer_factor=cfg.initializer_factor,
        pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
    )  # fmt: skip


def is_tied(tensors: dict[str, np.ndarray], prefix: str) -> bool:
    """Whether the checkpoint's LM head is its shared embedding (no `lm_head.weight`, or an identical one)."""
    head = tensors.get(prefix + "lm_head.weight")
    return head is None or np.array_equal(np.asarray(head), np.asarray(tensors[prefix + "shared.weight"]))


def params(tensors: dict[str, np.ndarray], prefix: str, hf: dict[str, Any], source: str, used: set[str], **overrides):
    """(T5Config, parameters) of the T5 whose tensors are named `prefix + <T5ForConditionalGeneration name>`."""
    if prefix + "shared.weight" not in tensors and prefix + "encoder.embed_tokens.weight" in tensors:
        tensors = dict(tensors, **{prefix + "shared.weight": tensors[prefix + "encoder.embed_tokens.weight"]})
    if prefix + "shared.weight" not in tensors:
        raise CheckpointError(f"{source}: missing weight {prefix}shared.weight (the T5 embedding)")
    cfg = config_from_hf(hf, tie_word_embeddings=is_tied(tensors, prefix), **overrides)
    entries = table(cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    converted = convert(tensors, prefix, entries, expected_shapes(t5.T5(cfg), ids, ids, ids), source)
    used.update(prefix + e.hf_name for e in entries)
    used.update(prefix + n for n in _IGNORED + ("lm_head.weight",))
    return cfg, converted
