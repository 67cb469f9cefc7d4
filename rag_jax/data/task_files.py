"""The data files of the paper's tasks, in their own formats, read into records {"input", "outputs", ...} that a
task (rag_jax/tasks/) turns into examples. Pure Python.

Formats (`detect_format` tells them apart by extension and the first record's keys):
  kilt      KILT JSON-lines (Petroni et al. 2021): {"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id",
            "title", ...}]}]}; an output without "answer" is provenance only. "pages": one set of titles per output
            with provenance (R-Precision's gold sets).
  fever     FEVER JSON-lines: {"id", "claim", "label": SUPPORTS | REFUTES | NOT ENOUGH INFO}.
  msmarco   MS-MARCO v2.1: the official JSON of columns {"query": {row: text}, "answers": {row: [...]},
            "wellFormedAnswers": {row: [...] or "[]"}}, or JSON-lines with those keys. Outputs: the well-formed
            answers where a row has them (the NLG task's references), else its answers; rows whose only answer is
            "No Answer Present." are left out (they have no reference).
  searchqa  SearchQA's Jeopardy files: JSON-lines or a JSON array of {"question" (the clue), "answer", "category",
            ...}. For question generation the input is the answer and the output the clue, as in the RAG paper.
  dpr_csv   DPR's question files (TriviaQA, WebQuestions, CuratedTrec; *.csv, tab-separated inside as DPR writes
            them): `question<TAB>["answer", ...]` a line. A file
            whose name contains "curatedtrec" has regular-expression answers ("answers_are_regex").
  dpr_json  DPR's retriever training JSON: an array of {"question", "answers", "positive_ctxs": [{"title", ...}]}.
  nq        NQ-open JSONL {"question", "answers" | "answer"} (rag_jax/data/nq_jsonl.py reads it).
A bad record raises TaskFileError naming the file and line (or record number) and what is wrong.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any, Iterator

from rag_jax.data import nq_jsonl

FORMATS = ("kilt", "fever", "msmarco", "searchqa", "dpr_csv", "dpr_json", "nq")
NO_ANSWER = "No Answer Present."
_JEOPARDY_KEYS = ("category", "air_date", "show_number", "search_results", "round")


class TaskFileError(ValueError):
    """A file or record that cannot be read; the message names the file and line."""


def _format_of_record(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "input" in record and "output" in record:
        return "kilt"
    if "claim" in record:
        return "fever"
    if "query" in record:
        return "msmarco"
    if "question" in record and "answer" in record and any(key in record for key in _JEOPARDY_KEYS):
        return "searchqa"
    if "positive_ctxs" in record:
        return "dpr_json"
    if "question" in record and ("answers" in record or "answer" in record):
        return "nq"
    raise TaskFileError(f"{where}: a record with keys {sorted(record)} is none of the known formats "
                        f"({', '.join(FORMATS)}); see rag_jax/data/task_files.py")


def _first_json(path: str) -> tuple[Any, str]:
    for _, where, record in _jsonl(path):
        return record, where
    raise TaskFileError(f"{path}: empty file")


def _whole_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise TaskFileError(f"{path}: not UTF-8 text; save the file as UTF-8") from None


def detect_format(path: str) -> str:
    """One of FORMATS: dpr_csv by extension (.csv, as DPR names its question files), else from the first record's
    keys (of the JSON array in a .json file, of the first line otherwise)."""
    if os.path.splitext(path)[1].lower() == ".csv":
        return "dpr_csv"
    if os.path.splitext(path)[1].lower() == ".json":
        data = _whole_json(path)
        if isinstance(data, dict) and isinstance(data.get("query"), dict):
            return "msmarco"
        if isinstance(data, list) and data:
            return _format_of_record(data[0], f"{path}: record 1")
        raise TaskFileError(f"{path}: expected a JSON array of records or MS-MARCO's column object")
    record, where = _first_json(path)
    return _format_of_record(record, where)


def _jsonl(path: str) -> Iterator[tuple[int, str, dict]]:
    try:
        for line_no, where, line in nq_jsonl.nonblank_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise TaskFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield line_no, where, record
    except TaskFileError:
        raise
    except ValueError as e:  # nonblank_lines' "not UTF-8" line: one error type for callers
        raise TaskFileError(str(e)) from None


def _records(path: str) -> Iterator[tuple[int, str, dict]]:
    """(line or record number, "file:line" for messages, object) of a JSON-lines file or a JSON array."""
    if os.path.splitext(path)[1].lower() != ".json":
        yield from _jsonl(path)
        return
    data = _whole_json(path)
    if not isinstance(data, list):
        raise TaskFileError(f"{path}: expected a JSON array of records")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise TaskFileError(f"{path}: record {number}: expected a JSON object, got {type(record).__name__}")
        yield number, f"{path}: record {number}", record


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(f"{where}: {key!r} is missing or not a non-empty string")
    return value.strip()


def _kilt(path: str) -> Iterator[tuple[int, dict]]:
    for line, where, record in _records(path):
        outputs = record.get("output")
        if not isinstance(outputs, list):
            raise TaskFileError(f"{where}: 'output' must be a list of {{\"answer\", \"provenance\"}} objects")
        answers, pages = [], []
        for output in outputs:
            if not isinstance(output, dict):
                raise TaskFileError(f"{where}: every 'output' entry must be an object, got {type(output).__name__}")
            if "answer" in output:
                answers.append(output["answer"])
            titles = [p.get("title") for p in output.get("provenance") or [] if isinstance(p, dict)]
            if not all(isinstance(t, str) and t for t in titles):
                raise TaskFileError(f"{where}: a provenance entry has no 'title' (the page R-Precision compares)")
            if titles:
                pages.append(titles)
        yield line, {"id": record.get("id"), "input": _text(record, "input", where), "outputs": answers,
                     "pages": pages}


def _fever(path: str) -> Iterator[tuple[int, dict]]:
    for line, where, record in _records(path):
        yield line, {"id": record.get("id"), "input": _text(record, "claim", where),
                     "outputs": [_text(record, "label", where)]}


def _answer_list(value: Any, where: str, key: str) -> list[str]:
    if isinstance(value, str):  # MS-MARCO writes an absent wellFormedAnswers as the string "[]"
        value = [] if value.strip() == "[]" else [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise TaskFileError(f"{where}: {key!r} must be a list of strings")
    return [a for a in value if a.strip() and a.strip() != NO_ANSWER]


def _msmarco_rows(path: str) -> Iterator[tuple[int, str, dict]]:
    if os.path.splitext(path)[1].lower() != ".json":
        yield from _jsonl(path)
        return
    columns = _whole_json(path)
    if not isinstance(columns, dict) or not isinstance(columns.get("query"), dict):
        raise TaskFileError(f"{path}: expected MS-MARCO v2.1's column object {{\"query\": {{row: text}}, ...}}")
    for number, row in enumerate(columns["query"], start=1):
        yield number, f"{path}: row {row}", {key: values.get(row) for key, values in columns.items()
                                             if isinstance(values, dict)}


def _msmarco(path: str) -> Iterator[tuple[int, dict]]:
    for line, where, record in _msmarco_rows(path):
        well_formed = _answer_list(record.get("wellFormedAnswers") or [], where, "wellFormedAnswers")
        outputs = well_formed or _answer_list(record.get("answers") or [], where, "answers")
        if outputs:
            yield line, {"id": record.get("query_id"), "input": _text(record, "query", where), "outputs": outputs}


def _searchqa(path: str) -> Iterator[tuple[int, dict]]:
    for line, where, record in _records(path):
        clue = _text(record, "question", where)
        if len(clue) > 1 and clue[0] == clue[-1] == "'":  # the Jeopardy archive quotes every clue
            clue = clue[1:-1].strip()
        yield line, {"input": _text(record, "answer", where), "outputs": [clue],
                     "category": record.get("category")}


def _dpr_csv(path: str) -> Iterator[tuple[int, dict]]:
    regex = "curatedtrec" in os.path.basename(path).lower()
    for line_no, where, line in nq_jsonl.nonblank_lines(path):
        question, tab, answers_text = line.rstrip("\n").rpartition("\t")
        if not tab:
            raise TaskFileError(f"{where}: expected 'question<TAB>[\"answer\", ...]' (DPR's question files)")
        try:
            answers = ast.literal_eval(answers_text.strip())
        except (ValueError, SyntaxError):
            raise TaskFileError(f"{where}: the answers {answers_text.strip()[:60]!r} are not a Python/JSON list of "
                                "strings") from None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise TaskFileError(f"{where}: the answers must be a list of strings")
        yield line_no, {"input": question.strip(), "outputs": answers, "answers_are_regex": regex}


def _dpr_json(path: str) -> Iterator[tuple[int, dict]]:
    for line, where, record in _records(path):
        answers = record.get("answers")
        if not isinstance(answers, list):
            raise TaskFileError(f"{where}: 'answers' must be a list of strings")
        yield line, {"input": _text(record, "question", where), "outputs": answers}


def _nq(path: str) -> Iterator[tuple[int, dict]]:
    try:
        for index, example in nq_jsonl.read_nq_jsonl(path):
            yield index + 1, {"input": example["question"], "outputs": list(example["answers"]),
                              "gold_passage_id": example.get("gold_passage_id", nq_jsonl.UNKNOWN_PASSAGE_ID)}
    except ValueError as e:
        raise TaskFileError(str(e)) from None


_READERS = {"kilt": _kilt, "fever": _fever, "msmarco": _msmarco, "searchqa": _searchqa, "dpr_csv": _dpr_csv,
            "dpr_json": _dpr_json, "nq": _nq}


def read_records(path: str, file_format: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line or record number, record {"input", "outputs", optional "id", "pages", "answers_are_regex",
    "gold_passage_id"}) of a task data file, in the format given or detected."""
    file_format = file_format or detect_format(path)
    if file_format not in _READERS:
        raise TaskFileError(f"{path}: unknown format {file_format!r}; one of {', '.join(FORMATS)}")
    try:
        yield from _READERS[file_format](path)
    except OSError as e:
        raise TaskFileError(f"{path}: cannot read ({e.strerror})") from None
