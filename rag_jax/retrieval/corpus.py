"""The passage corpus: streaming readers, a random-access passage store, and document splitting.

Two on-disk formats, chosen by file extension (optionally followed by `.gz`):
  * `.tsv`   DPR's `psgs_w100.tsv` layout: header `id<TAB>text<TAB>title`, one passage a record, written by
             Python's csv module with the `excel-tab` dialect, so fields may be quoted and a quoted field may
             contain tabs, doubled quotes and newlines (the bundled nq_open_mini file has all three).
  * `.jsonl` one JSON object a line: {"id": str|int, "title": str, "text": str}.

Row numbers (0..N-1) are the order of records in the file; the index stores one embedding per row, and the
`PassageStore` turns retrieved rows back into passages by seeking to byte offsets, so nothing here keeps the
whole corpus (21M passages for DPR's Wikipedia) in Python objects.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from rag_jax import files

TSV_HEADER = ("id", "text", "title")
TSV_DIALECT = "excel-tab"  # What DPR (and HF's RagRetriever) use to read and write psgs_w100.tsv.
_STORE_VERSION = 1
_STORE_FILES = ("passage_store.json", "passage_offsets.npy", "passage_id_keys.npy", "passage_id_rows.npy")


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


def _records_from(path, fmt: str, lines: Iterable[bytes], start_offset: int = 0, header: bool = True
                  ) -> Iterator[tuple[Passage, int, int, int]]:
    """Parses records from an iterable of raw lines; line numbers are relative to `lines` unless header=True."""
    if fmt == "tsv":
        return _tsv_records(path, lines, start_offset, header=header)
    return _jsonl_records(path, lines, start_offset)


def _records(path) -> Iterator[tuple[Passage, int, int, int]]:
    with _open_binary(path) as f:
        yield from _records_from(path, corpus_format(path), f)


def _changed_file_error(path, offset: int, cause: Exception) -> CorpusError:
    """Records read by offset were validated when the store was built, so a parse failure means a changed file."""
    return CorpusError(f"{path}:{_line_of_offset(path, offset)}: cannot re-read the record at byte {offset} "
                       f"({cause}); the file changed after its passage store was built — rebuild the store")


def read_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Streams the passages of a .tsv/.jsonl(.gz) file in row order, validating each record.

    Raises CorpusError naming the line for a bad header, a wrong field count, bad JSON or an empty text.
    Duplicate ids are caught by `PassageStore.build`, which sees all ids at once in numpy.
    """
    for passage, _, _, _ in _records(path):
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
# Random access.


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


def _id_key(pid: str) -> int:
    """64-bit hash of a passage id; the store sorts these so that id -> row needs no Python dict of 21M ids."""
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little")


def _line_of_offset(path, offset: int) -> int:
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


