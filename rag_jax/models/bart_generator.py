"""BART as RAG's generator: its registry entry (rag_jax/models/registry.py). The network is bart.py, its Hugging Face
table and config reading hf.py; this module says how a run config builds and checks one and what it costs.
"""

from __future__ import annotations

from typing import Any

from rag_jax.models import bart, flops, hf, registry

# <s>=0, <pad>=1, </s>=2, <mask>=50264; the default family (no `matches`): byte-level BPE
TOKENIZER = registry.TokenizerKind(cls="BartTokenizerFast",
                                   file_sets=(("tokenizer.json",), ("vocab.json", "merges.txt")), probe="Ġthe",
                                   what="Generator (BART)")


def config_from_run(c, dtype) -> bart.BartConfig:
    """A random-init BART from a run config's model.generator section (one `heads` and `ffn_dim` for both stacks)."""
    return bart.BartConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
        encoder_heads=c.heads, decoder_heads=c.heads, encoder_ffn_dim=c.ffn_dim, decoder_ffn_dim=c.ffn_dim,
        max_position_embeddings=c.max_position_embeddings, dropout=c.dropout, attention_dropout=c.attention_dropout,
        init_std=c.init_std, dtype=dtype)


def sizes_to_run(c, cfg: bart.BartConfig) -> None:
    c.vocab_size, c.d_model, c.encoder_layers, c.decoder_layers = (cfg.vocab_size, cfg.d_model, cfg.encoder_layers,
                                                                   cfg.decoder_layers)
    c.heads, c.ffn_dim, c.max_position_embeddings = cfg.encoder_heads, cfg.encoder_ffn_dim, cfg.max_position_embeddings


def check_run_config(config) -> str | None:
    """A random-init BART's heads must split its width, and its learned positions cover the source and target."""
    m = config.model
    c = m.generator
    if c.init != "random":
        return None  # a checkpoint's sizes are checked when it loads
    if c.d_model % c.heads:
        return (f"config model.generator.d_model={c.d_model} is not divisible by model.generator.heads={c.heads}; "
                "attention heads split the width evenly")
    for field, length in (("model.max_combined_length", m.max_combined_length),
                          ("data.max_target_length", config.data.max_target_length),
                          ("eval.max_length", config.eval.max_length)):
        if m.init_from_rag is None and length > c.max_position_embeddings:
            return (f"config {field}={length} exceeds model.generator.max_position_embeddings="
                    f"{c.max_position_embeddings}; lower it or give the model more positions")
    return None


def params_from_hf(tensors, prefix: str, hf_config: dict[str, Any], source: str, used: set[str], **overrides):
    cfg = hf.bart_config_from_hf(hf_config, **overrides)
    return cfg, hf.bart_params(tensors, prefix, cfg, source, used)


def export_extras(cfg: bart.BartConfig, prefix: str) -> dict[str, Any]:
    del cfg, prefix  # the context prefix is not written for BART (transformers' RagRetriever would prepend it)
    return {"forced_eos_token_id": None}


def forward_flops(cfg: bart.BartConfig, rows: int, source_length: int, target_length: int) -> int:
    """Matmul FLOPs of one teacher-forced forward pass of BART over `rows` (source, target) pairs, LM head included."""
    e, s, t = cfg.d_model, source_length, target_length
    encoder = cfg.encoder_layers * (flops.attention_block(rows, s, s, e)
                                    + flops.feed_forward(rows * s, e, cfg.encoder_ffn_dim))  # fmt: skip
    decoder_layer = (flops.attention_block(rows, t, t, e) + flops.attention_block(rows, t, s, e)
                     + flops.feed_forward(rows * t, e, cfg.decoder_ffn_dim))  # fmt: skip
    lm_head = 2 * rows * t * e * cfg.vocab_size
    return encoder + cfg.decoder_layers * decoder_layer + lm_head


ENTRY = registry.register(registry.Generator(
    name="bart", config_class=bart.BartConfig, module_class=bart.Bart, hf_model_type="bart",
    hf_config_class="BartConfig", config_from_run=config_from_run, sizes_to_run=sizes_to_run,
    check_run_config=check_run_config, config_from_hf=hf.bart_config_from_hf, params_from_hf=params_from_hf,
    load=hf.load_bart, hf_table=hf.bart_table, hf_config_dict=hf.bart_config_dict, hf_export_extras=export_extras,
    forward_flops=forward_flops, tokenizer=TOKENIZER,
))  # fmt: skip
