"""Document posteriors (provenance) against transformers' RAG on the same random weights, and their properties.

The reference returns no posteriors; it computes their terms. RAG-Token: the per-document log-probabilities that
`RagTokenForGeneration.marginalize` sums (caught at its torch.logsumexp), normalised over documents. RAG-Sequence:
the per-document sequence log-likelihoods plus doc log-priors that `RagSequenceForGeneration.get_nll` sums over
documents (caught at its logsumexp), normalised.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rag_jax.inference import provenance
from rag_jax.readers import generation, marginal, rag_sequence, rag_token
from rag_jax.retrieval.corpus import Passage
from tests import hf_models, test_decode

BATCH, N_DOCS, PAD = 3, 3, 1
TOLERANCE = 1e-5


# The random RAG checkpoint of the decoding tests, whose decoded answers vary in length and by document.
pair = test_decode.checkpoint


def _inputs(seed=0, n_docs=N_DOCS):
    rng = np.random.default_rng(seed)
    ids, mask = hf_models.padded_ids(rng, BATCH * n_docs, 12, vocab=101, pad=PAD)
    scores = (rng.normal(size=(BATCH, n_docs)) * 2).astype(np.float32)
    return ids, mask, scores


def _answers(seed=1, length=7):
    """Decoder inputs (B, T): start token, then at least two real targets (so that the reference's RAG-Sequence
    prior, added at target position 1, is never dropped by its one-token-answer quirk), then padding."""
    ids, _ = hf_models.padded_ids(np.random.default_rng(seed), BATCH, length, vocab=101, pad=PAD, first=2)
    ids[:, 1:3] = np.maximum(ids[:, 1:3], 3)
    return ids


def _ours(pair, inputs, answers):
    """Our posteriors (per token (B, T, K), per answer (B, K)) from a teacher-forced pass."""
    ids, mask, scores = map(jnp.asarray, inputs)
    logits = pair["model"].generator_logits(pair["params"], ids, mask, jnp.asarray(answers))
    token_ll = marginal.target_log_likelihoods(logits, jnp.asarray(answers), pad_token_id=PAD)
    return tuple(np.asarray(x) for x in marginal.doc_posteriors(scores, token_ll))


def _caught(monkeypatch, owner, name, call):
    """The first argument of the first owner.name(...) during call()."""
    seen = []
    original = getattr(owner, name)

    def spy(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return original(x, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, spy)
        call()
    return seen[0].numpy()


def _reference(pair, monkeypatch, inputs, answers):
    """The reference's posteriors: per token from RAG-Token's marginalize, per answer from RAG-Sequence's get_nll."""
    ids, mask, scores = map(torch.as_tensor, inputs)
    answers_t = torch.as_tensor(np.array(answers))
    with torch.no_grad():
        out = pair["token"](context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                            decoder_input_ids=answers_t, do_marginalize=False, n_docs=N_DOCS)  # fmt: skip
        log_prob_sum = _caught(monkeypatch, torch, "logsumexp",
                               lambda: pair["token"].marginalize(out.logits, out.doc_scores, N_DOCS))  # B,K,T,V
        target = np.concatenate([answers[:, 1:], np.full((BATCH, 1), PAD)], axis=1)
        per_doc = np.take_along_axis(log_prob_sum, target[:, None, :, None], axis=-1)[..., 0]  # B, K, T
        per_token = torch.softmax(torch.as_tensor(per_doc), dim=1).numpy().transpose(0, 2, 1)
        out = pair["sequence"](context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                               decoder_input_ids=answers_t, n_docs=N_DOCS)  # fmt: skip
        joint = _caught(monkeypatch, torch.Tensor, "logsumexp",
                        lambda: pair["sequence"].get_nll(out.logits, out.doc_scores, answers_t, n_docs=N_DOCS))
        per_answer = torch.softmax(torch.as_tensor(joint), dim=1).numpy()
    return per_token, per_answer, target != PAD


def test_posteriors_equal_the_references_terms_normalised(pair, monkeypatch):
    inputs, answers = _inputs(), _answers()
    per_token, per_answer = _ours(pair, inputs, answers)
    ref_token, ref_answer, real = _reference(pair, monkeypatch, inputs, answers)
    assert real.sum() > BATCH * 2 and not real.all()  # pads are there and left out
    np.testing.assert_allclose(per_token[real], ref_token[real], atol=TOLERANCE)
    np.testing.assert_allclose(per_answer, ref_answer, atol=TOLERANCE)
    assert np.abs(per_answer - per_answer.mean(-1, keepdims=True)).max() > 0.05  # not uniform: a real test


