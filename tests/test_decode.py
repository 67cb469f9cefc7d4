"""Decoding against transformers' RagTokenForGeneration.generate / RagSequenceForGeneration.generate on the same
random weights, the logits processors against transformers' own, and the properties of fast decoding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.readers import decoding, generation, rag_sequence, rag_token, search
from rag_jax.models import hf
from tests import hf_models

BATCH, N_DOCS, PAD, BOS, EOS = 3, 3, 1, 0, 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random RAG checkpoint (save_pretrained) with generation-friendly weights (hf_models.decode_rag), its
    PyTorch twins and ours."""
    directory = str(tmp_path_factory.mktemp("rag_decode"))
    reference = hf_models.decode_rag(N_DOCS)
    reference.save_pretrained(directory)
    loaded = hf.load_rag(directory)
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    return dict(
        directory=directory,
        hf_config=loaded.hf_config,
        model=model,
        params=params,
        token=transformers.RagTokenForGeneration.from_pretrained(directory).eval(),
        sequence=transformers.RagSequenceForGeneration.from_pretrained(directory).eval(),
    )


def _inputs(seed=0, n_docs=N_DOCS, repeat_first_doc=False, extra_padding=0):
    """Contexts with right padding of varied lengths (B*K, S) and doc scores (B, K). With `repeat_first_doc`, each
    example's second context is a copy of its first, so that its beams repeat across docs (deduplication). With
    `extra_padding`, that many more pad columns after the longest context (as a tokenizer padding to
    max_combined_length leaves them)."""
    rng = np.random.default_rng(seed)
    ids, mask = hf_models.padded_ids(rng, BATCH * n_docs, 12, vocab=101, pad=PAD)
    columns = [(0, 0), (0, extra_padding)]
    ids, mask = np.pad(ids, columns, constant_values=PAD), np.pad(mask, columns)
    if repeat_first_doc:
        ids[1::n_docs], mask[1::n_docs] = ids[::n_docs], mask[::n_docs]
    scores = (rng.normal(size=(BATCH, n_docs)) * 2).astype(np.float32)
    return ids, mask, scores


def _reference(model, inputs, **kwargs) -> np.ndarray:
    ids, mask, scores = map(torch.as_tensor, inputs)
    with torch.no_grad():
        return model.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores, **kwargs).numpy()


def _assert_same(ours, reference: np.ndarray):
    """Ours is the reference's output filled with pad up to max_length."""
    ours = np.asarray(ours)
    width = reference.shape[1]
    assert ours.shape[0] == reference.shape[0]
    np.testing.assert_array_equal(ours[:, :width], reference)
    assert (ours[:, width:] == PAD).all()


def _token(checkpoint, inputs, gen):
    return rag_token.generate(checkpoint["model"], checkpoint["params"], *map(jnp.asarray, inputs), gen)


def _sequence(checkpoint, inputs, gen, **kwargs):
    """Our RAG-Sequence decoding and its candidates (one compilation per gen / mode / mask_beams / shape)."""
    return rag_sequence.generate(
        checkpoint["model"], checkpoint["params"], *map(jnp.asarray, inputs), gen, return_candidates=True, **kwargs
    )


TOKEN_CASES = [
    dict(num_beams=1, max_length=8),
    dict(num_beams=1, max_length=9, min_length=4, bad_words_ids=[[0, 0]], forced_bos_token_id=0),
    dict(num_beams=1, max_length=9, no_repeat_ngram_size=1, forced_eos_token_id=2),
    dict(num_beams=3, max_length=8),
    dict(num_beams=4, max_length=9, min_length=4, bad_words_ids=[[0, 0]], num_return_sequences=2),
    dict(num_beams=3, max_length=9, early_stopping=True, forced_bos_token_id=0, bad_words_ids=[[0, 0]]),
    dict(num_beams=3, max_length=9, min_length=4, early_stopping="never", length_penalty=0.7),
    dict(num_beams=3, max_length=9, no_repeat_ngram_size=2, length_penalty=2.0),
]


