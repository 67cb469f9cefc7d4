"""Training examples for the retriever (rag_jax/training/retriever_loop.py): (question, positive passage, hard
negatives), from one of three sources, and the Inverse Cloze Task that needs no questions at all.

  gold pairs   NQ-open style JSONL whose `gold_passage_id` names a passage of the corpus (the bundled mini NQ task,
               the knowledge task's files); hard negatives optionally from a mined file (below).
  DPR JSON     DPR's training files (biencoder-nq-train.json: a JSON array of {question, answers, positive_ctxs,
               negative_ctxs, hard_negative_ctxs}, each ctx {title, text, passage_id}); streamed, record by record,
               never loaded whole (the NQ file is 7 GB).
  mined        a JSONL file written by experiments.mine_negatives: {"question", "negative_ids"} a line, the top
               passages of an existing index that contain no answer (DPR's BM25 hard negatives, from a dense index).
  ICT          (Lee et al. 2019, ORQA) a random sentence of a passage is the pseudo-question and the passage its
               positive, the sentence removed from it with probability 1 - keep_sentence (ORQA keeps it 10% of the time).

Every example is {"question", "answers", "positive": Passage, "negatives": [Passage], "where": "file:line"}. Bad
input raises DataError naming the file and line.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Sequence

import numpy as np

from rag_jax.data import nq_jsonl, nq_open
from rag_jax.retrieval import corpus


class DataError(ValueError):
    """A retriever training file that cannot be used; the message names the file, the line and what to do."""


class Corpus:
    """The passages of a file held in memory, with rows found by passage id."""

    def __init__(self, path: str):
        self.path = path
        self.passages: list[corpus.Passage] = list(corpus.read_passages(path))
        self._rows = {p.id: i for i, p in enumerate(self.passages)}

    def __len__(self) -> int:
        return len(self.passages)

    def row(self, passage_id, where: str) -> int:
        row = self._rows.get(str(passage_id))
        if row is None:
            raise unknown_passage(where, passage_id, self.path, len(self))
        return row


def unknown_passage(where: str, passage_id, passages_path: str, num_passages: int) -> DataError:
    """The one rule for a passage id that names no passage (a gold passage id, a mined negative): every entry point
    that reads them refuses it with this message."""
    return DataError(f"{where}: passage id {passage_id!r} is not in the corpus {passages_path} ({num_passages} "
                     "passages); the ids must come from the same passages file")


def check_gold_ids(questions_path: str, passages_path: str) -> None:
    """Every gold_passage_id of an NQ-open JSONL file names a passage of `passages_path` (read once, streamed);
    raises DataError naming the first question line that does not. A question without one (-1) is fine."""
    wanted: dict[str, tuple[int, int]] = {}  # id as the corpus spells it -> (line, id as the question gives it)
    try:
        for index, record in nq_jsonl.read_nq_jsonl(questions_path):
            if record["gold_passage_id"] != nq_jsonl.UNKNOWN_PASSAGE_ID:
                wanted.setdefault(str(record["gold_passage_id"]), (index + 1, record["gold_passage_id"]))
    except ValueError as e:
        raise DataError(str(e)) from None
    if not wanted:
        return
    missing, count = set(wanted), 0
    for passage in corpus.read_passages(passages_path):
        missing.discard(passage.id)
        count += 1
    if missing:
        line, passage_id = min(wanted[pid] for pid in missing)
        raise unknown_passage(f"{questions_path}:{line}", passage_id, passages_path, count)


# ---------------------------------------------------------------------------------------------------- sources


def gold_pairs(questions_path: str, passages: Corpus) -> list[dict[str, Any]]:
    """The questions of an NQ-open JSONL file that name a gold passage, each with it as positive."""
    examples = []
    try:
        for index, record in nq_open.read_nq_jsonl(questions_path):
            where = f"{questions_path}:{index + 1}"
            if record["gold_passage_id"] == nq_open.UNKNOWN_PASSAGE_ID:
                continue
            row = passages.row(record["gold_passage_id"], where)
            examples.append({"question": record["question"], "answers": record["answers"],
                             "positive": passages.passages[row], "negatives": [], "gold_row": row, "where": where})
    except ValueError as e:
        raise DataError(str(e)) from None
    if not examples:
        raise DataError(f"{questions_path}: no question has a gold_passage_id; supervised training needs them "
                        "(or use data.kind='ict' or a DPR JSON file)")
    return examples


def _json_array_items(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """(line, item) for each item of the JSON array in `path`, parsed incrementally (memory: one item + a chunk)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buffer, line, started = "", 1, False
        eof = False
        while True:
            stripped = buffer.lstrip(" \t\r\n,")
            line += buffer[: len(buffer) - len(stripped)].count("\n")
            buffer = stripped
            if not started and buffer:
                if buffer[0] != "[":
                    raise DataError(f"{path}:{line}: a DPR training file is a JSON array ('[' first)")
                buffer, started = buffer[1:], True
                continue
            if buffer.startswith("]"):
                return
            try:
                item, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError as e:
                if eof:
                    if not buffer:
                        raise DataError(f"{path}:{line}: the JSON array is not closed (a truncated file?)") from None
                    raise DataError(f"{path}:{line + buffer[: e.pos].count(chr(10))}: not valid JSON ({e.msg})") from None
                more = f.read(chunk_size)
                eof = not more
                buffer += more
                continue
            yield line, item
            line += buffer[:end].count("\n")
            buffer = buffer[end:]


