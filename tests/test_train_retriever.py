"""experiments.train_retriever: its data readers (streamed DPR JSON, gold pairs, mined negatives, ICT), the run
(checkpoints, resume, metrics), the Hugging Face encoders it exports (transformers gives the same vectors) and its
bad-input refusals through the real command line."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from experiments.configs import retriever as retriever_config
from rag_jax.models import bert, hf
from rag_jax.retrieval import corpus, training_data
from rag_jax.training import retriever_loop
from tests.hostile import PASSAGES, QUESTIONS, refused, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dpr_record(i, positives=True):
    ctx = lambda kind: {"title": f"T{kind}{i}", "text": f"{kind} text {i}.", "passage_id": f"{kind}{i}"}  # noqa: E731
    return {"question": f"q{i}?", "answers": [f"a{i}"], "positive_ctxs": [ctx("pos")] if positives else [],
            "negative_ctxs": [ctx("neg")], "hard_negative_ctxs": [ctx("hard")] if i % 2 else []}


def _write_dpr(path, records, tail="\n]\n"):
    with open(path, "w") as f:  # pretty-printed, as DPR's files are: records span many lines
        f.write("[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + tail)
    return str(path)


def test_dpr_json_is_streamed_record_by_record(tmp_path):
    path = _write_dpr(tmp_path / "train.json", [_dpr_record(i) for i in range(5)])
    read = list(training_data.dpr_examples(path))
    assert [e["question"] for e in read] == [f"q{i}?" for i in range(5)]
    assert read[0]["positive"] == corpus.Passage("pos0", "Tpos0", "pos text 0.")
    assert [p.id for p in read[1]["negatives"]] == ["hard1"]  # hard negatives first ...
    assert [p.id for p in read[0]["negatives"]] == ["neg0"]  # ... else DPR's plain negatives
    lines = open(path).read().split("\n")
    for example in read:  # each record's line is where it starts
        assert lines[int(example["where"].rsplit(":", 1)[1]) - 1].strip() == "{"
    # Incremental: with a damaged end, the records before it still come out (read in 64-character chunks).
    broken = _write_dpr(tmp_path / "broken.json", [_dpr_record(i) for i in range(3)], tail=",\n{\"question\": ")
    items = training_data._json_array_items(broken, chunk_size=64)
    assert [next(items)[1]["question"] for _ in range(3)] == ["q0?", "q1?", "q2?"]
    with pytest.raises(training_data.DataError, match="broken.json:"):
        next(items)


def test_dpr_record_without_positives_names_file_and_line(tmp_path):
    path = _write_dpr(tmp_path / "train.json", [_dpr_record(0), _dpr_record(1, positives=False)])
    with pytest.raises(training_data.DataError, match=r"train.json:\d+: .*q1\?.*no positive_ctxs"):
        list(training_data.dpr_examples(path))


def test_ict_removes_the_sentence_nine_times_in_ten():
    passage = corpus.Passage("7", "Title", "First one. Second one! Third one? Fourth one.")
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(2000):
        example = training_data.ict_example(passage, rng, keep_sentence=0.1)
        assert example["question"] in training_data.sentences(passage.text)
        kept += example["question"] in example["positive"].text
        assert example["positive"].id == "7"
    assert 0.08 < kept / 2000 < 0.12, kept / 2000


def test_batches_are_deterministic_and_fill_missing_negatives(tmp_path):
    passages = training_data.Corpus(PASSAGES)
    examples = training_data.gold_pairs(QUESTIONS, passages)
    make = lambda: training_data.Batches("gold", examples=examples, passages=passages, batch_size=8,  # noqa: E731
                                         hard_negatives=2, seed=3)
    a, b = make().at(5), make().at(5)
    assert [e["question"] for e in a] == [e["question"] for e in b]
    assert all(len(e["negatives"]) == 2 and e["positive"] not in e["negatives"] for e in a)
    assert [e["question"] for e in make().at(6)] != [e["question"] for e in a]


def _tiny_config(**fields):
    config = retriever_config.get_config("tiny")
    for key, value in fields.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


@pytest.mark.slow
def test_run_resumes_and_exports_encoders_that_transformers_loads(tmp_path):
    workdir = str(tmp_path / "run")
    first = retriever_loop.train_and_evaluate(_tiny_config(**{"train.steps": 2}), workdir)
    assert first["step"] == 2
    resumed = retriever_loop.train_and_evaluate(_tiny_config(**{"train.steps": 4}), workdir)
    assert resumed["step"] == 4
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert {"eval/gold_recall@5", "eval/top5_accuracy"} <= set(records[-1])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(3, 10))
    mask = np.ones_like(ids)
    for name, cls in (("question_encoder", transformers.DPRQuestionEncoder),
                      ("ctx_encoder", transformers.DPRContextEncoder)):
        directory = resumed["export"][name]
        theirs = cls.from_pretrained(directory).eval()(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
        loaded = hf.load_encoder(directory)  # what build_index --encoder and train_nq's *.init read
        ours = loaded.module().apply({"params": loaded.params}, ids, mask)[1]
        assert np.max(np.abs(np.asarray(ours) - theirs.pooler_output.detach().numpy())) <= 1e-5
        assert transformers.AutoTokenizer.from_pretrained(directory)("a b")["input_ids"][0] == 101


@pytest.mark.slow
def test_frozen_document_encoder_reads_the_index_vectors_of_the_batch_passages(tmp_path):
    """model.train_doc_encoder=False: the loss scores the questions against the corpus vectors embedded once, which
    must be the very vectors the document encoder gives the batch's passages (the rows line up), on 8 devices."""
    from rag_jax.training import contrastive

    fields = {"data.hard_negatives_per_question": 1}
    trained = retriever_loop.setup(_tiny_config(**fields), str(tmp_path / "both"))
    frozen = retriever_loop.setup(_tiny_config(**fields, **{"model.train_doc_encoder": False}), str(tmp_path / "q"))
    assert set(frozen.trained()) == {"question"} and frozen.frozen_vectors.shape[0] == len(frozen.passages)
    q_module, d_module = (bert.BertEncoder(frozen.encoders[k]) for k in ("question", "document"))
    with_encoder = contrastive.bi_encoder_loss(q_module, d_module, trained.pretrained,
                                               retriever_loop.global_batch(trained, 3))
    batch = retriever_loop.global_batch(frozen, 3)
    assert "passage_ids" not in batch
    from_index = contrastive.bi_encoder_loss(q_module, d_module, frozen.trained(), batch)
    assert float(from_index) == pytest.approx(float(with_encoder), rel=1e-5)

    result = retriever_loop.train_and_evaluate(_tiny_config(**fields, **{"model.train_doc_encoder": False}),
                                               str(tmp_path / "run"))
    exported = {k: hf.load_encoder(result["export"][k]).params for k in ("question_encoder", "ctx_encoder")}
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), exported["ctx_encoder"],
                        frozen.pretrained["document"])
    assert all(jax.tree.leaves(same))  # the document encoder did not move ...
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), exported["question_encoder"],
                         frozen.pretrained["question"])
    assert any(jax.tree.leaves(moved))  # ... the question encoder did


