"""Sentence-transformers directories as encoders: pooling and normalisation from modules.json, parity with
BertModel + the pooling + torch.nn.functional.normalize, and the real all-MiniLM-L6-v2 when it is installed."""

import json

import numpy as np
import pytest
import transformers

from rag_jax.data import tokenizers
from rag_jax.models import bert, hf, sentence_transformers_dir
from rag_jax.retrieval import corpus, embed
from tests import hf_models
from tests.hf_models import relative_error

TOLERANCE = 1e-5


def _encode(loaded, ids, mask, token_types=None):
    _, pooled = loaded.module().apply({"params": loaded.params}, ids, mask, token_types)
    return np.asarray(pooled)


@pytest.mark.parametrize(
    "pooling,normalize,transformer_path",
    [("mean", True, ""), ("cls", False, ""), ("mean", False, "0_Transformer")],  # the last: the old layout
)
def test_sentence_transformers_directory_matches_its_pipeline(tmp_path, pooling, normalize, transformer_path):
    reference = hf_models.bert_model(seed=5)
    hf_models.save_sentence_transformer(reference, tmp_path, pooling=pooling, normalize=normalize,
                                        transformer_path=transformer_path)  # fmt: skip
    loaded = hf.load_encoder(str(tmp_path))
    assert (loaded.config.pooling, loaded.config.normalize) == (pooling, normalize)

    ids, mask = hf_models.padded_ids(np.random.default_rng(3), batch=5, length=11, vocab=97, pad=0, first=2)
    pooled = _encode(loaded, ids, mask)
    expected = hf_models.sentence_transformer_reference(reference, ids, mask, pooling=pooling, normalize=normalize)
    assert relative_error(pooled, expected) <= TOLERANCE
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, rtol=1e-6)


def test_explicit_pooling_and_normalize_replace_the_directorys(tmp_path):
    hf_models.save_sentence_transformer(hf_models.bert_model(seed=6), tmp_path, pooling="mean", normalize=True)
    assert hf.load_encoder(str(tmp_path), pooling="cls").config.pooling == "cls"
    assert hf.load_encoder(str(tmp_path), pooling="cls").config.normalize  # pooling alone leaves normalize
    assert not hf.load_encoder(str(tmp_path), normalize=False).config.normalize


def test_normalisation_of_a_zero_vector_is_zero_with_a_finite_gradient():
    """A batch's all-padding rows mean-pool to 0: normalising them must not give NaN (forward or backward)."""
    import jax  # pylint: disable=g-import-not-at-top

    x = np.zeros((2, 5), np.float32)
    x[1] = [3, 4, 0, 0, 0]
    np.testing.assert_allclose(bert.l2_normalize(x), [[0] * 5, [0.6, 0.8, 0, 0, 0]], atol=1e-7)
    grad = jax.grad(lambda v: bert.l2_normalize(v).sum())(x)
    assert np.all(np.isfinite(grad))


def test_unsupported_pipelines_are_refused_by_file(tmp_path):
    hf_models.save_sentence_transformer(hf_models.bert_model(seed=7), tmp_path)
    modules_path, pooling_path = tmp_path / "modules.json", tmp_path / "1_Pooling" / "config.json"
    modules = json.loads(modules_path.read_text())
    dense = {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    modules_path.write_text(json.dumps(modules[:2] + [dense]))
    with pytest.raises(hf.CheckpointError, match=r"modules\.json: modules \['Transformer', 'Pooling', 'Dense'\]"):
        hf.load_encoder(str(tmp_path))
    modules_path.write_text(json.dumps(modules))
    config = json.loads(pooling_path.read_text())
    pooling_path.write_text(json.dumps({**config, "pooling_mode_max_tokens": True}))
    with pytest.raises(hf.CheckpointError, match=r"1_Pooling/config\.json: pooling modes \['max_tokens', 'mean_t"):
        hf.load_encoder(str(tmp_path))


def test_tokenizer_comes_from_the_transformer_module(tmp_path):
    hf_models.save_sentence_transformer(hf_models.bert_model(seed=8), tmp_path, transformer_path="0_Transformer")
    tokenizers.load_question_tokenizer().save_pretrained(tmp_path / "0_Transformer")
    assert tokenizers.load_question_tokenizer(str(tmp_path)).tokenize("Paris IS") == ["paris", "is"]
    from experiments import model_loading  # pylint: disable=g-import-not-at-top

    assert model_loading.encoder_tokenizer(str(tmp_path), None).name_or_path == str(tmp_path / "0_Transformer")


def test_dpr_export_names_pooling_and_normalisation():
    with pytest.raises(hf.CheckpointError, match=r"no normalisation, so this encoder \('cls' pooling with L2 norm"):
        hf.dpr_config_dict(bert.BertConfig(normalize=True))


# ------------------------------------------------------------------------------------- the real all-MiniLM-L6-v2

QUESTIONS = ["who wrote the novel pride and prejudice", "what is the boiling point of water at sea level"]
PASSAGES = [
    corpus.Passage("p0", "Pride and Prejudice", "Pride and Prejudice is an 1813 novel of manners by Jane Austen."),
    corpus.Passage("p1", "Boiling point", "At sea level, pure water boils at 100 degrees Celsius (212 Fahrenheit)."),
    corpus.Passage("p2", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level."),
]


@pytest.fixture(scope="module")
def minilm():
    try:
        directory = hf.pretrained_retriever_dir()
    except hf.CheckpointError as e:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed ({e})")
    return directory, hf.load_encoder(directory), tokenizers.load_question_tokenizer(directory)


def test_minilm_matches_transformers_and_ranks_the_relevant_passage_first(minilm):
    directory, loaded, tokenizer = minilm
    assert (loaded.config.pooling, loaded.config.normalize, loaded.config.hidden_size) == ("mean", True, 384)
    assert sentence_transformers_dir.read_pipeline(directory).max_seq_length == 256
    assert tokenizer.tokenize("Jane AUSTEN's café") == ["jane", "austen", "'", "s", "cafe"]  # uncased, no accents
    reference = transformers.BertModel.from_pretrained(directory).eval()
    texts = QUESTIONS + [p.text for p in PASSAGES]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    vectors = _encode(loaded, batch["input_ids"], batch["attention_mask"])
    expected = hf_models.sentence_transformer_reference(reference, batch["input_ids"], batch["attention_mask"])
    assert relative_error(vectors, expected) <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, rtol=1e-5)

    # As the index encodes them: (title, text) pairs, through the embedding job.
    docs = embed.embed_passages(embed.make_encode_fn(loaded.config), loaded.params, tokenizer, PASSAGES,
                                batch_size=4, max_length=64)  # fmt: skip
    scores = vectors[: len(QUESTIONS)] @ docs.T
    assert list(scores.argmax(1)) == [0, 1]
    assert scores[0, 0] - scores[0, 2] > 0.3 and scores[1, 1] - scores[1, 0] > 0.3  # cosines, not near-ties
