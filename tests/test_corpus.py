"""Passage corpus: TSV/JSONL readers, their errors, the random-access PassageStore, document splitting."""

import csv
import gzip
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from rag_jax.retrieval import corpus, passage_store
from rag_jax.retrieval.corpus import CorpusError, Passage

BUNDLED = pathlib.Path(__file__).resolve().parents[1] / "rag_jax/assets/nq_open_mini/passages.tsv"

# Fields that need quoting in the excel-tab dialect: a tab, a doubled quote, a newline, a CRLF, a leading quote.
TRICKY = [
    Passage(id="a1", title="Title\twith tab", text='He said "hi"\tand left.'),
    Passage(id="a2", title="Multi", text="line one\nline two\n\nline four"),
    Passage(id="a3", title='"Quoted" title', text="windows\r\nline end and ünïcödé"),
    Passage(id="a4", title="", text="no title, plain text"),
]


def _write(path, text: str):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_bundled_passages_match_whole_file_csv_read():
    passages = list(corpus.read_passages(BUNDLED))
    with open(BUNDLED, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "text", "title"]
    assert len(passages) == 2600 == len(rows) - 1
    assert passages == [Passage(id=i, title=title, text=text) for i, text, title in rows[1:]]
    assert [p.id for p in passages] == [str(i) for i in range(1, 2601)]
    assert any("\n" in p.text for p in passages)  # The bundled file has quoted multi-line records.


def test_tsv_quoting_round_trip(tmp_path):
    path = tmp_path / "p.tsv"
    assert corpus.write_passages_tsv(path, TRICKY) == len(TRICKY)
    assert list(corpus.read_passages(path)) == TRICKY


def test_hand_written_quoted_tsv(tmp_path):
    path = _write(tmp_path / "p.tsv", 'id\ttext\ttitle\n7\t"a ""quoted""\ttab\nand newline"\tT\n8\tplain\t"t"\n')
    assert list(corpus.read_passages(path)) == [
        Passage(id="7", title="T", text='a "quoted"\ttab\nand newline'), Passage(id="8", title="t", text="plain")]


def test_jsonl_and_gzip(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for p in TRICKY:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
        f.write("\n")  # Blank lines carry nothing.
        f.write(json.dumps({"id": 5, "title": "int id", "text": "x"}) + "\n")
    expected = TRICKY + [Passage(id="5", title="int id", text="x")]
    assert list(corpus.read_passages(jsonl)) == expected
    for src in (jsonl, tmp_path / "t.tsv"):
        if src.suffix == ".tsv":
            corpus.write_passages_tsv(src, expected)
        gz = pathlib.Path(str(src) + ".gz")
        with open(src, "rb") as fin, gzip.open(gz, "wb") as fout:
            fout.write(fin.read())
        assert list(corpus.read_passages(gz)) == expected


@pytest.mark.parametrize("name, content, line, words", [
    ("bad_header.tsv", "id\ttitle\ttext\n1\tx\ty\n", 1, "bad header"),
    ("fields.tsv", "id\ttext\ttitle\n1\tok\tT\n2\tmissing title\n", 3, "expected 3"),
    ("extra.tsv", "id\ttext\ttitle\n1\tok\tT\n2\tok\tT\n3\ta\tb\tc\n", 4, "got 4"),
    ("empty_text.tsv", "id\ttext\ttitle\n1\tok\tT\n2\t  \tT\n", 3, "empty text"),
    ("empty_id.tsv", "id\ttext\ttitle\n\tok\tT\n", 2, "empty passage id"),
    ("multiline_then_bad.tsv", 'id\ttext\ttitle\n1\t"two\nlines"\tT\n2\tx\n', 4, "expected 3"),
    ("bad.jsonl", '{"id": 1, "title": "t", "text": "ok"}\n{"id": 2, "title": "t", "text": \n', 2, "bad JSON"),
    ("keys.jsonl", '{"id": 1, "title": "t", "text": "ok"}\n\n{"id": 2, "title": "t"}\n', 3, '"text"'),
    ("empty.jsonl", '{"id": 1, "title": "t", "text": ""}\n', 1, "empty text"),
])
def test_errors_name_file_and_line(tmp_path, name, content, line, words):
    path = _write(tmp_path / name, content)
    with pytest.raises(CorpusError, match=words) as e:
        list(corpus.read_passages(path))
    assert f"{path}:{line}:" in str(e.value)


def test_unbalanced_quote_is_reported_not_swallowed(tmp_path):
    # An unclosed quote runs to the end of file: the record then has the wrong number of fields.
    path = _write(tmp_path / "q.tsv", 'id\ttext\ttitle\n1\tok\tT\n2\t"open quote\tT\n3\tx\tT\n')
    with pytest.raises(CorpusError) as e:
        list(corpus.read_passages(path))
    assert f"{path}:3:" in str(e.value)


def test_unknown_extension(tmp_path):
    with pytest.raises(CorpusError, match=r"\.tsv.*\.jsonl"):
        list(corpus.read_passages(_write(tmp_path / "p.csv", "id,text,title\n")))


def test_duplicate_id_names_both_lines(tmp_path):
    path = _write(tmp_path / "d.tsv", 'id\ttext\ttitle\n1\t"a\nb"\tT\n2\tx\tT\n1\ty\tT\n')
    with pytest.raises(CorpusError, match="duplicate passage id '1'") as e:
        passage_store.PassageStore.build(path, tmp_path / "store")
    assert f"{path}:5:" in str(e.value) and "line 2" in str(e.value)


def test_store_random_access_equals_sequential(tmp_path):
    store = passage_store.PassageStore.build(BUNDLED, tmp_path)
    sequential = list(corpus.read_passages(BUNDLED))
    assert len(store) == len(sequential)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(store))
    assert [store[r] for r in rows] == [sequential[r] for r in rows]
    rows_QxK = rows[:12].reshape(3, 4)
    assert store.get(rows_QxK) == [sequential[r] for r in rows_QxK.reshape(-1)]
    assert list(store.iter_passages(1234, 1300)) == sequential[1234:1300]
    assert list(store.iter_passages(2590)) == sequential[2590:]
    ids = [p.id for p in sequential]
    assert store.rows_for_ids(ids[::37]).tolist() == list(range(0, len(ids), 37))
    assert store.row_for_id(2600) == 2599  # Integer ids are looked up as their decimal string.
    with pytest.raises(IndexError):
        store[2600]


