"""BART encoder-decoder as in Hugging Face's `BartForConditionalGeneration`: RAG's generator.

Learned positions offset by 2 (BART's quirk), `layernorm_embedding`, optional sqrt(d_model) embedding scale,
post-LayerNorm layers, LM head tied to the shared embedding plus `final_logits_bias`.

Incremental decoding keeps an explicit cache (`DecodeCache`): per layer the self-attention keys/values written so
far and the cross-attention keys/values of the encoder output, computed once. Decoding one token at a time gives
the logits of a full forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rag_jax.models import layers

POSITION_OFFSET = 2  # BART's learned positions start at row 2 of the table (fairseq's padding_idx legacy)


@dataclasses.dataclass(frozen=True)
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_heads: int = 16
    decoder_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which BART uses
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for heads, name in ((self.encoder_heads, "encoder_heads"), (self.decoder_heads, "decoder_heads")):
            if self.d_model % heads:
                raise ValueError(f"BartConfig.d_model ({self.d_model}) must be divisible by {name} ({heads})")
        layers.activation(self.activation_function)


DecodeCache = layers.DecodeCache  # shared with T5


def _attention(cfg: BartConfig, heads: int, name: str) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        num_heads=heads,
        head_dim=cfg.d_model // heads,
        features=cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        init_std=cfg.init_std,
        dropout_rate=cfg.attention_dropout,
        name=name,
    )


class FeedForward(nn.Module):
    config: BartConfig
    ffn_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std)
        h = layers.dense(self.ffn_dim, ("embed", "mlp"), name="fc1", **common)(x)
        h = layers.constrain(layers.activation(cfg.activation_function)(h), ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
        h = layers.dense(cfg.d_model, ("mlp", "embed"), name="fc2", **common)(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


def _add_and_norm(cfg: BartConfig, x: jax.Array, h: jax.Array, norm: nn.Module) -> jax.Array:
    return layers.constrain(norm(x + h).astype(cfg.dtype), ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    config: BartConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _attention(cfg, cfg.encoder_heads, "self_attn")(x, bias, deterministic=deterministic)
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = _add_and_norm(cfg, x, h, layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "self_attn_norm"))
        h = FeedForward(cfg, cfg.encoder_ffn_dim, name="ffn")(x, deterministic)
        return _add_and_norm(cfg, x, h, layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "ffn_norm"))


class DecoderLayer(nn.Module):
    config: BartConfig

    def setup(self):
        cfg = self.config
        self.self_attn = _attention(cfg, cfg.decoder_heads, "self_attn")
        self.self_attn_norm = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "self_attn_norm")
        self.cross_attn = _attention(cfg, cfg.decoder_heads, "cross_attn")
        self.cross_attn_norm = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "cross_attn_norm")
        self.ffn = FeedForward(cfg, cfg.decoder_ffn_dim)
        self.ffn_norm = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "ffn_norm")
        self.dropout = nn.Dropout(cfg.dropout)

    def cross_kv(self, encoder_out_BxSxE: jax.Array) -> layers.KVCache:
        return self.cross_attn.project_kv(encoder_out_BxSxE)

    def __call__(
        self,
        x_BxTxE: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
        *,
        encoder_out_BxSxE: jax.Array | None = None,
        self_kv: layers.KVCache | None = None,
        cross_kv: layers.KVCache | None = None,
        cache_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, layers.KVCache | None]:
        """One decoder layer. With `self_kv` (incremental decoding) the new keys/values are written into it at
        `cache_index` and the updated cache is returned; without it, a full causal pass."""
        cfg = self.config
        if self_kv is not None:
            self_kv = self.self_attn.append_kv(x_BxTxE, self_kv, cache_index)
        h = self.self_attn(x_BxTxE, self_bias, kv=self_kv, deterministic=deterministic)
        x = _add_and_norm(cfg, x_BxTxE, self.dropout(h, deterministic=deterministic), self.self_attn_norm)
        h = self.cross_attn(x, cross_bias, inputs_kv_BxKxE=encoder_out_BxSxE, kv=cross_kv, deterministic=deterministic)
        x = _add_and_norm(cfg, x, self.dropout(h, deterministic=deterministic), self.cross_attn_norm)
        x = _add_and_norm(cfg, x, self.ffn(x, deterministic), self.ffn_norm)
        return x, self_kv


class Bart(layers.EncoderDecoder):
    """BART for conditional generation.

    Methods (call through `apply(..., method=...)`):
      encode(input_ids, attention_mask) -> encoder states (B, S, E)
      decode(decoder_input_ids, encoder_out, encoder_mask, decoder_mask=None, head=True) -> logits (B, T, V),
        float32; with head=False the features (B, T, E) the LM head maps to them (see lm_head_arrays)
      lm_head_arrays() -> (kernel (V, E), bias (V,)): logits = features @ kernel.T + bias
      __call__(input_ids, attention_mask, decoder_input_ids, decoder_mask=None) -> logits
      init_cache(encoder_out, encoder_mask, max_length) -> DecodeCache
      decode_step(decoder_input_ids (B, T), cache) -> (logits (B, T, V), cache)
    """

    config: BartConfig

    def setup(self):
        cfg = self.config
        std = cfg.init_std
        self.shared = layers.embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.param_dtype, std, "shared")
        # The position tables are separate for encoder and decoder; both have the +2 offset rows.
        positions = cfg.max_position_embeddings + POSITION_OFFSET
        self.encoder_positions = layers.embedding(
            positions, cfg.d_model, ("position", "embed"), cfg.param_dtype, std, "encoder_positions"
        )
        self.decoder_positions = layers.embedding(
            positions, cfg.d_model, ("position", "embed"), cfg.param_dtype, std, "decoder_positions"
        )
        self.encoder_embedding_norm = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "encoder_embedding_norm")
        self.decoder_embedding_norm = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "decoder_embedding_norm")
        self.encoder_layers = [EncoderLayer(cfg, name=f"encoder_layer_{i}") for i in range(cfg.encoder_layers)]
        self.decoder_layers = [DecoderLayer(cfg, name=f"decoder_layer_{i}") for i in range(cfg.decoder_layers)]
        self.final_logits_bias = self.param(
            "final_logits_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
            (cfg.vocab_size,),
            cfg.param_dtype,
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, ids_BxT: jax.Array, positions_T: jax.Array, table: nn.Embed, norm: nn.Module, deterministic):
        cfg = self.config
        scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0
        x = self.shared(ids_BxT) * scale + table(positions_T + POSITION_OFFSET)[None]
        x = self.dropout(norm(x).astype(cfg.dtype), deterministic=deterministic)
        return layers.constrain(x, ("batch", "length", "embed"))

    def encode(self, input_ids_BxS: jax.Array, attention_mask_BxS: jax.Array, deterministic: bool = True):
        x = self._embed(
            input_ids_BxS,
            jnp.arange(input_ids_BxS.shape[1]),
            self.encoder_positions,
            self.encoder_embedding_norm,
            deterministic,
        )
        bias = layers.padding_bias(attention_mask_BxS)
        for layer in self.encoder_layers:
            x = layer(x, bias, deterministic)
        return x

    def _logits(self, x_BxTxE: jax.Array) -> jax.Array:
        logits = layers.tied_logits(x_BxTxE.astype(self.config.dtype), self.shared)
        # A registered buffer in the reference's BartForConditionalGeneration, not a parameter: it never trains.
        logits = logits + jax.lax.stop_gradient(self.final_logits_bias).astype(logits.dtype)
        return layers.constrain(logits, ("batch", "length", "vocab"))

    def lm_head_arrays(self) -> tuple[jax.Array, jax.Array]:
        """The LM head as arrays, for callers that take the logits a slice of the vocabulary at a time."""
        return self.shared.embedding, jax.lax.stop_gradient(self.final_logits_bias)

    def decode(
        self,
        decoder_input_ids_BxT: jax.Array,
        encoder_out_BxSxE: jax.Array,
        encoder_mask_BxS: jax.Array,
        decoder_mask_BxT: jax.Array | None = None,
        deterministic: bool = True,
        head: bool = True,
    ) -> jax.Array:
        length = decoder_input_ids_BxT.shape[1]
        positions_T = jnp.arange(length)
        x = self._embed(
            decoder_input_ids_BxT, positions_T, self.decoder_positions, self.decoder_embedding_norm, deterministic
        )
        x = layers.run_decoder_layers(self.decoder_layers, x, layers.causal_bias(positions_T, length), decoder_mask_BxT,
                                      encoder_out_BxSxE, encoder_mask_BxS, deterministic)  # fmt: skip
        return self._logits(x) if head else x

    def init_cache(self, encoder_out_BxSxE: jax.Array, encoder_mask_BxS: jax.Array, max_length: int) -> DecodeCache:
        """An empty decode cache for up to `max_length` decoder positions, with the cross-attention keys/values."""
        cfg = self.config
        return layers.empty_decode_cache(self.decoder_layers, encoder_out_BxSxE, encoder_mask_BxS, max_length,
                                         cfg.decoder_heads, cfg.d_model // cfg.decoder_heads, cfg.dtype)  # fmt: skip

    def decode_step(self, decoder_input_ids_BxT: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """Decodes T new positions (usually 1) after the `cache.index` already in the cache."""
        length = decoder_input_ids_BxT.shape[1]
        max_length = cache.self_kv[0].key.shape[2]
        positions_T = cache.index + jnp.arange(length)
        x = self._embed(
            decoder_input_ids_BxT, positions_T, self.decoder_positions, self.decoder_embedding_norm, True
        )
        self_bias = layers.causal_bias(positions_T, max_length)
        x, cache = layers.run_decoder_layers_cached(self.decoder_layers, x, self_bias, cache)
        return self._logits(x), cache
