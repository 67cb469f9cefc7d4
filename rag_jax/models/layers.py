"""Building blocks shared by the BERT encoders, BART and T5: dense layers, layer norms, attention, decode caches.

Every parameter carries logical axis names (see `rag_jax.sharding` for the rules that map them onto a mesh):
  vocab, embed, mlp, heads, kv (per-head features), position, token_type.
Activations carry logical constraints with: batch, length, embed, mlp, heads, kv, vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.models import low_precision

Dtype = Any
Initializer = Callable[..., jax.Array]

# Additive attention bias for masked keys. Large and finite so that a row whose keys are all masked gives a
# uniform (not NaN) distribution, as PyTorch's `finfo.min` masks do.
MASK_VALUE = -1e9


def accumulation_dtype(dtype: Dtype) -> Dtype:
    """The dtype for softmaxes, norms, logits and sums: float32 for float32 and lower-precision compute, float64 in
    a float64 run (the parity tests that tell float32 rounding from a real difference run both sides in float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in `accumulation_dtype` of its dtype."""
    return x.astype(accumulation_dtype(x.dtype))


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU as PyTorch computes it, x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu(approximate=False) uses erfc,
    which agrees to float32 rounding but runs about 1.6x slower on XLA:CPU (and the GELU of a BERT feed-forward
    layer, fused into its matmul, cost a quarter of that matmul's time)."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


ACTIVATIONS = {
    "gelu": gelu_erf,  # HF "gelu" is the exact erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation function {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


class _DenseGeneralPartitioned(nn.LogicallyPartitioned):
    """Logical axis names of a DenseGeneral kernel or bias, never applied as a constraint when unboxed.

    DenseGeneral initialises a flat kernel/bias, unboxes it and reshapes it (also inside `apply`, where Flax
    re-runs the initialiser under eval_shape to check shapes). Under a mesh, the default unbox would constrain the
    flat array with the reshaped array's axis names and fail. Placement comes from the shardings the caller
    derives from these names (rag_jax/sharding.py), so the constraint is not needed.
    """

    def unbox(self, apply_constraint=True):
        del apply_constraint
        return self.value


def _partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    axes = tuple(axes)

    def boxed(*args, **kwargs):
        return _DenseGeneralPartitioned(init(*args, **kwargs), axes)

    return boxed


def dense(
    features: int | Sequence[int],
    kernel_axes: Sequence[str | None],
    *,
    axis: int | Sequence[int] = -1,
    dtype: Dtype,
    param_dtype: Dtype,
    init_std: float,
    name: str,
    use_bias: bool = True,
) -> nn.DenseGeneral:
    """A `DenseGeneral` whose kernel and bias carry logical axis names.

    The bias takes the kernel's output axes (those after the contracted input axes).
    """
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        # float32 keeps lax.dot_general itself (None), so float32 runs are unchanged bit for bit
        dot_general=low_precision.dot_general if low_precision.is_low_precision(dtype) else None,
        param_dtype=param_dtype,
        kernel_init=_partitioned(nn.initializers.normal(init_std), kernel_axes),
        bias_init=_partitioned(nn.initializers.zeros_init(), kernel_axes[-n_out:]),
        name=name,
    )


def layer_norm(eps: float, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm computed in float32 with the exact (two-pass) variance, as PyTorch computes it."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=accumulation_dtype(param_dtype),
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def rms_norm(eps: float, param_dtype: Dtype, name: str) -> nn.RMSNorm:
    """T5's layer norm: x / sqrt(mean(x^2) + eps) times a scale, no mean and no bias, computed in float32."""
    return nn.RMSNorm(
        epsilon=eps,
        dtype=accumulation_dtype(param_dtype),
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        name=name,
    )


def embedding(num: int, features: int, axes: tuple[str, str], param_dtype: Dtype, init_std: float, name: str):
    return nn.Embed(
        num_embeddings=num,
        features=features,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
        name=name,
    )


def padding_bias(mask_BxK: jax.Array) -> jax.Array:
    """Additive attention bias (B, 1, 1, K) from a 0/1 key mask (B, K)."""
    return jnp.where(mask_BxK[:, None, None, :] > 0, 0.0, MASK_VALUE).astype(jnp.float32)


def causal_bias(query_positions_Q: jax.Array, num_keys: int) -> jax.Array:
    """Additive bias (1, 1, Q, K) letting the query at absolute position p see keys 0..p."""
    keys_K = jnp.arange(num_keys)
    allowed = keys_K[None, :] <= query_positions_Q[:, None]
    return jnp.where(allowed, 0.0, MASK_VALUE)[None, None].astype(jnp.float32)


class KVCache(NamedTuple):
    """Keys and values of one attention layer: (B, H, T, D) each, heads before positions.

    That is the layout of the batched score and value products (batch dims b, h first), so a cached key/value is
    used as stored; in (B, T, H, D) XLA transposes the whole cache in every decoding step, which on CPU cost more
    than the step's matmuls."""

    key: jax.Array
    value: jax.Array


class DecodeCache(NamedTuple):
    """State of incremental decoding for a batch of B sequences (BART and T5).

    self_kv / cross_kv: one `KVCache` per decoder layer, (B, H, T_max, D) and (B, H, S, D).
    encoder_mask_BxS: the encoder padding mask. index: number of decoder positions already written.
    """

    self_kv: tuple[KVCache, ...]
    cross_kv: tuple[KVCache, ...]
    encoder_mask_BxS: jax.Array
    index: jax.Array


def empty_decode_cache(decoder_layers: Sequence[nn.Module], encoder_out_BxSxE: jax.Array, encoder_mask_BxS: jax.Array,
                       max_length: int, heads: int, head_dim: int, dtype: Dtype) -> DecodeCache:  # fmt: skip
    """An empty decode cache for up to `max_length` decoder positions, with the cross-attention keys/values
    (each decoder layer's `cross_kv`) of the encoder output."""
    empty = jnp.zeros((encoder_out_BxSxE.shape[0], heads, max_length, head_dim), dtype)
    return DecodeCache(
        self_kv=tuple(KVCache(empty, empty) for _ in decoder_layers),
        cross_kv=tuple(layer.cross_kv(encoder_out_BxSxE) for layer in decoder_layers),
        encoder_mask_BxS=encoder_mask_BxS,
        index=jnp.zeros((), jnp.int32),
    )


def run_decoder_layers(decoder_layers: Sequence[nn.Module], x_BxTxE: jax.Array, self_bias: jax.Array,
                       decoder_mask_BxT: jax.Array | None, encoder_out_BxSxE: jax.Array, encoder_mask_BxS: jax.Array,
                       deterministic: bool) -> jax.Array:  # fmt: skip
    """The decoder layers (BART's or T5's) over whole sequences (training, scoring): self-attention under
    `self_bias` and the decoder padding mask if given, cross-attention under the encoder padding mask."""
    if decoder_mask_BxT is not None:
        self_bias = self_bias + padding_bias(decoder_mask_BxT)
    cross_bias = padding_bias(encoder_mask_BxS)
    for layer in decoder_layers:
        x_BxTxE, _ = layer(x_BxTxE, self_bias, cross_bias, encoder_out_BxSxE=encoder_out_BxSxE,
                           deterministic=deterministic)  # fmt: skip
    return x_BxTxE


def run_decoder_layers_cached(
    decoder_layers: Sequence[nn.Module], x_BxTxE: jax.Array, self_bias: jax.Array, cache: DecodeCache
) -> tuple[jax.Array, DecodeCache]:
    """The decoder layers over T new positions after the `cache.index` already in the cache: their output and the
    cache with their self-attention keys/values written and the index advanced by T."""
    length = x_BxTxE.shape[1]
    cross_bias = padding_bias(cache.encoder_mask_BxS)
    new_self_kv = []
    for layer, self_kv, cross_kv in zip(decoder_layers, cache.self_kv, cache.cross_kv):
        x_BxTxE, self_kv = layer(x_BxTxE, self_bias, cross_bias, self_kv=self_kv, cross_kv=cross_kv,
                                 cache_index=cache.index)  # fmt: skip
        new_self_kv.append(self_kv)
    return x_BxTxE, cache._replace(self_kv=tuple(new_self_kv), index=cache.index + length)


class EncoderDecoder(nn.Module):
    """The forward pass of BART and T5, which each define `encode` and `decode` (same arguments, same outputs)."""

    def __call__(
        self,
        input_ids_BxS: jax.Array,
        attention_mask_BxS: jax.Array,
        decoder_input_ids_BxT: jax.Array,
        decoder_mask_BxT: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits (B, T, V), float32."""
        encoder_out = self.encode(input_ids_BxS, attention_mask_BxS, deterministic)
        return self.decode(decoder_input_ids_BxT, encoder_out, attention_mask_BxS, decoder_mask_BxT, deterministic)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with separate q/k/v/out projections (BERT, BART and T5 layout).

    With `scale_query` the query is scaled by head_dim**-0.5 after its projection, as BART does; for BERT (which
    scales the scores) this is the same function. T5 scales nothing (its initialisation absorbs the factor) and has
    no biases (`use_bias=False`). Softmax runs in float32.
    """

    num_heads: int
    head_dim: int
    features: int
    dtype: Dtype
    param_dtype: Dtype
    init_std: float
    dropout_rate: float = 0.0
    use_bias: bool = True
    scale_query: bool = True

    def setup(self):
        qkv = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std, use_bias=self.use_bias)
        heads = (self.num_heads, self.head_dim)
        self.query = dense(heads, ("embed", "heads", "kv"), name="query", **qkv)
        self.key = dense(heads, ("embed", "heads", "kv"), name="key", **qkv)
        self.value = dense(heads, ("embed", "heads", "kv"), name="value", **qkv)
        self.out = dense(self.features, ("heads", "kv", "embed"), axis=(-2, -1), name="out", **qkv)
        self.dropout = nn.Dropout(self.dropout_rate)

    def project_kv(self, inputs_kv_BxKxE: jax.Array) -> KVCache:
        """Keys and values (B, H, K, D) of `inputs_kv`; a decode cache computes cross-attention's once."""
        k = constrain(self.key(inputs_kv_BxKxE), ("batch", "length", "heads", "kv")).transpose(0, 2, 1, 3)
        v = constrain(self.value(inputs_kv_BxKxE), ("batch", "length", "heads", "kv")).transpose(0, 2, 1, 3)
        return KVCache(constrain(k, ("batch", "heads", "length", "kv")), constrain(v, ("batch", "heads", "length", "kv")))

    def append_kv(self, inputs_BxTxE: jax.Array, kv: KVCache, index: jax.Array) -> KVCache:
        """`kv` (B, H, T_max, D) with the keys/values of T new positions written at `index` (incremental decoding)."""
        new = self.project_kv(inputs_BxTxE)
        start = (0, 0, index, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(kv.key, new.key.astype(kv.key.dtype), start),
            jax.lax.dynamic_update_slice(kv.value, new.value.astype(kv.value.dtype), start),
        )

    def __call__(
        self,
        inputs_q_BxQxE: jax.Array,
        bias: jax.Array | None,
        *,
        inputs_kv_BxKxE: jax.Array | None = None,
        kv: KVCache | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Attends from `inputs_q` to keys/values given either as inputs (projected here) or as a `kv` cache.

        bias: additive, broadcastable to (B, H, Q, K), float32.
        """
        # Scores and values are batched over (batch, heads) in the leading dims: XLA:CPU runs an einsum whose batch
        # dims sit elsewhere ("bqhd,bkhd->bhqk") about 2x slower than the same products after explicit transposes.
        if kv is None:  # full passes (training, scoring): keys/values projected here
            kv = self.project_kv(inputs_q_BxQxE if inputs_kv_BxKxE is None else inputs_kv_BxKxE)
        k, v = kv
        q = self.query(inputs_q_BxQxE)
        if self.scale_query:
            q = q * jnp.asarray(self.head_dim**-0.5, self.dtype)
        q = constrain(q, ("batch", "length", "heads", "kv")).transpose(0, 2, 1, 3)
        logits_BxHxQxK = _scores(q, k.astype(self.dtype))
        if bias is not None:
            logits_BxHxQxK = logits_BxHxQxK + bias
        weights = jax.nn.softmax(logits_BxHxQxK, axis=-1)
        if self.is_mutable_collection("intermediates"):  # Fusion-in-Decoder's provenance and ADist's scores
            self.sow("intermediates", "attention_weights", weights)
            self.sow("intermediates", "value_norms", jnp.linalg.norm(at_least_float32(v), axis=-1))  # (B, H, K)
        weights = self.dropout(weights, deterministic=deterministic).astype(self.dtype)
        out_BxHxQxD = _weighted_values(weights, v.astype(self.dtype))
        out_BxQxHxD = out_BxHxQxD.transpose(0, 2, 1, 3)
        return self.out(out_BxQxHxD)


def tied_logits(x_BxTxE: jax.Array, embedding: nn.Embed) -> jax.Array:
    """x @ embedding.T (a tied LM head), at least float32. bfloat16 x: bfloat16 products accumulated in float32
    (nn.Embed.attend would promote both to float32); otherwise Embed.attend itself."""
    if not low_precision.is_low_precision(x_BxTxE.dtype):
        return at_least_float32(embedding.attend(x_BxTxE))
    table_VxE = embedding.embedding.astype(x_BxTxE.dtype)
    logits_NxV = _logits(x_BxTxE.reshape(-1, x_BxTxE.shape[-1]), table_VxE, jnp.float32)
    return logits_NxV.reshape(x_BxTxE.shape[:-1] + table_VxE.shape[:1])


def _scores(q_BxHxQxD: jax.Array, k_BxHxKxD: jax.Array) -> jax.Array:
    """Attention logits (B, H, Q, K) in float32 (bfloat16 products accumulated in float32, low_precision)."""
    if low_precision.is_low_precision(q_BxHxQxD.dtype):
        return low_precision.matmul_f32_accumulate(q_BxHxQxD, k_BxHxKxD, True, jnp.float32)
    return at_least_float32(jnp.einsum("bhqd,bhkd->bhqk", q_BxHxQxD, k_BxHxKxD))


def _weighted_values(weights_BxHxQxK: jax.Array, v_BxHxKxD: jax.Array) -> jax.Array:
    if low_precision.is_low_precision(v_BxHxKxD.dtype):
        return low_precision.matmul_f32_accumulate(weights_BxHxQxK, v_BxHxKxD, False, v_BxHxKxD.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights_BxHxQxK, v_BxHxKxD)


def vocab_slice_width(vocab: int, target: int, smallest: int, largest: int) -> int:
    """The width in [smallest, largest] nearest `target` (the smaller of two as near) that divides `vocab`, else
    `target`: for passes over a vocabulary a slice at a time, which then need no padded copy of it."""
    fits = [d for d in range(smallest, largest + 1) if vocab % d == 0]
    return min(fits, key=lambda d: abs(d - target)) if fits else target


def _logits(features_NxE: jax.Array, head_CxE: jax.Array, float_dtype: Dtype) -> jax.Array:
    if low_precision.is_low_precision(features_NxE.dtype):
        return low_precision.matmul_f32_accumulate(features_NxE, head_CxE, True, float_dtype)
    return jnp.einsum("ne,ce->nc", features_NxE, head_CxE).astype(float_dtype)


def log_softmax_at(features_NxE: jax.Array, head_VxE: jax.Array, bias_V: jax.Array | None, targets_N: jax.Array,
                   with_vocab_sum: bool = False):  # fmt: skip
    """log_softmax(features @ head.T + bias)[n, targets[n]] (N,), and with `with_vocab_sum` the sum over the
    vocabulary of those log-probabilities (N,) (label smoothing), else None; float32.

    The same values as from the (N, V) logits to float32 rounding, without writing them out: the logits are made a
    vocabulary slice at a time and folded into a running max and sum of exponentials. At 640 x 50,265 the written-out
    logits (128 MB) and the passes over them ran ~4x slower on CPU than slices that stay in cache."""
    vocab = head_VxE.shape[0]
    width = vocab_slice_width(vocab, 1024, 512, 2048)
    slices = -(-vocab // width)
    float_dtype = accumulation_dtype(features_NxE.dtype)
    bias_V = jnp.zeros((vocab,), float_dtype) if bias_V is None else bias_V.astype(float_dtype)
    if slices * width != vocab:  # pad rows score -inf: no weight in the sum
        head_VxE = jnp.pad(head_VxE, ((0, slices * width - vocab), (0, 0)))
        bias_V = jnp.pad(bias_V, (0, slices * width - vocab), constant_values=-jnp.inf)
    features_NxE = features_NxE.astype(head_VxE.dtype)

    def fold(carry, slice_):
        max_N, sum_N, total_N = carry
        head_CxE, bias_C = slice_
        logits_NxC = _logits(features_NxE, head_CxE, float_dtype) + bias_C
        new_max_N = jnp.maximum(max_N, logits_NxC.max(-1))
        sum_N = sum_N * jnp.exp(max_N - new_max_N) + jnp.exp(logits_NxC - new_max_N[:, None]).sum(-1)
        if with_vocab_sum:
            total_N = total_N + jnp.where(jnp.isfinite(bias_C), logits_NxC, 0.0).sum(-1)
        return (new_max_N, sum_N, total_N), None

    rows = features_NxE.shape[0]
    init = (jnp.full((rows,), -jnp.inf, float_dtype), jnp.zeros((rows,), float_dtype), jnp.zeros((rows,), float_dtype))
    slices_ = (head_VxE.reshape(slices, width, -1), bias_V.reshape(slices, width))
    (max_N, sum_N, total_N), _ = jax.lax.scan(fold, init, slices_)
    lse_N = max_N + jnp.log(sum_N)
    picked_N = jnp.einsum("ne,ne->n", features_NxE, head_VxE[targets_N]).astype(float_dtype) + bias_V[targets_N]
    return picked_N - lse_N, (total_N - vocab * lse_N) if with_vocab_sum else None
