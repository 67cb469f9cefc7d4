"""RAG-Sequence's candidate answers: each passage's own beam search (the generator's `generate` over that passage
alone, as RagSequenceForGeneration.generate runs it), padded as the reference pads them, and which of them repeat
an earlier one (deduplication). rag_sequence.py scores and chooses among them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rag_jax.readers import decoding, search
from rag_jax.readers.generation import GenerationConfig


class SequenceCandidates(NamedTuple):
    """The hypotheses RAG-Sequence decoding chooses from, C = K * num_beams per example, doc-major (doc z's beams
    at z*num_beams ...), as the reference lists them.

    ids_BxCxL: the hypotheses (start token first, filled past the end).
    is_first_BxC: False where a hypothesis repeats an earlier one (the reference's deduplication keeps the first).
    scores_BxC: the selection score (thorough: -loss of the reference; fast: log Σ_z p(z|x) p(y|x,z) over the docs
      whose beams hold y); -inf for repeats when deduplicating.
    """

    ids_BxCxL: jax.Array
    is_first_BxC: jax.Array
    scores_BxC: jax.Array


def per_doc_hypotheses(model, params, ids_BKxS, mask_BKxS, batch, n_docs, gen_doc: GenerationConfig):
    """The generator's own `generate` over each of the B*K contexts with num_return_sequences = num_beams:
    (B, K * num_beams, L)."""
    nb = gen_doc.num_beams
    encoder_out = decoding.encode(model, params, ids_BKxS, mask_BKxS)
    cache = decoding.tiled_cache(model, params, encoder_out, mask_BKxS, nb, 1, gen_doc.max_length)
    step = functools.partial(decoding.decode_step, model, params)
    reorder = functools.partial(decoding.reorder_self_kv, rows_per_beam=1)
    ids = search.search(step, reorder, cache, batch * n_docs, gen_doc)
    return ids.reshape(batch, n_docs * nb, gen_doc.max_length)


def to_generate_width(ids_BxCxL: jax.Array, eos: int | None, pad: int) -> jax.Array:
    """Pad past the end of each example's longest hypothesis, as the reference's tensors are: its per-example
    `generate` returns the K * num_beams hypotheses padded (by the search, with `pad or eos`) only up to the longest
    of them, and its outputs are then padded to a common width with pad. The two fills differ when pad is 0 (T5:
    beams write EOS): the reference rescores the EOS fill inside that width as targets and returns it, pad beyond."""
    if eos is None:
        return ids_BxCxL
    length = ids_BxCxL.shape[-1]
    ends_BxCxL = jnp.concatenate([jnp.zeros_like(ids_BxCxL[..., :1], bool), ids_BxCxL[..., 1:] == eos], axis=-1)
    lengths_BxC = jnp.where(ends_BxCxL.any(-1), jnp.argmax(ends_BxCxL, axis=-1) + 1, length)
    width_B = lengths_BxC.max(axis=1)
    return jnp.where(jnp.arange(length)[None, None, :] < width_B[:, None, None], ids_BxCxL, pad)


def first_occurrences(ids_BxCxL: jax.Array):
    """(B, C, C) equality of hypotheses and (B, C) flags of those not seen at a lower index."""
    same_BxCxC = jnp.all(ids_BxCxL[:, :, None, :] == ids_BxCxL[:, None, :, :], axis=-1)
    earlier = jnp.tril(jnp.ones(same_BxCxC.shape[1:], bool), k=-1)
    return same_BxCxC, ~jnp.any(same_BxCxC & earlier[None], axis=-1)


def first_token_is_bos(ids_BxCxL: jax.Array, bos_token_id: int | None):
    """Per example, whether every hypothesis starts (after the start token) with BOS: the reference's use_bos,
    decided over the candidate batch of ONE example (repeats do not change it: they copy kept hypotheses)."""
    if bos_token_id is None:
        return None
    return jnp.all(ids_BxCxL[:, :, 1] == bos_token_id, axis=1)


@functools.partial(jax.jit, static_argnames=("model", "gen", "n_docs", "mask_beams"))
def hypotheses(model, params, ids_BKxS, mask_BKxS, gen, n_docs, mask_beams):
    """The per-document beam searches' K * num_beams hypotheses per example (B, C, L), at the contexts' full
    width: the reference's search attends to the padding (mask_beams=False), so its answers depend on it."""
    gen_doc = dataclasses.replace(gen, num_return_sequences=gen.num_beams)
    search_mask = mask_BKxS if mask_beams else jnp.ones_like(mask_BKxS)
    ids_BxCxL = per_doc_hypotheses(model, params, ids_BKxS, search_mask, ids_BKxS.shape[0] // n_docs, n_docs,
                                   gen_doc)  # fmt: skip
    return to_generate_width(ids_BxCxL, gen.eos_token_id, model.generator_config.pad_token_id)
