"""Atlas's losses teach a weak retriever from answers alone: a linear q(x) over a frozen index, trained only with
the losses of rag_jax/training/retriever_losses.py on the answer likelihoods of a reader that reads (high for the
passage that holds the answer, low for the others; for ADist, a FiD decoder's cross-attention that favours that
passage), raises held-out gold recall@4. The gold ids are used only to
measure. The end-to-end version on the knowledge task, with the real reader, is experiments.retriever_loss_table
(docs/retriever_losses.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rag_jax.readers import marginal
from rag_jax.training import retriever_losses

PASSAGES, TRAIN, DIM, FEATURES, K, ANSWER_TOKENS = 160, 96, 16, 32, 4, 2
SCALE = 20.0  # retrieval.score_scale for unit vectors
ADIST_TEMPERATURE = 0.005  # train.retriever_temperature for adist: the target 0.93 on the passage attended most


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def world():
    """Unit passage vectors d(z); a question about passage i is a noisy linear view of d(z_i), so one linear q(x)
    retrieves every entity's passage, seen in training or not; the weak start is that map plus noise."""
    rng = np.random.default_rng(0)
    docs = _unit(rng.standard_normal((PASSAGES, DIM))).astype(np.float32)
    view = rng.standard_normal((DIM, FEATURES)).astype(np.float32)
    questions = (docs @ view + 0.3 * rng.standard_normal((PASSAGES, FEATURES))).astype(np.float32)
    ideal = np.linalg.pinv(view)
    weak = (ideal + 3.0 * ideal.std() * rng.standard_normal(ideal.shape)).astype(np.float32)
    return docs, questions, weak


def _top_k(w, docs, questions):
    return np.argsort(-(_unit(questions @ w) @ docs.T), axis=-1)[:, :K]


def recall_at_k(w, docs, questions, first: int) -> float:
    """Gold recall@K over questions[first:] (question i's gold passage is passage i)."""
    top = _top_k(w, docs, questions[first:])
    return 100.0 * float(np.mean((top == np.arange(first, PASSAGES)[:, None]).any(-1)))


def reader_token_log_likelihoods(retrieved_BxK, asked_B):
    """A reader that reads: the answer's tokens are likely (log p = -0.1) given the passage that states it and
    unlikely (-4) given any other; what it returns is all the retriever loss sees (never the gold id)."""
    holds_answer = retrieved_BxK == asked_B[:, None]
    return np.broadcast_to(np.where(holds_answer, -0.1, -4.0)[:, :, None], holds_answer.shape + (ANSWER_TOKENS,))


def reader_attention_scores(retrieved_BxK, asked_B):
    """A FiD reader that reads, as ADist sees it (readers/fid.py attention_distillation_scores): while reading the
    answer its decoder puts 70% of its cross-attention on the passage that states it (the rest spread evenly), value
    norms ~8, and Atlas's division by 256 (the scale that train.retriever_temperature divides)."""
    holds_answer = retrieved_BxK == asked_B[:, None]
    found_B = holds_answer.any(-1, keepdims=True)
    mass = np.where(found_B, np.where(holds_answer, 0.7, 0.3 / (K - 1)), 1.0 / K)
    return 8.0 * mass / 256


def train(loss: str, w, docs, questions, reader=None, steps: int = 150, batch: int = 16):
    """`steps` Adam updates of q(x) with `loss` on the first TRAIN questions (top-K retrieval from the current q(x),
    as training does), the reader's terms from `reader` (answer likelihoods; for adist, attention scores)."""
    reader = reader or (reader_attention_scores if loss == "adist" else reader_token_log_likelihoods)
    tx = optax.adam(3e-3)
    opt_state = tx.init(w)
    mask = jnp.ones((batch, ANSWER_TOKENS), bool)

    def objective(w, q_BxF, docs_BxKxD, token_ll):
        q = q_BxF @ w
        scores = SCALE * jnp.einsum("bd,bkd->bk", q / jnp.linalg.norm(q, axis=-1, keepdims=True), docs_BxKxD)
        if loss == "pdist":
            return retriever_losses.pdist(scores, token_ll, mask, temperature=0.1).mean()
        if loss == "adist":
            # Atlas's 0.01 makes this reader's target soft (0.69 on the right passage): 30 -> 41% (measured)
            return retriever_losses.adist(scores, token_ll, temperature=ADIST_TEMPERATURE).mean()
        if loss == "emdr2":
            return retriever_losses.emdr2(scores, token_ll, mask).mean()
        left_out = marginal.leave_one_out_losses(token_ll, scores, mask, per_token=False)  # RAG-Sequence's
        return retriever_losses.loop(scores, left_out, temperature=0.1).mean()

    grad = jax.jit(jax.grad(objective))
    rng = np.random.default_rng(1)
    for _ in range(steps):
        asked = rng.choice(TRAIN, batch, replace=False)
        retrieved = _top_k(np.asarray(w), docs, questions[asked])
        token_ll = reader(retrieved, asked)
        updates, opt_state = tx.update(grad(w, questions[asked], docs[retrieved], jnp.asarray(token_ll)), opt_state)
        w = optax.apply_updates(w, updates)
    return np.asarray(w)


@pytest.mark.parametrize("loss", ["pdist", "emdr2", "loop", "adist"])
def test_a_weak_retriever_learns_from_the_readers_answer_likelihoods(world, loss):
    docs, questions, weak = world
    start = recall_at_k(weak, docs, questions, TRAIN)
    assert 10 <= start <= 50  # weak, but the gold passage is sometimes in the top K: there is a signal to follow
    end = recall_at_k(train(loss, jnp.asarray(weak), docs, questions), docs, questions, TRAIN)
    assert end >= start + 25, (loss, start, end)


def test_a_reader_that_cannot_read_teaches_nothing(world):
    """The same training with a reader whose likelihoods ignore the passage: no gain (the gain above comes from the
    reader's signal, not from the optimiser moving q(x) anywhere)."""
    docs, questions, weak = world
    start = recall_at_k(weak, docs, questions, TRAIN)

    def ignores_the_passage(retrieved, asked):
        return np.full(retrieved.shape + (ANSWER_TOKENS,), -2.0)
    end = recall_at_k(train("pdist", jnp.asarray(weak), docs, questions, ignores_the_passage), docs, questions, TRAIN)
    assert end <= start + 5