@pytest.mark.parametrize("kwargs", TOKEN_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_rag_token_generate_matches_reference(checkpoint, kwargs):
    inputs = _inputs(seed=0)
    reference = _reference(checkpoint["token"], inputs, **kwargs)
    gen = generation.GenerationConfig.from_hf(checkpoint["hf_config"], **kwargs)
    _assert_same(_token(checkpoint, inputs, gen), reference)


def test_cases_exercise_early_eos_and_the_processors(checkpoint):
    """The parity cases are only meaningful if EOS ends some hypotheses early while others run to max_length, and
    if min_length / bad_words_ids change the output."""
    inputs = _inputs(seed=0)
    early = _reference(checkpoint["token"], inputs, **TOKEN_CASES[5])
    ended = (early[:, 1:-1] == EOS).any(axis=1)  # column 0 is the start token (also 2)
    assert ended.any() and not ended.all()

    def has_pair(ids, a, b):
        return ((ids[:, :-1] == a) & (ids[:, 1:] == b)).any()

    plain = _reference(checkpoint["token"], inputs, num_beams=1, max_length=9, forced_bos_token_id=0)
    assert has_pair(plain, 0, 0) and not has_pair(_reference(checkpoint["token"], inputs, **TOKEN_CASES[1]), 0, 0)
    without_min_length = {k: v for k, v in TOKEN_CASES[6].items() if k != "min_length"}
    short = _reference(checkpoint["token"], inputs, **without_min_length)
    constrained = _reference(checkpoint["token"], inputs, **TOKEN_CASES[6])
    assert (short[:, 1:3] == EOS).any() and not (constrained[:, 1:3] == EOS).any()


SEQUENCE_CASES = [
    dict(num_beams=3, max_length=8),
    dict(num_beams=2, max_length=9, min_length=3, bad_words_ids=[[0, 0]], num_return_sequences=2),
    dict(num_beams=1),  # the default max_length: 20 new tokens + the start token
]
FAST = SEQUENCE_CASES[0]  # the setting the fast-decoding tests share (one compilation per mode)


@pytest.mark.parametrize("kwargs", SEQUENCE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_rag_sequence_thorough_matches_reference(checkpoint, kwargs):
    inputs = _inputs(seed=1, repeat_first_doc=True)
    reference = _reference(checkpoint["sequence"], inputs, do_deduplication=True, **kwargs)
    gen = generation.GenerationConfig.for_rag_sequence(checkpoint["hf_config"], **kwargs)
    ours, candidates = _sequence(checkpoint, inputs, gen, do_deduplication=True)
    _assert_same(ours, reference)
    # A real choice: several distinct hypotheses per example, and (with beams) repeats for deduplication to drop.
    first = np.asarray(candidates.is_first_BxC)
    assert (first.sum(axis=1) > 1).all()
    assert kwargs["num_beams"] == 1 or not first.all()


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "all"])
def test_thorough_scores_are_the_references_rescoring_loss(checkpoint, dedup, monkeypatch):
    """Every scored hypothesis gets -loss of the reference's rescoring forward pass over its example's K docs (the
    scored ones: the first occurrences with deduplication, else all, which takes more than one packed pass). The
    contexts carry pad columns past the longest, which the rescoring cuts (decoding.masked_width) and the
    reference attends to, masked."""
    monkeypatch.setattr(decoding, "CONTEXT_BUCKET", 4)
    inputs = _inputs(seed=1, repeat_first_doc=True, extra_padding=9)
    assert decoding.masked_width(inputs[1]) == 12 < inputs[1].shape[1]
    gen = generation.GenerationConfig.for_rag_sequence(checkpoint["hf_config"], **FAST)
    _, candidates = _sequence(checkpoint, inputs, gen, do_deduplication=dedup)
    ids, mask, doc_scores = map(torch.as_tensor, inputs)
    hyps, first = np.asarray(candidates.ids_BxCxL), np.asarray(candidates.is_first_BxC)
    scores = np.asarray(candidates.scores_BxC)
    for b in range(BATCH):
        scored = first[b] if dedup else np.ones_like(first[b])
        n = int(scored.sum())
        docs = slice(b * N_DOCS, (b + 1) * N_DOCS)
        with torch.no_grad():
            loss = checkpoint["sequence"](
                context_input_ids=ids[docs].repeat(n, 1),
                context_attention_mask=mask[docs].repeat(n, 1),
                doc_scores=doc_scores[b : b + 1].repeat(n, 1),
                labels=torch.as_tensor(hyps[b][scored], dtype=torch.long),
                exclude_bos_score=True,
                n_docs=N_DOCS,
            ).loss
        np.testing.assert_allclose(scores[b][scored], -loss.numpy(), rtol=1e-5, atol=1e-5)
        assert np.isneginf(scores[b][~scored]).all()