def _ctx(ctx: Any, where: str, key: str) -> corpus.Passage:
    if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
        raise DataError(f"{where}: each of {key!r} must be an object with a 'text' string, got {ctx!r:.80}")
    return corpus.Passage(str(ctx.get("passage_id", ctx.get("psg_id", ""))), str(ctx.get("title", "")), ctx["text"])


def dpr_examples(path: str) -> Iterator[dict[str, Any]]:
    """The records of a DPR training JSON file, streamed; hard negatives are its hard_negative_ctxs (then
    negative_ctxs when a record has none, as DPR's data loader falls back)."""
    for line, record in _json_array_items(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise DataError(f"{where}: a DPR record must be an object with a 'question' string")
        positives = record.get("positive_ctxs") or []
        if not positives:
            raise DataError(f"{where}: the record for question {record['question']!r} has no positive_ctxs; every "
                            "training question needs a positive passage (drop the record or add one)")
        hard = [_ctx(c, where, "hard_negative_ctxs") for c in record.get("hard_negative_ctxs") or []]
        plain = [_ctx(c, where, "negative_ctxs") for c in record.get("negative_ctxs") or []]
        yield {"question": record["question"], "answers": list(record.get("answers") or []),
               "positive": _ctx(positives[0], where, "positive_ctxs"), "negatives": hard or plain, "gold_row": -1,
               "where": where}


def read_mined_negatives(path: str, passages: Corpus) -> dict[str, list[corpus.Passage]]:
    """{question: hard negative passages} from an experiments.mine_negatives file."""
    found = {}
    for _, where, line in nq_jsonl.nonblank_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("negative_ids"), list):
            raise DataError(f"{where}: expected {{\"question\": ..., \"negative_ids\": [...]}}")
        found[record.get("question")] = [passages.passages[passages.row(p, where)] for p in record["negative_ids"]]
    if not found:
        raise DataError(f"{path}: the hard-negatives file is empty; mine it again (python -m experiments."
                        "mine_negatives) or leave data.hard_negatives unset")
    return found


def attach_negatives(examples: list[dict[str, Any]], mined: dict[str, list[corpus.Passage]]) -> None:
    for example in examples:
        example["negatives"] = mined.get(example["question"], example["negatives"])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def ict_example(passage: corpus.Passage, rng: np.random.Generator, keep_sentence: float) -> dict[str, Any]:
    """ORQA's Inverse Cloze Task: a random sentence of the passage asks for the passage; the sentence stays in the
    positive with probability `keep_sentence` (so that the encoder also learns lexical matching)."""
    parts = sentences(passage.text)
    pick = int(rng.integers(len(parts))) if parts else 0
    question = parts[pick] if parts else passage.text
    if len(parts) > 1 and rng.random() >= keep_sentence:
        passage = corpus.Passage(passage.id, passage.title, " ".join(parts[:pick] + parts[pick + 1:]))
    return {"question": question, "answers": [], "positive": passage, "negatives": [], "gold_row": -1,
            "where": f"passage {passage.id}"}


# ---------------------------------------------------------------------------------------------------- batches


def check_corpus_size(passages: Corpus, needed: int, what: str) -> None:
    if len(passages) < needed:
        raise DataError(f"{passages.path}: {len(passages)} passages, too few for {what} ({needed} distinct "
                        "passages a batch); lower train.global_batch_size or data.hard_negatives_per_question")