@pytest.mark.parametrize("model_type,mode,num_beams", [("token", None, 1), ("token", None, 2),
                                                       ("sequence", "thorough", 3), ("sequence", "fast", 3)])
def test_decoding_returns_the_posteriors_of_its_answers(pair, monkeypatch, model_type, mode, num_beams):
    """What decoding returns (RAG-Sequence thorough: kept from its rescoring pass, no pass of its own) gives the
    reference's posteriors of the answers it decoded, and the same answers as without it."""
    inputs = _inputs(seed=3)  # answers of one to three tokens, the best hypothesis not always the first
    args = (pair["model"], pair["params"], *map(jnp.asarray, inputs))
    if model_type == "token":
        gen = generation.GenerationConfig.from_hf(pair["hf_config"], num_beams=num_beams, max_length=8)
        plain = rag_token.generate(*args, gen)
        tokens, token_ll = rag_token.generate(*args, gen, return_token_ll=True)
    else:
        gen = generation.GenerationConfig.for_rag_sequence(pair["hf_config"], num_beams=num_beams, max_length=8)
        plain = rag_sequence.generate(*args, gen, mode=mode)
        tokens, token_ll = rag_sequence.generate(*args, gen, mode=mode, return_token_ll=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(plain))
    per_token, per_answer = (np.asarray(x) for x in marginal.doc_posteriors(jnp.asarray(inputs[2]), token_ll))
    tokens = np.asarray(tokens)
    ref_token, ref_answer, real = _reference(pair, monkeypatch, inputs, tokens)
    np.testing.assert_allclose(per_token[real], ref_token[real], atol=TOLERANCE)
    # The reference's sequence terms drop the prior where target position 1 is a pad (a one-token answer).
    two_plus = real[:, 1]
    assert two_plus.any()
    np.testing.assert_allclose(per_answer[two_plus], ref_answer[two_plus], atol=TOLERANCE)


def test_posteriors_sum_to_one_and_are_one_for_a_single_document(pair):
    per_token, per_answer = _ours(pair, _inputs(), _answers())
    np.testing.assert_allclose(per_token.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(per_answer.sum(-1), 1.0, atol=1e-6)
    per_token, per_answer = _ours(pair, _inputs(n_docs=1), _answers())
    np.testing.assert_array_equal(per_token, 1.0)
    np.testing.assert_array_equal(per_answer, 1.0)


def test_swapping_two_documents_swaps_their_posteriors(pair):
    ids, mask, scores = _inputs()
    order = np.array([2, 1, 0])
    rows = (np.arange(BATCH)[:, None] * N_DOCS + order[None]).reshape(-1)
    per_token, per_answer = _ours(pair, (ids, mask, scores), _answers())
    swapped_token, swapped_answer = _ours(pair, (ids[rows], mask[rows], scores[:, order]), _answers())
    np.testing.assert_allclose(swapped_answer, per_answer[:, order], atol=1e-6)
    np.testing.assert_allclose(swapped_token, per_token[:, :, order], atol=1e-6)


class _Tokens:
    def decode(self, ids):
        return f"<{ids[0]}>"


def test_entry_lays_out_one_row_per_generated_token_in_document_order():
    passages = [Passage("7", "Seven", "text seven"), Passage("9", "Nine", "text nine")]
    tokens = np.array([2, 0, 11, 12, 2, PAD, PAD])  # start, <s>, two words, end, fill
    per_token = np.random.default_rng(0).dirichlet([1, 1], size=len(tokens))
    record = provenance.entry(passages, np.array([1.0, 0.0]), np.array([0.25, 0.75]), per_token, tokens, _Tokens(),
                              PAD)  # fmt: skip
    assert [d["id"] for d in record["documents"]] == ["7", "9"]
    assert record["documents"][0]["prior"] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert [d["posterior"] for d in record["documents"]] == [0.25, 0.75]
    assert [row["token"] for row in record["tokens"]] == ["<0>", "<11>", "<12>", "<2>"]
    np.testing.assert_array_equal([row["posteriors"] for row in record["tokens"]], per_token[:4])
    assert [rank for rank, _ in provenance.ranked_documents(record)] == [1, 0]


def test_snippet_marks_the_answer_where_it_occurs():
    text = "Alma Berg was born in Oslo in 1901. She played the cello. " * 3
    assert provenance.snippet(text, "oslo", width=40).count("**Oslo**") == 1
    assert provenance.snippet(text, "Bergen", width=40) == text[:40].rstrip() + " …"
    assert "**" not in provenance.snippet(text, "Osl", width=200)  # whole words only