def test_masked_width_keeps_every_unmasked_column(monkeypatch):
    """The rescoring's cut reaches the last column any row keeps (a hole or left padding keeps more), rounded up to
    the bucket; inside jit, where the mask's values are unknown, nothing is cut."""
    monkeypatch.setattr(decoding, "CONTEXT_BUCKET", 4)
    mask = np.zeros((2, 20), np.int32)
    mask[0, :5], mask[1, :3] = 1, 1
    assert decoding.masked_width(mask) == 8
    assert jax.jit(lambda m: jnp.zeros(decoding.masked_width(m)))(mask).shape == (20,)
    mask[1, 17] = 1
    assert decoding.masked_width(mask) == 20


def test_fast_decoding_returns_a_candidate_and_equals_thorough_with_one_document(checkpoint):
    inputs = _inputs(seed=1, repeat_first_doc=True)
    gen = generation.GenerationConfig.for_rag_sequence(checkpoint["hf_config"], **FAST)
    fast, candidates = _sequence(checkpoint, inputs, gen, mode="fast")
    _, thorough_candidates = _sequence(checkpoint, inputs, gen, do_deduplication=True)
    np.testing.assert_array_equal(candidates.ids_BxCxL, thorough_candidates.ids_BxCxL)
    ids, first = np.asarray(candidates.ids_BxCxL), np.asarray(candidates.is_first_BxC)
    for b, row in enumerate(np.asarray(fast)):
        assert any((row == ids[b, c]).all() for c in np.flatnonzero(first[b]))
    assert np.isfinite(np.asarray(candidates.scores_BxC)[first]).all()

    # With one document, p(y|x,z) is known for every hypothesis: fast decoding is thorough decoding.
    ctx_ids, ctx_mask, scores = inputs
    one_doc = (ctx_ids[::N_DOCS], ctx_mask[::N_DOCS], scores[:, :1])
    fast1, fast1_candidates = _sequence(checkpoint, one_doc, gen, mode="fast")
    thorough1, thorough1_candidates = _sequence(checkpoint, one_doc, gen, do_deduplication=True)
    np.testing.assert_array_equal(fast1, thorough1)
    np.testing.assert_allclose(fast1_candidates.scores_BxC, thorough1_candidates.scores_BxC, rtol=1e-5)


def test_fast_decoding_marginalises_over_the_docs_that_produced_a_hypothesis(checkpoint):
    """Fast scores sum p(z|x) p(y|x,z) over the docs whose beams hold y, thorough ones over all docs (ε = 0 here):
    thorough >= fast for every hypothesis, and strictly greater where other docs give y probability."""
    inputs = _inputs(seed=1, repeat_first_doc=True)
    gen = generation.GenerationConfig.for_rag_sequence(checkpoint["hf_config"], **FAST)
    _, fast = _sequence(checkpoint, inputs, gen, mode="fast")
    _, thorough = _sequence(checkpoint, inputs, gen, do_deduplication=True)
    first = np.asarray(fast.is_first_BxC)
    gap = np.asarray(thorough.scores_BxC)[first] - np.asarray(fast.scores_BxC)[first]
    assert (gap >= -1e-4).all()
    assert (gap > 1e-3).any()


def test_search_masks_context_padding_only_when_asked(checkpoint):
    """The reference's per-doc beam search sees the contexts unmasked (attention_mask=None); mask_beams=True
    gives the masked search, which is what the generator's generate does with the mask passed explicitly."""
    inputs = _inputs(seed=1, repeat_first_doc=True)
    gen = generation.GenerationConfig.for_rag_sequence(checkpoint["hf_config"], **FAST)
    _, unmasked = _sequence(checkpoint, inputs, gen, do_deduplication=True)
    _, masked = _sequence(checkpoint, inputs, gen, do_deduplication=True, mask_beams=True)
    ids, mask, _ = map(torch.as_tensor, inputs)
    beams = FAST["num_beams"]
    with torch.no_grad():
        reference = checkpoint["sequence"].generator.generate(
            ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams, max_length=FAST["max_length"]
        )
    _assert_same(np.asarray(masked.ids_BxCxL).reshape(-1, FAST["max_length"]), reference.numpy())
    assert not np.array_equal(np.asarray(unmasked.ids_BxCxL), np.asarray(masked.ids_BxCxL))


# ------------------------------------------------------------------------------------------------- configuration