class Batches:
    """The global training batch of each step, deterministic in (seed, step) so that a resumed run continues the
    same sequence: `at(step)` -> (examples, each with exactly `hard_negatives` negatives).

    In-memory sources (gold pairs, ICT over the corpus) are shuffled per epoch; a streamed DPR file is read in order
    through a shuffle buffer, and a resume skips the examples already used. A question lacking hard negatives gets
    random corpus passages (other than its positive) instead."""

    def __init__(self, kind: str, *, passages: Corpus, batch_size: int, hard_negatives: int, seed: int,
                 examples: Sequence[dict[str, Any]] | None = None, dpr_file: str | None = None,
                 keep_sentence: float = 0.1, shuffle_buffer: int = 4096):
        self.kind, self.passages, self.batch_size, self.hard = kind, passages, batch_size, hard_negatives
        self.seed, self.examples, self.dpr_file = seed, examples, dpr_file
        self.keep_sentence, self.shuffle_buffer = keep_sentence, shuffle_buffer
        self._stream: Iterator[dict[str, Any]] | None = None
        self._stream_step = -1
        check_corpus_size(passages, batch_size * (1 + hard_negatives) if kind == "ict" else 1 + hard_negatives,
                          f"train.global_batch_size={batch_size} with {hard_negatives} hard negatives each")
        if kind == "gold" and examples is not None and len(examples) < batch_size:
            raise DataError(f"{examples[0]['where'].rsplit(':', 1)[0]}: {len(examples)} training questions, fewer "
                            f"than train.global_batch_size={batch_size}")

    def _epoch_order(self, epoch: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _in_memory(self, step: int) -> list[dict[str, Any]]:
        n = len(self.passages) if self.kind == "ict" else len(self.examples)
        per_epoch = n // self.batch_size
        epoch, offset = divmod(step, per_epoch)
        rows = self._epoch_order(epoch, n)[offset * self.batch_size:(offset + 1) * self.batch_size]
        if self.kind != "ict":
            return [self.examples[i] for i in rows]
        rng = np.random.default_rng([self.seed, step, 1])
        return [ict_example(self.passages.passages[i], rng, self.keep_sentence) for i in rows]

    def _shuffled_stream(self) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            rng, buffer, count = np.random.default_rng([self.seed, epoch]), [], 0
            for example in dpr_examples(self.dpr_file):
                count += 1
                buffer.append(example)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
            if count < self.batch_size:
                raise DataError(f"{self.dpr_file}: {count} training questions, fewer than train.global_batch_size="
                                f"{self.batch_size}")
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1

    def _streamed(self, step: int) -> list[dict[str, Any]]:
        if self._stream is None or step != self._stream_step + 1:
            self._stream = self._shuffled_stream()
            for _ in range(step * self.batch_size):  # a resume: skip what the run has used
                next(self._stream)
        self._stream_step = step
        return [next(self._stream) for _ in range(self.batch_size)]

    def at(self, step: int) -> list[dict[str, Any]]:
        examples = self._streamed(step) if self.kind == "dpr" else self._in_memory(step)
        rng = np.random.default_rng([self.seed, step, 2])
        out = []
        for example in examples:
            negatives = [p for p in example["negatives"] if p.text != example["positive"].text][: self.hard]
            while len(negatives) < self.hard:
                candidate = self.passages.passages[int(rng.integers(len(self.passages)))]
                if candidate.text != example["positive"].text:
                    negatives.append(candidate)
            out.append({**example, "negatives": negatives})
        return out


def tokenize(tokenizer, examples: Sequence[dict[str, Any]], max_question_length: int,
             max_passage_length: int, with_passages: bool = True) -> dict[str, np.ndarray]:
    """int32 arrays: question_ids/question_mask (Q, Lq); passage_ids/passage_mask/passage_types (Q*(1+H), Lp), each
    question's positive then its negatives, (title, text) pairs as the index embeds them (unless not
    `with_passages`: a frozen document encoder reads their vectors instead); fixed lengths, one compilation."""
    questions = tokenizer([e["question"] for e in examples], max_length=max_question_length, truncation=True,
                          padding="max_length", return_tensors="np")
    if not with_passages:
        return {"question_ids": questions["input_ids"].astype(np.int32),
                "question_mask": questions["attention_mask"].astype(np.int32)}
    rows = [p for e in examples for p in [e["positive"], *e["negatives"]]]
    docs = tokenizer([p.title for p in rows], [p.text for p in rows], max_length=max_passage_length,
                     truncation="longest_first", padding="max_length", return_tensors="np")
    return {"question_ids": questions["input_ids"].astype(np.int32),
            "question_mask": questions["attention_mask"].astype(np.int32),
            "passage_ids": docs["input_ids"].astype(np.int32), "passage_mask": docs["attention_mask"].astype(np.int32),
            "passage_types": docs["token_type_ids"].astype(np.int32)}


def passage_rows(passages: Corpus, examples: Sequence[dict[str, Any]]) -> np.ndarray:
    """The corpus rows of the batch's passages (Q*(1+H),), in tokenize's order: each question's positive, then its
    negatives."""
    return np.array([passages.row(p.id, e["where"]) for e in examples for p in [e["positive"], *e["negatives"]]],
                    np.int64)