class PassageStore:
    """Random access to the passages of one uncompressed .tsv/.jsonl file, by row and by passage id.

    Backed by arrays saved in `store_dir` (usually the index directory):
      passage_offsets.npy   int64[N+1]  record r is the bytes [offsets[r], offsets[r+1]) of the file
      passage_id_keys.npy   uint64[N]   sorted 64-bit hashes of the ids
      passage_id_rows.npy   int64[N]    row of each sorted key
    Arrays are memory-mapped, so opening the store of a 21M-passage corpus costs no parse and ~0.5 GB of
    address space, not Python objects.
    """

    def __init__(self, passages_path: str | os.PathLike, store_dir: str | os.PathLike):
        """Opens a store written by `PassageStore.build`; refuses it if the passages file has changed since."""
        self.path = os.fspath(passages_path)
        self.store_dir = os.fspath(store_dir)
        meta_path = os.path.join(self.store_dir, _STORE_FILES[0])
        if not os.path.exists(meta_path):
            raise CorpusError(f"{meta_path}: no passage store here; create it with PassageStore.build("
                              f"{self.path!r}, {self.store_dir!r})")
        with open(meta_path) as f:
            self.metadata = json.load(f)
        self.format = corpus_format(self.path)
        if not os.path.exists(self.path):
            raise CorpusError(f"{self.path}: passages file not found (the store in {self.store_dir} was built from "
                              f"{self.metadata.get('passages_path')!r})")
        fingerprint = file_fingerprint(self.path)
        if fingerprint != self.metadata.get("fingerprint"):
            built_from = self.metadata.get("passages_path")
            raise CorpusError(f"{self.path}: the file differs from the one the passage store in {self.store_dir} was "
                              f"built from ({built_from!r}: {self.metadata.get('fingerprint')}, now {fingerprint}); "
                              "rebuild the store (and the index, whose rows follow the file)")
        load = lambda name: np.load(os.path.join(self.store_dir, name), mmap_mode="r")
        self._offsets = load(_STORE_FILES[1])
        self._id_keys = load(_STORE_FILES[2])
        self._id_rows = load(_STORE_FILES[3])
        self._file = None

    @classmethod
    def build(cls, passages_path: str | os.PathLike, store_dir: str | os.PathLike) -> PassageStore:
        """Reads the whole file once (validating every record), saves the offset and id arrays, returns the store.

        Reuses an existing store in `store_dir` for the same, unchanged file. Raises CorpusError for every
        problem `read_passages` reports, for duplicate ids (naming both lines) and for .gz files (no seeking).
        """
        path, store_dir = os.fspath(passages_path), os.fspath(store_dir)
        if path.lower().endswith(".gz"):
            raise CorpusError(f"{path}: random access needs an uncompressed file; run `gunzip -k {path}` and use "
                              f"{path[:-3]}")
        corpus_format(path)
        meta_path = os.path.join(store_dir, _STORE_FILES[0])
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if old.get("version") == _STORE_VERSION and os.path.exists(path) and \
                old.get("fingerprint") == file_fingerprint(path):
                return cls(path, store_dir)
        os.makedirs(store_dir, exist_ok=True)
        # Python ints grow the arrays by doubling, so peak memory stays ~3x 8 bytes per passage.
        offsets, keys = _GrowingArray(np.int64), _GrowingArray(np.uint64)
        end = 0
        for passage, start, end, _ in _records(path):
            offsets.append(start)
            keys.append(_id_key(passage.id))
        if len(offsets) == 0:
            raise CorpusError(f"{path}: no passages in the file")
        if len(offsets) >= 2**31:
            raise CorpusError(f"{path}: {len(offsets)} passages; rows are int32, so at most 2**31-1 are supported")
        offsets.append(end)
        offsets_arr, keys_arr = offsets.array(), keys.array()
        rows = np.argsort(keys_arr, kind="stable")
        sorted_keys = keys_arr[rows]
        _raise_on_duplicate_ids(path, offsets_arr, sorted_keys, rows, cls._read_record_at)
        files.save_npy(os.path.join(store_dir, _STORE_FILES[1]), offsets_arr)
        files.save_npy(os.path.join(store_dir, _STORE_FILES[2]), sorted_keys)
        files.save_npy(os.path.join(store_dir, _STORE_FILES[3]), rows.astype(np.int64))
        files.write_json(meta_path, {
            "version": _STORE_VERSION, "passages_path": os.path.abspath(path), "format": corpus_format(path),
            "num_passages": int(len(keys_arr)), "fingerprint": file_fingerprint(path)})
        return cls(path, store_dir)

    @property
    def num_passages(self) -> int:
        return len(self._offsets) - 1

    def __len__(self) -> int:
        return self.num_passages

    def _fh(self) -> IO[bytes]:
        if self._file is None:
            self._file = open(self.path, "rb")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _read_record_at(path, fmt: str, f: IO[bytes], start: int, end: int) -> Passage:
        # pread, not seek + read: threads share the handle (training reads gold rows ahead while the step's
        # retrieval reads its passages), and a seek by one would move the other's read.
        lines = io.BytesIO(os.pread(f.fileno(), end - start, start))
        try:
            got = [p for p, _, _, _ in _records_from(path, fmt, lines, start, header=False)]
            if len(got) != 1:
                raise CorpusError(f"expected one passage, found {len(got)}")
        except CorpusError as e:
            raise _changed_file_error(path, start, e) from None
        return got[0]

    def __getitem__(self, row: int) -> Passage:
        """The passage at `row` (0-based, in file order)."""
        row = int(row)
        if not 0 <= row < self.num_passages:
            raise IndexError(f"row {row} out of range for {self.path} ({self.num_passages} passages)")
        return self._read_record_at(self.path, self.format, self._fh(), int(self._offsets[row]),
                                    int(self._offsets[row + 1]))

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """Passages for an array of rows of any shape (e.g. retrieved rows_QxK), flattened in C order."""
        return [self[r] for r in np.asarray(rows).reshape(-1)]

    def iter_passages(self, start: int = 0, stop: int | None = None) -> Iterator[Passage]:
        """Streams rows [start, stop) in order with one seek (e.g. to resume an embedding job at `rows_done`)."""
        stop = self.num_passages if stop is None else min(stop, self.num_passages)
        if start >= stop:
            return
        begin, end = int(self._offsets[start]), int(self._offsets[stop])
        with open(self.path, "rb") as f:
            f.seek(begin)
            try:
                for passage, _, _, _ in _records_from(self.path, self.format, _lines_until(f, end - begin), begin,
                                                      header=False):
                    yield passage
            except CorpusError as e:
                raise _changed_file_error(self.path, begin, e) from None

    def row_for_id(self, passage_id: str | int) -> int:
        """Row of the passage with this id (ints are compared as their decimal string, as DPR ids are)."""
        pid = str(passage_id)
        key = np.uint64(_id_key(pid))
        lo = int(np.searchsorted(self._id_keys, key, side="left"))
        hi = int(np.searchsorted(self._id_keys, key, side="right"))
        for i in range(lo, hi):  # More than one only on a 64-bit hash collision.
            row = int(self._id_rows[i])
            if self[row].id == pid:
                return row
        raise UnknownPassageIdError(f"passage id {pid!r} is not in {self.path} ({self.num_passages} passages); "
                                    "check that the gold passage ids come from the same corpus as the index")

    def rows_for_ids(self, passage_ids: Iterable[str | int]) -> np.ndarray:
        """int64 rows for a sequence of passage ids; UnknownPassageIdError naming the first unknown id."""
        return np.asarray([self.row_for_id(p) for p in passage_ids], dtype=np.int64)


