"""The search algorithms of decoding: greedy search and beam search, over a model-agnostic step function.

Everything matches Hugging Face's `generate` for RagTokenForGeneration / RagSequenceForGeneration (transformers 5)
token for token on the same weights, up to float32 rounding where two hypotheses score within an ulp: beam search is
a port of the reference's vectorised `_beam_search`: 2·num_beams candidates per step, running beams that hit
EOS/max length masked by -1e9, finished hypotheses scored by sum-log-prob / len^length_penalty, the same
early-stopping heuristic (`early_stopping` True / False / "never") and the same fill value; the logits processors
(generation.py) run on every step's scores. Shapes are static: sequences are (rows, max_length) int32, filled past
their end like the reference's output, which is the same array cut to the shortest width holding every returned
sequence.

The search loops are `jax.lax.while_loop`s over a `step_fn(state, tokens_N) -> (scores_NxV, state)` that feeds one
token per row through the generator's decode cache (a reader builds it: decoding.py); `reorder(state, beam_idx_N)`
follows the beams.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rag_jax.models import layers
from rag_jax.readers.generation import GenerationConfig, process_scores

NEG = -1.0e9  # the reference's "impossible" beam score (a finite number, not -inf)
StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]


def _start(rows_shape: tuple[int, ...], gen: GenerationConfig, fill: int) -> jax.Array:
    seqs = jnp.full((*rows_shape, gen.max_length), fill, jnp.int32)
    return seqs.at[..., 0].set(gen.decoder_start_token_id)


def first_max_index(x_NxV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN where there is one) as int32 (N,), in two
    passes XLA:CPU vectorises: its argmax reduction carries (value, index) pairs and took 30% of a RAG-Token greedy
    step over a 50,265-entry vocabulary; a max, then the smallest index holding it, takes a third of that."""
    top_Nx1 = jnp.max(x_NxV, axis=-1, keepdims=True)  # NaN where the row holds one
    hit_NxV = (x_NxV == top_Nx1) | jnp.isnan(x_NxV)
    index_V = jnp.arange(x_NxV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit_NxV, index_V, x_NxV.shape[-1]), axis=-1)


def greedy_search(step_fn: StepFn, state: Any, batch_size: int, gen: GenerationConfig) -> jax.Array:
    """The reference's `_sample` without sampling: argmax of the processed raw scores. Rows that emitted EOS get
    pad from then on; the loop stops when every row has finished or at max_length. Returns (N, max_length)."""
    fill = -1 if gen.pad_token_id is None else gen.pad_token_id

    def cond(carry):
        cur_len, _, unfinished_N, _ = carry
        return (cur_len < gen.max_length) & jnp.any(unfinished_N)

    def body(carry):
        cur_len, seqs_NxL, unfinished_N, state = carry
        tokens_N = jax.lax.dynamic_index_in_dim(seqs_NxL, cur_len - 1, axis=1, keepdims=False)
        scores_NxV, state = step_fn(state, tokens_N)
        scores_NxV = process_scores(scores_NxV.astype(jnp.float32), seqs_NxL, cur_len, gen)
        next_N = first_max_index(scores_NxV)
        if gen.eos_token_id is not None:
            next_N = jnp.where(unfinished_N, next_N, fill)
            unfinished_N = unfinished_N & (next_N != gen.eos_token_id)
        seqs_NxL = jax.lax.dynamic_update_index_in_dim(seqs_NxL, next_N, cur_len, axis=1)
        return cur_len + 1, seqs_NxL, unfinished_N, state

    carry = (jnp.int32(1), _start((batch_size,), gen, fill), jnp.ones((batch_size,), bool), state)
    return jax.lax.while_loop(cond, body, carry)[1]


def gather_rows(x_BxMx___: jax.Array, idx_BxK: jax.Array) -> jax.Array:
    """x[b, idx[b, k], ...] (B, K, ...)."""
    idx = idx_BxK.reshape(idx_BxK.shape + (1,) * (x_BxMx___.ndim - 2))
    return jnp.take_along_axis(x_BxMx___, idx, axis=1)


def has_processors(gen: GenerationConfig) -> bool:
    """Whether `process_scores` changes anything under `gen`."""
    return bool(gen.no_repeat_ngram_size > 0 or gen.bad_words_ids is not None or gen.forced_bos_token_id is not None
                or gen.forced_eos_token_id is not None or (gen.eos_token_id is not None and gen.min_length > 0))


