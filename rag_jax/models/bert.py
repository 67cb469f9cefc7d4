"""BERT encoders as DPR uses them: the question encoder q(x) and the document encoder d(z) of RAG.

A post-LayerNorm BERT whose pooled output is chosen by `pooling`:
  "cls"     the [CLS] hidden state (DPR; `pooler_output` of DPRQuestionEncoder / DPRContextEncoder),
  "pooler"  BERT's dense + tanh pooler over [CLS] (BertModel's `pooler_output`),
  "mean"    the mean of the non-padding hidden states (sentence-transformers style retrievers),
optionally followed by a linear projection (DPR's `encode_proj`, when `projection_dim` > 0), and by L2
normalisation when `normalize` (sentence-transformers' Normalize module: inner products of such vectors are the
cosine similarities the model was trained to rank by), and by a score scale (`score_scale`, fixed or learnt: what
the softmax over retrieved documents sees is scale x q(x)·d(z)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.models import layers

POOLINGS = ("cls", "pooler", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    pooling: str = "cls"
    projection_dim: int = 0
    normalize: bool = False
    # Multiplies the output vector (a question encoder's: retrieval scores q(x)·d(z) are then on this scale before
    # every softmax over documents; rankings are unchanged). With `learn_score_scale` it starts here and is trained
    # as a parameter (its log, so that Adam's steps are relative).
    score_scale: float = 1.0
    learn_score_scale: bool = False
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"BertConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        layers.activation(self.hidden_act)  # fails early on an unknown name
        if not self.score_scale > 0:
            raise ValueError(f"BertConfig.score_scale must be > 0, got {self.score_scale}")

    @property
    def output_dim(self) -> int:
        """Size of the pooled vector: the retrieval dimension."""
        return self.projection_dim or self.hidden_size


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BxLxE: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.initializer_range)
        attention = layers.MultiHeadAttention(
            num_heads=cfg.num_heads,
            head_dim=cfg.hidden_size // cfg.num_heads,
            features=cfg.hidden_size,
            dropout_rate=cfg.attention_dropout,
            name="attention",
            **common,
        )
        dropout = nn.Dropout(cfg.hidden_dropout)
        h = dropout(attention(x_BxLxE, bias, deterministic=deterministic), deterministic=deterministic)
        x = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "attention_norm")(x_BxLxE + h).astype(cfg.dtype)
        h = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="intermediate", **common)(x)
        h = layers.constrain(layers.activation(cfg.hidden_act)(h), ("batch", "length", "mlp"))
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="output", **common)(h)
        h = dropout(h, deterministic=deterministic)
        x = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "output_norm")(x + h).astype(cfg.dtype)
        return layers.constrain(x, ("batch", "length", "embed"))


class BertEncoder(nn.Module):
    """Returns (hidden states (B, L, E), pooled output (B, output_dim)); pooled output is float32."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids_BxL: jax.Array,
        attention_mask_BxL: jax.Array | None = None,
        token_type_ids_BxL: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones_like(input_ids_BxL)
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
        length = input_ids_BxL.shape[1]
        std = cfg.initializer_range
        word = layers.embedding(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), cfg.param_dtype, std, "word")
        position = layers.embedding(
            cfg.max_position_embeddings, cfg.hidden_size, ("position", "embed"), cfg.param_dtype, std, "position"
        )
        token_type = layers.embedding(
            cfg.type_vocab_size, cfg.hidden_size, ("token_type", "embed"), cfg.param_dtype, std, "token_type"
        )
        x = word(input_ids_BxL) + position(jnp.arange(length)[None, :]) + token_type(token_type_ids_BxL)
        x = layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, "embedding_norm")(x).astype(cfg.dtype)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = layers.constrain(x, ("batch", "length", "embed"))

        bias = layers.padding_bias(attention_mask_BxL)
        for i in range(cfg.num_layers):
            x = BertLayer(cfg, name=f"layer_{i}")(x, bias, deterministic)

        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=std)
        if cfg.pooling == "cls":
            pooled = x[:, 0]
        elif cfg.pooling == "pooler":
            pooled = jnp.tanh(layers.dense(cfg.hidden_size, ("embed", "mlp"), name="pooler", **common)(x[:, 0]))
        else:
            x_float = layers.at_least_float32(x)
            mask = attention_mask_BxL[..., None].astype(x_float.dtype)
            pooled = (x_float * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        if cfg.projection_dim:
            pooled = layers.dense(cfg.projection_dim, ("embed", "mlp"), name="projection", **common)(pooled)
        pooled = layers.at_least_float32(pooled)
        if cfg.normalize:
            pooled = l2_normalize(pooled)
        if cfg.learn_score_scale:
            log_scale = self.param(LOG_SCORE_SCALE, nn.with_logical_partitioning(
                nn.initializers.constant(math.log(cfg.score_scale)), ()), (), cfg.param_dtype)
            pooled = pooled * jnp.exp(log_scale).astype(pooled.dtype)
        elif cfg.score_scale != 1.0:
            pooled = pooled * jnp.asarray(cfg.score_scale, pooled.dtype)
        return x, pooled


LOG_SCORE_SCALE = "log_score_scale"  # the parameter of a learnt score scale (BertConfig.learn_score_scale)


def with_score_scale(params: Any, cfg: BertConfig) -> Any:
    """A checkpoint's encoder parameters with the learnt score scale's parameter added at its initial value (a
    checkpoint has none); unchanged for a fixed scale."""
    if not cfg.learn_score_scale or LOG_SCORE_SCALE in params:
        return params
    return {**params, LOG_SCORE_SCALE: np.asarray(math.log(cfg.score_scale), np.float32)}


def effective_score_scale(cfg: BertConfig, params: Any) -> float:
    """The scale the encoder's vectors are multiplied by now: the learnt one's current value, or the fixed one."""
    if cfg.learn_score_scale:
        return float(np.exp(np.asarray(params[LOG_SCORE_SCALE], np.float64)))
    return float(cfg.score_scale)


NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, which sentence-transformers' Normalize uses


def l2_normalize(x_BxD: jax.Array) -> jax.Array:
    """x / max(||x||, eps) as torch.nn.functional.normalize computes it. The norm is taken as sqrt(max(||x||^2,
    eps^2)), the same value, so that an all-zero row (a padding row of a batch) gets a zero gradient, not NaN."""
    squared_Bx1 = jnp.sum(jnp.square(x_BxD), axis=-1, keepdims=True)
    return x_BxD / jnp.sqrt(jnp.maximum(squared_Bx1, NORMALIZE_EPS**2))