def test_frozen_document_encoder_needs_gold_pairs_and_separate_encoders():
    from rag_jax.runs import config_check

    for fields in ({"model.shared_encoder": True}, {"data.kind": "ict"}):
        with pytest.raises(config_check.ConfigError, match="model.train_doc_encoder=False"):
            config_check.check_retriever_config(_tiny_config(**fields, **{"model.train_doc_encoder": False}))


def test_mean_pooled_normalised_encoder_exports_as_sentence_transformers(tmp_path):
    from rag_jax.inference import export
    from rag_jax.models import bert
    from rag_jax.data import tokenizers

    cfg = bert.BertConfig(vocab_size=200, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          max_position_embeddings=32, pooling="mean", normalize=True)
    import flax.linen as nn

    params = nn.meta.unbox(bert.BertEncoder(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    params = jax.tree.map(np.asarray, params)
    tokenizer = tokenizers.load_question_tokenizer()
    export.save_hf_encoder(str(tmp_path / "enc"), cfg, params, "question", tokenizer)
    loaded = hf.load_encoder(str(tmp_path / "enc"))
    assert (loaded.config.pooling, loaded.config.normalize) == ("mean", True)
    ids = np.array([[5, 6, 7, 0]])
    mask = np.array([[1, 1, 1, 0]])
    want = bert.BertEncoder(cfg).apply({"params": params}, ids, mask)[1]
    got = loaded.module().apply({"params": loaded.params}, ids, mask)[1]
    assert np.max(np.abs(np.asarray(want) - np.asarray(got))) <= 1e-6
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


# ---------------------------------------------------------------------------------------------------- bad input

TRAIN = ("experiments.train_retriever", "--config=experiments/configs/retriever.py:tiny")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    _write_dpr(tmp / "no_positive.json", [_dpr_record(0), _dpr_record(1), _dpr_record(2, positives=False)])
    with open(QUESTIONS) as f:
        lines = f.readlines()[:20]
    record = json.loads(lines[3])
    record["gold_passage_id"] = 99_999_999
    lines[3] = json.dumps(record) + "\n"
    (tmp / "bad_gold.jsonl").write_text("".join(lines))
    (tmp / "empty_negatives.jsonl").write_text("")
    with open(PASSAGES) as f:
        (tmp / "five_passages.tsv").write_text("".join(f.readlines()[:6]))
    return tmp


BAD_INPUT = [
    ("dpr_record_without_positives", ("--config.data.kind=dpr", "--config.data.train_file={tmp}/no_positive.json"),
     ["no_positive.json:", "no positive_ctxs"]),
    ("gold_passage_id_not_in_corpus", ("--config.data.train_file={tmp}/bad_gold.jsonl",),
     ["bad_gold.jsonl:4", "99999999", "not in the corpus"]),
    ("empty_hard_negatives_file", ("--config.data.hard_negatives={tmp}/empty_negatives.jsonl",),
     ["empty_negatives.jsonl", "empty"]),
    ("corpus_too_small_for_the_batch", ("--config.data.kind=ict", "--config.data.passages={tmp}/five_passages.tsv"),
     ["five_passages.tsv", "5 passages", "train.global_batch_size=8"]),
    ("unknown_data_kind", ("--config.data.kind=bm25",), ["data.kind='bm25'", "gold"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,flags,culprits", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_error_line(bad_files, tmp_path, name, flags, culprits):
    del name
    args = [a.format(tmp=bad_files) for a in flags]
    done = run(*TRAIN, f"--workdir={tmp_path}/w", *args)
    refused(done, *culprits)


def _leaf_fields(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("variant", retriever_config.VARIANTS)
def test_every_retriever_config_field_has_a_rule(variant):
    from rag_jax.runs import config_check

    config = retriever_config.get_config(variant)
    unchecked = {"variant", "eval.recall_ks"}
    missing = [f for f in _leaf_fields(config.to_dict()) if f not in config_check.RULES and f not in unchecked]
    assert not missing, f"add a rule for each to rag_jax/runs/config_check.py RULES: {missing}"
    config_check.check_fields(config)


def test_mined_negatives_are_top_passages_without_an_answer(tmp_path):
    """hard_negatives.mine keeps the best-ranked passages that hold no answer and are not the gold one, and the job
    reads what it writes."""
    from rag_jax.data import nq_open, tokenizers
    from rag_jax.inference import metrics
    from rag_jax.retrieval import embed, exact
    from rag_jax.training import hard_negatives
    from tests import hf_models

    with open(PASSAGES) as f:
        (tmp_path / "passages.tsv").write_text("".join(f.readlines()[:201]))
    questions = [q for _, q in nq_open.read_nq_jsonl(QUESTIONS)][:20]
    for q in questions[::2]:  # an answer most passages hold: the filter must skip many
        q["answers"] = ["the"]
    hf_models.dpr_context_encoder(seed=3, vocab_size=30522, max_position_embeddings=64).save_pretrained(tmp_path / "d")
    hf_models.dpr_question_encoder(seed=4, vocab_size=30522, max_position_embeddings=64).save_pretrained(tmp_path / "q")
    d, q = hf.load_encoder(str(tmp_path / "d")), hf.load_encoder(str(tmp_path / "q"))
    tokenizer = tokenizers.load_question_tokenizer()
    index = embed.build_index(d.config, d.params, tokenizer, str(tmp_path / "passages.tsv"), str(tmp_path / "index"),
                              max_length=64, progress=False)
    mined = list(hard_negatives.mine(index, q, tokenizer, questions, negatives=2, depth=50))
    vectors = embed.embed_questions(q.config, q.params, tokenizer, [x["question"] for x in questions], 64, 32)
    ranked, _ = exact.ExactSearcher(index.embeddings(dtype=np.float32)).search(vectors, 50)
    skipped = 0
    for question, record, rows in zip(questions, mined, ranked):
        skipped += record["negative_ids"] != [index.passages[int(r)].id for r in rows[:2]]
        want = [index.passages[int(r)].id for r in rows
                if index.passages[int(r)].id != str(question["gold_passage_id"])
                and not metrics.has_answer(question["answers"], index.passages[int(r)].text)][:2]
        assert record["question"] == question["question"] and record["negative_ids"] == want
    assert skipped  # some top passages held an answer or were gold: the filter was exercised
    path = tmp_path / "negatives.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mined))
    read = training_data.read_mined_negatives(str(path), training_data.Corpus(str(tmp_path / "passages.tsv")))
    assert [p.id for p in read[questions[0]["question"]]] == mined[0]["negative_ids"]