def _group_width(vocab: int, k: int) -> int:
    """A group width near 1024 that divides `vocab` (no padded copy), else 1024; near vocab / 4k and at most
    vocab / 2k when that is smaller, so that there are more groups than the k to keep."""
    target = max(1, min(1024, vocab // (4 * k)))
    return layers.vocab_slice_width(vocab, target, max(1, target // 4), min(2 * target, vocab // (2 * k)))


def _top_candidates(logits_BxNxV: jax.Array, running_scores_BxN: jax.Array, k: int):
    """jax.lax.top_k over (beam, token) of log_softmax(logits) + running score, per example (values, flat indices
    beam * V + token), without writing those B x N x V scores out or running TopK over them.

    The score is x -> ((x - max) - logsumexp) + running score, the same float32 operations as log_softmax's, so it
    never decreases with x: a group's largest score is the score of its largest logit. Groups of contiguous tokens
    are ranked by that score (lower index first among equals, as top_k), and top_k over the tokens of the k best
    groups, in index order, is then exactly top_k over all (a member of the true top k lies in one of those groups;
    ties included). On CPU the one TopK over 2 x 50,265 scores per example, and writing those scores, had cost
    as much as the LM head."""
    batch, nb, vocab = logits_BxNxV.shape
    width = _group_width(vocab, k)
    groups = -(-vocab // width)
    logits_BxNxV = logits_BxNxV.astype(jnp.float32)
    if groups * width != vocab:
        logits_BxNxV = jnp.pad(logits_BxNxV, ((0, 0), (0, 0), (0, groups * width - vocab)), constant_values=-jnp.inf)
    # Every pass below reads the grouped view: in two shapes, XLA wrote the logits out twice.
    grouped_BxNxGxW = logits_BxNxV.reshape(batch, nb, groups, width)
    group_max_BxNxG = grouped_BxNxGxW.max(-1)
    # The barrier keeps XLA from merging the two maxima into a second pass over the logits.
    max_BxN = jax.lax.optimization_barrier(group_max_BxNxG).max(-1)
    # Summed per group first (behind a barrier, as XLA would merge the two sums): YNNPACK's one reduction over both
    # axes ran ~3x slower per element than over the last one.
    group_sums_BxNxG = jnp.exp(grouped_BxNxGxW - max_BxN[..., None, None]).sum(-1)
    shifted_lse_BxN = jnp.log(jax.lax.optimization_barrier(group_sums_BxNxG).sum(-1))
    group_scores_BxNxG = ((group_max_BxNxG - max_BxN[..., None]) - shifted_lse_BxN[..., None]) + running_scores_BxN[
        ..., None]  # fmt: skip
    group_scores = group_scores_BxNxG.reshape(batch, nb * groups)
    _, best_Bxk = jax.lax.top_k(group_scores, k)
    best_Bxk = jnp.sort(best_Bxk, axis=-1)  # index order, so that top_k's tie-break by index carries over
    beam_Bxk = best_Bxk // groups
    candidates_BxkxW = jnp.take_along_axis(grouped_BxNxGxW.reshape(batch, nb * groups, width), best_Bxk[..., None], 1)
    take = lambda a: jnp.take_along_axis(a, beam_Bxk, 1)[..., None]  # noqa: E731
    scores_BxkxW = ((candidates_BxkxW - take(max_BxN)) - take(shifted_lse_BxN)) + take(running_scores_BxN)
    top_Bxk, pos_Bxk = jax.lax.top_k(scores_BxkxW.reshape(batch, k * width), k)
    group_Bxk = jnp.take_along_axis(best_Bxk, pos_Bxk // width, 1)
    beam_of, token = group_Bxk // groups, (group_Bxk % groups) * width + pos_Bxk % width
    return top_Bxk, beam_of * vocab + token


class _Beams(NamedTuple):
    cur_len: jax.Array
    running_BxNxL: jax.Array
    running_scores_BxN: jax.Array
    sequences_BxNxL: jax.Array  # finished hypotheses (placeholders while is_finished is False)
    scores_BxN: jax.Array
    is_finished_BxN: jax.Array
    improvable_Bx1: jax.Array  # the reference's is_early_stop_heuristic_unsatisfied
    done: jax.Array
    state: Any


def beam_search(step_fn: StepFn, reorder: ReorderFn, state: Any, batch_size: int, gen: GenerationConfig) -> jax.Array:
    """The reference's vectorised `_beam_search` over B examples of `num_beams` rows each (rows example-major).

    `step_fn` gets the last token of each of the B*num_beams running beams; `reorder(state, idx)` must make row i of
    the state a copy of row idx[i]. Returns (B * num_return_sequences, max_length), best first per example.
    """
    nb, max_length, lp = gen.num_beams, gen.max_length, gen.length_penalty
    num_rows = batch_size * nb
    keep = 2 * nb  # max(2, 1 + number of EOS ids) * num_beams
    fill = gen.beam_fill_token_id
    vocab = jax.eval_shape(step_fn, state, jnp.zeros((num_rows,), jnp.int32))[0].shape[-1]
    # Python's len ** length_penalty rounded to float32, the value the reference divides by.
    denominator = jnp.asarray([float(max(n, 1)) ** lp for n in range(max_length + 1)], jnp.float32)
    is_top_nb = jnp.arange(keep) < nb
    early_true = gen.early_stopping is True

    def body(s: _Beams) -> _Beams:
        cur_len = s.cur_len
        flat_running = s.running_BxNxL.reshape(num_rows, max_length)
        tokens = jax.lax.dynamic_index_in_dim(flat_running, cur_len - 1, axis=1, keepdims=False)
        logits, state = step_fn(s.state, tokens)
        if has_processors(gen):
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            log_probs = process_scores(log_probs, flat_running, cur_len, gen)
            log_probs = log_probs.reshape(batch_size, nb, vocab) + s.running_scores_BxN[:, :, None]
            topk_lp, topk_idx = jax.lax.top_k(log_probs.reshape(batch_size, nb * vocab), keep)
        else:
            topk_lp, topk_idx = _top_candidates(logits.reshape(batch_size, nb, vocab), s.running_scores_BxN, keep)
        src_beam, token = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
        topk_seqs = jax.lax.dynamic_update_index_in_dim(gather_rows(s.running_BxNxL, src_beam), token, cur_len, axis=2)
        hits = jnp.broadcast_to(cur_len + 1 >= max_length, token.shape)
        if gen.eos_token_id is not None:
            hits = hits | (token == gen.eos_token_id)

        # Next running beams: the best candidates that did not stop.
        running_lp = topk_lp + hits.astype(jnp.float32) * NEG
        _, next_idx = jax.lax.top_k(running_lp, nb)
        running = gather_rows(topk_seqs, next_idx)
        running_scores = gather_rows(running_lp, next_idx)
        source_row = (jnp.arange(batch_size)[:, None] * nb + gather_rows(src_beam, next_idx)).reshape(num_rows)

        # Finished hypotheses: merge the stopped candidates among the top num_beams into the kept ones.
        just_finished = hits & is_top_nb[None]
        finished_lp = topk_lp / denominator[cur_len]  # cur_len + 1 tokens minus the one-token prompt
        full = jnp.all(s.is_finished_BxN, axis=-1, keepdims=True) & early_true
        finished_lp = finished_lp + full.astype(jnp.float32) * NEG
        finished_lp = finished_lp + (~s.improvable_Bx1).astype(jnp.float32) * NEG
        finished_lp = finished_lp + (~just_finished).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([s.scores_BxN, finished_lp], axis=1)
        _, best = jax.lax.top_k(merged_scores, nb)
        sequences = gather_rows(jnp.concatenate([s.sequences_BxNxL, topk_seqs], axis=1), best)
        scores = gather_rows(merged_scores, best)
        is_finished = gather_rows(jnp.concatenate([s.is_finished_BxN, just_finished], axis=1), best)

        state = reorder(state, source_row)
        cur_len = cur_len + 1
        if gen.early_stopping == "never" and lp > 0.0:
            best_possible_len = max_length - 1
        else:
            best_possible_len = cur_len - 1
        best_possible = running_scores[:, :1] / denominator[best_possible_len]
        worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = s.improvable_Bx1 & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        go_on = jnp.any(improvable) & ~(jnp.all(is_finished) & early_true) & ~jnp.all(hits)
        return _Beams(cur_len, running, running_scores, sequences, scores, is_finished, improvable, ~go_on, state)

    running = _start((batch_size, nb), gen, fill)
    init = _Beams(
        cur_len=jnp.int32(1),
        running_BxNxL=running,
        running_scores_BxN=jnp.zeros((batch_size, nb), jnp.float32).at[:, 1:].set(NEG),
        sequences_BxNxL=running,
        scores_BxN=jnp.full((batch_size, nb), NEG, jnp.float32),
        is_finished_BxN=jnp.zeros((batch_size, nb), bool),
        improvable_Bx1=jnp.ones((batch_size, 1), bool),
        done=jnp.bool_(False),
        state=state,
    )
    final = jax.lax.while_loop(lambda s: ~s.done & (s.cur_len < max_length), body, init)
    return final.sequences_BxNxL[:, : gen.num_return_sequences].reshape(-1, max_length)


def search(step_fn: StepFn, reorder: ReorderFn, state: Any, batch_size: int, gen: GenerationConfig) -> jax.Array:
    """Greedy search when num_beams == 1, beam search otherwise (the reference's choice of decoding method)."""
    if gen.num_return_sequences > gen.num_beams:
        raise ValueError(
            f"GenerationConfig.num_return_sequences={gen.num_return_sequences} exceeds num_beams={gen.num_beams}: a "
            "search returns at most num_beams sequences per example"
        )
    if gen.num_beams == 1:
        return greedy_search(step_fn, state, batch_size, gen)
    return beam_search(step_fn, reorder, state, batch_size, gen)
