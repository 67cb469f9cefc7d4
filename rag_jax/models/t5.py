"""T5 encoder-decoder as in Hugging Face's `T5ForConditionalGeneration`: RAG's other generator (T5 v1.0, v1.1 and
Flan-T5).

Pre-norm layers with T5's RMS layer norm (no mean, no bias), attention without biases and without scaling of the
logits, relative position biases (one table per stack, held by the first layer in Hugging Face's layout and shared
by all layers: bidirectional buckets in the encoder, causal ones in the decoder; none in cross-attention), a
feed-forward of ReLU (v1.0) or gated GELU (v1.1, Flan-T5), and an LM head that is either the shared embedding with
the decoder output scaled by d_model**-0.5 (v1.0) or its own matrix (v1.1).

The interface is BART's (`rag_jax.models.bart.Bart`): encode, decode, __call__, init_cache, decode_step with the
same `DecodeCache`, so RAG's losses and every decoding mode take either generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rag_jax.models import layers


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 1024
    d_kv: int = 64
    d_ff: int = 2816
    encoder_layers: int = 24
    decoder_layers: int = 24
    heads: int = 16
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"  # "relu" (v1.0) or "gated-gelu" (v1.1, Flan-T5); "gated-<act>" in general
    tie_word_embeddings: bool = False  # the LM head is the shared embedding (v1.0) or its own matrix (v1.1)
    scale_decoder_outputs: bool = False  # decoder output times d_model**-0.5 before the head (v1.0)
    layer_norm_eps: float = 1e-6
    dropout: float = 0.1
    attention_dropout: float = 0.1  # Hugging Face's T5 uses dropout_rate for both
    initializer_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    bos_token_id: int | None = None  # T5 has no BOS, so exclude_bos_score has nothing to exclude
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        layers.activation(self.activation_name)
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: expected 'relu', 'gelu' or "
                             "'gated-<activation>' such as 'gated-gelu'")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (gelu_new), as the original T5 v1.1 does
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def init_std(self) -> float:
        """One std for every projection: Hugging Face's d_model**-0.5 of the input-side projections."""
        return self.initializer_factor * self.d_model**-0.5


def relative_position_bucket(relative_QxK: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket (int32) of each relative position key - query, as transformers computes it (float32 logs)."""
    buckets = jnp.zeros_like(relative_QxK)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_QxK > 0).astype(relative_QxK.dtype) * num_buckets
        distance = jnp.abs(relative_QxK)
    else:
        distance = -jnp.minimum(relative_QxK, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_QxK.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativeBias(nn.Module):
    """The additive attention bias (1, H, Q, K) of relative positions, from a (buckets, heads) table."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions_Q: jax.Array, num_keys: int) -> jax.Array:
        cfg = self.config
        table = layers.embedding(cfg.relative_attention_num_buckets, cfg.heads, ("position", "heads"),
                                 cfg.param_dtype, cfg.init_std, "embedding")  # fmt: skip
        relative_QxK = jnp.arange(num_keys)[None, :] - query_positions_Q[:, None]
        bucket_QxK = relative_position_bucket(relative_QxK, self.bidirectional, cfg.relative_attention_num_buckets,
                                              cfg.relative_attention_max_distance)  # fmt: skip
        return layers.at_least_float32(table(bucket_QxK)).transpose(2, 0, 1)[None]


def _attention(cfg: T5Config, name: str) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        num_heads=cfg.heads, head_dim=cfg.d_kv, features=cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        init_std=cfg.init_std, dropout_rate=cfg.attention_dropout, use_bias=False, scale_query=False, name=name,
    )  # fmt: skip


