"""RAG with a T5 generator against transformers' RagSequenceForGeneration / RagTokenForGeneration with the same T5
generator: a RagRetriever over a custom exact index of real passages, a SentencePiece tokenizer trained on them,
the generator's `prefix` in the contexts; losses and greedy / beam / thorough decoding on the same random weights."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.readers import generation, rag_sequence, rag_token
from rag_jax.models import hf
from rag_jax.retrieval import corpus, embed, retriever
from tests import hf_models
from tests.hf_models import relative_error

faiss = pytest.importorskip("faiss")
datasets = pytest.importorskip("datasets")

N_PASSAGES, N_DOCS, N_QUESTIONS = 300, 4, 6
ASSETS = "rag_jax/assets/nq_open_mini"
PREFIX = "answer: "
PAD, EOS = 0, 1
SEED = 4
EOS_SCALE = {"v1.0": 12.0, "v1.1": 3.0}


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def setup(request, tmp_path_factory):
    version = request.param
    tmp = tmp_path_factory.mktemp(f"rag_t5_{version}")
    all_passages = list(corpus.read_passages(f"{ASSETS}/passages.tsv"))
    gtok = tokenizers.train_sentencepiece((p.title + " " + p.text for p in all_passages), str(tmp / "t5tok"))
    passages = all_passages[:N_PASSAGES]
    corpus.write_passages_tsv(tmp / "passages.tsv", passages)
    with open(f"{ASSETS}/questions.jsonl") as f:
        rows = [json.loads(line) for line in itertools.islice(f, N_QUESTIONS)]

    real_vocab = dict(vocab_size=30522, max_position_embeddings=512)
    ctx_encoder = hf_models.randomize(transformers.DPRContextEncoder(hf_models.dpr_config(**real_vocab)), 1, std=0.5)
    ctx_encoder.save_pretrained(tmp / "ctx")
    qtok = tokenizers.load_question_tokenizer()
    loaded_ctx = hf.load_encoder(str(tmp / "ctx"))
    index = embed.build_index(loaded_ctx.config, loaded_ctx.params, qtok, str(tmp / "passages.tsv"),
                              str(tmp / "index"), batch_size=64, progress=False)  # fmt: skip

    config = transformers.RagConfig.from_question_encoder_generator_configs(
        # Two workarounds for the reference (transformers 5): bos_token_id=None said explicitly, since T5Config has
        # no such attribute and RAG-Sequence's get_nll reads it; equal encoder and decoder depths, since RAG's
        # generate sizes the decoder cache by the generator's num_layers (the encoder's). tests/test_t5.py checks
        # unequal depths against T5ForConditionalGeneration alone.
        hf_models.dpr_config(**real_vocab),
        hf_models.t5_config(version, vocab_size=len(gtok), prefix=PREFIX, bos_token_id=None, num_decoder_layers=2),
        n_docs=N_DOCS, max_combined_length=80, index_name="custom",
    )  # fmt: skip
    reference = transformers.RagSequenceForGeneration(config)
    hf_models.untie_t5_head(reference.rag.generator)
    hf_models.randomize(reference, seed=2, std=0.5)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # RMS norms near the identity, so that no single token wins whatever the context
        for name, p in reference.rag.generator.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
        # A large EOS row of the output matrix: EOS wins at some steps, so that some hypotheses end early.
        reference.rag.generator.lm_head.weight[EOS] *= EOS_SCALE[version]
    reference.save_pretrained(tmp / "rag")

    dataset = datasets.Dataset.from_dict({
        "title": [p.title for p in passages], "text": [p.text for p in passages],
        "embeddings": [row for row in index.embeddings(np.float32)],
    })  # fmt: skip
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(index.dim))
    hf_retriever = transformers.RagRetriever(
        config, question_encoder_tokenizer=qtok, generator_tokenizer=gtok,
        index=transformers.models.rag.retrieval_rag.CustomHFIndex(index.dim, dataset),
    )  # fmt: skip

    loaded = hf.load_rag(str(tmp / "rag"))
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    q_ids = qtok([r["question"] for r in rows], padding=True, return_tensors="np")
    ours = retriever.Retriever(index, qtok, gtok, model.config.context)
    retrieved = ours(model.encode_questions(params, q_ids["input_ids"], q_ids["attention_mask"]), q_ids["input_ids"],
                     N_DOCS)  # fmt: skip
    return dict(version=version, tmp=tmp, gtok=gtok, hf_retriever=hf_retriever, hf_config=loaded.hf_config,
                model=model, params=params, q_ids=q_ids, retrieved=retrieved,
                answers=[r["answers"][0] for r in rows])  # fmt: skip


def _reference(setup, kind):
    cls = {"sequence": transformers.RagSequenceForGeneration, "token": transformers.RagTokenForGeneration}[kind]
    return cls.from_pretrained(str(setup["tmp"] / "rag"), retriever=setup["hf_retriever"]).eval()


def _labels(gtok, answers):
    """T5 labels as decoder inputs: the start token (pad) then `answer </s>`, padded; the targets are these
    shifted left, so every answer token and the EOS are predicted."""
    ids = gtok(answers, padding=True, return_tensors="np")["input_ids"]
    return np.concatenate([np.full((len(answers), 1), PAD), ids], axis=1)


def test_t5_generator_loads_as_the_reference_builds_it(setup):
    model = setup["model"]
    assert model.generator_config.tie_word_embeddings == (setup["version"] == "v1.0")
    assert model.generator_config.bos_token_id is None and model.generator_config.decoder_start_token_id == PAD
    assert model.config.context.prefix == PREFIX


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_contexts_and_losses_match_reference(setup, kind):
    q_ids, retrieved, model, params = setup["q_ids"], setup["retrieved"], setup["model"], setup["params"]
    labels = _labels(setup["gtok"], setup["answers"])
    with torch.no_grad():
        out = _reference(setup, kind)(
            input_ids=torch.as_tensor(q_ids["input_ids"]), attention_mask=torch.as_tensor(q_ids["attention_mask"]),
            labels=torch.as_tensor(labels), output_retrieved=True,
        )  # fmt: skip
    np.testing.assert_array_equal(retrieved.context_input_ids_BKxS, out.context_input_ids.numpy())
    np.testing.assert_array_equal(retrieved.context_attention_mask_BKxS, out.context_attention_mask.numpy())
    first = setup["gtok"].decode(retrieved.context_input_ids_BKxS[0], skip_special_tokens=True)
    assert first.startswith(PREFIX.strip())  # the generator's prefix leads every context

    scores = rag.doc_scores(model.encode_questions(params, q_ids["input_ids"], q_ids["attention_mask"]),
                            retrieved.doc_embeds_BxKxD)  # fmt: skip
    logits = model.generator_logits(params, retrieved.context_input_ids_BKxS, retrieved.context_attention_mask_BKxS,
                                    labels)  # fmt: skip
    nll_fn = rag_sequence.nll if kind == "sequence" else rag_token.nll
    extra = dict(bos_token_id=model.generator_config.bos_token_id) if kind == "sequence" else {}
    nll = nll_fn(logits, scores, labels, pad_token_id=PAD, **extra)
    assert relative_error(scores, out.doc_scores.numpy()) <= 1e-5
    assert relative_error(nll, out.loss.numpy()) <= 1e-4
    if kind == "sequence":  # no BOS: exclude_bos_score changes nothing, in the reference as here
        assert model.generator_config.bos_token_id is None
        excluded = nll_fn(logits, scores, labels, pad_token_id=PAD, exclude_bos_score=True, **extra)
        np.testing.assert_array_equal(np.asarray(excluded), np.asarray(nll))


def _decoding_inputs(setup):
    r = setup["retrieved"]
    scores = rag.doc_scores(setup["model"].encode_questions(setup["params"], setup["q_ids"]["input_ids"],
                                                            setup["q_ids"]["attention_mask"]), r.doc_embeds_BxKxD)
    return r.context_input_ids_BKxS, r.context_attention_mask_BKxS, np.asarray(scores)


def _generate(reference, inputs, **kwargs):
    ids, mask, scores = map(torch.as_tensor, inputs)
    with torch.no_grad():
        return reference.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                                  n_docs=N_DOCS, **kwargs).numpy()  # fmt: skip


def _assert_same(ours, reference, fill=PAD):
    """Ours is the reference's output filled up to max_length: with pad, or with what beam search writes past a
    sequence's end (`pad or eos`: EOS for T5, whose pad is 0)."""
    ours = np.asarray(ours)
    assert ours.shape[0] == reference.shape[0]
    np.testing.assert_array_equal(ours[:, : reference.shape[1]], reference)
    assert (ours[:, reference.shape[1] :] == fill).all()


