"""The training step: the sharded train state and the jitted `train_step(state, batch, rng, corpus) -> (state,
metrics)` (state donated, no I/O).

One step: question encoding q(x), doc scores q(x)·d(z) against the retrieved documents' precomputed embeddings, the
reader's loss over the K documents (config model.reader: RAG-Sequence's or RAG-Token's marginal NLL, rag_jax/readers/),
and the optax update. In the paper's recipe the
document encoder is frozen: it is not in the state, its embeddings are the index. End to end (model.doc_encoder.
trainable) it is params["doc_encoder"] and the step embeds the retrieved passages again from their document-encoder
tokens, so the doc scores carry gradients to both encoders; with retrieval.rerank_candidates L the batch holds L
passages per question from the (stale) index and the step keeps the K that the current encoders score best (Atlas's
retrieve_with_rerank). Retrieval (config retrieval.mode):
  host    the loop encodes the batch's questions with a separate jitted call, searches on the host (exact or
          ScaNN, rag_jax/retrieval/retriever.py), forms the generator inputs there exactly as the reference does,
          and the step receives them with the retrieved embeddings; `corpus` is empty.
  device  `corpus` holds the index embeddings and every passage's generator tokens, split over all devices; the
          step searches (exact MIPS, make_sharded_topk) and assembles the generator inputs itself
          (rag_jax/retrieval/contexts.py). The query is q(x) without dropout in both modes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rag_jax import rag, sharding
from rag_jax.readers import marginal, registry as readers
from rag_jax.retrieval import code_search, codes as codes_lib, contexts, embed, exact
from rag_jax.runs import build
from rag_jax.training import contrastive, optim, retriever_losses
from rag_jax.training.inputs import BATCH_AXES, DOC_TOKEN_KEYS, candidates, device_codes_kind


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # {"question_encoder": ..., "generator": ...} (+ "doc_encoder" when it is trained)
    opt_state: Any


# ---------------------------------------------------------------------------------------------------- state


def _boxed_state(model: rag.Rag, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = rag.init_params(model, rng)
    # The optimizer state mirrors the boxed params, so Adam's moments inherit their logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_layout(model: rag.Rag, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, state shardings): eval_shape -> logical specs -> NamedShardings."""
    boxed = jax.eval_shape(functools.partial(_boxed_state, model, tx), jax.random.PRNGKey(0))
    unboxed = nn.meta.unbox(boxed)
    shardings = sharding.tree_shardings(mesh, nn.get_partition_spec(boxed), unboxed)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      unboxed, shardings)
    return abstract, shardings


def create_train_state(model: rag.Rag, tx: optax.GradientTransformation, mesh, rng: jax.Array,
                       pretrained: dict[str, Any] | None = None) -> TrainState:
    """The initial state, created already sharded; `pretrained` parts (numpy trees) replace the random ones."""
    _, shardings = state_layout(model, tx, mesh)
    pretrained = pretrained or {}
    # Traced outside `sharding.use`: Flax's DenseGeneral reshapes a boxed kernel at init, and a current mesh would
    # apply the kernel's 3-axis constraint to the flat 2-d array. out_shardings places everything anyway.
    params = jax.jit(lambda r: nn.meta.unbox(rag.init_params(model, r)), out_shardings=shardings.params)(rng)
    for part, tree in pretrained.items():
        expected = jax.tree_util.tree_structure(params[part])
        if jax.tree_util.tree_structure(tree) != expected:
            raise build.ConfigError(f"pretrained {part} parameters do not match the model's structure")
        params[part] = jax.tree_util.tree_map(
            lambda x, ref, s: jax.device_put(np.asarray(x, ref.dtype), s), tree, params[part],
            shardings.params[part])
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=shardings)
    return init(params)


# ---------------------------------------------------------------------------------------------------- step

# What a batch holds per retrieved passage: reranking keeps these for the K best of the L candidates.
RERANKED_KEYS = ("doc_rows", "doc_embeds", "context_input_ids", "context_attention_mask") + DOC_TOKEN_KEYS


def rerank(model: rag.Rag, params, batch: dict[str, jax.Array], n_docs: int) -> dict[str, jax.Array]:
    """The batch's L candidate passages per question -> the `n_docs` that the current q(x) and d(z) score best, best
    first (Atlas's retrieve_with_rerank). Both encoders run without dropout and without gradient: the choice is not
    trained; the passages kept are, by the loss."""
    q_BxD = model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"])
    scores_BxL = jax.lax.stop_gradient(model.trained_doc_scores(params, q_BxD, batch))
    _, keep_BxK = jax.lax.top_k(scores_BxL, n_docs)

    def kept(x):
        return jnp.take_along_axis(x, keep_BxK.reshape(keep_BxK.shape + (1,) * (x.ndim - 2)), axis=1)

    return {**batch, **{key: kept(batch[key]) for key in RERANKED_KEYS}}


