"""The passage corpus: streaming readers and writers, record validation, and document splitting.

Two on-disk formats, chosen by file extension (optionally followed by `.gz`):
  * `.tsv`   DPR's `psgs_w100.tsv` layout: header `id<TAB>text<TAB>title`, one passage a record, written by
             Python's csv module with the `excel-tab` dialect, so fields may be quoted and a quoted field may
             contain tabs, doubled quotes and newlines (the bundled nq_open_mini file has all three).
  * `.jsonl` one JSON object a line: {"id": str|int, "title": str, "text": str}.

Row numbers (0..N-1) are the order of records in the file; the index stores one embedding per row, and
rag_jax/retrieval/passage_store.py turns retrieved rows back into passages by reading at the byte offsets that
`records_with_offsets` gives.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
from typing import IO, Iterable, Iterator

TSV_HEADER = ("id", "text", "title")
TSV_DIALECT = "excel-tab"  # What DPR (and HF's RagRetriever) use to read and write psgs_w100.tsv.


class CorpusError(ValueError):
    """A passages file (or its cached store) cannot be used; the message names the file, line and remedy."""


class UnknownPassageIdError(CorpusError, KeyError):
    """A passage id (e.g. a gold passage id) that is not in the corpus."""

    def __str__(self) -> str:  # KeyError would print the message quoted.
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable passage. `id` is the corpus' own id (a string, e.g. "1" for DPR), not the row number."""
    id: str
    title: str
    text: str


def corpus_format(path: str | os.PathLike) -> str:
    """Returns "tsv" or "jsonl" from the file name (`.tsv`, `.jsonl`, each optionally `.gz`)."""
    name = os.fspath(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".jsonl"):
        return "jsonl"
    raise CorpusError(f"{path}: unknown passages format; name the file *.tsv (DPR psgs_w100 layout: "
                      f"id<TAB>text<TAB>title) or *.jsonl ({{\"id\", \"title\", \"text\"}} per line), optionally .gz")


def _open_binary(path: str | os.PathLike) -> IO[bytes]:
    if not os.path.exists(path):
        raise CorpusError(f"{path}: passages file not found")
    if os.fspath(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decoded_lines(f: Iterable[bytes], path, position: list[int], line_no: list[int]) -> Iterator[str]:
    """Yields decoded lines (newline kept, as csv wants) and keeps `position`/`line_no` at the byte offset and
    1-based number of the last line handed out, so callers learn where each record starts and ends."""
    for raw in f:
        line_no[0] += 1
        position[0] += len(raw)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}:{line_no[0]}: not valid UTF-8 ({e}); re-encode the file as UTF-8") from None


def _check_passage(path, line: int, pid: str, title: str, text: str) -> Passage:
    if not pid.strip():
        raise CorpusError(f"{path}:{line}: empty passage id; every passage needs a unique id")
    if not text.strip():
        raise CorpusError(f"{path}:{line}: passage id {pid!r} has empty text; drop the record or fill it in")
    return Passage(pid, title, text)


def _tsv_records(path, f: Iterable[bytes], start_offset: int = 0, header: bool = True
                 ) -> Iterator[tuple[Passage, int, int, int]]:
    """Yields (passage, start_byte, end_byte, line_no) for every TSV record in the raw lines `f`."""
    position, line_no = [start_offset], [0]
    reader = csv.reader(_decoded_lines(f, path, position, line_no), dialect=TSV_DIALECT)
    if header:
        try:
            got = next(reader, None)
        except csv.Error as e:
            raise CorpusError(f"{path}:1: cannot parse header ({e})") from None
        if got is None:
            raise CorpusError(f"{path}: empty file; expected a header line 'id<TAB>text<TAB>title' and passages")
        if got and got[0].startswith("\ufeff"):
            got[0] = got[0][1:]
        if tuple(got) != TSV_HEADER:
            raise CorpusError(f"{path}:1: bad header {got!r}; expected {list(TSV_HEADER)} separated by tabs "
                              "(DPR psgs_w100.tsv layout); fix the first line or convert the file")
    while True:
        start, line = position[0], line_no[0] + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise CorpusError(f"{path}:{line}: malformed TSV record ({e}); check for an unbalanced quote "
                              "starting on this line") from None
        if not fields:  # A blank line carries no passage.
            continue
        if len(fields) != 3:
            raise CorpusError(f"{path}:{line}: expected 3 tab-separated fields (id, text, title), got {len(fields)}; "
                              "a tab or newline inside text must be inside a double-quoted field")
        pid, text, title = fields
        yield _check_passage(path, line, pid, title, text), start, position[0], line


