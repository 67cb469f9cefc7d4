"""DPR's contrastive bi-encoder loss with global in-batch negatives (Karpukhin et al. 2020, sec. 3.2).

Each question's positive passage is scored against every passage of the *global* batch (all questions' positives
and hard negatives) by inner product, and the loss is the mean negative log-likelihood of the positive under the
softmax over those scores (DPR's BiEncoderNllLoss). The batch arrays are global jax arrays sharded over the data
axis; the score matmul q·dᵀ reads every device's passage vectors, so GSPMD gathers them across the data axis: the
negatives are global without an explicit all_gather, and a sharded step equals the one-device step
(tests/test_contrastive.py checks both this and parity with transformers' DPR encoders).

Passage layout: passages_PxL holds, for Q questions and H hard negatives each, Q*(1+H) rows; question i's positive
is row i*(1+H) (DPR's layout: positive first, then that question's hard negatives).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rag_jax.models import bert, layers


def scores(q_QxD: jax.Array, d_PxD: jax.Array) -> jax.Array:
    """Inner-product scores of every question against every passage of the global batch (float32)."""
    return jnp.einsum("qd,pd->qp", layers.at_least_float32(q_QxD), layers.at_least_float32(d_PxD))


def positive_rows(num_questions: int, num_passages: int) -> jax.Array:
    """Row of each question's positive: i * (1 + hard negatives per question)."""
    if num_passages % num_questions:
        raise ValueError(f"{num_passages} passages are not a whole number per question ({num_questions} questions)")
    return jnp.arange(num_questions) * (num_passages // num_questions)


def nll(q_QxD: jax.Array, d_PxD: jax.Array, scale: float = 1.0) -> jax.Array:
    """Mean negative log-likelihood of each question's positive among all passages of the batch, the scores
    multiplied by `scale` first (1 for DPR's unnormalised vectors; L2-normalised encoders' cosines lie in [-1, 1],
    too flat a softmax without one: sentence-transformers' MultipleNegativesRankingLoss uses 20)."""
    logp_QxP = jax.nn.log_softmax(scale * scores(q_QxD, d_PxD), axis=-1)
    rows = positive_rows(q_QxD.shape[0], d_PxD.shape[0])
    return -jnp.mean(jnp.take_along_axis(logp_QxP, rows[:, None], axis=-1))


def retrieved_nll(scores_BxK: jax.Array, rows_BxK: jax.Array, gold_B: jax.Array) -> jax.Array:
    """The contrastive loss over each question's retrieved passages (train_nq's train.retrieval_loss_weight): the
    negative log-likelihood of the gold passage under the softmax of the K retrieval scores, the other retrieved
    passages its negatives (hard ones: the retriever ranked them high). Averaged over the questions whose known gold
    passage (gold_B >= 0) was retrieved; the others add nothing (the frozen index holds no vector to score it by here)."""
    is_gold_BxK = (rows_BxK == gold_B[:, None]) & (gold_B[:, None] >= 0)
    found_B = jnp.any(is_gold_BxK, axis=1)
    logp_BxK = jax.nn.log_softmax(layers.at_least_float32(scores_BxK), axis=-1)
    nll_B = -jnp.sum(jnp.where(is_gold_BxK, logp_BxK, 0.0), axis=1) / jnp.maximum(is_gold_BxK.sum(axis=1), 1)
    return jnp.sum(jnp.where(found_B, nll_B, 0.0)) / jnp.maximum(found_B.sum(), 1)


def encode(module: bert.BertEncoder, params: Any, ids_BxL: jax.Array, mask_BxL: jax.Array,
           types_BxL: jax.Array | None = None, **kwargs) -> jax.Array:
    """The pooled (retrieval) vectors of a batch of token ids."""
    return module.apply({"params": params}, ids_BxL, mask_BxL, types_BxL, **kwargs)[1]


def vectors(question_module: bert.BertEncoder, document_module: bert.BertEncoder, params: dict[str, Any],
            batch: dict[str, jax.Array], *, shared_encoder: bool = False,
            rngs: dict[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(q_QxD, d_PxD) of one global batch. params = {"question": ..., "document": ...}, or {"question": ...} alone
    when `shared_encoder` (one BERT encodes both sides, as a shared-weights DPR does). batch holds
    question_ids/question_mask (Q, Lq) and passage_ids/passage_mask[/passage_types] (Q*(1+H), Lp), or, when the
    document encoder is frozen, passage_vectors (Q*(1+H), D) (params then hold "question" alone); dropout is on
    when `rngs` is given."""
    train = {"deterministic": rngs is None, "rngs": rngs or {}}
    q_QxD = encode(question_module, params["question"], batch["question_ids"], batch["question_mask"], **train)
    if "passage_vectors" in batch:  # a frozen document encoder: the passages' index vectors, no encoder to run
        return q_QxD, batch["passage_vectors"]
    document_params = params["question"] if shared_encoder else params["document"]
    # (title, text) pairs carry segment ids, as the index embeds them; without them every token is segment 0.
    d_PxD = encode(document_module, document_params, batch["passage_ids"], batch["passage_mask"],
                   batch.get("passage_types"), **train)
    return q_QxD, d_PxD


def bi_encoder_loss(question_module: bert.BertEncoder, document_module: bert.BertEncoder, params: dict[str, Any],
                    batch: dict[str, jax.Array], *, shared_encoder: bool = False,
                    rngs: dict[str, jax.Array] | None = None) -> jax.Array:
    """The contrastive loss of one global batch (see `vectors` for params and batch)."""
    return nll(*vectors(question_module, document_module, params, batch, shared_encoder=shared_encoder, rngs=rngs))


def make_update(question_module: bert.BertEncoder, document_module: bert.BertEncoder, tx, *, shared_encoder: bool,
                scale: float = 1.0):
    """The optimiser update on the contrastive loss (not jitted): (params, opt_state, batch, rng) -> (params,
    opt_state, {"loss", "grad_norm", "accuracy"}), accuracy: the share of questions whose positive scores highest.
    Dropout draws from `rng`; the batch may be sharded over the data axis (the negatives stay global)."""

    def loss_fn(params, batch, rng):
        q_QxD, d_PxD = vectors(question_module, document_module, params, batch, shared_encoder=shared_encoder,
                               rngs={"dropout": rng})
        best = jnp.argmax(scores(q_QxD, d_PxD), axis=-1)
        accuracy = jnp.mean(best == positive_rows(q_QxD.shape[0], d_PxD.shape[0]))
        return nll(q_QxD, d_PxD, scale), accuracy

    def update(params, opt_state, batch, rng):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "accuracy": accuracy}
        return optax.apply_updates(params, updates), opt_state, metrics

    return update


def make_step(question_module: bert.BertEncoder, document_module: bert.BertEncoder, tx, *, shared_encoder: bool):
    """A jitted optimiser step on the contrastive loss: (params, opt_state, batch, rng) -> (params, opt_state, loss)."""
    update = make_update(question_module, document_module, tx, shared_encoder=shared_encoder)

    def step(params, opt_state, batch, rng):
        params, opt_state, metrics = update(params, opt_state, batch, rng)
        return params, opt_state, metrics["loss"]

    return jax.jit(step)