def test_store_tricky_records_and_jsonl(tmp_path):
    tsv = tmp_path / "p.tsv"
    corpus.write_passages_tsv(tsv, TRICKY)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(dataclass_dict(p)) + "\n" for p in TRICKY), encoding="utf-8")
    for path in (tsv, jsonl):
        store = passage_store.PassageStore.build(path, tmp_path / path.suffix[1:])
        assert [store[i] for i in (3, 1, 0, 2)] == [TRICKY[i] for i in (3, 1, 0, 2)]
        assert [store.row_for_id(p.id) for p in TRICKY] == [0, 1, 2, 3]


def dataclass_dict(p: Passage) -> dict:
    return {"id": p.id, "title": p.title, "text": p.text}


def test_unknown_id_is_a_clear_key_error(tmp_path):
    store = passage_store.PassageStore.build(BUNDLED, tmp_path)
    with pytest.raises(KeyError, match="passage id '99999' is not in"):
        store.row_for_id("99999")
    with pytest.raises(corpus.UnknownPassageIdError):
        store.rows_for_ids(["1", "nope"])


def test_store_is_reused_and_detects_a_changed_file(tmp_path):
    path = tmp_path / "p.tsv"
    corpus.write_passages_tsv(path, TRICKY)
    passage_store.PassageStore.build(path, tmp_path / "s")
    mtime = os.path.getmtime(tmp_path / "s" / "passage_offsets.npy")
    passage_store.PassageStore.build(path, tmp_path / "s")
    assert os.path.getmtime(tmp_path / "s" / "passage_offsets.npy") == mtime
    corpus.write_passages_tsv(path, TRICKY[::-1])
    with pytest.raises(CorpusError, match="differs from the one the passage store"):
        passage_store.PassageStore(path, tmp_path / "s")
    assert passage_store.PassageStore.build(path, tmp_path / "s")[0] == TRICKY[-1]  # build() rebuilds it.


def test_store_refuses_gzip(tmp_path):
    gz = tmp_path / "p.tsv.gz"
    with gzip.open(gz, "wb") as f, open(BUNDLED, "rb") as src:
        shutil.copyfileobj(src, f)
    with pytest.raises(CorpusError, match="gunzip"):
        passage_store.PassageStore.build(gz, tmp_path)


def test_split_documents_into_passages():
    text = " ".join(f"w{i}" for i in range(250))
    chunks = corpus.split_documents_into_passages("Doc", "  " + text.replace(" w5 ", "\n\tw5 ") + " ")
    assert [len(t.split()) for _, t in chunks] == [100, 100, 50]
    assert all(title == "Doc" for title, _ in chunks)
    assert " ".join(t for _, t in chunks) == text
    assert corpus.split_documents_into_passages("Doc", "a b c", words_per_passage=2) == [("Doc", "a b"), ("Doc", "c")]
    assert corpus.split_documents_into_passages("Doc", "   ") == []


def test_store_reads_from_several_threads_at_once(tmp_path):
    """Training reads gold rows in a background thread while the step's retrieval reads passages (one handle)."""
    import concurrent.futures

    store = passage_store.PassageStore.build(BUNDLED, tmp_path)
    expected = store.get(np.arange(store.num_passages))
    rows = np.random.default_rng(0).integers(0, store.num_passages, (4, 3000))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(store.get, rows))
    for row_block, passages in zip(rows, got):
        assert passages == [expected[r] for r in row_block]