def test_generation_config_resolves_like_transformers(checkpoint, tmp_path):
    """A config.json with legacy generation fields at the top level and in the generator section: RAG-Token's
    generation config takes the top level first, then the generator section; RAG-Sequence's generator ignores
    them and its max_length defaults to 20 new tokens."""
    hf_config = json.loads(json.dumps(checkpoint["hf_config"]))
    hf_config.update(num_beams=3, max_length=11)
    hf_config["generator"].update(num_beams=4, min_length=2, bad_words_ids=[[0, 0]], no_repeat_ngram_size=3)
    directory = tmp_path / "legacy"
    transformers.RagTokenForGeneration.from_pretrained(checkpoint["directory"]).save_pretrained(directory)
    (directory / "generation_config.json").unlink()
    (directory / "config.json").write_text(json.dumps(hf_config))
    expected = transformers.RagTokenForGeneration.from_pretrained(directory).generation_config
    ours = generation.GenerationConfig.from_hf(hf_config)
    assert (ours.num_beams, ours.max_length, ours.min_length) == (expected.num_beams, expected.max_length, 2)
    assert (expected.num_beams, expected.max_length, expected.min_length) == (3, 11, 2)
    assert ours.bad_words_ids == tuple(map(tuple, expected.bad_words_ids)) == ((0, 0),)
    assert ours.no_repeat_ngram_size == expected.no_repeat_ngram_size == 3
    assert (ours.decoder_start_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 2, 1)
    assert generation.GenerationConfig.from_hf(hf_config, num_beams=1).num_beams == 1

    sequence = generation.GenerationConfig.for_rag_sequence(hf_config)
    assert (sequence.num_beams, sequence.max_length, sequence.min_length, sequence.bad_words_ids) == (1, 21, 0, None)
    assert generation.GenerationConfig.for_rag_sequence(hf_config, max_length=7).max_length == 7


# ---------------------------------------------------------------------------------------------- logits processors


_process = jax.jit(generation.process_scores, static_argnames="gen")


@pytest.mark.parametrize("cur_len", [1, 2, 3, 5, 8])
def test_logits_processors_match_transformers(cur_len):
    """Our processors on rows filled with junk past cur_len against transformers' on the first cur_len tokens;
    ids from a tiny alphabet so that n-grams and multi-token bad words do repeat."""
    rng = np.random.default_rng(cur_len)
    rows, vocab, max_length = 64, 7, 9
    prefix = rng.integers(0, 4, size=(rows, cur_len))
    scores = rng.normal(size=(rows, vocab)).astype(np.float32)
    junk = rng.integers(0, vocab, size=(rows, max_length - cur_len))
    bad = [[1, 2, 3], [0, 0], [3], [2], [3, 1]]  # [2] = [eos] is dropped, as transformers does
    for ngram in (1, 2, 3):
        gen = generation.GenerationConfig(
            max_length=max_length, min_length=4, no_repeat_ngram_size=ngram, bad_words_ids=bad,
            forced_bos_token_id=5, forced_eos_token_id=EOS, eos_token_id=EOS,
        )  # fmt: skip
        processors = transformers.LogitsProcessorList([
            transformers.NoRepeatNGramLogitsProcessor(ngram),
            transformers.NoBadWordsLogitsProcessor(bad, EOS),
            transformers.MinLengthLogitsProcessor(4, EOS),
            transformers.ForcedBOSTokenLogitsProcessor(5),
            transformers.ForcedEOSTokenLogitsProcessor(max_length, EOS),
        ])  # fmt: skip
        expected = processors(torch.as_tensor(prefix), torch.as_tensor(scores)).numpy()
        seqs = jnp.asarray(np.concatenate([prefix, junk], axis=1))
        ours = _process(jnp.asarray(scores), seqs, jnp.int32(cur_len), gen)
        np.testing.assert_array_equal(np.asarray(ours), expected)
        if cur_len >= 3:
            assert np.isinf(expected).sum() > np.isinf(scores).sum()  # something was banned


