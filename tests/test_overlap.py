"""Overlapping host work with device work (rag_jax/data/prefetch.py): it really runs ahead, and answers are the
same with and without it."""

import dataclasses
import itertools
import json
import threading

import pytest
import transformers

from rag_jax.data import prefetch, tokenizers
from rag_jax.inference import answering, model_dir
from rag_jax.models import hf
from rag_jax.readers import base
from rag_jax.retrieval import contexts, corpus, embed, retriever
from tests import hf_models

ASSETS = "rag_jax/assets/nq_open_mini"
REAL_VOCAB = dict(vocab_size=30522, max_position_embeddings=512)


def test_prefetch_prepares_the_next_item_while_the_current_one_is_consumed():
    started = {i: threading.Event() for i in range(4)}

    def prepare(i):
        started[i].set()
        return i * 10

    seen = []
    for value in prefetch.prefetch(range(4), prepare):
        i = value // 10
        if i + 1 < 4:  # without the overlap, item i+1 is prepared only after this body returns: the wait times out
            assert started[i + 1].wait(timeout=30), f"item {i + 1} was not prepared while item {i} was consumed"
        seen.append(value)
    assert seen == [0, 10, 20, 30]
    assert list(prefetch.prefetch(range(4), lambda i: i * 10, enabled=False)) == [0, 10, 20, 30]


def test_prefetch_raises_a_preparation_error_at_its_item():
    def prepare(i):
        if i == 2:
            raise ValueError("bad item 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 2"):
        for value in prefetch.prefetch(range(5), prepare):
            got.append(value)
    assert got == [0, 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    passages = itertools.islice(corpus.read_passages(f"{ASSETS}/passages.tsv"), 60)
    corpus.write_passages_tsv(tmp / "passages.tsv", passages)
    ctx = hf_models.randomize(transformers.DPRContextEncoder(hf_models.dpr_config(**REAL_VOCAB)), 1, std=0.5)
    ctx.save_pretrained(tmp / "ctx")
    qtok, gtok = tokenizers.load_question_tokenizer(), tokenizers.load_generator_tokenizer()
    loaded_ctx = hf.load_encoder(str(tmp / "ctx"))
    index = embed.build_index(loaded_ctx.config, loaded_ctx.params, qtok, str(tmp / "passages.tsv"),
                              str(tmp / "index"), batch_size=64, progress=False)  # fmt: skip
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(**REAL_VOCAB), hf_models.bart_config(vocab_size=50265, max_position_embeddings=260),
        n_docs=3, max_combined_length=256,
    )  # fmt: skip
    config.architectures = ["RagSequenceForGeneration"]
    hf_models.randomize(transformers.RagSequenceForGeneration(config), seed=2, std=0.3).save_pretrained(tmp / "rag")
    model, params, defaults = model_dir.load_hf_rag(str(tmp / "rag"))
    with open(f"{ASSETS}/questions.jsonl") as f:
        examples = [json.loads(line) for line in itertools.islice(f, 11)]  # 11: the last batch of 4 is padded
    return model, params, defaults, retriever.Retriever(index, qtok, gtok, model.config.context), examples


@pytest.mark.parametrize("reader,num_beams,random_passages", [("rag_token", 1, False), ("rag_sequence", 2, True)])
def test_answers_are_identical_with_and_without_the_overlap(setup, reader, num_beams, random_passages):
    model, params, defaults, searcher, examples = setup
    generation = defaults.generation_config(reader, num_beams=num_beams, max_length=6)
    settings = answering.AnswerSettings(n_docs=3, reader=reader, batch_size=4, score=True, provenance=True)
    answered = {}
    for overlap in (False, True):
        # Random passages advance a random generator batch by batch: the overlap must keep that order too.
        source = retriever.RandomPassages(searcher, seed=5) if random_passages else searcher
        answered[overlap] = [record for record, _ in answering.answer_questions(
            model, params, source, examples, dataclasses.replace(settings, overlap=overlap), generation)]  # fmt: skip
    assert len(answered[True]) == len(examples)
    assert json.dumps(answered[True]) == json.dumps(answered[False])


@pytest.mark.parametrize("reader,num_beams", [("rag_token", 1), ("rag_sequence", 2)])
def test_answers_are_identical_with_contexts_glued_from_the_passage_token_table(setup, reader, num_beams,
                                                                               monkeypatch):
    """eval_nq's --contexts=table: the generator inputs glued from the index's passage token table instead of
    tokenised strings change no answer, score or provenance record."""
    model, params, defaults, searcher, examples = setup
    generation = defaults.generation_config(reader, num_beams=num_beams, max_length=6)
    settings = answering.AnswerSettings(n_docs=3, reader=reader, batch_size=4, score=True, provenance=True)
    table = contexts.host_context_table(searcher.index, searcher.generator_tokenizer, model.config.context, "table",
                                        len(examples) * 3, remedy="")
    glued = retriever.Retriever(searcher.index, searcher.question_tokenizer, searcher.generator_tokenizer,
                                model.config.context, passage_table=table)
    answered = []
    for source in (searcher, glued):
        answered.append([r for r, _ in answering.answer_questions(model, params, source, examples, settings,
                                                                  generation)])  # fmt: skip
        monkeypatch.setattr(contexts, "generator_inputs", None)  # the glued run must not tokenise strings
    assert len(answered[0]) == len(examples)
    assert json.dumps(answered[0]) == json.dumps(answered[1])


def test_cutting_context_padding_leaves_answers_unchanged(setup, monkeypatch):
    """RAG-Token contexts are cut to the batch's longest (rounded up to base.CONTEXT_BUCKET) instead of
    max_combined_length; RAG-Sequence's keep their length (its search attends to padding, as the reference's)."""
    model, params, defaults, searcher, examples = setup
    widths = []
    prepare = answering._prepare
    monkeypatch.setattr(answering, "_prepare", lambda *a: widths.append(prepare(*a).context_ids.shape[1]) or
                        prepare(*a))  # fmt: skip
    sequence = answering.AnswerSettings(n_docs=3, reader="rag_sequence", batch_size=4)
    list(answering.answer_questions(model, params, searcher, examples[:4], sequence,
                                    defaults.generation_config("sequence", num_beams=2, max_length=6)))
    assert set(widths) == {model.config.context.max_combined_length}
    widths.clear()
    generation = defaults.generation_config("token", num_beams=2, max_length=6)
    settings = answering.AnswerSettings(n_docs=3, reader="rag_token", batch_size=4, score=True, provenance=True)
    cut = [record for record, _ in answering.answer_questions(model, params, searcher, examples, settings, generation)]
    assert max(widths) < model.config.context.max_combined_length  # the cut happened
    monkeypatch.setattr(base, "CONTEXT_BUCKET", 10_000)  # never cut
    whole = [r for r, _ in answering.answer_questions(model, params, searcher, examples, settings, generation)]
    assert json.dumps(cut) == json.dumps(whole)