class FeedForward(nn.Module):
    """wo(act(wi x)) (v1.0) or wo(act(wi_0 x) * wi_1 x) (gated, v1.1), without biases."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std, use_bias=False)
        act = layers.activation(cfg.activation_name)
        if cfg.gated:
            wi_0 = layers.dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", **common)(x)
            h = act(wi_0) * layers.dense(cfg.d_ff, ("embed", "mlp"), name="wi_1", **common)(x)
        else:
            h = act(layers.dense(cfg.d_ff, ("embed", "mlp"), name="wi", **common)(x))
        h = layers.constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return layers.dense(cfg.d_model, ("mlp", "embed"), name="wo", **common)(h)


class Layer(nn.Module):
    """One pre-norm T5 block: self-attention, cross-attention (decoder only), feed-forward, each x + f(norm(x))."""

    config: T5Config
    is_decoder: bool

    def setup(self):
        cfg = self.config
        self.self_attn = _attention(cfg, "self_attn")
        self.self_attn_norm = layers.rms_norm(cfg.layer_norm_eps, cfg.param_dtype, "self_attn_norm")
        if self.is_decoder:
            self.cross_attn = _attention(cfg, "cross_attn")
            self.cross_attn_norm = layers.rms_norm(cfg.layer_norm_eps, cfg.param_dtype, "cross_attn_norm")
        self.ffn = FeedForward(cfg)
        self.ffn_norm = layers.rms_norm(cfg.layer_norm_eps, cfg.param_dtype, "ffn_norm")
        self.dropout = nn.Dropout(cfg.dropout)

    def cross_kv(self, encoder_out_BxSxE: jax.Array) -> layers.KVCache:
        return self.cross_attn.project_kv(encoder_out_BxSxE)

    def _residual(self, x: jax.Array, h: jax.Array, deterministic: bool) -> jax.Array:
        x = x + self.dropout(h, deterministic=deterministic).astype(x.dtype)
        return layers.constrain(x, ("batch", "length", "embed"))

    def __call__(
        self,
        x_BxTxE: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array | None = None,
        *,
        encoder_out_BxSxE: jax.Array | None = None,
        self_kv: layers.KVCache | None = None,
        cross_kv: layers.KVCache | None = None,
        cache_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, layers.KVCache | None]:
        """With `self_kv` (incremental decoding) the new keys/values are written into it at `cache_index` and the
        updated cache is returned; without it, a full pass."""
        cfg = self.config
        h = self.self_attn_norm(x_BxTxE).astype(cfg.dtype)
        if self_kv is not None:
            self_kv = self.self_attn.append_kv(h, self_kv, cache_index)
        x = self._residual(x_BxTxE, self.self_attn(h, self_bias, kv=self_kv, deterministic=deterministic),
                           deterministic)  # fmt: skip
        if self.is_decoder:
            h = self.cross_attn_norm(x).astype(cfg.dtype)
            h = self.cross_attn(h, cross_bias, inputs_kv_BxKxE=encoder_out_BxSxE, kv=cross_kv,
                                deterministic=deterministic)  # fmt: skip
            x = self._residual(x, h, deterministic)
        h = self.ffn(self.ffn_norm(x).astype(cfg.dtype), deterministic)
        return self._residual(x, h, deterministic), self_kv


class T5(layers.EncoderDecoder):
    """T5 for conditional generation, with the methods of `rag_jax.models.bart.Bart`:
      encode(input_ids, attention_mask) -> encoder states (B, S, E)
      decode(decoder_input_ids, encoder_out, encoder_mask, decoder_mask=None) -> logits (B, T, V), float32
      __call__(input_ids, attention_mask, decoder_input_ids, decoder_mask=None) -> logits
      init_cache(encoder_out, encoder_mask, max_length) -> DecodeCache
      decode_step(decoder_input_ids (B, T), cache) -> (logits (B, T, V), cache)
    """

    config: T5Config

    def setup(self):
        cfg = self.config
        self.shared = layers.embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.param_dtype,
                                       cfg.initializer_factor, "shared")  # fmt: skip
        self.encoder_relative_bias = RelativeBias(cfg, bidirectional=True)
        self.decoder_relative_bias = RelativeBias(cfg, bidirectional=False)
        self.encoder_layers = [Layer(cfg, False, name=f"encoder_layer_{i}") for i in range(cfg.encoder_layers)]
        self.decoder_layers = [Layer(cfg, True, name=f"decoder_layer_{i}") for i in range(cfg.decoder_layers)]
        self.encoder_final_norm = layers.rms_norm(cfg.layer_norm_eps, cfg.param_dtype, "encoder_final_norm")
        self.decoder_final_norm = layers.rms_norm(cfg.layer_norm_eps, cfg.param_dtype, "decoder_final_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                        init_std=cfg.initializer_factor, use_bias=False, name="lm_head")  # fmt: skip
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, ids_BxT: jax.Array, deterministic: bool) -> jax.Array:
        x = self.dropout(self.shared(ids_BxT).astype(self.config.dtype), deterministic=deterministic)
        return layers.constrain(x, ("batch", "length", "embed"))

    def _final(self, x: jax.Array, norm: nn.Module, deterministic: bool) -> jax.Array:
        return self.dropout(norm(x).astype(self.config.dtype), deterministic=deterministic)

    def encode(self, input_ids_BxS: jax.Array, attention_mask_BxS: jax.Array, deterministic: bool = True):
        length = input_ids_BxS.shape[1]
        x = self._embed(input_ids_BxS, deterministic)
        bias = self.encoder_relative_bias(jnp.arange(length), length) + layers.padding_bias(attention_mask_BxS)
        for layer in self.encoder_layers:
            x, _ = layer(x, bias, deterministic=deterministic)
        return self._final(x, self.encoder_final_norm, deterministic)

    def _head_features(self, x_BxTxE: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        x = self._final(x_BxTxE, self.decoder_final_norm, deterministic)
        if cfg.scale_decoder_outputs:
            x = x * jnp.asarray(cfg.d_model**-0.5, cfg.dtype)
        return x

    def _logits(self, x_BxTxE: jax.Array, deterministic: bool) -> jax.Array:
        x = self._head_features(x_BxTxE, deterministic)
        logits = layers.tied_logits(x, self.shared) if self.config.tie_word_embeddings else self.lm_head(x)
        return layers.constrain(layers.at_least_float32(logits), ("batch", "length", "vocab"))

    def lm_head_arrays(self) -> tuple[jax.Array, None]:
        """The LM head as (kernel (V, E), no bias): logits = decode(..., head=False) @ kernel.T, for callers that
        take the logits a slice of the vocabulary at a time."""
        if self.config.tie_word_embeddings:
            return self.shared.embedding, None
        return self.lm_head.variables["params"]["kernel"].T, None

    def _self_bias(self, positions_T: jax.Array, num_keys: int) -> jax.Array:
        return self.decoder_relative_bias(positions_T, num_keys) + layers.causal_bias(positions_T, num_keys)

    def decode(
        self,
        decoder_input_ids_BxT: jax.Array,
        encoder_out_BxSxE: jax.Array,
        encoder_mask_BxS: jax.Array,
        decoder_mask_BxT: jax.Array | None = None,
        deterministic: bool = True,
        head: bool = True,
    ) -> jax.Array:
        """Logits (B, T, V), float32; with head=False the features (B, T, E) the LM head maps to them
        (lm_head_arrays)."""
        length = decoder_input_ids_BxT.shape[1]
        x = self._embed(decoder_input_ids_BxT, deterministic)
        x = layers.run_decoder_layers(self.decoder_layers, x, self._self_bias(jnp.arange(length), length),
                                      decoder_mask_BxT, encoder_out_BxSxE, encoder_mask_BxS, deterministic)  # fmt: skip
        if not head:
            return self._head_features(x, deterministic)
        return self._logits(x, deterministic)

    def init_cache(self, encoder_out_BxSxE: jax.Array, encoder_mask_BxS: jax.Array, max_length: int):
        """An empty decode cache for up to `max_length` decoder positions, with the cross-attention keys/values."""
        cfg = self.config
        return layers.empty_decode_cache(self.decoder_layers, encoder_out_BxSxE, encoder_mask_BxS, max_length,
                                         cfg.heads, cfg.d_kv, cfg.dtype)  # fmt: skip

    def decode_step(self, decoder_input_ids_BxT: jax.Array, cache: layers.DecodeCache):
        """Decodes T new positions (usually 1) after the `cache.index` already in the cache."""
        length = decoder_input_ids_BxT.shape[1]
        max_length = cache.self_kv[0].key.shape[2]
        x = self._embed(decoder_input_ids_BxT, True)
        self_bias = self._self_bias(cache.index + jnp.arange(length), max_length)
        x, cache = layers.run_decoder_layers_cached(self.decoder_layers, x, self_bias, cache)
        return self._logits(x, True), cache