def _split_microbatches(batch: dict[str, jax.Array], count: int, mesh) -> dict[str, jax.Array]:
    """(B, ...) -> (count, B/count, ...) with microbatch i = rows i, i+count, ...: each device keeps its rows."""

    def split(key, x):
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
        spec = sharding.named_sharding(mesh, (None,) + BATCH_AXES[key])
        return jax.lax.with_sharding_constraint(x, spec)

    return {key: split(key, x) for key, x in batch.items()}


def make_train_step(model: rag.Rag, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh,
                    state_shardings: TrainState, batch_keys, corpus_shardings: dict | None = None,
                    num_passages: int | None = None) -> Callable:
    """The jitted `train_step(state, batch, rng, corpus) -> (state, metrics)` (state donated).

    batch: global arrays with `batch_keys` (BATCH_AXES layout). rng: the run's base key; the step uses
    fold_in(rng, step). corpus: {} for host retrieval, else inputs.device_corpus's arrays.
    metrics: replicated float32 scalars loss, grad_norm, update_norm, learning_rate, gold_hits, gold_known (and
    support_prior, support_count with train.retriever_loss pdist/emdr2/loop/adist).
    """
    gcfg = model.generator_config
    pad, bos, eos = gcfg.pad_token_id, gcfg.bos_token_id, gcfg.eos_token_id
    reader = readers.from_config(config)
    epsilon = float(config.model.label_smoothing)
    accum = int(config.train.grad_accum_steps)
    n_docs = int(config.model.n_docs)
    schedule = optim.learning_rate_schedule(config)
    device_mode = config.retrieval.mode == "device"
    codes_kind = device_codes_kind(config)  # the devices hold the index's codes (index.codes), not its vectors
    if device_mode and codes_kind:
        topk = code_search.make_sharded_code_topk(mesh, codes_kind, candidates(config),
                                                  corpus_axes=sharding.corpus_axes())
    elif device_mode:  # (L candidates when reranking)
        topk = exact.make_sharded_topk(mesh, candidates(config), num_passages, corpus_axes=sharding.corpus_axes())
    if device_mode:
        gather = contexts.make_sharded_gather(mesh, sharding.corpus_axes())
    max_len = model.config.context.max_combined_length
    retrieval_weight = float(config.train.get("retrieval_loss_weight", 0.0))  # (absent from configs saved before it)
    reranks = int(config.retrieval.get("rerank_candidates", 0)) > 0  # (absent from configs saved before it)
    retriever_loss = config.train.get("retriever_loss", "marginal")  # (absent from configs saved before it)
    # q(x)'s gradient is exactly 0 when it is frozen, when no loss reaches the scores (retriever_loss none), or when
    # only RAG's marginal does at K=1 (a softmax over one passage is 1 whatever its score): its backward pass is
    # skipped. Identical updates: AdamW's moments of a zero gradient stay 0 and weight decay still applies.
    question_gradient_is_zero = optim.freezes_question_encoder(config) or (
        not retrieval_weight and (retriever_loss == "none" or (retriever_loss == "marginal" and n_docs == 1)))
    retriever_temperature = float(config.train.get("retriever_temperature", 1.0))

    def constrain(key, x):
        return jax.lax.with_sharding_constraint(x, sharding.named_sharding(mesh, BATCH_AXES[key]))

    def retrieve(params, batch, corpus):
        q_BxD = model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"])
        doc_keys = ("doc_tokens",) if model.trains_doc_encoder else ()
        if codes_kind:  # search the codes; the doc scores use the vectors the codes stand for
            arrays = codes_lib.CodeArrays(corpus["codes"], corpus["code_scale"], corpus["code_bias"])
            rows_BxK, _ = topk(jax.lax.stop_gradient(q_BxD), arrays, corpus.get("codebooks"))
            codes_BxKxC, scale_BxK, table, *doc_table = gather(
                rows_BxK, *(corpus[key] for key in ("codes", "code_scale", "tokens") + doc_keys))
            embeds = codes_lib.decode_rows(codes_kind, codes_BxKxC, scale_BxK, corpus.get("codebooks"))
        else:
            rows_BxK, _ = topk(jax.lax.stop_gradient(q_BxD), corpus["embeddings"])
            embeds, table, *doc_table = gather(rows_BxK, *(corpus[key] for key in ("embeddings", "tokens") + doc_keys))
        ids, mask = contexts.assemble_contexts(table[..., 1:], table[..., 0], batch["question_gen_ids"],
                                                      batch["question_gen_length"], max_len, bos=bos, eos=eos,
                                                      pad=pad)
        found = {"doc_rows": rows_BxK, "doc_embeds": embeds.astype(jnp.float32), "context_input_ids": ids,
                 "context_attention_mask": mask, **(embed.split_doc_tokens(doc_table[0]) if doc_table else {})}
        return {**batch, **{key: constrain(key, x) for key, x in found.items()}}

    def loss_fn(params, batch, rng):
        q_rng, g_rng = jax.random.split(rng)
        q_BxD = model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"],
                                       dropout_rng=q_rng)
        if question_gradient_is_zero:
            q_BxD = jax.lax.stop_gradient(q_BxD)
        if model.trains_doc_encoder:
            scores_BxK = model.trained_doc_scores(params, q_BxD, batch, dropout_rng=jax.random.fold_in(rng, 2))
        else:
            scores_BxK = rag.doc_scores(q_BxD, batch["doc_embeds"])
        # Only RAG's own loss trains the retriever through the reader's marginal; Atlas's losses train it alone.
        reader_scores_BxK = scores_BxK if retriever_loss == "marginal" else jax.lax.stop_gradient(scores_BxK)
        nll_B = reader.loss(model, params, batch, reader_scores_BxK, epsilon=epsilon, dropout_rng=g_rng)
        loss, aux = nll_B.mean(), {}
        if retriever_loss not in ("marginal", "none"):
            retriever_B, aux = distilled_loss(params, batch, scores_BxK)
            loss = loss + retriever_B.mean()
        if retrieval_weight:
            # Mean over this (micro)batch's questions with a retrieved gold passage (a microbatch-weighted mean
            # under gradient accumulation).
            loss = loss + retrieval_weight * contrastive.retrieved_nll(scores_BxK, batch["doc_rows"],
                                                                       batch["gold_row"])
        return loss, aux

    def distilled_loss(params, batch, scores_BxK):
        """Atlas's retriever loss per question (B,) from the reader's terms (a pass without dropout, held fixed),
        and the sum of the supported (ADist: most attended) passages' priors (support_prior metric)."""
        target_mask_BxT = marginal.shift_left(batch["labels"], pad) != pad
        if retriever_loss == "adist":
            attention_BxK = jax.lax.stop_gradient(reader.passage_attention_scores(model, params, batch))
            loss_B = retriever_losses.adist(scores_BxK, attention_BxK, temperature=retriever_temperature)
            prior_B = retriever_losses.attended_prior(jax.lax.stop_gradient(scores_BxK), attention_BxK)
            return loss_B, {"support_prior": prior_B.sum(), "support_count": jnp.float32(prior_B.shape[0])}
        token_ll_BxKxT = jax.lax.stop_gradient(reader.passage_token_log_likelihoods(model, params, batch))
        if retriever_loss == "pdist":
            loss_B = retriever_losses.pdist(scores_BxK, token_ll_BxKxT, target_mask_BxT,
                                            temperature=retriever_temperature)
        elif retriever_loss == "emdr2":
            tempered_BxKxT = token_ll_BxKxT if retriever_temperature == 1.0 else jax.lax.stop_gradient(
                reader.passage_token_log_likelihoods(model, params, batch, temperature=retriever_temperature))
            loss_B = retriever_losses.emdr2(scores_BxK, tempered_BxKxT, target_mask_BxT)
        else:  # loop
            left_out_BxK = reader.leave_one_out_losses(token_ll_BxKxT, jax.lax.stop_gradient(scores_BxK),
                                                       target_mask_BxT)
            loss_B = retriever_losses.loop(scores_BxK, left_out_BxK, temperature=retriever_temperature)
        prior_B = retriever_losses.support_prior(jax.lax.stop_gradient(scores_BxK), token_ll_BxKxT)
        return loss_B, {"support_prior": prior_B.sum(), "support_count": jnp.float32(prior_B.shape[0])}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch, rng, corpus):
        rng = jax.random.fold_in(rng, state.step)
        if device_mode:
            batch = retrieve(state.params, batch, corpus)
        if reranks:
            batch = rerank(model, state.params, batch, n_docs)
            batch = {**batch, **{key: constrain(key, batch[key]) for key in RERANKED_KEYS}}
        model_batch = {key: batch[key] for key in ("question_input_ids", "question_attention_mask", "labels",
                                                   "context_input_ids", "context_attention_mask", "doc_embeds")
                       + (("doc_rows", "gold_row") if retrieval_weight else ())
                       + (DOC_TOKEN_KEYS if model.trains_doc_encoder else ())}
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, model_batch, rng)
        else:
            micro = _split_microbatches(model_batch, accum, mesh)

            def body(carry, xs):
                mb, i = xs
                (loss_i, aux_i), grads_i = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss_i, aux_i, grads_i)), None

            aux_shapes = jax.eval_shape(lambda: grad_fn(state.params, jax.tree_util.tree_map(lambda x: x[0], micro),
                                                        rng)[0][1])
            zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                                        aux_shapes),
                     jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            loss, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        gold = batch["gold_row"]
        hits = jnp.any(batch["doc_rows"] == gold[:, None], axis=1) & (gold >= 0)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),  # inf/NaN here means the new parameters are bad
            "learning_rate": schedule(state.step),
            "gold_hits": hits.sum().astype(jnp.float32),
            "gold_known": (gold >= 0).sum().astype(jnp.float32),
            **aux,  # with an Atlas retriever loss: support_prior (summed over questions), support_count
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    batch_shardings = {key: sharding.named_sharding(mesh, BATCH_AXES[key]) for key in batch_keys}
    corpus_shardings = corpus_shardings or {}
    replicated = sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, replicated, corpus_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


