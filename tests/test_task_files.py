"""rag_jax/data/task_files.py: each format a user brings, read from a few hand-written records, and a bad record is
one error naming the file and line."""

import json

import pytest

from rag_jax.data import task_files
from rag_jax.tasks import base, registry


def _write(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines),
                    encoding="utf-8")
    return str(path)


def _read(path):
    return list(task_files.read_records(path))


KILT = [
    {"id": "1", "input": "Who wrote Hamlet?", "output": [
        {"answer": "Shakespeare", "provenance": [{"wikipedia_id": "1", "title": "Hamlet"}]},
        {"answer": "William Shakespeare"},
        {"provenance": [{"wikipedia_id": "2", "title": "William Shakespeare"},
                        {"wikipedia_id": "1", "title": "Hamlet"}]},
    ]},
]


def test_kilt_answers_and_one_page_set_per_output_with_provenance(tmp_path):
    path = _write(tmp_path / "nq-dev-kilt.jsonl", KILT)
    assert task_files.detect_format(path) == "kilt"
    [(line, record)] = _read(path)
    assert line == 1 and record["input"] == "Who wrote Hamlet?"
    assert record["outputs"] == ["Shakespeare", "William Shakespeare"]  # the provenance-only output has no answer
    assert record["pages"] == [["Hamlet"], ["William Shakespeare", "Hamlet"]]
    example = base.to_example(registry.get("qa"), record, f"{path}:1")
    assert example["pages"] == record["pages"] and example["id"] == "1"


def test_a_kilt_line_without_input_is_one_error_naming_file_and_line(tmp_path):
    path = _write(tmp_path / "k.jsonl", [KILT[0], {"id": "2", "output": [{"answer": "x"}]}])
    with pytest.raises(task_files.TaskFileError, match=r"k.jsonl:2: 'input' is missing"):
        _read(path)


def test_fever(tmp_path):
    path = _write(tmp_path / "fever.jsonl", [{"id": 7, "label": "REFUTES", "claim": "The moon is cheese.",
                                              "evidence": []}])
    assert task_files.detect_format(path) == "fever"
    [(_, record)] = _read(path)
    example = base.to_example(registry.get("fact_verification"), record, "fever.jsonl:1")
    assert example["question"] == "The moon is cheese." and example["answers"] == ["refutes"]


def test_fever_label_outside_the_set_is_one_error(tmp_path):
    path = _write(tmp_path / "fever.jsonl", [{"label": "SUPPORTS", "claim": "a"}, {"label": "PERHAPS", "claim": "b"}])
    task = registry.get("fact_verification")
    with pytest.raises(base.TaskDataError, match="fever.jsonl:2: label 'PERHAPS'"):
        [base.to_example(task, record, f"{path}:{line}") for line, record in _read(path)]


def test_msmarco_v21_columns_well_formed_answers_first(tmp_path):
    columns = {"query": {"0": "what is rag", "1": "how tall is it", "2": "why"},
               "query_id": {"0": 10, "1": 11, "2": 12},
               "answers": {"0": ["retrieval"], "1": ["two metres"], "2": ["No Answer Present."]},
               "wellFormedAnswers": {"0": ["RAG is retrieval-augmented generation."], "1": "[]", "2": "[]"}}
    path = tmp_path / "dev_v2.1.json"
    path.write_text(json.dumps(columns), encoding="utf-8")
    assert task_files.detect_format(str(path)) == "msmarco"
    records = [record for _, record in _read(str(path))]
    assert [r["outputs"] for r in records] == [["RAG is retrieval-augmented generation."], ["two metres"]]
    assert [r["id"] for r in records] == [10, 11]  # the unanswerable row is left out


def test_searchqa_jeopardy_answer_in_clue_out(tmp_path):
    path = _write(tmp_path / "searchqa.jsonl", [{"category": "AUTHORS", "air_date": "2004-12-31",
                                                  "question": "'He wrote \"Hamlet\"'", "answer": "Shakespeare"}])
    assert task_files.detect_format(path) == "searchqa"
    [(_, record)] = _read(path)
    assert record["input"] == "Shakespeare" and record["outputs"] == ['He wrote "Hamlet"']


def test_dpr_csv_and_curatedtrec_regex_answers(tmp_path):
    trivia = _write(tmp_path / "trivia-dev.qa.csv", ['who wrote hamlet?\t["Shakespeare", "William Shakespeare"]\n'])
    [(_, record)] = _read(trivia)
    assert record == {"input": "who wrote hamlet?", "outputs": ["Shakespeare", "William Shakespeare"],
                      "answers_are_regex": False}
    trec = _write(tmp_path / "curatedtrec-test.qa.csv", ['how far is the moon\t["2\\\\d\\\\d,?\\\\d+ miles"]\n'])
    [(_, record)] = _read(trec)
    example = base.to_example(registry.get("qa"), record, trec)
    assert example["answers_are_regex"] and registry.get("qa").score("238,855 miles", example)["exact_match"] == 1.0


def test_dpr_csv_bad_answers_name_the_line(tmp_path):
    path = _write(tmp_path / "q.csv", ['a\t["x"]\n', 'b\t[unquoted\n'])
    with pytest.raises(task_files.TaskFileError, match=r"q.csv:2: the answers '\[unquoted' are not"):
        _read(path)


def test_dpr_json(tmp_path):
    path = tmp_path / "nq-dev.json"
    path.write_text(json.dumps([{"question": "q?", "answers": ["a"], "positive_ctxs": [{"title": "T"}]}]))
    assert task_files.detect_format(str(path)) == "dpr_json"
    assert _read(str(path)) == [(1, {"input": "q?", "outputs": ["a"]})]


def test_bad_json_names_the_line(tmp_path):
    path = _write(tmp_path / "k.jsonl", [KILT[0], "{not json\n"])
    with pytest.raises(task_files.TaskFileError, match=r"k.jsonl:2: not valid JSON"):
        _read(path)