def _lines_until(f: IO[bytes], nbytes: int) -> Iterator[bytes]:
    """Yields whole lines of `f` until `nbytes` bytes were read (records end on line boundaries)."""
    while nbytes > 0:
        raw = f.readline(nbytes)
        if not raw:
            return
        nbytes -= len(raw)
        yield raw


class _GrowingArray:
    """An append-only numpy buffer (amortised doubling), so reading 21M records builds no Python list."""

    def __init__(self, dtype):
        self._data = np.empty(1 << 16, dtype)
        self._n = 0

    def append(self, value: int) -> None:
        if self._n == len(self._data):
            self._data = np.resize(self._data, 2 * len(self._data))
        self._data[self._n] = value
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def array(self) -> np.ndarray:
        return self._data[:self._n].copy()


def _raise_on_duplicate_ids(path, offsets, sorted_keys, rows, read_record_at) -> None:
    """Raises CorpusError naming both lines if two rows share an id (equal hashes are re-read to be sure)."""
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(same) == 0:
        return
    fmt = corpus_format(path)
    with open(path, "rb") as f:
        for i in same:
            a, b = sorted((int(rows[i]), int(rows[i + 1])))
            pa = read_record_at(path, fmt, f, int(offsets[a]), int(offsets[a + 1]))
            pb = read_record_at(path, fmt, f, int(offsets[b]), int(offsets[b + 1]))
            if pa.id == pb.id:
                raise CorpusError(f"{path}:{_line_of_offset(path, int(offsets[b]))}: duplicate passage id {pb.id!r} "
                                  f"(first seen on line {_line_of_offset(path, int(offsets[a]))}); ids must be unique "
                                  "so gold passage ids map to one row")