@pytest.mark.parametrize("kwargs", [dict(num_beams=1, max_length=10), dict(num_beams=3, max_length=10)],
                         ids=["greedy", "beam"])  # fmt: skip
def test_rag_token_generate_matches_reference(setup, kwargs):
    inputs = _decoding_inputs(setup)
    expected = _generate(_reference(setup, "token"), inputs, **kwargs)
    assert (expected[:, 0] == PAD).all()  # T5 starts from the pad token
    if kwargs["num_beams"] > 1:  # some hypotheses end early, others run to max_length
        ended = (expected[:, 1:-1] == EOS).any(axis=1)
        assert ended.any() and not ended.all()
    assert len({tuple(row) for row in expected}) > 1  # the contexts matter
    gen = generation.GenerationConfig.from_hf(setup["hf_config"], **kwargs)
    ours = rag_token.generate(setup["model"], setup["params"], *map(jnp.asarray, inputs), gen)
    _assert_same(ours, expected, fill=gen.beam_fill_token_id if gen.num_beams > 1 else PAD)


@pytest.mark.parametrize("mode", ["thorough", "fast"])
def test_rag_sequence_generate(setup, mode):
    """Thorough decoding equals the reference's; fast decoding (not in the reference) returns one of the same
    candidates."""
    inputs = _decoding_inputs(setup)
    kwargs = dict(num_beams=2, max_length=10)
    gen = generation.GenerationConfig.for_rag_sequence(setup["hf_config"], **kwargs)
    ours, candidates = rag_sequence.generate(
        setup["model"], setup["params"], *map(jnp.asarray, inputs), gen, mode=mode, return_candidates=True)
    if mode == "thorough":
        expected = _generate(_reference(setup, "sequence"), inputs, do_deduplication=True, **kwargs)
        _assert_same(ours, expected)
    else:
        ids, first = np.asarray(candidates.ids_BxCxL), np.asarray(candidates.is_first_BxC)
        for b, row in enumerate(np.asarray(ours)):
            assert any((row == ids[b, c]).all() for c in np.flatnonzero(first[b]))
