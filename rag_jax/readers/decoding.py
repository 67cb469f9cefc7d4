"""The generator plumbing readers decode with: the encoder over the contexts (a few at a time), a decode cache tiled
over (example, beam, passage) rows with the cross-attention keys/values projected once, one decoder step, beams
followed in the cache, and the context width a rescoring pass needs.

Works for every generator architecture (the registry's modules share BART's methods: encode, decode, init_cache,
decode_step, lm_head_arrays).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax import rag
from rag_jax.models.layers import DecodeCache
from rag_jax.readers.base import CONTEXT_BUCKET


# Tokens per slice of contexts the encoder runs on at a time (_encode), and the size of one head's attention scores
# over all contexts (float32) above which it slices.
_ENCODE_TOKENS = 640
_ENCODE_SLICE_ABOVE = 6 << 20


def encode(model: rag.Rag, params, ids_BKxS, mask_BKxS):
    """The generator's encoder over the contexts, a few at a time: each context's states depend on it alone, and
    with every context in one call the (contexts, heads, S, S) attention scores (46 MB at 32 x 4 x 300 x 300) leave
    the CPU's caches; slices of ~_ENCODE_TOKENS tokens ran the attention ~4x faster, with the same values. Narrower
    contexts run in one call: for 32 of them the slices took 189 -> 61 ms at width 300, 62 -> 43 at 256, but the
    same at 192 and 128, and longer at 64 (6.8 -> 8.6 ms)."""
    rows, width = ids_BKxS.shape
    per_slice = max(d for d in range(1, rows + 1) if rows % d == 0 and d * width <= max(_ENCODE_TOKENS, width))
    encode = functools.partial(model.generator.apply, {"params": params["generator"]}, method="encode")
    if per_slice == rows or rows * width * width * 4 <= _ENCODE_SLICE_ABOVE:
        return encode(ids_BKxS, mask_BKxS)
    slices = lambda x: x.reshape(rows // per_slice, per_slice, width)  # noqa: E731
    out = jax.lax.map(lambda args: encode(*args), (slices(ids_BKxS), slices(mask_BKxS)))
    return out.reshape(rows, width, -1)


def tiled_cache(model: rag.Rag, params, encoder_out, mask, copies: int, n_docs: int, max_length: int):
    """A decode cache for rows (example, copy, doc) from encoder rows (example, doc): the reference's
    extend_enc_output / repeat_interleave. The cross-attention keys/values are projected once, then tiled."""
    cache = model.generator.apply(
        {"params": params["generator"]}, encoder_out, mask, max_length - 1, method="init_cache"
    )

    def tile(x):
        x = x.reshape(-1, 1, n_docs, *x.shape[1:])
        return jnp.broadcast_to(x, (x.shape[0], copies, *x.shape[2:])).reshape(-1, *x.shape[3:])

    return cache._replace(
        self_kv=jax.tree.map(tile, cache.self_kv),
        cross_kv=jax.tree.map(tile, cache.cross_kv),
        encoder_mask_BxS=tile(cache.encoder_mask_BxS),
    )


def decode_step(model: rag.Rag, params, cache: DecodeCache, tokens_R: jax.Array):
    logits, cache = model.generator.apply(
        {"params": params["generator"]}, tokens_R[:, None], cache, method="decode_step"
    )
    return logits[:, 0], cache


def reorder_self_kv(cache: DecodeCache, idx_N: jax.Array, rows_per_beam: int) -> DecodeCache:
    """Follows the beams in the self-attention cache (rows_per_beam consecutive rows per beam). Only the
    self-attention keys/values differ between beams of one example; cross-attention and masks are identical copies,
    so they are left in place."""

    def take(x):
        x = x.reshape(-1, rows_per_beam, *x.shape[1:])
        return jnp.take(x, idx_N, axis=0).reshape(-1, *x.shape[2:])

    return cache._replace(self_kv=jax.tree.map(take, cache.self_kv))


def check_shapes(context_input_ids, doc_scores, n_docs):
    batch, docs = doc_scores.shape
    if n_docs is not None and n_docs != docs:
        raise ValueError(f"decode: n_docs={n_docs} but doc_scores has {docs} columns; pass doc_scores (B, n_docs)")
    if context_input_ids.shape[0] != batch * docs:
        raise ValueError(
            f"decode: context_input_ids has {context_input_ids.shape[0]} rows, expected B*K = {batch}*{docs}"
        )
    return batch, docs


def masked_width(mask_BKxS) -> int:
    """The width the rescoring passes need: up to the last column any context's mask keeps, rounded up to
    CONTEXT_BUCKET (few shapes to compile). Everything past it is padding the mask hides, so cutting it changes no
    value (masked keys get exactly zero weight) and saves attention over it; the contexts' full width inside jit."""
    width = mask_BKxS.shape[1]
    if isinstance(mask_BKxS, jax.core.Tracer):
        return width
    kept_S = np.flatnonzero(np.asarray(mask_BKxS).any(axis=0))
    return min(width, -(-(int(kept_S[-1]) + 1 if kept_S.size else 1) // CONTEXT_BUCKET) * CONTEXT_BUCKET)
