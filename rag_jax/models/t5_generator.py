"""T5 (v1.0, v1.1, Flan-T5) as RAG's generator: its registry entry (rag_jax/models/registry.py). The network is t5.py,
its Hugging Face table and config reading hf_t5.py; this module says how a run config builds one, what it costs,
and how its SentencePiece tokenizer is recognised.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rag_jax.models import hf, hf_t5, registry, t5


def holds_t5_tokenizer(path: str) -> bool:
    """Whether `path` holds a T5 SentencePiece tokenizer (spiece.model, or a tokenizer_config.json naming a T5
    tokenizer); a hub id (not a directory) is taken as T5 when its name says t5."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return "t5" in path.lower()
    if os.path.isfile(os.path.join(path, "spiece.model")):
        return True
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return str(json.load(f).get("tokenizer_class", "")).startswith("T5")


# <pad>=0, </s>=1, <unk>=2, no BOS, 100 <extra_id_*> sentinels at the top
TOKENIZER = registry.TokenizerKind(cls="T5Tokenizer", file_sets=(("tokenizer.json",), ("spiece.model",)),
                                   probe="▁the", what="Generator (T5)", matches=holds_t5_tokenizer)


def config_from_run(c, dtype) -> t5.T5Config:
    """A random-init T5 from a run config's model.generator section: v1.0 (tied LM head, scaled decoder output)
    unless feed_forward_proj is gated (v1.1, Flan-T5)."""
    v1_0 = not c.feed_forward_proj.startswith("gated-")
    return t5.T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.ffn_dim, encoder_layers=c.encoder_layers,
        decoder_layers=c.decoder_layers, heads=c.heads, feed_forward_proj=c.feed_forward_proj,
        tie_word_embeddings=v1_0, scale_decoder_outputs=v1_0, dropout=c.dropout,
        attention_dropout=c.attention_dropout, dtype=dtype)


def sizes_to_run(c, cfg: t5.T5Config) -> None:
    c.vocab_size, c.d_model, c.encoder_layers, c.decoder_layers = (cfg.vocab_size, cfg.d_model, cfg.encoder_layers,
                                                                   cfg.decoder_layers)
    c.heads, c.ffn_dim, c.d_kv, c.feed_forward_proj = cfg.heads, cfg.d_ff, cfg.d_kv, cfg.feed_forward_proj


def check_run_config(config) -> str | None:
    del config  # heads have their own width (d_kv), and relative positions take any length
    return None


def export_extras(cfg: t5.T5Config, prefix: str) -> dict[str, Any]:
    # bos_token_id None said explicitly: transformers' RAG-Sequence loss reads it from the generator's config
    del cfg
    return {"bos_token_id": None, **({"prefix": prefix} if prefix else {})}


def forward_flops(cfg: t5.T5Config, rows: int, source_length: int, target_length: int) -> int:
    """Matmul FLOPs of one teacher-forced forward pass of T5 over `rows` (source, target) pairs, LM head included.
    Attention projections map d_model to heads * d_kv (not d_model); a gated feed-forward has two input matrices."""
    e, inner, s, t = cfg.d_model, cfg.heads * cfg.d_kv, source_length, target_length
    ffn_inputs = 2 if cfg.gated else 1

    def attention(q_len, kv_len):
        return 2 * 2 * rows * (q_len + kv_len) * e * inner + 2 * 2 * rows * q_len * kv_len * inner

    def ffn(length):
        return 2 * rows * length * e * cfg.d_ff * (ffn_inputs + 1)

    encoder = cfg.encoder_layers * (attention(s, s) + ffn(s))
    decoder = cfg.decoder_layers * (attention(t, t) + attention(t, s) + ffn(t))
    return encoder + decoder + 2 * rows * t * e * cfg.vocab_size


ENTRY = registry.register(registry.Generator(
    name="t5", config_class=t5.T5Config, module_class=t5.T5, hf_model_type="t5", hf_config_class="T5Config",
    config_from_run=config_from_run, sizes_to_run=sizes_to_run, check_run_config=check_run_config,
    config_from_hf=hf_t5.config_from_hf, params_from_hf=hf_t5.params, load=hf.load_t5, hf_table=hf_t5.table,
    hf_config_dict=hf_t5.config_dict, hf_export_extras=export_extras, forward_flops=forward_flops,
    tokenizer=TOKENIZER,
))  # fmt: skip
