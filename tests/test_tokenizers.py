"""Tokenizer loading: known ids for the bundled BERT and BART vocabularies, layouts, and error messages."""

import os
import shutil

import pytest
import transformers

from rag_jax.data import tokenizers as tk


@pytest.fixture(scope="module")
def bert():
    return tk.load_question_tokenizer()


@pytest.fixture(scope="module")
def bart():
    return tk.load_generator_tokenizer()


def test_default_dirs_are_bundled():
    dirs = tk.default_tokenizer_dirs()
    assert os.path.isfile(os.path.join(dirs["question"], "vocab.txt"))
    assert os.path.isfile(os.path.join(dirs["generator"], "vocab.json"))
    assert os.path.isfile(os.path.join(dirs["generator"], "merges.txt"))


def test_bert_known_ids(bert):
    assert bert("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert bert.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]) == [101, 102, 0, 100, 103]
    assert (bert.cls_token_id, bert.sep_token_id, bert.pad_token_id) == (101, 102, 0)
    assert len(bert) == 30522
    # WordPiece splits unknown words into pieces: "embeddings" -> em ##bed ##ding ##s in bert-base-uncased.
    assert bert("embeddings")["input_ids"] == [101, 7861, 8270, 4667, 2015, 102]


def test_bert_lower_cases_and_round_trips(bert):
    assert bert("HeLLo WORLD")["input_ids"] == bert("hello world")["input_ids"]
    for text in ["who got the first nobel prize in physics", "when is the next deadpool movie being released"]:
        assert bert.decode(bert(text)["input_ids"], skip_special_tokens=True) == text
    assert bert.decode(bert("Who Wrote THE Declaration")["input_ids"], skip_special_tokens=True) == (
        "who wrote the declaration"
    )


def test_bert_sentence_pair_token_types(bert):
    """DPR's context encoder embeds (title, text) pairs: [CLS] title [SEP] text [SEP] with segment ids 0 then 1."""
    enc = bert("Hello", "world wide")
    assert enc["input_ids"] == [101, 7592, 102, 2088, 2898, 102]
    assert enc["token_type_ids"] == [0, 0, 0, 1, 1, 1]


def test_bart_known_ids(bart):
    assert bart("Hello world")["input_ids"] == [0, 31414, 232, 2]
    assert bart.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>", ".", "Ġthe"]) == [
        0, 1, 2, 3, 50264, 4, 5,
    ]
    assert (bart.bos_token_id, bart.pad_token_id, bart.eos_token_id) == (0, 1, 2)
    assert len(bart) == 50265
    # Byte-level BPE is space sensitive: a leading space selects the "Ġ"-prefixed tokens.
    assert bart(" Hello world")["input_ids"] == [0, 20920, 232, 2]
    assert bart("Hello world")["attention_mask"] == [1, 1, 1, 1]


def test_bart_round_trips_including_non_ascii(bart):
    for text in ["Wilhelm Conrad Röntgen", " May 18, 2018", "hit points or health points", "Cyrus"]:
        assert bart.decode(bart(text)["input_ids"], skip_special_tokens=True) == text


def test_rag_layout(tmp_path, bert, bart):
    transformers.RagTokenizer(question_encoder=bert, generator=bart).save_pretrained(str(tmp_path))
    q, g = tk.load_rag_tokenizers(str(tmp_path))
    assert q("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert q("Hello", "world")["token_type_ids"] == [0, 0, 0, 1, 1]
    assert g("Hello world")["input_ids"] == [0, 31414, 232, 2]
    default_q, default_g = tk.load_rag_tokenizers()
    assert default_q("Hello")["input_ids"] == q("Hello")["input_ids"]
    assert default_g("Hello")["input_ids"] == g("Hello")["input_ids"]


def test_raw_vocabulary_files_only(tmp_path):
    """A directory holding only vocab.txt, or only vocab.json + merges.txt, is enough."""
    (tmp_path / "bert").mkdir()
    (tmp_path / "bart").mkdir()
    shutil.copy(os.path.join(tk.QUESTION_TOKENIZER_DIR, "vocab.txt"), tmp_path / "bert")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tk.GENERATOR_TOKENIZER_DIR, f), tmp_path / "bart")
    q = tk.load_question_tokenizer(str(tmp_path / "bert"))
    g = tk.load_generator_tokenizer(str(tmp_path / "bart"))
    assert q("Hello World")["input_ids"] == [101, 7592, 2088, 102]
    assert g("Hello world")["input_ids"] == [0, 31414, 232, 2]


def test_missing_files_name_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt") as e:
        tk.load_question_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    shutil.copy(os.path.join(tk.GENERATOR_TOKENIZER_DIR, "vocab.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks merges.txt") as e:
        tk.load_generator_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.load_question_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="question_encoder_tokenizer/"):
        tk.load_rag_tokenizers(str(tmp_path))


def test_tiny_vocabulary_is_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match="did not load"):
        tk.load_question_tokenizer(str(tmp_path))