def test_first_max_index_is_torch_argmax():
    """greedy_search's argmax: ties (the first wins), -inf rows (banned tokens), NaN (the first NaN wins, as
    torch.argmax), the vocabulary's last entry, against torch.argmax, which the reference's greedy search calls."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, size=(12, 50)).astype(np.float32)  # small integers: ties in every row
    x[1] = -np.inf
    x[2, [7, 30]] = np.nan
    x[3, -1] = 9.0
    x[4, :] = 1.0
    x[5, 0], x[5, 10] = np.inf, np.inf
    got = np.asarray(jax.jit(search.first_max_index)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, torch.argmax(torch.as_tensor(x), dim=-1).numpy())
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


@pytest.mark.parametrize("vocab", [50265, 977], ids=["divisible", "padded"])
def test_beam_candidates_are_top_k_of_the_log_probs_ties_included(vocab):
    """The beam search's candidates (through group maxima, search._top_candidates) are jax.lax.top_k of
    log_softmax(logits) + running score over (beam, token): the same tokens, lower index first among equal scores,
    on logits with many ties, with the reference's -1e9 running score, and with a vocabulary the groups do not
    divide."""
    rng = np.random.default_rng(vocab)
    k = 4

    def full(logits, running):
        lp = jax.nn.log_softmax(logits, axis=-1) + running[:, :, None]
        return jax.lax.top_k(lp.reshape(logits.shape[0], -1), k)

    # The best group holds ties with groups of lower index: the k best groups must be read in index order.
    spikes = np.zeros((1, 2, vocab))
    spikes[:, :, vocab - 10 : vocab - 6] = [3, 2, 2, 2]
    spikes[:, :, [5, vocab // 3, vocab // 2]] = 2
    for logits, running in [
        (spikes, np.zeros((1, 2))),
        (rng.integers(-3, 3, (5, 2, vocab)), rng.standard_normal((5, 2))),  # ties everywhere
        (rng.standard_normal((5, 2, vocab)), np.tile([0.0, search.NEG], (5, 1))),  # the first step
        (rng.standard_normal((4, 3, vocab)) * 3, rng.standard_normal((4, 3)) * 5),
    ]:
        logits, running = jnp.asarray(logits, jnp.float32), jnp.asarray(running, jnp.float32)
        want_values, want_idx = full(logits, running)
        values, idx = jax.jit(search._top_candidates, static_argnums=2)(logits, running, k)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("vocab", [5000, 977], ids=["divisible", "padded"])
def test_log_softmax_at_the_targets_equals_the_full_log_softmax(vocab):
    """layers.log_softmax_at (the rescoring's LM head, a vocabulary slice at a time) gives log_softmax of the full
    logits at the targets, and the vocabulary sum label smoothing needs."""
    from rag_jax.models import layers

    rng = np.random.default_rng(0)
    features, head = rng.standard_normal((6, 8)), rng.standard_normal((vocab, 8))
    bias, targets = rng.standard_normal(vocab), rng.integers(0, vocab, 6)
    features, head, bias = (jnp.asarray(x, jnp.float32) for x in (features, head, bias))
    log_probs = jax.nn.log_softmax(features @ head.T + bias, axis=-1)
    picked, vocab_sum = layers.log_softmax_at(features, head, bias, jnp.asarray(targets), with_vocab_sum=True)
    np.testing.assert_allclose(picked, log_probs[np.arange(6), targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vocab_sum, log_probs.sum(-1), rtol=1e-5)
    no_bias, none = layers.log_softmax_at(features, head, None, jnp.asarray(targets))
    full = jax.nn.log_softmax(features @ head.T, axis=-1)[np.arange(6), targets]
    assert none is None
    np.testing.assert_allclose(no_bias, full, rtol=1e-5, atol=1e-5)


def test_encoder_slices_give_the_encoder_outputs(checkpoint, monkeypatch):
    """decoding.encode, which runs the generator's encoder over slices of the contexts (here forced: 3 per
    slice), gives the encoder's outputs over all of them at once."""
    monkeypatch.setattr(decoding, "_ENCODE_SLICE_ABOVE", 0)
    ids, mask, _ = _inputs(seed=1)
    monkeypatch.setattr(decoding, "_ENCODE_TOKENS", 3 * ids.shape[1])
    model, params = checkpoint["model"], checkpoint["params"]
    whole = model.generator.apply({"params": params["generator"]}, ids, mask, method="encode")
    sliced = jax.jit(lambda i, m: decoding.encode(model, params, i, m))(ids, mask)
    assert ids.shape[0] > 2
    # float32 rounding of other matmul shapes, which depends on the CPU's kernels: measured up to 1.2e-5 (of outputs
    # up to ~3) on an AVX2 CPU, below 1e-5 on an AVX-512 one; a slice given the wrong rows is off by O(1).
    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=5e-5)
