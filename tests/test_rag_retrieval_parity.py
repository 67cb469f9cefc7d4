"""End to end against the reference: transformers' RagRetriever over a custom exact (faiss IndexFlatIP) index of real
passages, with real tokenizers, versus rag_jax's index, Retriever and losses on the same random weights."""

import itertools
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.retrieval import contexts as context, retriever
from rag_jax.models import hf
from rag_jax.readers import rag_sequence, rag_token
from rag_jax.retrieval import corpus, embed
from tests import hf_models
from tests.hf_models import relative_error

faiss = pytest.importorskip("faiss")
datasets = pytest.importorskip("datasets")

N_PASSAGES, N_DOCS, N_QUESTIONS = 300, 4, 6
ASSETS = "rag_jax/assets/nq_open_mini"
REAL_VOCAB = dict(vocab_size=30522, max_position_embeddings=512)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ragret")
    passages = list(itertools.islice(corpus.read_passages(f"{ASSETS}/passages.tsv"), N_PASSAGES))
    corpus.write_passages_tsv(tmp / "passages.tsv", passages)
    with open(f"{ASSETS}/questions.jsonl") as f:
        questions = [json.loads(line)["question"] for line in itertools.islice(f, N_QUESTIONS)]

    # A large init std, as REFERENCE.md advises: small random encoders give every input the same [CLS] vector.
    ctx_encoder = hf_models.randomize(transformers.DPRContextEncoder(hf_models.dpr_config(**REAL_VOCAB)), 1, std=0.5)
    ctx_encoder.save_pretrained(tmp / "ctx")
    qtok, gtok = tokenizers.load_question_tokenizer(), tokenizers.load_generator_tokenizer()
    loaded_ctx = hf.load_encoder(str(tmp / "ctx"))
    index = embed.build_index(loaded_ctx.config, loaded_ctx.params, qtok, str(tmp / "passages.tsv"),
                              str(tmp / "index"), batch_size=64, progress=False)  # fmt: skip

    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(**REAL_VOCAB), hf_models.bart_config(vocab_size=50265, max_position_embeddings=320),
        n_docs=N_DOCS, max_combined_length=96, index_name="custom",
    )  # fmt: skip
    model = hf_models.randomize(transformers.RagSequenceForGeneration(config), seed=2, std=0.5)
    model.save_pretrained(tmp / "rag")

    dataset = datasets.Dataset.from_dict({
        "title": [p.title for p in passages], "text": [p.text for p in passages],
        "embeddings": [row for row in index.embeddings(np.float32)],
    })  # fmt: skip
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(index.dim))
    hf_retriever = transformers.RagRetriever(
        config, question_encoder_tokenizer=qtok, generator_tokenizer=gtok,
        index=transformers.models.rag.retrieval_rag.CustomHFIndex(index.dim, dataset),
    )  # fmt: skip
    return dict(tmp=tmp, index=index, questions=questions, qtok=qtok, gtok=gtok, hf_retriever=hf_retriever)


def _labels(gtok, answers):
    return gtok(answers, padding=True, return_tensors="np")["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["sequence", "token"])
def test_retrieval_inputs_losses_and_gradients_match_reference(setup, model_type):
    qtok, gtok = setup["qtok"], setup["gtok"]
    q_ids = qtok(setup["questions"], padding=True, return_tensors="np")
    labels = _labels(gtok, ["paris", "the united states of america", "1984", "a", "no", "blue whale"])

    cls = {"sequence": transformers.RagSequenceForGeneration, "token": transformers.RagTokenForGeneration}[model_type]
    reference = cls.from_pretrained(str(setup["tmp"] / "rag"), retriever=setup["hf_retriever"]).eval()
    out = reference(
        input_ids=torch.as_tensor(q_ids["input_ids"]), attention_mask=torch.as_tensor(q_ids["attention_mask"]),
        labels=torch.as_tensor(labels), output_retrieved=True,
    )  # fmt: skip
    out.loss.sum().backward()
    ref_grad = reference.question_encoder.question_encoder.bert_model.embeddings.word_embeddings.weight.grad.numpy()

    loaded = hf.load_rag(str(setup["tmp"] / "rag"))
    rag_config = rag.RagConfig.from_hf(loaded.hf_config)
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag_config)
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    ours = retriever.Retriever(setup["index"], qtok, gtok, rag_config.context)
    q = model.encode_questions(params, q_ids["input_ids"], q_ids["attention_mask"])
    retrieved = ours(q, q_ids["input_ids"], N_DOCS)

    np.testing.assert_array_equal(retrieved.rows_BxK, out.retrieved_doc_ids.numpy())
    np.testing.assert_array_equal(retrieved.context_input_ids_BKxS, out.context_input_ids.numpy())
    np.testing.assert_array_equal(retrieved.context_attention_mask_BKxS, out.context_attention_mask.numpy())

    def loss_fn(params):
        scores = rag.doc_scores(model.encode_questions(params, q_ids["input_ids"], q_ids["attention_mask"]),
                                retrieved.doc_embeds_BxKxD)  # fmt: skip
        logits = model.generator_logits(params, retrieved.context_input_ids_BKxS,
                                        retrieved.context_attention_mask_BKxS, labels)  # fmt: skip
        if model_type == "sequence":
            nll = rag_sequence.nll(logits, scores, labels, pad_token_id=1)
        else:
            nll = rag_token.nll(logits, scores, labels, pad_token_id=1)
        return nll.sum(), (nll, scores)

    (_, (nll, scores)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    assert relative_error(scores, out.doc_scores.detach().numpy()) <= 1e-5
    assert relative_error(nll, out.loss.detach().numpy()) <= 1e-4
    # The doc-score gradient is posterior minus prior, a difference of nearby numbers: float32 cancellation leaves
    # ~1e-4 of noise in both implementations; a wrong gradient is off by O(1).
    assert relative_error(grads["question_encoder"]["word"]["embedding"], ref_grad) <= 1e-3


def test_context_formatting_strips_title_quotes_and_collapses_double_spaces():
    fmt = context.ContextFormat()
    assert context.combine('"Quoted"', "a  b", "q", fmt) == "Quoted / a b // q"
    assert context.combine('""x"', "t", "q", fmt) == '"x / t // q'  # one quote each side only
