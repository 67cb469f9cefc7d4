"""Random access to a passage file by row and by passage id, without holding the corpus in Python objects.

Row numbers (0..N-1) are the order of records in the file (rag_jax/retrieval/corpus.py reads and validates them);
the index stores one embedding per row, and the store turns retrieved rows back into passages by reading at byte
offsets, so nothing here keeps the whole corpus (21M passages for DPR's Wikipedia) in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from rag_jax import files
from rag_jax.retrieval import corpus
from rag_jax.retrieval.corpus import CorpusError, Passage, UnknownPassageIdError, corpus_format, file_fingerprint

_STORE_VERSION = 1
_STORE_FILES = ("passage_store.json", "passage_offsets.npy", "passage_id_keys.npy", "passage_id_rows.npy")


def _id_key(pid: str) -> int:
    """64-bit hash of a passage id; the store sorts these so that id -> row needs no Python dict of 21M ids."""
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little")


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
        for passage, start, end, _ in corpus.records_with_offsets(path):
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
            got = [p for p, _, _, _ in corpus.parse_records(path, fmt, lines, start, header=False)]
            if len(got) != 1:
                raise CorpusError(f"expected one passage, found {len(got)}")
        except CorpusError as e:
            raise corpus.changed_file_error(path, start, e) from None
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
                lines = _lines_until(f, end - begin)
                for passage, _, _, _ in corpus.parse_records(self.path, self.format, lines, begin, header=False):
                    yield passage
            except CorpusError as e:
                raise corpus.changed_file_error(self.path, begin, e) from None

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
                line_a, line_b = (corpus.line_of_offset(path, int(offsets[r])) for r in (a, b))
                raise CorpusError(f"{path}:{line_b}: duplicate passage id {pb.id!r} (first seen on line {line_a}); ids "
                                  "must be unique so gold passage ids map to one row")