def _jsonl_records(path, f: Iterable[bytes], start_offset: int = 0
                   ) -> Iterator[tuple[Passage, int, int, int]]:
    """Yields (passage, start_byte, end_byte, line_no) for every JSONL record in the raw lines `f`."""
    position, line = start_offset, 0
    for raw in f:
        line += 1
        start, position = position, position + len(raw)
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorpusError(f"{path}:{line}: bad JSON line ({e}); each line must be one JSON object "
                              '{"id", "title", "text"}') from None
        if not isinstance(obj, dict) or "id" not in obj or "text" not in obj:
            raise CorpusError(f"{path}:{line}: expected an object with keys \"id\", \"title\", \"text\"; got "
                              f"{str(obj)[:80]!r}")
        title = obj.get("title", "")
        if not isinstance(obj["text"], str) or not isinstance(title, str):
            raise CorpusError(f"{path}:{line}: \"text\" and \"title\" must be strings")
        yield _check_passage(path, line, str(obj["id"]), title, obj["text"]), start, position, line


def parse_records(path, fmt: str, lines: Iterable[bytes], start_offset: int = 0, header: bool = True
                  ) -> Iterator[tuple[Passage, int, int, int]]:
    """Parses records from an iterable of raw lines; line numbers are relative to `lines` unless header=True."""
    if fmt == "tsv":
        return _tsv_records(path, lines, start_offset, header=header)
    return _jsonl_records(path, lines, start_offset)


def records_with_offsets(path) -> Iterator[tuple[Passage, int, int, int]]:
    """Every record of the file with its byte span and line: (passage, start, end, line)."""
    with _open_binary(path) as f:
        yield from parse_records(path, corpus_format(path), f)


def changed_file_error(path, offset: int, cause: Exception) -> CorpusError:
    """Records read by offset were validated when the store was built, so a parse failure means a changed file."""
    return CorpusError(f"{path}:{line_of_offset(path, offset)}: cannot re-read the record at byte {offset} "
                       f"({cause}); the file changed after its passage store was built — rebuild the store")


def read_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Streams the passages of a .tsv/.jsonl(.gz) file in row order, validating each record.

    Raises CorpusError naming the line for a bad header, a wrong field count, bad JSON or an empty text.
    Duplicate ids are caught by `PassageStore.build`, which sees all ids at once in numpy.
    """
    for passage, _, _, _ in records_with_offsets(path):
        yield passage


def write_passages_tsv(path: str | os.PathLike, passages: Iterable[Passage]) -> int:
    """Writes passages in DPR's psgs_w100.tsv layout (what `read_passages` reads back); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, dialect=TSV_DIALECT, lineterminator="\n")
        writer.writerow(TSV_HEADER)
        for p in passages:
            writer.writerow((p.id, p.text, p.title))
            n += 1
    return n


def split_documents_into_passages(title: str, text: str, words_per_passage: int = 100) -> list[tuple[str, str]]:
    """Cuts one document into (title, passage_text) chunks of `words_per_passage` whitespace-separated words.

    This is how DPR built psgs_w100 from Wikipedia and how HF's RAG example splits a custom knowledge base:
    every chunk keeps the document title; the last chunk may be shorter. An empty text gives no passages.
    """
    if words_per_passage <= 0:
        raise ValueError(f"words_per_passage must be positive, got {words_per_passage}")
    words = text.split()
    return [(title, " ".join(words[i:i + words_per_passage])) for i in range(0, len(words), words_per_passage)]


# --------------------------------------------------------------------------------------------------------------
# File identity and positions.


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a (possibly 13 GB) file: its size and a hash of its first and last MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (1 << 20):
            f.seek(max(1 << 20, size - (1 << 20)))
            h.update(f.read())
    return f"size={size},sha256-head-tail={h.hexdigest()[:32]}"


def line_of_offset(path, offset: int) -> int:
    """1-based line number of the byte at `offset` (only used to word error messages)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1
