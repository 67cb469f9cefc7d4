"""NQ-open style JSONL questions: one {"question", "answers" (or the official "answer"), optional
"gold_passage_id"} object a line, read without TFDS (eval_nq reads its --questions with this alone, and importing
tensorflow_datasets costs a third of a second at start-up; rag_jax/data/nq_open.py builds the TFDS dataset)."""

import json
from typing import Any, Iterator

UNKNOWN_PASSAGE_ID = -1
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def nonblank_lines(path: str) -> Iterator[tuple[int, str, str]]:
    """(line number from 1, "path:line" for error messages, text) of each non-blank line of a UTF-8 file: the loop of
    a JSON-lines reader (each caller parses, and says what a bad record means, itself). Raises ValueError naming
    the line that is not UTF-8 (lines are decoded one by one, so that the message can say where)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {e.start + 1} of the line: "
                                 f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8.") from None
            if line.strip():
                yield line_no, f"{path}:{line_no}", line


def read_nq_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line index, example) from an NQ-open style JSONL file.

    Accepts the official key "answer" and the bundled key "answers"; "gold_passage_id" is optional. Raises
    ValueError naming the file and line for malformed records.
    """
    for line_no, where, line in nonblank_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e}).") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"question\", \"answers\"}}, got a JSON "
                             f"{_JSON_KINDS.get(type(record), type(record).__name__)}.")
        question = record.get("question")
        answers = record.get("answers", record.get("answer"))
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string, got {question!r}.")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answer' (or 'answers') must be a non-empty list of strings (the "
                             f"gold answers that labels and exact match need), got {answers!r}.")
        # An empty answer would teach the generator to stop at once, and score an empty prediction right.
        if not all(a.strip() for a in answers):
            raise ValueError(f"{where}: field 'answer' (or 'answers') holds an empty string ({answers!r}); remove it "
                             "(every gold answer must have text).")
        gold = record.get("gold_passage_id", UNKNOWN_PASSAGE_ID)
        if not isinstance(gold, int):
            raise ValueError(f"{where}: field 'gold_passage_id' must be an integer, got {gold!r}.")
        yield line_no - 1, {"question": question, "answers": answers, "gold_passage_id": gold}


class JsonlSource:
    """Questions from an NQ-open style JSONL file, held in memory (a pipeline source: len + indexing)."""

    def __init__(self, path: str):
        self.name = path
        self._examples = [ex for _, ex in read_nq_jsonl(path)]
        if not self._examples:
            raise ValueError(f"{path}: no questions in the file")

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._examples[index]
