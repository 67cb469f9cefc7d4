"""The index directory: passage embeddings in resumable shards, plus metadata tying them to an encoder and corpus.

Layout of `index_dir/`:
  index.json              metadata: encoder_id, dim, dtype, num_passages, shard_size, shards, passages file
                          (path and fingerprint), complete flag, backends (e.g. a ScaNN searcher's parameters)
  embeddings-00000.npy    rows [0, shard_size) of the N x D matrix, then the next shard_size rows, ...
                          (bfloat16 is stored as its uint16 bit pattern, since .npy has no bfloat16)
  passage_*.npy/json      the PassageStore (byte offsets, id lookup) for the passages file
  scann/                  optional serialised ScaNN searcher (see scann_backend.py)

Every file is written to a temporary name and renamed, so a killed embedding job leaves only whole shards and
`IndexWriter` resumes after the last one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from rag_jax.retrieval import corpus

INDEX_VERSION = 1
METADATA_FILE = "index.json"
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# How each dtype is stored in .npy (bfloat16 has no .npy type code, so its bits go in as uint16).
_STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                   "bfloat16": np.dtype(np.uint16)}


class IndexFormatError(ValueError):
  """An index directory cannot be written or loaded as asked; the message names the field and the remedy."""


def shard_file(i: int) -> str:
  return f"embeddings-{i:05d}.npy"


def _read_metadata(index_dir: str) -> dict[str, Any] | None:
  path = os.path.join(index_dir, METADATA_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise IndexFormatError(f"{path}: not valid JSON ({e}); delete the index directory and rebuild it") from None


def write_metadata(index_dir: str, metadata: dict[str, Any]) -> None:
  """Atomically replaces index.json (also used by backends to record themselves under "backends")."""
  corpus._atomic_write_json(os.path.join(index_dir, METADATA_FILE), metadata)


def _shard_rows(num_passages: int, shard_size: int, i: int) -> int:
  return min(shard_size, num_passages - i * shard_size)


def _num_shards(num_passages: int, shard_size: int) -> int:
  return -(-num_passages // shard_size)


class IndexWriter:
  """Appends passage embeddings (in row order) to an index directory, resuming an interrupted run.

  Usage (the embedding job):
    writer = IndexWriter(out_dir, encoder_id, dim, None, shard_size, passages_path, dtype="float16")
    for passages in batches(writer.passages.iter_passages(writer.rows_done)):
      writer.write(encode(passages))         # emb_BxD, any B
    writer.finalize()

  On construction the passage store is built (or reused) in `output_dir`; `rows_done` is the number of rows
  already on disk in whole shards, i.e. where to restart. Rows written since the last whole shard are held in
  memory and lost if the job dies, which costs at most one shard of recomputation.
  """

  def __init__(self, output_dir: str | os.PathLike, encoder_id: str, dim: int, num_passages: int | None,
               shard_size: int, passages_path: str | os.PathLike, dtype: str = "float32"):
    """encoder_id: any string identifying the document encoder (name + checkpoint fingerprint); an index is
    only reused for the same one. num_passages: None takes the count from the passages file, otherwise it must
    agree. dtype: "float32", "float16" or "bfloat16" storage of the embeddings."""
    self.output_dir = os.fspath(output_dir)
    if dtype not in DTYPES:
      raise IndexFormatError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    if dim <= 0 or shard_size <= 0:
      raise IndexFormatError(f"dim ({dim}) and shard_size ({shard_size}) must be positive")
    if not os.path.isfile(passages_path):
      raise IndexFormatError(f"{passages_path}: passages file not found")
    os.makedirs(self.output_dir, exist_ok=True)
    self.dim, self.shard_size, self.dtype = int(dim), int(shard_size), dtype
    self.metadata = {
        "version": INDEX_VERSION, "encoder_id": encoder_id, "dim": self.dim, "dtype": dtype,
        "num_passages": num_passages, "shard_size": self.shard_size,
        "passages_path": os.path.abspath(passages_path),
        "passages_fingerprint": corpus.file_fingerprint(passages_path),
        "complete": False, "shards": [], "backends": {}}
    # Check a previous run's metadata before (re)building the passage store, which would overwrite its own.
    old = _read_metadata(self.output_dir)
    if old is not None:
      self._check_resumable(old, num_passages_known=num_passages is not None)
    self.passages = corpus.PassageStore.build(passages_path, self.output_dir)
    if num_passages is not None and num_passages != self.passages.num_passages:
      raise IndexFormatError(f"num_passages={num_passages} but {passages_path} holds "
                             f"{self.passages.num_passages} passages; pass None to take the file's count")
    self.num_passages = self.metadata["num_passages"] = self.passages.num_passages
    if old is not None:  # Same file (by fingerprint), maybe moved: remember where it is now.
      self.metadata = {**old, "passages_path": self.metadata["passages_path"]}
    write_metadata(self.output_dir, self.metadata)
    self._shards_done = self._count_whole_shards()
    self._buffer: list[np.ndarray] = []
    self._buffered = 0

  def _check_resumable(self, old: dict[str, Any], num_passages_known: bool) -> None:
    where = os.path.join(self.output_dir, METADATA_FILE)
    fields = ["version", "encoder_id", "dim", "dtype", "shard_size", "passages_fingerprint"]
    for field in fields + (["num_passages"] if num_passages_known else []):
      if old.get(field) != self.metadata[field]:
        raise IndexFormatError(
            f"{where}: this directory holds an index with {field}={old.get(field)!r}, but this run has "
            f"{field}={self.metadata[field]!r}; use a fresh output directory (or delete this one) instead of "
            "resuming into it")

  def _count_whole_shards(self) -> int:
    for name in os.listdir(self.output_dir):  # Leftovers of a write that was killed before its rename.
      if name.startswith("embeddings-") and name.endswith(".tmp"):
        os.remove(os.path.join(self.output_dir, name))
    done = 0
    for i in range(_num_shards(self.num_passages, self.shard_size)):
      path = os.path.join(self.output_dir, shard_file(i))
      if not os.path.exists(path):
        break
      arr = np.load(path, mmap_mode="r")
      want = (_shard_rows(self.num_passages, self.shard_size, i), self.dim)
      if arr.shape != want or arr.dtype != _STORAGE_DTYPES[self.dtype]:
        raise IndexFormatError(f"{path}: shape {arr.shape} dtype {arr.dtype}, expected {want} "
                               f"{_STORAGE_DTYPES[self.dtype]}; delete the index directory and rebuild it")
      done += 1
    return done

  @property
  def rows_done(self) -> int:
    """Rows safely on disk (whole shards); the row to restart embedding from."""
    return min(self._shards_done * self.shard_size, self.num_passages)

  def write(self, embeddings_NxD) -> None:
    """Appends the embeddings of the next N rows (numpy or jax array; cast to the index dtype)."""
    emb = np.asarray(embeddings_NxD)
    if emb.ndim != 2 or emb.shape[1] != self.dim:
      raise IndexFormatError(f"write() got embeddings of shape {emb.shape}; expected (N, {self.dim})")
    if self.rows_done + self._buffered + emb.shape[0] > self.num_passages:
      raise IndexFormatError(f"write() would go past num_passages={self.num_passages} (have "
                             f"{self.rows_done + self._buffered} rows, got {emb.shape[0]} more); restart the "
                             "embedding loop at writer.rows_done")
    if not np.all(np.isfinite(emb.astype(np.float32, copy=False))):
      raise IndexFormatError(f"write() got non-finite embeddings in rows starting at "
                             f"{self.rows_done + self._buffered}; check the encoder (NaN weights or overflow)")
    self._buffer.append(emb.astype(DTYPES[self.dtype]))
    self._buffered += emb.shape[0]
    self._flush(final=False)

  def _flush(self, final: bool) -> None:
    while self._buffered > 0:
      need = _shard_rows(self.num_passages, self.shard_size, self._shards_done)
      if self._buffered < need:
        if final:
          raise IndexFormatError(f"finalize(): only {self.rows_done + self._buffered} of {self.num_passages} "
                                 "rows were written; write the rest (from writer.rows_done) before finalize()")
        return
      data = np.concatenate(self._buffer, axis=0) if len(self._buffer) > 1 else self._buffer[0]
      shard, rest = data[:need], data[need:]
      corpus._atomic_save_npy(os.path.join(self.output_dir, shard_file(self._shards_done)),
                              shard.view(_STORAGE_DTYPES[self.dtype]))
      self._shards_done += 1
      self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

  def finalize(self) -> str:
    """Writes the last partial shard and marks index.json complete; returns the index directory."""
    self._flush(final=True)
    if self.rows_done != self.num_passages:
      raise IndexFormatError(f"finalize(): only {self.rows_done} of {self.num_passages} rows were written; "
                             "write the rest (from writer.rows_done) before finalize()")
    self.metadata["shards"] = [
        {"file": shard_file(i), "start": i * self.shard_size,
         "rows": _shard_rows(self.num_passages, self.shard_size, i)}
        for i in range(_num_shards(self.num_passages, self.shard_size))]
    self.metadata["complete"] = True
    write_metadata(self.output_dir, self.metadata)
    return self.output_dir


@dataclasses.dataclass
class Index:
  """A loaded index directory. `shards` are read-only memmaps in the stored dtype (bfloat16 as ml_dtypes)."""
  index_dir: str
  metadata: dict[str, Any]
  shards: list[np.ndarray]
  passages: corpus.PassageStore

  @property
  def num_passages(self) -> int:
    return int(self.metadata["num_passages"])

  @property
  def dim(self) -> int:
    return int(self.metadata["dim"])

  @property
  def encoder_id(self) -> str:
    return self.metadata["encoder_id"]

  def read_rows(self, start: int, stop: int, dtype=None) -> np.ndarray:
    """Rows [start, stop) of the N x D embeddings as one in-memory array (optionally cast to `dtype`)."""
    if not 0 <= start <= stop <= self.num_passages:
      raise IndexError(f"rows [{start}, {stop}) out of range for an index of {self.num_passages} passages")
    size = int(self.metadata["shard_size"])
    parts = []
    for i in range(start // size, -(-stop // size)):
      lo, hi = max(start, i * size) - i * size, min(stop, (i + 1) * size) - i * size
      parts.append(self.shards[i][lo:hi])
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, self.dim), DTYPES[self.metadata["dtype"]])
    return out if dtype is None else out.astype(dtype)

  def embeddings(self, dtype=None) -> np.ndarray:
    """The whole N x D matrix in memory (for exact search or building ScaNN on one host)."""
    return self.read_rows(0, self.num_passages, dtype)


def load_index(index_dir: str | os.PathLike, expected_encoder: str | None = None, expected_dim: int | None = None,
               passages_path: str | os.PathLike | None = None) -> Index:
  """Opens a complete index directory, refusing one built for another encoder/dim or with missing shards.

  passages_path: where the passages file lives now, if it moved since the index was built (its fingerprint
  must match the one recorded).
  """
  index_dir = os.fspath(index_dir)
  where = os.path.join(index_dir, METADATA_FILE)
  meta = _read_metadata(index_dir)
  if meta is None:
    raise IndexFormatError(f"{where} not found: {index_dir} is not an index directory; build one with "
                           "experiments/build_index")
  if meta.get("version") != INDEX_VERSION:
    raise IndexFormatError(f"{where}: version={meta.get('version')!r}, this code reads {INDEX_VERSION}; rebuild "
                           "the index")
  if expected_encoder is not None and meta["encoder_id"] != expected_encoder:
    raise IndexFormatError(f"{where}: encoder_id={meta['encoder_id']!r} but the model's document encoder is "
                           f"{expected_encoder!r}; rebuild the index with this encoder or point at the right "
                           "index directory")
  if expected_dim is not None and meta["dim"] != expected_dim:
    raise IndexFormatError(f"{where}: dim={meta['dim']} but the question encoder gives {expected_dim}-d vectors; "
                           "rebuild the index with the matching encoder")
  if not meta.get("complete"):
    writer_rows = sum(1 for name in os.listdir(index_dir) if name.startswith("embeddings-")
                      and name.endswith(".npy")) * meta["shard_size"]
    raise IndexFormatError(f"{where}: complete=false (about {min(writer_rows, meta['num_passages'])} of "
                           f"{meta['num_passages']} rows written); rerun build_index on this directory to resume")
  storage, dtype = _STORAGE_DTYPES[meta["dtype"]], DTYPES[meta["dtype"]]
  shards, next_row = [], 0
  for entry in meta["shards"]:
    path = os.path.join(index_dir, entry["file"])
    if not os.path.exists(path):
      raise IndexFormatError(f"{where}: shard {entry['file']} is missing; restore it or rebuild the index")
    arr = np.load(path, mmap_mode="r")
    if arr.shape != (entry["rows"], meta["dim"]) or arr.dtype != storage or entry["start"] != next_row:
      raise IndexFormatError(f"{path}: shape {arr.shape} dtype {arr.dtype} start {entry['start']}, expected "
                             f"({entry['rows']}, {meta['dim']}) {storage} start {next_row}; rebuild the index")
    shards.append(arr.view(dtype))
    next_row += entry["rows"]
  if next_row != meta["num_passages"]:
    raise IndexFormatError(f"{where}: shards hold {next_row} rows but num_passages={meta['num_passages']}; "
                           "rebuild the index")
  path = meta["passages_path"] if passages_path is None else os.fspath(passages_path)
  try:
    store = corpus.PassageStore(path, index_dir)
  except corpus.CorpusError as e:
    raise IndexFormatError(f"{where}: passages file: {e}; pass passages_path= if the file moved") from None
  if store.metadata["fingerprint"] != meta["passages_fingerprint"] or store.num_passages != meta["num_passages"]:
    raise IndexFormatError(f"{where}: the passage store in {index_dir} ({store.num_passages} passages) does not "
                           f"match num_passages={meta['num_passages']}/passages_fingerprint; rebuild the index")
  return Index(index_dir, meta, shards, store)
